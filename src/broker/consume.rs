//! Subscribing, bounded like every broker operation.

use std::time::Duration;

use lapin::{
    options::{BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable},
};

use super::{BrokerError, bounded};

/// Closes a channel in the background (a frozen node may answer late, or never).
pub(crate) fn close_later(channel: lapin::Channel, why: &'static str) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(60), channel.close(200, why.into())).await;
    });
}

/// `basic.qos` then `basic.consume` on `channel`. (Quorum queues have no channel-wide
/// prefetch: each consumer gets its own.)
pub(crate) async fn consume(
    channel: &lapin::Channel,
    queue: &str,
    tag: &str,
    prefetch: u16,
    timeout: Duration,
) -> Result<lapin::Consumer, BrokerError> {
    bounded(
        timeout,
        "basic.qos",
        channel.basic_qos(prefetch, BasicQosOptions::default()),
    )
    .await?;
    bounded(
        timeout,
        "basic.consume",
        channel.basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
}

/// The arguments of a queue with a single active consumer: the broker delivers to
/// one of its consumers at a time, and to the next when that one goes.
pub(crate) fn single_active_consumer(mut args: FieldTable) -> FieldTable {
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args
}
