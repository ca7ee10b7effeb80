//! Ownership by token: a queue with a single active consumer holds one token
//! message; the consumer the broker gives it to, and who keeps it unacked, owns what
//! the queue stands for (the router's role, or a partition), until it hands the token
//! back or its connection dies, when the broker gives it to the next consumer.
//!
//! Why a token and not just the single active consumer: a worker learns that it is
//! active only by being delivered something, and a new owner must not start before
//! the old one has handed back everything it held. The old owner hands the token back
//! last, so whoever gets it next has all the rest already.
//!
//! A token is created when a queue has neither messages nor consumers (the first
//! start). Two workers starting at once may both create one: harmless, since only the
//! active consumer is delivered anything, with a prefetch of one, and it keeps the
//! token it holds until it has handed everything back; the second token then waits
//! in the queue for the next owner.

use std::time::Duration;

use lapin::{
    BasicProperties, Channel,
    message::Delivery,
    options::QueueDeclareOptions,
    types::{AMQPValue, FieldTable},
};

use crate::{
    broker::{BrokerError, Publisher, bounded},
    job::{header, int_header},
};

/// True for a token message.
pub(super) fn is_token(delivery: &Delivery) -> bool {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| int_header(h, header::TOKEN))
        .is_some()
}

/// A queue's ready messages and (active) consumers, read with a passive declare.
pub(super) async fn counts(
    channel: &Channel,
    queue: &str,
    timeout: Duration,
) -> Result<(u32, u32), BrokerError> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = bounded(
        timeout,
        "queue.declare",
        channel.queue_declare(queue.into(), passive, FieldTable::default()),
    )
    .await?;
    Ok((q.message_count(), q.consumer_count()))
}

/// Creates the token of `queue` if it has none (no message, no consumer).
pub(super) async fn ensure_token(
    channel: &Channel,
    publisher: &Publisher,
    queue: &str,
    timeout: Duration,
) -> Result<(), BrokerError> {
    if counts(channel, queue, timeout).await? != (0, 0) {
        return Ok(());
    }
    let mut headers = FieldTable::default();
    headers.insert(header::TOKEN.into(), AMQPValue::LongLongInt(1));
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    publisher.publish("", queue, b"", properties).await?;
    tracing::debug!(queue, "created an ownership token");
    Ok(())
}
