//! `jelou-worker check`: is this configuration ready to run? Checks the configuration,
//! the broker, the topology and Jelou's reachability and credentials, and sends no
//! message.
//!
//! Jelou is asked with an empty JSON object posted to `/v1/bots/{bot}/messages`: it
//! has no `type` and no `userId`, so Jelou must refuse it as a message. A 401/403
//! means the credentials are refused; 5xx or no answer means Jelou is unreachable;
//! any other answer means both reachable and authenticated.

use std::time::Duration;

use lapin::{Connection, options::QueueDeclareOptions};

use crate::{
    broker::{self, BrokerError, Topology, bounded},
    config::Settings,
    jelou::{JelouClient, Probe},
};

/// One line of the verdict.
#[derive(Debug, Clone)]
pub struct Finding {
    pub(crate) ok: bool,
    pub(crate) what: &'static str,
    pub(crate) detail: String,
}

/// Runs every check; never stops at the first problem, so the operator sees all.
pub async fn run(settings: &Settings, bot: &str) -> Vec<Finding> {
    let mut findings = vec![Finding {
        ok: true,
        what: "configuration",
        detail: format!(
            "valid (broker {}, Jelou {})",
            settings.amqp.url, settings.jelou.base_url
        ),
    }];
    let amqp = &settings.amqp;
    match broker::connect(amqp, "jelou-worker check").await {
        Ok(connected) => {
            findings.push(Finding {
                ok: true,
                what: "broker",
                detail: format!("connected to {}", connected.node),
            });
            findings.push(check_topology(settings, &connected.connection).await);
            let _ = connected.connection.close(200, "checked".into()).await;
        }
        Err(e) => findings.push(Finding {
            ok: false,
            what: "broker",
            detail: e.to_string(),
        }),
    }
    findings.push(match JelouClient::new(&settings.jelou, 1) {
        Err(e) => Finding {
            ok: false,
            what: "jelou",
            detail: e.to_string(),
        },
        Ok(client) => match client.probe(bot).await {
            Probe::Healthy(answer) => Finding {
                ok: true,
                what: "jelou",
                detail: format!(
                    "reachable and the credentials are accepted ({answer}; no message was sent)"
                ),
            },
            Probe::BadCredentials(answer) => Finding {
                ok: false,
                what: "jelou",
                detail: format!(
                    "credentials refused ({answer}): check jelou.client_id and jelou.client_secret"
                ),
            },
            Probe::Unreachable(answer) => Finding {
                ok: false,
                what: "jelou",
                detail: format!("unreachable at {}: {answer}", settings.jelou.base_url),
            },
        },
    });
    findings
}

/// Checks that everything exists and, for what exists, that it was declared with the
/// arguments this configuration uses (a re-declaration with the same arguments changes
/// nothing; with other ones the broker refuses it, which is what we want to know).
async fn check_topology(settings: &Settings, conn: &Connection) -> Finding {
    let amqp = &settings.amqp;
    let timeout = amqp.operation_timeout();
    let topology = Topology::for_settings(settings);
    if let Some(finding) = check_presence(&topology, conn, timeout, amqp.declare_topology).await {
        return finding;
    }
    if let Some(finding) = check_queue_arguments(&topology, conn, timeout).await {
        return finding;
    }
    Finding {
        ok: true,
        what: "topology",
        detail: format!(
            "queues and exchanges present, with this configuration's arguments ({})",
            amqp.jobs_queue
        ),
    }
}

/// Whether every queue and exchange exists: `None` if so, else the finding (fine
/// when `run` will declare what is missing, `declares` being amqp.declare_topology).
async fn check_presence(
    topology: &Topology,
    conn: &Connection,
    timeout: Duration,
    declares: bool,
) -> Option<Finding> {
    match topology.verify(conn, timeout).await {
        Ok(()) => None,
        Err(BrokerError::Missing { what, .. }) if declares => Some(Finding {
            ok: true,
            what: "topology",
            detail: format!(
                "missing {what}: `run` will declare it (amqp.declare_topology is true)"
            ),
        }),
        Err(e) => Some(Finding {
            ok: false,
            what: "topology",
            detail: e.to_string(),
        }),
    }
}

/// Re-declares the jobs and dead-letter queues with this configuration's arguments:
/// `None` if the broker accepts both, else the finding naming the key to change.
async fn check_queue_arguments(
    topology: &Topology,
    conn: &Connection,
    timeout: Duration,
) -> Option<Finding> {
    let queues = [
        (
            topology.jobs_queue.clone(),
            topology.jobs_queue_args(),
            "amqp.queue_type / amqp.dead_letter_exchange",
        ),
        (
            topology.dead_letter_queue.clone(),
            topology.dead_letter_queue_args(),
            "amqp.queue_type",
        ),
    ];
    for (name, args, key) in queues {
        let result = async {
            let ch = bounded(timeout, "channel.open", conn.create_channel()).await?;
            bounded(
                timeout,
                "queue.declare",
                ch.queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), args),
            )
            .await
        }
        .await;
        if let Err(e) = result {
            return Some(Finding {
                ok: false,
                what: "topology",
                detail: format!(
                    "queue `{name}` exists with other arguments ({e}); change {key} to match it"
                ),
            });
        }
    }
    None
}

/// Prints the findings; true when all are fine.
pub fn print(findings: &[Finding]) -> bool {
    for f in findings {
        println!(
            "{} {:<13} {}",
            if f.ok { "ok  " } else { "FAIL" },
            f.what,
            f.detail
        );
    }
    let ok = findings.iter().all(|f| f.ok);
    println!(
        "{}",
        if ok {
            "ready to run"
        } else {
            "not ready: fix the FAIL lines above"
        }
    );
    ok
}
