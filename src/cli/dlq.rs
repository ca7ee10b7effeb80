//! `jelou-worker dlq list` and `jelou-worker dlq replay`: look at the jobs that failed,
//! and move them back onto the jobs queue once the cause is fixed.
//!
//! Both read the dead-letter queue with `basic.get` in acknowledgement mode, so a
//! message is never gone before its fate is settled: `list` hands every message back
//! untouched (the channel closes without acking), and `replay` acks a dead letter
//! only after its copy on the jobs queue has been confirmed by the broker. A crash in
//! between leaves the job in both queues (replayed twice at worst), never in neither.

use std::time::Duration;

use lapin::{
    BasicProperties, Channel,
    message::BasicGetMessage,
    options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions},
    types::FieldTable,
};
use serde::Serialize;

use crate::{
    broker::{self, Published, Publisher, bounded},
    cli::enqueue::Progress,
    config::Settings,
    job::{RetryState, header, int_header, string_header},
};

/// One dead letter, as `dlq list` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub(crate) job_id: Option<String>,
    pub(crate) kind: Option<String>,
    pub(crate) message: Option<String>,
    pub(crate) failed_at: Option<String>,
    pub(crate) attempts: Option<i64>,
    pub(crate) bytes: usize,
}

impl DeadLetter {
    fn read(m: &BasicGetMessage) -> Self {
        let props = &m.delivery.properties;
        let headers = props.headers().as_ref();
        let text = |name| headers.and_then(|h| string_header(h, name));
        // Jobs dead-lettered by the broker itself (not by the worker) have no
        // annotations of ours: fall back to what the job says.
        let body_id = || {
            serde_json::from_slice::<serde_json::Value>(&m.delivery.data)
                .ok()
                .and_then(|v| v.get("jobId").and_then(|id| id.as_str()).map(str::to_owned))
        };
        Self {
            job_id: text(header::JOB_ID)
                .or_else(body_id)
                .or_else(|| props.message_id().as_ref().map(|id| id.to_string())),
            kind: text(header::ERROR_KIND),
            message: text(header::ERROR_MESSAGE),
            failed_at: text(header::FAILED_AT),
            attempts: headers.and_then(|h| int_header(h, header::ATTEMPTS)),
            bytes: m.delivery.data.len(),
        }
    }
}

/// Which dead letters `replay` moves.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only these failure kinds (any when empty).
    pub kinds: Vec<String>,
    /// Only these jobIds (any when empty).
    pub job_ids: Vec<String>,
}

impl Filter {
    fn matches(&self, d: &DeadLetter) -> bool {
        let kind_ok =
            self.kinds.is_empty() || d.kind.as_ref().is_some_and(|k| self.kinds.contains(k));
        let id_ok = self.job_ids.is_empty()
            || d.job_id
                .as_ref()
                .is_some_and(|id| self.job_ids.contains(id));
        kind_ok && id_ok
    }
}

async fn open(settings: &Settings) -> anyhow::Result<(lapin::Connection, Channel, u32)> {
    let amqp = &settings.amqp;
    let timeout = amqp.operation_timeout();
    let conn = broker::connect(amqp, "jelou-worker dlq").await?.connection;
    let channel = bounded(timeout, "channel.open", conn.create_channel()).await?;
    let queue = bounded(
        timeout,
        "queue.declare",
        channel.queue_declare(
            amqp.dead_letter_queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "the dead-letter queue `{}` cannot be read: {e}",
            amqp.dead_letter_queue
        )
    })?;
    Ok((conn, channel, queue.message_count()))
}

async fn get(
    channel: &Channel,
    queue: &str,
    timeout: Duration,
) -> anyhow::Result<Option<BasicGetMessage>> {
    Ok(bounded(
        timeout,
        "basic.get",
        channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }),
    )
    .await?)
}

/// Lists up to `limit` dead letters, oldest first, leaving them all in place.
pub async fn list(settings: &Settings, limit: usize) -> anyhow::Result<(Vec<DeadLetter>, u32)> {
    let (conn, channel, total) = open(settings).await?;
    let timeout = settings.amqp.operation_timeout();
    let mut out = Vec::new();
    while out.len() < limit {
        match get(&channel, &settings.amqp.dead_letter_queue, timeout).await? {
            Some(m) => out.push(DeadLetter::read(&m)),
            None => break,
        }
    }
    // Closing the channel hands every unacked message back to the queue.
    let _ = channel.close(200, "listed".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok((out, total))
}

/// What `replay` did.
#[derive(Debug, Default)]
pub struct Replayed {
    pub moved: Vec<Option<String>>,
    pub kept: usize,
}

/// Moves the dead letters that match `filter` back onto the jobs queue with a fresh
/// attempt count; the others stay where they are.
pub async fn replay(
    settings: &Settings,
    filter: &Filter,
    limit: Option<usize>,
) -> anyhow::Result<Replayed> {
    let (conn, channel, total) = open(settings).await?;
    let amqp = &settings.amqp;
    let timeout = amqp.operation_timeout();
    let publisher = Publisher::open(&conn, timeout).await?;
    let progress = Progress::new(total as usize);
    let mut done = Replayed::default();
    while limit.is_none_or(|l| done.moved.len() < l) {
        let Some(m) = get(&channel, &amqp.dead_letter_queue, timeout).await? else {
            break;
        };
        let letter = DeadLetter::read(&m);
        if !filter.matches(&letter) {
            // Held unacked until the end, so this pass does not see it again.
            done.kept += 1;
            continue;
        }
        let mut headers = m.delivery.properties.headers().clone().unwrap_or_default();
        RetryState::clear_headers(&mut headers);
        crate::job::remove(&mut headers, header::QUORUM_DELIVERY_COUNT);
        crate::job::remove(&mut headers, header::JOB_ID);
        let properties: BasicProperties = m
            .delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        match publisher
            .publish("", &amqp.jobs_queue, &m.delivery.data, properties)
            .await?
        {
            Published::Routed => {}
            Published::Unroutable => anyhow::bail!(
                "the jobs queue `{}` does not exist: nothing was moved after this point",
                amqp.jobs_queue
            ),
        }
        bounded(
            timeout,
            "basic.ack",
            m.delivery.acker.ack(BasicAckOptions::default()),
        )
        .await?;
        println!("{}", letter.job_id.as_deref().unwrap_or("(no jobId)"));
        done.moved.push(letter.job_id);
        progress.tick(done.moved.len() + done.kept);
    }
    progress.finish();
    publisher.close().await;
    let _ = channel.close(200, "replayed".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(done)
}

/// Prints dead letters as an aligned table.
pub fn print_table(letters: &[DeadLetter], total: u32) {
    println!(
        "{:<38} {:<18} {:<26} {:>8}  message",
        "jobId", "kind", "failedAt", "attempts"
    );
    for d in letters {
        let message: String = d
            .message
            .as_deref()
            .unwrap_or("")
            .chars()
            .take(100)
            .collect();
        println!(
            "{:<38} {:<18} {:<26} {:>8}  {}",
            d.job_id.as_deref().unwrap_or("-"),
            d.kind.as_deref().unwrap_or("-"),
            d.failed_at.as_deref().unwrap_or("-"),
            d.attempts
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            message
        );
    }
    println!("{} shown, {total} in the dead-letter queue", letters.len());
}
