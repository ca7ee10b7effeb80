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
    broker::{BrokerError, acks::Acks, bounded, consume::consume},
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

/// Runs until shutdown (`Ok`) or a failure (`Err(reason)`): waits for the router's
/// token, then routes.
pub(super) async fn run(
    ctx: Arc<Ctx2>,
    lease_channel: Channel,
    route_channel: Channel,
    publish_channel: Channel,
) -> Result<(), String> {
    let shared = &ctx.shared;
    let timeout = shared.settings.amqp.operation_timeout();
    let queue = shared.topology.router_queue();
    let err = |e: BrokerError| e.to_string();
    lease::ensure_token(&lease_channel, &ctx.session.publisher, &queue, timeout)
        .await
        .map_err(err)?;
    let mut lease = consume(
        &lease_channel,
        &queue,
        &format!("{}-router-lease", ctx.tag),
        1,
        timeout,
    )
    .await
    .map_err(err)?;
    let token = loop {
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
    let routed = route(&ctx, &route_channel, &publish_channel).await;
    shared.metrics.order.router_active.set(0);
    // The token goes back last, when every routed job is confirmed and acked.
    drop(token);
    let _ = tokio::time::timeout(timeout, lease_channel.close(200, "router stopped".into())).await;
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
        let _ =
            tokio::time::timeout(timeout, route_channel.close(200, "router stopped".into())).await;
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
