//! The router: the one worker of the fleet holding the router's token moves every
//! job from the jobs queue (and the retry queue, where jobs of an unordered worker
//! may wait) to its user's partition queue, stamping its sequence number.
//!
//! One consumer, one publishing channel: the broker keeps the order of what one
//! channel publishes to one queue, so a user's jobs reach their partition in the
//! order they left the jobs queue. Publishes are pipelined; each job is acked once
//! its copy is confirmed (a crash in between leaves the job on the jobs queue, to be
//! routed again: at least once).

use std::{sync::Arc, time::Duration};

use futures_util::{StreamExt, stream::FuturesOrdered};
use lapin::{
    Channel, Confirmation, PublisherConfirm,
    message::Delivery,
    options::{BasicCancelOptions, BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, ShortString},
};

use super::{Ctx2, lease, partition_of};
use crate::{
    broker::{
        BrokerError,
        acks::Acks,
        bounded,
        consume::{close_later, consume},
    },
    job::{header, parse_job_with, remove},
};

/// Sequence numbers: microseconds since the Unix epoch, strictly increasing here.
/// A new router starts above the old one's numbers as long as the two machines'
/// clocks differ by less than the time a router takes over (seconds).
struct Sequencer {
    last: u64,
}

impl Sequencer {
    fn next(&mut self, now_micros: u64) -> u64 {
        self.last = now_micros.max(self.last + 1);
        self.last
    }
}

/// Runs until shutdown or the session's end: waits for the router's token, then
/// routes. A failure of its own (a subscription without an answer, a channel closed)
/// is retried on new channels a second later: the router's token went back with them.
pub(super) async fn run(ctx: Arc<Ctx2>) {
    loop {
        let attempt = lead(&ctx).await;
        if ctx.stops.shutdown.is_cancelled() || ctx.session.lost.is_cancelled() {
            return;
        }
        if let Err(reason) = attempt {
            tracing::warn!(reason, "the router stopped; trying again");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = ctx.stops.shutdown.cancelled() => return,
            _ = ctx.session.lost.cancelled() => return,
        }
    }
}

/// One term: opens its channels, waits for the token, routes until shutdown, and
/// closes its channels (returning the token and whatever was not acked).
async fn lead(ctx: &Ctx2) -> Result<(), String> {
    let timeout = ctx.shared.settings.amqp.operation_timeout();
    let open = || bounded(timeout, "channel.open", ctx.connection.create_channel());
    let err = |e: BrokerError| e.to_string();
    let channels = [
        open().await.map_err(err)?,
        open().await.map_err(err)?,
        open().await.map_err(err)?,
    ];
    let [lease, route_channel, publish_channel] = &channels;
    let led = hold_and_route(ctx, lease, route_channel, publish_channel).await;
    for channel in channels {
        close_later(channel, "router stopped");
    }
    led
}

async fn hold_and_route(
    ctx: &Ctx2,
    lease_channel: &Channel,
    route_channel: &Channel,
    publish_channel: &Channel,
) -> Result<(), String> {
    let shared = &ctx.shared;
    let timeout = shared.settings.amqp.operation_timeout();
    let queue = shared.topology.router_queue();
    let err = |e: BrokerError| e.to_string();
    lease::ensure_token(lease_channel, &ctx.session.publisher, &queue, timeout)
        .await
        .map_err(err)?;
    let mut lease = consume(
        lease_channel,
        &queue,
        &format!("{}-router-lease", ctx.tag),
        1,
        timeout,
    )
    .await
    .map_err(err)?;
    let _token = loop {
        tokio::select! {
            _ = ctx.stops.shutdown.cancelled() => return Ok(()),
            _ = ctx.session.lost.cancelled() => return Err("the session was lost".into()),
            next = lease.next() => match next {
                Some(Ok(d)) if lease::is_token(&d) => break d,
                Some(Ok(d)) => {
                    // Not a token: nothing else belongs in the router's queue.
                    let _ = d.acker.ack(Default::default()).await;
                }
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the broker cancelled the router's lease".into()),
            }
        }
    };
    tracing::info!("routing the jobs queue into the partitions");
    shared.metrics.order.router_active.set(1);
    // The token goes back last (with its channel), when every routed job is
    // confirmed and acked.
    let routed = route(ctx, route_channel, publish_channel).await;
    shared.metrics.order.router_active.set(0);
    routed
}

type Pending =
    FuturesOrdered<futures_util::future::BoxFuture<'static, (lapin::Result<Confirmation>, u64)>>;

/// Consumes the jobs and retry queues and routes each delivery, until shutdown.
async fn route(
    ctx: &Ctx2,
    route_channel: &Channel,
    publish_channel: &Channel,
) -> Result<(), String> {
    let shared = &ctx.shared;
    let amqp = &shared.settings.amqp;
    let timeout = amqp.operation_timeout();
    let err = |e: BrokerError| e.to_string();
    bounded(
        timeout,
        "confirm.select",
        publish_channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await
    .map_err(err)?;
    let prefetch = amqp.prefetch.saturating_mul(4).min(1024);
    let jobs_tag = format!("{}-router", ctx.tag);
    let retry_tag = format!("{}-router-retry", ctx.tag);
    let mut jobs = consume(
        route_channel,
        &amqp.jobs_queue,
        &jobs_tag,
        prefetch,
        timeout,
    )
    .await
    .map_err(err)?;
    let mut retries = consume(
        route_channel,
        &shared.topology.retry_queue(),
        &retry_tag,
        prefetch / 4 + 1,
        timeout,
    )
    .await
    .map_err(err)?;
    let acks = Acks::start(route_channel.clone(), ctx.session.lost.clone());
    let mut sequencer = Sequencer { last: 0 };
    let mut pending: Pending = FuturesOrdered::new();
    let end = loop {
        let delivery = tokio::select! {
            _ = ctx.stops.shutdown.cancelled() => break Ok(()),
            _ = ctx.session.lost.cancelled() => break Err("the session was lost".to_string()),
            Some((confirmed, tag)) = pending.next() => {
                match confirmed {
                    Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => acks.ack(tag),
                    Ok(Confirmation::Ack(Some(_))) => break Err("a partition queue is missing (declare the topology: amqp.declare_topology)".into()),
                    Ok(Confirmation::Nack(_)) => break Err("the broker refused a routed job (nack)".into()),
                    Err(e) => break Err(e.to_string()),
                }
                continue;
            }
            next = jobs.next() => next,
            next = retries.next() => next,
        };
        let delivery = match delivery {
            Some(Ok(d)) => d,
            Some(Err(e)) => break Err(e.to_string()),
            None => {
                break Err("the broker cancelled the router's consumer (queue deleted?)".into());
            }
        };
        let seq = sequencer.next(chrono::Utc::now().timestamp_micros().max(0) as u64);
        match forward(ctx, publish_channel, &delivery, seq, timeout).await {
            Ok(confirm) => {
                let tag = delivery.delivery_tag;
                pending.push_back(Box::pin(async move { (confirm.await, tag) }));
            }
            Err(e) => break Err(e.to_string()),
        }
    };
    for tag in [&jobs_tag, &retry_tag] {
        let _ = bounded(
            timeout,
            "basic.cancel",
            route_channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
        )
        .await;
    }
    if end.is_ok() {
        // What the broker delivered before the cancel is routed too: handed back
        // instead, it would return to the back of the jobs queue, behind later jobs
        // of the same users.
        let mut sequencer = sequencer;
        let rest = tokio::time::timeout(timeout, async {
            for consumer in [&mut jobs, &mut retries] {
                while let Some(Ok(delivery)) = consumer.next().await {
                    let seq = sequencer.next(chrono::Utc::now().timestamp_micros().max(0) as u64);
                    let confirm = forward(ctx, publish_channel, &delivery, seq, timeout).await?;
                    let tag = delivery.delivery_tag;
                    pending.push_back(Box::pin(async move { (confirm.await, tag) }));
                }
            }
            Ok::<(), BrokerError>(())
        });
        if !matches!(rest.await, Ok(Ok(()))) {
            return Err("could not route what was delivered before stopping".into());
        }
        // Finish what is in flight: every routed job confirmed, then acked.
        let confirmed = tokio::time::timeout(timeout, async {
            while let Some((confirmed, tag)) = pending.next().await {
                if let Ok(Confirmation::Ack(None)) = confirmed {
                    acks.ack(tag);
                }
            }
        });
        let _ = confirmed.await;
        let _ = tokio::time::timeout(timeout, acks.flush()).await;
    }
    end
}

/// Publishes a copy of `delivery` to its user's partition, with its sequence number.
async fn forward(
    ctx: &Ctx2,
    channel: &Channel,
    delivery: &Delivery,
    seq: u64,
    timeout: Duration,
) -> Result<PublisherConfirm, BrokerError> {
    let shared = &ctx.shared;
    let key = routing_key(delivery, shared.settings.amqp.max_job_bytes);
    let p = partition_of(&key, shared.topology.partitions);
    let queue = shared.topology.partition_queue(p);
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    remove(&mut headers, header::QUORUM_DELIVERY_COUNT);
    headers.insert(header::SEQ.into(), AMQPValue::LongLongInt(seq as i64));
    let properties = delivery.properties.clone().with_headers(headers);
    let mandatory = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    bounded(
        timeout,
        "basic.publish",
        channel.basic_publish(
            ShortString::from(""),
            queue.as_str().into(),
            mandatory,
            &delivery.data,
            properties,
        ),
    )
    .await
}

/// What a job is partitioned by: its user (botId and userId), or its body when
/// those cannot be read (an invalid job fails wherever it lands).
fn routing_key(delivery: &Delivery, max_bytes: usize) -> Vec<u8> {
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(ShortString::as_str);
    match parse_job_with(&delivery.data, message_id, max_bytes, false) {
        Ok(job) => super::user_bytes(&job.bot_id, &job.user_id),
        Err(invalid) => match (invalid.bot_id, invalid.user_id) {
            (Some(bot), Some(user)) => super::user_bytes(&bot, &user),
            _ => delivery.data.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_increase_even_when_the_clock_does_not() {
        let mut s = Sequencer { last: 0 };
        assert_eq!(s.next(100), 100);
        assert_eq!(s.next(100), 101);
        assert_eq!(s.next(50), 102, "a clock stepping back does not reorder");
        assert_eq!(s.next(1_000), 1_000);
    }
}
