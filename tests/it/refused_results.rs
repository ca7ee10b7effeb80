//! Results the broker refuses (nack): a results queue that is full with
//! `x-overflow = reject-publish` (what a quorum queue without a majority also does).
//! The worker retries a refused publish for `amqp.operation_timeout_ms`, then drops
//! its connection so that the jobs it holds go back to the queue, reconnects, and
//! never sends a job to Jelou twice for it. One warning per episode, not per retry.

use std::{collections::HashMap, time::Duration};

use crate::utils::*;
use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    options::*,
    types::{AMQPValue, FieldTable},
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
/// `amqp.operation_timeout_ms` in this test: how long refusals are retried.
const BOUND: Duration = Duration::from_secs(3);
const JOBS: usize = 12;
const PREFETCH: u16 = 8;
/// `x-max-length` of the results queue: room for a prefetch of results once drained,
/// so that the drained queue refuses nothing more.
const MAX_LENGTH: i64 = 10;

/// The worker's JSON log lines at `level` whose message starts with `message`.
fn log_lines(log: &str, level: &str, message: &str) -> usize {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["level"] == level && l["message"].as_str().unwrap_or("").starts_with(message))
        .count()
}

const REFUSED_WARNING: &str = "the broker refuses publishes (nack)";
const GAVE_UP: &str = "gave up on refused publishes";
const ENDED: &str = "the broker takes publishes again";
const RECONNECTING: &str = "lost the broker; reconnecting";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_results_hand_the_jobs_back_and_are_sent_once() {
    let mut env = TestEnv::new("refused").await;
    // Eight results in flight at once: eight independent jobs (order off).
    env.settings.order.enabled = false;
    env.settings.amqp.operation_timeout_ms = BOUND.as_millis() as u64;
    env.settings.amqp.prefetch = PREFETCH;
    env.declare().await;
    let exchange = env.settings.amqp.result_exchange.clone();
    // Results go only to a small quorum queue that refuses publishes when full (the
    // test's usual collecting queue would take copies of every refused result).
    env.channel
        .queue_unbind(
            env.results_queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let full = format!("{}.full", env.name);
    env.extra_queues.push(full.clone());
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(MAX_LENGTH));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    env.channel
        .queue_declare(full.as_str().into(), QueueDeclareOptions::durable(), args)
        .await
        .unwrap();
    env.channel
        .queue_bind(
            full.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Fill it until the broker refuses a publish through the result exchange.
    let filler = env.conn.create_channel().await.unwrap();
    filler
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut accepted = 0;
    loop {
        let confirm = filler
            .basic_publish(
                exchange.as_str().into(),
                "filler".into(),
                BasicPublishOptions::default(),
                b"filler",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        if confirm.is_nack() {
            break;
        }
        accepted += 1;
        assert!(
            accepted <= 2 * MAX_LENGTH,
            "the full queue never refused a publish"
        );
    }
    let _ = filler.close(200, "done".into()).await;

    let jobs: Vec<String> = (0..JOBS).map(|i| format!("refused-{i}")).collect();
    for id in &jobs {
        let mut job = text_job(id, "B");
        // The text names the job, so Jelou's requests can be told apart.
        job["message"]["text"] = Value::String(id.clone());
        env.publish(&job).await;
    }
    let sends = |env: &TestEnv| {
        let mut by_job: HashMap<String, usize> = HashMap::new();
        for s in env.jelou.seen() {
            if let Some(text) = s.json()["text"].as_str() {
                *by_job.entry(text.to_string()).or_default() += 1;
            }
        }
        by_job
    };

    let mut daemon = Daemon::start(&env.settings).await;
    let jobs_queue = env.settings.amqp.jobs_queue.clone();
    // A full prefetch of jobs is sent, and their results refused.
    assert!(env.jelou.wait_for(PREFETCH.into(), WAIT).await);
    let first_send = env.jelou.seen()[0].at;
    // Refused for the bound: the worker drops its connection, and reconnects.
    eventually("a reconnection", WAIT, || async {
        daemon.metric("jelou_worker_broker_connects_total").await >= Some(2.0)
    })
    .await;
    let dropped_after = first_send.elapsed();
    assert!(
        dropped_after >= BOUND,
        "gave up after {dropped_after:?}, before the bound of {BOUND:?}"
    );
    assert!(
        dropped_after < BOUND + Duration::from_secs(2),
        "reconnected only {dropped_after:?} after the first refusal (bound {BOUND:?})"
    );
    assert!(
        daemon
            .metric("jelou_worker_publishes_refused_total")
            .await
            .unwrap()
            >= f64::from(PREFETCH),
        "every held result was refused at least once"
    );
    // The jobs went back to the queue; the redelivered ones are completed from what the
    // worker knows, not sent again; their results are refused again, and so on.
    eventually("a second episode given up", WAIT, || async {
        daemon.metric("jelou_worker_broker_connects_total").await >= Some(3.0)
    })
    .await;
    let sent = sends(&env);
    assert!(
        sent.values().all(|n| *n == 1),
        "a job was sent twice: {sent:?}"
    );
    assert!(
        (usize::from(PREFETCH)..=JOBS).contains(&sent.len()),
        "{sent:?}"
    );

    // Drain the queue while the third session's publishes are being refused: that
    // episode ends with publishes confirmed.
    let refused = daemon
        .metric("jelou_worker_publishes_refused_total")
        .await
        .unwrap();
    eventually("a refusal in the third session", WAIT, || async {
        daemon.metric("jelou_worker_publishes_refused_total").await > Some(refused)
    })
    .await;
    let reader = env.conn.create_channel().await.unwrap();
    let mut consumer = reader
        .basic_consume(
            full.as_str().into(),
            "drain".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut results: HashMap<String, Vec<Value>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while results.len() < JOBS {
        let next = tokio::time::timeout_at(deadline, consumer.next()).await;
        let delivery = match next {
            Ok(Some(Ok(d))) => d,
            other => panic!(
                "{} of {JOBS} results once the queue was drained ({other:?}); log:\n{}",
                results.len(),
                daemon.log_text()
            ),
        };
        if delivery.data != b"filler" {
            let r: Value = serde_json::from_slice(&delivery.data).unwrap();
            let id = r["jobId"].as_str().unwrap().to_string();
            results.entry(id).or_default().push(r);
        }
    }
    let refused_total = daemon
        .metric("jelou_worker_publishes_refused_total")
        .await
        .unwrap();
    daemon.signal("TERM");
    assert_eq!(daemon.exit_code(WAIT).await, Some(0));
    // Whatever else was delivered before the cancel is read too.
    reader
        .basic_cancel("drain".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    while let Some(Ok(delivery)) = consumer.next().await {
        let r: Value = serde_json::from_slice(&delivery.data).unwrap();
        let id = r["jobId"].as_str().unwrap().to_string();
        results.entry(id).or_default().push(r);
    }
    for r in env.drain(&full).await {
        let r = r.json();
        let id = r["jobId"].as_str().unwrap().to_string();
        results.entry(id).or_default().push(r);
    }

    // No consumer is left: every message of the queue is ready, and counted here.
    assert_eq!(
        env.message_count(&jobs_queue).await,
        0,
        "every job was acked"
    );
    for id in &jobs {
        let got = &results[id];
        assert_eq!(got.len(), 1, "{id}: {got:?}");
        assert_eq!(got[0]["status"], "success", "{id}: {:?}", got[0]);
    }
    let sent = sends(&env);
    assert_eq!(sent.len(), JOBS, "{sent:?}");
    assert!(
        sent.values().all(|n| *n == 1),
        "a job was sent twice: {sent:?}"
    );

    // One warning per episode; each episode given up (a reconnection) or ended.
    let log = daemon.log_text();
    let warnings = log_lines(&log, "WARN", REFUSED_WARNING);
    let gave_up = log_lines(&log, "INFO", GAVE_UP);
    let ended = log_lines(&log, "INFO", ENDED);
    let reconnects = log_lines(&log, "WARN", RECONNECTING);
    assert!(gave_up >= 2, "{gave_up} episodes given up; log:\n{log}");
    assert_eq!(ended, 1, "the last episode ended; log:\n{log}");
    assert_eq!(warnings, gave_up + ended, "log:\n{log}");
    assert_eq!(reconnects, gave_up, "log:\n{log}");
    let other_warnings: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains(r#""level":"WARN""#)
                && !l.contains(REFUSED_WARNING)
                && !l.contains(RECONNECTING)
        })
        .collect();
    assert!(other_warnings.is_empty(), "{other_warnings:#?}");
    // Many refusals behind those few lines: the metric counts them all.
    let refusals: u64 = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| {
            let m = l["message"].as_str().unwrap_or("");
            m.starts_with(GAVE_UP) || m.starts_with(ENDED)
        })
        .map(|l| l["refusals"].as_u64().unwrap())
        .sum();
    assert!(
        refusals >= 2 * u64::from(PREFETCH),
        "{refusals} refusals reported in {warnings} episodes; log:\n{log}"
    );
    assert!(
        refused_total >= refusals as f64,
        "{refused_total} < {refusals}"
    );
}
