//! One broker session: connect, check (or declare) the topology, open the publisher,
//! consume until shutdown or a failure, then close.
//!
//! Order off, the session consumes the jobs queue and the retry queue here and hands
//! each delivery to [`crate::pipeline`]; order on, [`crate::order`] consumes.

use std::{sync::Arc, time::Duration};

use futures_util::{StreamExt, future::BoxFuture};
use lapin::options::BasicCancelOptions;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{drain, hostname};
use crate::{
    broker::{
        self, BrokerError, Publisher,
        acks::Acks,
        bounded,
        consume::{close_later, consume},
    },
    order,
    pipeline::{self, Session, Shared, Stops, WaitPlace},
};

/// How a session ended without an error of its own.
pub(super) enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// What one session leaves to the next.
#[derive(Default)]
pub(super) struct Place {
    /// The topology was declared once: later sessions only check it.
    declared: bool,
    /// Where in amqp.url the next connection starts (random for the first).
    next_node: Option<usize>,
}

/// Connects, checks the topology, consumes until shutdown or a failure.
pub(super) async fn session(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    stops: &Stops,
    place: &mut Place,
) -> Result<SessionEnd, BrokerError> {
    let amqp = &shared.settings.amqp;
    let host = hostname();
    let name = format!("jelou-worker {host} pid {}", std::process::id());
    let connected = broker::connect_from(amqp, &name, place.next_node).await?;
    let connection = Arc::new(connected.connection);
    place.next_node = Some(connected.next_start);
    shared.metrics.connected_to(&connected.node);
    tracing::info!(node = connected.node, "connected to the broker");
    let tag = format!(
        "jelou-worker-{host}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let publisher = match set_up(shared, &connection, &mut place.declared).await {
        Ok(publisher) => publisher,
        Err(e) => {
            close(&connection, 320, "setting up failed").await;
            return Err(e);
        }
    };
    let session = Arc::new(Session {
        publisher,
        lost: CancellationToken::new(),
    });
    let consumed = if shared.settings.order.enabled {
        let ctx = order::Ctx {
            shared: shared.clone(),
            connection: connection.clone(),
            session: session.clone(),
            tracker: tracker.clone(),
            stops: stops.clone(),
            tag: tag.clone(),
        };
        order::consume(Arc::new(ctx)).await
    } else {
        consume_unordered(shared, &connection, &session, tracker, stops, &tag).await
    };
    shared.set_ready(false);
    match consumed {
        Ok(None) => {
            close(&connection, 200, "shutdown").await;
            tracing::info!("stopped");
            Ok(SessionEnd::Shutdown)
        }
        Ok(Some(reason)) => {
            session.lost.cancel();
            close(&connection, 320, "reconnecting").await;
            Ok(SessionEnd::Lost(reason))
        }
        Err(e) => {
            session.lost.cancel();
            close(&connection, 320, "setting up failed").await;
            Err(e)
        }
    }
}

/// Closes the connection, briefly bounded: closing returns every unacked delivery to
/// its queue, and a connection left open could hold deliveries nobody works on.
async fn close(connection: &lapin::Connection, code: u16, why: &str) {
    let wait = if code == 200 { 15 } else { 1 };
    let _ = tokio::time::timeout(
        Duration::from_secs(wait),
        connection.close(code, why.into()),
    )
    .await;
}

/// Checks (or declares) the topology, and opens the publisher.
async fn set_up(
    shared: &Arc<Shared>,
    connection: &lapin::Connection,
    declared: &mut bool,
) -> Result<Publisher, BrokerError> {
    let amqp = &shared.settings.amqp;
    let timeout = amqp.operation_timeout();
    if amqp.declare_topology && !*declared {
        shared.topology.declare(connection, timeout).await?;
        *declared = true;
    } else {
        // After the first declaration (and always when declaring is off) only check:
        // a full declaration can block on a cluster node that is still recovering.
        match shared.topology.verify(connection, timeout).await {
            Err(BrokerError::Missing { .. }) if amqp.declare_topology => {
                shared.topology.declare(connection, timeout).await?
            }
            other => other?,
        }
    }
    let publisher = Publisher::open(connection, timeout).await?;
    Ok(publisher.counting_refusals(shared.metrics.publishes_refused.clone()))
}

/// A consumer and the acks of its channel.
struct Subscribed {
    channel: lapin::Channel,
    consumer: lapin::Consumer,
    acks: Acks,
    tag: String,
}

type Subscribing<'a> = BoxFuture<'a, Result<(lapin::Channel, lapin::Consumer), BrokerError>>;

/// The retry queue's subscription, made beside the jobs queue's.
enum Retries<'a> {
    Subscribing(Subscribing<'a>),
    /// The last try failed; the next starts at this instant.
    WaitingUntil(tokio::time::Instant),
    Subscribed(Box<Subscribed>),
}

/// Order off: consumes the jobs queue, and the retry queue beside it, until shutdown
/// (`Ok(None)`) or a failure (`Ok(Some(reason))`).
async fn consume_unordered(
    shared: &Arc<Shared>,
    connection: &lapin::Connection,
    session: &Arc<Session>,
    tracker: &TaskTracker,
    stops: &Stops,
    tag: &str,
) -> Result<Option<String>, BrokerError> {
    let amqp = &shared.settings.amqp;
    let timeout = amqp.operation_timeout();
    let channel = bounded(timeout, "channel.open", connection.create_channel()).await?;
    let consumer = consume(&channel, &amqp.jobs_queue, tag, amqp.prefetch, timeout).await?;
    let acks = Acks::start(channel.clone(), session.lost.clone());
    let mut jobs = Subscribed {
        channel,
        consumer,
        acks,
        tag: tag.to_string(),
    };
    shared.set_ready(true);
    tracing::info!(queue = %amqp.jobs_queue, prefetch = amqp.prefetch, "consuming");
    // The retry queue (jobs coming back for another attempt) is subscribed beside the
    // jobs queue, never before it, on a channel of its own: on RabbitMQ 3.x a
    // basic.consume on a quorum queue whose leader is on a frozen node hangs until the
    // node comes back or is declared down (net_ticktime, 60 s by default), and new jobs
    // must not wait for that. Until it is subscribed its jobs wait on the broker.
    let retry_tag = format!("{tag}-retry");
    let mut retries = Retries::Subscribing(subscribe_retries(shared, connection, &retry_tag));
    let end = loop {
        let next = tokio::select! {
            _ = stops.shutdown.cancelled() => break None,
            _ = session.lost.cancelled() => break Some("publishing failed".to_string()),
            next = jobs.consumer.next() => (next, jobs.acks.clone()),
            next = retries.next(shared, connection, session, &retry_tag) => match next {
                Some(next) => next,
                None => continue,
            },
        };
        match next {
            (Some(Ok(delivery)), acks) => {
                tracker.spawn(pipeline::process(
                    shared.clone(),
                    session.clone(),
                    acks,
                    delivery,
                    stops.clone(),
                    WaitPlace::Unordered,
                ));
            }
            (Some(Err(e)), _) => break Some(e.to_string()),
            (None, _) => break Some("the broker cancelled a consumer (queue deleted?)".into()),
        }
    };
    shared.set_ready(false);
    if end.is_some() {
        return Ok(end);
    }
    tracing::info!("shutting down: no new jobs; finishing those in flight");
    let mut subscribed = vec![jobs];
    if let Retries::Subscribed(r) = retries {
        subscribed.push(*r);
    }
    for s in &subscribed {
        let cancel = s
            .channel
            .basic_cancel(s.tag.as_str().into(), BasicCancelOptions::default());
        let _ = bounded(timeout, "basic.cancel", cancel).await;
    }
    // Jobs of this session still need the connection to publish and ack.
    let tracker = tracker.clone();
    tracker.close();
    drain(&tracker, stops, shared.settings.shutdown.grace_period_ms).await;
    // The finished jobs' acks must be on the wire before the close frame.
    let flushes = subscribed.iter().map(|s| s.acks.flush());
    let _ = tokio::time::timeout(timeout, futures_util::future::join_all(flushes)).await;
    Ok(None)
}

type Next = (Option<lapin::Result<lapin::message::Delivery>>, Acks);

impl<'a> Retries<'a> {
    /// The next delivery of the retry queue, or `None` when the subscription changed
    /// state (subscribed, failed, due again): the caller loops.
    async fn next(
        &mut self,
        shared: &'a Arc<Shared>,
        connection: &'a lapin::Connection,
        session: &Arc<Session>,
        tag: &'a str,
    ) -> Option<Next> {
        match self {
            Retries::Subscribing(subscribing) => {
                *self = match subscribing.await {
                    Ok((channel, consumer)) => Retries::Subscribed(Box::new(Subscribed {
                        acks: Acks::start(channel.clone(), session.lost.clone()),
                        channel,
                        consumer,
                        tag: tag.to_string(),
                    })),
                    Err(e) => {
                        tracing::warn!(error = %e, queue = %shared.topology.retry_queue(), "cannot consume the retry queue yet; consuming new jobs meanwhile");
                        let timeout = shared.settings.amqp.operation_timeout();
                        Retries::WaitingUntil(tokio::time::Instant::now() + timeout)
                    }
                };
                None
            }
            Retries::WaitingUntil(at) => {
                tokio::time::sleep_until(*at).await;
                *self = Retries::Subscribing(subscribe_retries(shared, connection, tag));
                None
            }
            Retries::Subscribed(s) => Some((s.consumer.next().await, s.acks.clone())),
        }
    }
}

/// Subscribes to the retry queue on a new channel, with a quarter of `amqp.prefetch`
/// on top of the jobs queue's. A channel whose subscription got no answer is closed
/// (the broker may still complete it later: closing hands back what it delivered).
fn subscribe_retries<'a>(
    shared: &'a Arc<Shared>,
    connection: &'a lapin::Connection,
    tag: &'a str,
) -> Subscribing<'a> {
    Box::pin(async move {
        let amqp = &shared.settings.amqp;
        let timeout = amqp.operation_timeout();
        let channel = bounded(timeout, "channel.open", connection.create_channel()).await?;
        let queue = shared.topology.retry_queue();
        let prefetch = (amqp.prefetch / 4).max(1);
        match consume(&channel, &queue, tag, prefetch, timeout).await {
            Ok(consumer) => Ok((channel, consumer)),
            Err(e) => {
                close_later(channel, "subscribing failed");
                Err(e)
            }
        }
    })
}
