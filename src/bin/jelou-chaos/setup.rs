//! The run's world on the broker: the workers' settings (and the environment that
//! gives them to a child process), the topology, the collecting queue, the cleanup.

use std::time::Duration;

use anyhow::Context;
use jelou_worker::{
    broker::Topology,
    config::{AmqpUrls, QueueType, Settings},
};
use lapin::{Connection, ExchangeKind, options::*, types::FieldTable};

/// A short request timeout: the stand-in's slow answers are timeouts.
pub(crate) const REQUEST_TIMEOUT_MS: u64 = 2_000;

/// The fleet's settings: names of its own under `prefix`, the stand-in Jelou, retries
/// that outlast a 30 s outage.
pub(crate) fn settings(
    prefix: &str,
    amqp_url: &str,
    queue_type: QueueType,
    jelou: &str,
) -> anyhow::Result<Settings> {
    let mut s = Settings::default();
    s.amqp = s.amqp.namespaced(prefix);
    s.amqp.queue_type = queue_type;
    s.amqp.url = AmqpUrls::parse(amqp_url).map_err(|e| anyhow::anyhow!("--amqp-url: {e}"))?;
    s.amqp.prefetch = 32;
    s.amqp.operation_timeout_ms = 5_000;
    s.amqp.heartbeat_secs = 5;
    s.jelou.base_url = jelou.to_string();
    s.jelou.client_id = Some("chaos".into());
    s.jelou.client_secret = Some("chaos-secret".into());
    s.jelou.request_timeout_ms = REQUEST_TIMEOUT_MS;
    s.retry.initial_interval_ms = 200;
    s.retry.max_interval_ms = 5_000;
    s.retry.max_attempts = 60;
    s.retry.max_elapsed_ms = 300_000;
    s.retry.park_threshold_ms = 5_000;
    s.order.partitions = 8;
    s.shutdown.grace_period_ms = 10_000;
    Ok(s)
}

/// The environment that configures a `jelou-worker` child process like `s`.
pub(crate) fn env_for(s: &Settings) -> Vec<(String, String)> {
    let (a, j, r, o) = (&s.amqp, &s.jelou, &s.retry, &s.order);
    let url = a.url.expose().collect::<Vec<_>>().join(",");
    let secret = "chaos-secret".to_string();
    let env: Vec<(&str, String)> = vec![
        ("AMQP__URL", url),
        ("AMQP__JOBS_QUEUE", a.jobs_queue.clone()),
        ("AMQP__QUEUE_TYPE", a.queue_type.as_str().into()),
        ("AMQP__RESULT_EXCHANGE", a.result_exchange.clone()),
        ("AMQP__DEAD_LETTER_EXCHANGE", a.dead_letter_exchange.clone()),
        ("AMQP__DEAD_LETTER_QUEUE", a.dead_letter_queue.clone()),
        ("AMQP__PREFETCH", a.prefetch.to_string()),
        ("AMQP__MAX_DELIVERIES", a.max_deliveries.to_string()),
        (
            "AMQP__OPERATION_TIMEOUT_MS",
            a.operation_timeout_ms.to_string(),
        ),
        ("AMQP__HEARTBEAT_SECS", a.heartbeat_secs.to_string()),
        ("JELOU__BASE_URL", j.base_url.clone()),
        ("JELOU__CLIENT_ID", "chaos".into()),
        ("JELOU__CLIENT_SECRET", secret),
        (
            "JELOU__REQUEST_TIMEOUT_MS",
            j.request_timeout_ms.to_string(),
        ),
        (
            "RETRY__INITIAL_INTERVAL_MS",
            r.initial_interval_ms.to_string(),
        ),
        ("RETRY__MAX_INTERVAL_MS", r.max_interval_ms.to_string()),
        ("RETRY__MAX_ATTEMPTS", r.max_attempts.to_string()),
        ("RETRY__MAX_ELAPSED_MS", r.max_elapsed_ms.to_string()),
        ("RETRY__PARK_THRESHOLD_MS", r.park_threshold_ms.to_string()),
        ("ORDER__ENABLED", o.enabled.to_string()),
        ("ORDER__PARTITIONS", o.partitions.to_string()),
        (
            "SHUTDOWN__GRACE_PERIOD_MS",
            s.shutdown.grace_period_ms.to_string(),
        ),
        ("LOG__FORMAT", "json".into()),
    ];
    env.into_iter()
        .map(|(k, v)| (format!("JELOU_WORKER__{k}"), v))
        .collect()
}

/// The queue that receives a copy of every result.
pub(crate) fn results_queue(s: &Settings) -> String {
    format!("{}.collected", s.amqp.jobs_queue)
}

/// Declares the worker's topology and the results queue (bound with `#`), so that
/// jobs can be published and no result is unroutable before the first worker starts.
pub(crate) async fn declare(conn: &Connection, s: &Settings) -> anyhow::Result<()> {
    Topology::for_settings(s)
        .declare(conn, Duration::from_secs(15))
        .await
        .context("declaring the topology")?;
    let ch = conn.create_channel().await?;
    let exchange = s.amqp.result_exchange.as_str();
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    let queue = results_queue(s);
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        queue.as_str().into(),
        exchange.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// Every queue of the run: the worker's, the results queue.
pub(crate) fn queues(s: &Settings) -> Vec<String> {
    let mut queues = Topology::for_settings(s).queue_names();
    queues.push(results_queue(s));
    queues
}

/// Deletes the run's queues and exchanges (a channel each: an error closes it).
pub(crate) async fn cleanup(conn: &Connection, s: &Settings) {
    for q in queues(s) {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = ch.close(200, "done".into()).await;
        }
    }
    for x in [&s.amqp.result_exchange, &s.amqp.dead_letter_exchange] {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
            let _ = ch.close(200, "done".into()).await;
        }
    }
}
