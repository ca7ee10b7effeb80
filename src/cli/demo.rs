//! `jelou-worker demo`: the whole system on one machine, without Jelou credentials.
//!
//! It starts a stand-in Jelou on loopback, runs the real worker against the configured
//! broker (`amqp.url`) on queues and exchanges of its own (`jelou-demo-<id>.*`, so it
//! never touches real traffic), enqueues sample jobs of several message types and a
//! template (HSM) job (some succeed, some need retries, some fail, one is refused by
//! Jelou's rules before it is sent), prints each result as it arrives and a
//! summary, then removes everything it declared. It exits 0 when every job ended as
//! expected.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    options::{
        BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::FieldTable,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{
    broker::{self, Published, Publisher, Topology, bounded},
    config::Settings,
    stand_in::{Reply, StandIn},
    worker,
};

/// How long the demo waits for all results before giving up.
const DEMO_TIMEOUT: Duration = Duration::from_secs(60);

/// A sample job and the outcome it should have.
struct Sample {
    job: Value,
    /// What the stand-in does with it, for the printout.
    story: &'static str,
    /// `success`, or the failure kind.
    expect: &'static str,
}

fn samples() -> Vec<Sample> {
    let past = "2020-01-01T00:00:00Z";
    let sample = |id: &str, user: &str, message: Value, story, expect| {
        let mut message = message;
        message["userId"] = json!(user);
        Sample {
            job: json!({"jobId": id, "botId": "demo-bot", "message": message}),
            story,
            expect,
        }
    };
    let mut expired = sample(
        "demo-expired",
        "593000000010",
        json!({"type": "text", "text": "Too late"}),
        "its deadline has passed",
        "expired",
    );
    expired.job["deadline"] = json!(past);
    vec![
        sample(
            "demo-text",
            "593000000001",
            json!({"type": "text", "text": "Hola 👋"}),
            "accepted",
            "success",
        ),
        sample(
            "demo-image",
            "593000000002",
            json!({"type": "image", "mediaUrl": "https://example.com/menu.png", "text": "Our menu"}),
            "accepted",
            "success",
        ),
        sample(
            "demo-quick-reply",
            "593000000003",
            json!({"type": "quick_reply", "text": "Confirm?", "quick_replies": [{"title": "Yes"}, {"title": "No"}]}),
            "accepted",
            "success",
        ),
        sample(
            "demo-location",
            "593000000004",
            json!({"type": "location", "coordinates": {"lat": -2.1894, "long": -79.8891}, "name": "Guayaquil"}),
            "accepted",
            "success",
        ),
        sample(
            "demo-carousel",
            "593000000005",
            json!({"type": "CAROUSEL", "text": "Our plans", "parameters": {"cards": [{
                "card_index": 0, "type": "cta_url",
                "header": {"type": "image", "image": {"link": "https://example.com/plan-a.png"}},
                "body": {"text": "Plan A"},
                "action": {"name": "cta_url", "parameters": {"display_text": "Buy", "url": "https://example.com/a"}}
            }]}}),
            "accepted",
            "success",
        ),
        sample(
            "demo-flaky",
            "593000000006",
            json!({"type": "text", "text": "Jelou fails twice, then accepts"}),
            "503 twice, then accepted",
            "success",
        ),
        sample(
            "demo-throttled",
            "593000000007",
            json!({"type": "text", "text": "Rate limited once"}),
            "429 with Retry-After: 1, then accepted",
            "success",
        ),
        sample(
            "demo-rejected",
            "593000000008",
            json!({"type": "text", "text": "Not a WhatsApp number"}),
            "400: userId is not a WhatsApp number",
            "rejected",
        ),
        Sample {
            job: json!({"jobId": "demo-invalid", "botId": "demo-bot", "message": {"type": "text", "text": "no userId"}}),
            story: "a producer forgot message.userId",
            expect: "invalid_job",
        },
        sample(
            "demo-four-buttons",
            "593000000011",
            json!({"type": "quick_reply", "text": "Rate us", "quick_replies": [
                {"title": "1"}, {"title": "2"}, {"title": "3"}, {"title": "4"}]}),
            "breaks Jelou's rule of at most 3 quick replies: refused, never sent",
            "invalid_job",
        ),
        Sample {
            job: json!({"jobId": "demo-template", "botId": "demo-bot", "userId": "593000000012",
                        "template": {"elementName": "order_shipped", "language": "es",
                                     "parameters": ["Ana", "#42"]}}),
            story: "a template (HSM), sent outside the 24-hour window",
            expect: "success",
        },
        expired,
    ]
}

/// How the stand-in treats each sample, keyed by userId.
fn stand_in_behaviour(jelou: &StandIn) {
    let tries: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    jelou.set_handler(move |seen, _| {
        let user = seen.recipient();
        let n = {
            let mut tries = tries.lock().expect("not poisoned");
            let n = tries.entry(user.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let reply = match (user.as_str(), n) {
            ("593000000006", 1 | 2) => Reply::json(503, json!({"message": "temporarily unavailable"})),
            ("593000000007", 1) => Reply::json(429, json!({"message": "slow down"})).with_header("retry-after", "1"),
            ("593000000008", _) => Reply::json(
                400,
                json!({"message": "userId is not a WhatsApp number", "error": {"code": "INVALID_USER"}}),
            ),
            _ => Reply::Success,
        };
        reply.after(Duration::from_millis(40))
    });
}

/// Runs the demo; Ok(true) when every job ended as expected.
pub async fn run(settings: Settings) -> anyhow::Result<bool> {
    let jelou = StandIn::start()
        .await
        .context("cannot start the stand-in Jelou")?;
    stand_in_behaviour(&jelou);
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let prefix = format!("jelou-demo-{id}");
    let settings = demo_settings(settings, &prefix, &jelou);
    print_header(&settings, &prefix, &jelou);

    let amqp = &settings.amqp;
    let timeout = amqp.operation_timeout();
    let conn = broker::connect(amqp, "jelou-worker demo").await?.connection;
    let topology = Topology::for_settings(&settings);
    topology.declare(&conn, timeout).await?;
    // A queue that receives every result, so the demo can print them.
    let results_queue = format!("{prefix}.results.all");
    declare_results_queue(&conn, &results_queue, &amqp.result_exchange, timeout).await?;

    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(worker::run(settings.clone(), shutdown.clone()));
    let samples = samples();
    enqueue(&conn, &amqp.jobs_queue, &samples, timeout).await?;
    let outcome = collect(&conn, &results_queue, &samples).await;
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(15), worker).await;
    cleanup(&conn, &topology, &settings, &results_queue).await;
    let _ = conn.close(200, "demo done".into()).await;
    if let Ok(Ok(Err(e))) = stopped {
        return Err(e.context("the worker failed"));
    }
    let all_as_expected = outcome?;
    println!(
        "\nJelou received {} requests. {}",
        jelou.count(),
        if all_as_expected {
            "Every job ended as expected."
        } else {
            "Some jobs did NOT end as expected (see above)."
        }
    );
    Ok(all_as_expected)
}

/// The configuration of the demo's worker: the broker of `settings`, names of its own
/// under `prefix`, the stand-in as Jelou, short retries.
fn demo_settings(mut settings: Settings, prefix: &str, jelou: &StandIn) -> Settings {
    settings.amqp = settings.amqp.namespaced(prefix);
    settings.amqp.declare_topology = true;
    settings.jelou.base_url = jelou.base_url();
    settings.jelou.client_id = Some("demo-client".into());
    settings.jelou.client_secret = Some("demo-secret".into());
    settings.retry.initial_interval_ms = 200;
    settings.retry.max_interval_ms = 2_000;
    settings.retry.max_attempts = 5;
    settings.retry.max_elapsed_ms = 30_000;
    settings.server.listen = "127.0.0.1:0".parse().expect("valid");
    settings.shutdown.grace_period_ms = 5_000;
    settings
}

fn print_header(settings: &Settings, prefix: &str, jelou: &StandIn) {
    println!("jelou-worker demo");
    println!("  stand-in Jelou  {}", jelou.base_url());
    println!("  broker          {}", settings.amqp.url);
    println!("  queues          {prefix}.* (removed at the end)\n");
}

/// Declares `queue` bound to `exchange` with `#`: it receives every result.
async fn declare_results_queue(
    conn: &lapin::Connection,
    queue: &str,
    exchange: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let ch = bounded(timeout, "channel.open", conn.create_channel()).await?;
    bounded(
        timeout,
        "queue.declare",
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    bounded(
        timeout,
        "queue.bind",
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// Publishes the samples to `jobs_queue` (confirmed), printing each.
async fn enqueue(
    conn: &lapin::Connection,
    jobs_queue: &str,
    samples: &[Sample],
    timeout: Duration,
) -> anyhow::Result<()> {
    let publisher = Publisher::open(conn, timeout).await?;
    for s in samples {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64);
        match publisher
            .publish("", jobs_queue, s.job.to_string().as_bytes(), props)
            .await?
        {
            Published::Routed => println!(
                "→ enqueued {:<17} {}",
                s.job["jobId"].as_str().unwrap_or(""),
                s.story
            ),
            Published::Unroutable => anyhow::bail!("the demo's jobs queue vanished"),
        }
    }
    println!();
    publisher.close().await;
    Ok(())
}

/// Prints results as they arrive, then a summary; true when all are as expected.
async fn collect(
    conn: &lapin::Connection,
    queue: &str,
    samples: &[Sample],
) -> anyhow::Result<bool> {
    let ch = conn.create_channel().await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "jelou-demo".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let expected: HashMap<&str, &str> = samples
        .iter()
        .map(|s| (s.job["jobId"].as_str().unwrap_or(""), s.expect))
        .collect();
    let mut got: HashMap<String, String> = HashMap::new();
    let deadline = tokio::time::Instant::now() + DEMO_TIMEOUT;
    while got.len() < samples.len() {
        let delivery = match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(other) => anyhow::bail!("the results consumer ended: {other:?}"),
            Err(_) => {
                println!(
                    "! only {} of {} results within {DEMO_TIMEOUT:?}",
                    got.len(),
                    samples.len()
                );
                break;
            }
        };
        let r: Value =
            serde_json::from_slice(&delivery.data).context("a result that is not JSON")?;
        let (job_id, label) = print_result(&r, &expected);
        got.insert(job_id, label);
    }
    let _ = ch.close(200, "done".into()).await;
    print_summary(&got);
    Ok(expected
        .iter()
        .all(|(id, want)| got.get(*id).map(String::as_str) == Some(*want)))
}

/// Prints one result, marked ✓ when it is the expected one; its (jobId, outcome).
fn print_result(r: &Value, expected: &HashMap<&str, &str>) -> (String, String) {
    let job_id = r["jobId"].as_str().unwrap_or("?").to_string();
    let attempts = r["attempts"].as_u64().unwrap_or(0);
    let label = if r["status"] == "success" {
        "success".to_string()
    } else {
        r["error"]["kind"].as_str().unwrap_or("?").to_string()
    };
    let mark = if expected.get(job_id.as_str()) == Some(&label.as_str()) {
        "✓"
    } else {
        "✗"
    };
    if r["status"] == "success" {
        println!(
            "{mark} {job_id:<17} success  messageId {} after {attempts} attempt(s)",
            r["messageId"].as_str().unwrap_or("?")
        );
    } else {
        println!(
            "{mark} {job_id:<17} failure  {label}: {} ({attempts} attempt(s))",
            r["error"]["message"].as_str().unwrap_or("")
        );
    }
    (job_id, label)
}

/// How many jobs ended each way.
fn print_summary(got: &HashMap<String, String>) {
    println!("\nSummary");
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for label in got.values() {
        *counts.entry(label.as_str()).or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort();
    for (label, n) in counts {
        println!("  {label:<18} {n}");
    }
}

async fn cleanup(
    conn: &lapin::Connection,
    topology: &Topology,
    settings: &Settings,
    results_queue: &str,
) {
    let mut queues = topology.queue_names();
    queues.push(results_queue.to_string());
    for q in queues {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    for x in [
        &settings.amqp.result_exchange,
        &settings.amqp.dead_letter_exchange,
    ] {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}
