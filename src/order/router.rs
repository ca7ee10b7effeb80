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

use super::{Ctx, lease, partition_of};
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
pub(super) async fn run(ctx: Arc<Ctx>) {
    loop {
        let attempt = lead(&ctx).await;
        let ending = ctx.stops.shutdown.is_cancelled() || ctx.session.lost.is_cancelled();
        if let Err(reason) = &attempt {
            tracing::warn!(reason, ending, "the router stopped");
        }
        if ending {
            return;
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
async fn lead(ctx: &Ctx) -> Result<(), String> {
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
    ctx: &Ctx,
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

/// The router's moving parts while it routes.
struct Routing<'a> {
    ctx: &'a Ctx,
    publish_channel: &'a Channel,
    acks: Acks,
    sequencer: Sequencer,
    /// Routed jobs waiting for their copy's confirm, in routing order.
    pending: Pending,
    timeout: Duration,
}

/// Consumes the jobs and retry queues and routes each delivery, until shutdown.
async fn route(
    ctx: &Ctx,
    route_channel: &Channel,
    publish_channel: &Channel,
) -> Result<(), String> {
    let amqp = &ctx.shared.settings.amqp;
    let timeout = amqp.operation_timeout();
    let err = |e: BrokerError| e.to_string();
    let select = publish_channel.confirm_select(ConfirmSelectOptions::default());
    bounded(timeout, "confirm.select", select)
        .await
        .map_err(err)?;
    let prefetch = amqp.prefetch.saturating_mul(4).min(1024);
    let tags = [
        format!("{}-router", ctx.tag),
        format!("{}-router-retry", ctx.tag),
    ];
    let retry_queue = ctx.shared.topology.retry_queue();
    let mut jobs = consume(route_channel, &amqp.jobs_queue, &tags[0], prefetch, timeout)
        .await
        .map_err(err)?;
    let mut retries = consume(
        route_channel,
        &retry_queue,
        &tags[1],
        prefetch / 4 + 1,
        timeout,
    )
    .await
    .map_err(err)?;
    let mut r = Routing {
        ctx,
        publish_channel,
        acks: Acks::start(route_channel.clone(), ctx.session.lost.clone()),
        sequencer: Sequencer { last: 0 },
        pending: FuturesOrdered::new(),
        timeout,
    };
    let end = r.run(&mut jobs, &mut retries).await;
    for tag in &tags {
        let cancel = route_channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
        let _ = bounded(timeout, "basic.cancel", cancel).await;
    }
    end?;
    r.finish(&mut jobs, &mut retries).await
}

impl Routing<'_> {
    /// Routes until shutdown (`Ok`) or a failure.
    async fn run(
        &mut self,
        jobs: &mut lapin::Consumer,
        retries: &mut lapin::Consumer,
    ) -> Result<(), String> {
        loop {
            let delivery = tokio::select! {
                _ = self.ctx.stops.shutdown.cancelled() => return Ok(()),
                _ = self.ctx.session.lost.cancelled() => return Err("the session was lost".into()),
                Some((confirmed, tag)) = self.pending.next() => {
                    self.settle(confirmed, tag)?;
                    continue;
                }
                next = jobs.next() => next,
                next = retries.next() => next,
            };
            match delivery {
                Some(Ok(d)) => self.forward(&d).await.map_err(|e| e.to_string())?,
                Some(Err(e)) => return Err(e.to_string()),
                None => {
                    return Err(
                        "the broker cancelled the router's consumer (queue deleted?)".into(),
                    );
                }
            }
        }
    }

    /// A routed job's copy is confirmed: the job is acked.
    fn settle(&self, confirmed: lapin::Result<Confirmation>, tag: u64) -> Result<(), String> {
        match confirmed {
            Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => {
                self.acks.ack(tag);
                Ok(())
            }
            Ok(Confirmation::Ack(Some(_))) => Err(
                "a partition queue is missing (declare the topology: amqp.declare_topology)".into(),
            ),
            Ok(Confirmation::Nack(_)) => Err("the broker refused a routed job (nack)".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Publishes the copy (its confirm is awaited later, in order).
    async fn forward(&mut self, delivery: &Delivery) -> Result<(), BrokerError> {
        let seq = self
            .sequencer
            .next(chrono::Utc::now().timestamp_micros().max(0) as u64);
        let confirm = forward(self.ctx, self.publish_channel, delivery, seq, self.timeout).await?;
        let tag = delivery.delivery_tag;
        self.pending
            .push_back(Box::pin(async move { (confirm.await, tag) }));
        Ok(())
    }

    /// After the cancel: routes what the broker delivered before it (handed back
    /// instead, it would return to the back of the jobs queue, behind later jobs of
    /// the same users), then waits for every confirm and acks.
    async fn finish(
        mut self,
        jobs: &mut lapin::Consumer,
        retries: &mut lapin::Consumer,
    ) -> Result<(), String> {
        let timeout = self.timeout;
        let rest = tokio::time::timeout(timeout, async {
            for consumer in [jobs, retries] {
                while let Some(Ok(delivery)) = consumer.next().await {
                    self.forward(&delivery).await?;
                }
            }
            Ok::<(), BrokerError>(())
        });
        if !matches!(rest.await, Ok(Ok(()))) {
            return Err("could not route what was delivered before stopping".into());
        }
        let confirmed = tokio::time::timeout(timeout, async {
            while let Some((confirmed, tag)) = self.pending.next().await {
                if self.settle(confirmed, tag).is_err() {
                    break;
                }
            }
        });
        let _ = confirmed.await;
        let _ = tokio::time::timeout(timeout, self.acks.flush()).await;
        Ok(())
    }
}

/// Publishes a copy of `delivery` to its user's partition, with its sequence number.
async fn forward(
    ctx: &Ctx,
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
