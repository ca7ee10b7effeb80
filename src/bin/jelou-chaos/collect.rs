//! What the broker got: every result (a consumer on the collecting queue), the
//! dead-letter queue's jobs, and what is left in the run's queues.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use futures_util::StreamExt;
use lapin::{
    Channel, Connection,
    message::Delivery,
    options::*,
    types::{AMQPValue, FieldTable},
};
use tokio::task::JoinHandle;

/// A result as the result exchange got it.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub(crate) job: String,
    /// `success`, or the failure's `error.kind`.
    pub(crate) kind: String,
}

/// Results so far, shared with the consumer task.
#[derive(Clone, Default)]
pub(crate) struct Results(Arc<Mutex<Vec<Outcome>>>);

impl Results {
    pub(crate) fn all(&self) -> Vec<Outcome> {
        self.0.lock().expect("not poisoned").clone()
    }
}

fn outcome(d: &Delivery) -> Outcome {
    let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap_or_default();
    let job = v["jobId"].as_str().unwrap_or("?").to_string();
    let kind = match v["status"].as_str() {
        Some("success") => "success".to_string(),
        _ => v["error"]["kind"].as_str().unwrap_or("?").to_string(),
    };
    Outcome { job, kind }
}

/// Consumes `queue` (no ack) into `results` until the channel closes.
pub(crate) async fn consume(
    conn: &Connection,
    queue: &str,
    results: Results,
) -> anyhow::Result<JoinHandle<()>> {
    let ch = conn.create_channel().await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "chaos-collector".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(tokio::spawn(async move {
        let _keep = ch;
        while let Some(Ok(d)) = consumer.next().await {
            results.0.lock().expect("not poisoned").push(outcome(&d));
        }
    }))
}

/// Takes every message of the dead-letter queue; copies per `x-job-id` (`?` when
/// the header is missing).
pub(crate) async fn dead_letters(
    conn: &Connection,
    queue: &str,
) -> anyhow::Result<HashMap<String, u32>> {
    let ch = conn.create_channel().await?;
    let mut out = HashMap::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await?
    {
        let id = header_str(&m.delivery, "x-job-id").unwrap_or_else(|| "?".into());
        *out.entry(id).or_insert(0) += 1;
    }
    let _ = ch.close(200, "done".into()).await;
    Ok(out)
}

fn header_str(d: &Delivery, name: &str) -> Option<String> {
    match d.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// Messages left in `queue` that are not ownership tokens, taken by a consumer (the
/// ordered-work queues, single active consumer, refuse `basic.get`) until none comes
/// for a second; the run's queues are deleted next. Call with the fleet stopped.
pub(crate) async fn leftovers(conn: &Connection, queue: &str) -> anyhow::Result<u32> {
    let ch = conn.create_channel().await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "chaos-leftovers".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut n = 0;
    let idle = std::time::Duration::from_secs(1);
    while let Ok(Some(Ok(d))) = tokio::time::timeout(idle, consumer.next()).await {
        let token = d
            .properties
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key("x-jelou-token"));
        if !token {
            n += 1;
        }
    }
    close(ch).await;
    Ok(n)
}

async fn close(ch: Channel) {
    let _ = ch.close(200, "done".into()).await;
}
