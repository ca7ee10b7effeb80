//! The daemon (`jelou-worker run`): a supervisor that keeps one broker session alive,
//! and the session that consumes jobs and hands each to [`crate::pipeline`].
//!
//! lapin's own connection recovery is left off on purpose: a recovered channel would
//! carry on with deliveries whose acks are no longer valid. Instead, when anything
//! in a session fails (connection, channel, heartbeat), the session ends; the
//! supervisor reconnects with backoff (to the next cluster node, if several are
//! configured), re-checks the topology, and consumes again. Jobs in flight on the
//! dead session are never acked on the new one: the broker redelivers them.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use lapin::{
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    acks::Acks,
    broker::{self, BrokerError, Publisher, Topology, bounded},
    config::Settings,
    gate::Gate,
    jelou::JelouClient,
    metrics::Metrics,
    pipeline::{self, FinishedCache, Stops},
    retry::RetryPolicy,
    server,
};

/// What every job task shares, for the life of the process.
pub struct Shared {
    pub settings: Settings,
    pub jelou: JelouClient,
    pub policy: RetryPolicy,
    pub topology: Topology,
    pub gate: Arc<Gate>,
    pub metrics: Arc<Metrics>,
    pub finished: FinishedCache,
    /// True while consuming: what `/readyz` reports.
    pub ready: Arc<AtomicBool>,
}

/// One broker connection's worth of state, shared by the jobs it delivered.
pub struct Session {
    pub publisher: Publisher,
    /// Cancelled when the session is dead: its jobs stop waiting, and the supervisor
    /// reconnects.
    pub lost: CancellationToken,
}

impl Session {
    /// Marks the session dead when `error` means its channel or connection is gone,
    /// or that the broker keeps refusing its publishes: dropping the connection hands
    /// its unacked jobs back to the queue.
    pub fn fail(&self, error: &BrokerError) {
        if !self.publisher.is_open()
            || matches!(
                error,
                BrokerError::Timeout { .. } | BrokerError::Refused { .. }
            )
        {
            self.lost.cancel();
        }
    }
}

impl Shared {
    pub fn new(settings: Settings) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        let jelou = JelouClient::new(&settings.jelou, settings.amqp.prefetch as usize)?;
        Ok(Self {
            policy: RetryPolicy::from(&settings.retry),
            topology: Topology::for_settings(&settings),
            gate: Arc::new(Gate::new(
                &settings.jelou,
                Duration::from_millis(settings.retry.max_elapsed_ms),
                metrics.clone(),
            )),
            jelou,
            metrics,
            finished: FinishedCache::new(10_000),
            ready: Arc::new(AtomicBool::new(false)),
            settings,
        })
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.metrics.broker_connected.set(ready.into());
    }
}

/// How a session ended without an error of its own.
enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// Runs the worker until `shutdown` is cancelled, then drains (contract section 7).
/// Returns an error only for what retrying cannot fix (a topology mismatch, a
/// missing queue, bad TLS files, an unusable listen address).
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let shared = Arc::new(Shared::new(settings)?);
    let stop_background = CancellationToken::new();
    let server = server::serve(
        shared.settings.server.listen,
        shared.metrics.clone(),
        shared.ready.clone(),
        stop_background.clone(),
    )
    .await?;
    tokio::spawn(shared.gate.clone().run_prober(
        shared.jelou.clone(),
        shared.settings.jelou.clone(),
        stop_background.clone(),
    ));
    let stops = Stops {
        shutdown: shutdown.clone(),
        hard: CancellationToken::new(),
    };
    let tracker = TaskTracker::new();
    let result = supervise(&shared, &tracker, &stops).await;
    // Whatever ended the loop, jobs still running get the grace period.
    tracker.close();
    drain(&tracker, &stops, shared.settings.shutdown.grace_period_ms).await;
    stop_background.cancel();
    let _ = server.await;
    result
}

async fn supervise(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    stops: &Stops,
) -> anyhow::Result<()> {
    let new_backoff = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(30))
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut backoff = new_backoff();
    let mut declared = false;
    // Where in amqp.url the next connection starts (random for the first).
    let mut next_node = None;
    loop {
        if stops.shutdown.is_cancelled() {
            return Ok(());
        }
        let ended = session(shared, tracker, stops, &mut declared, &mut next_node).await;
        shared.set_ready(false);
        let wait = match ended {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Ok(SessionEnd::Lost(reason)) => {
                backoff = new_backoff();
                let wait = backoff.next().unwrap_or(Duration::from_secs(1));
                tracing::warn!(
                    reason,
                    retry_in_ms = wait.as_millis() as u64,
                    "lost the broker; reconnecting"
                );
                wait
            }
            Err(e) if e.is_fatal() => return Err(e.into()),
            Err(e) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker unavailable; retrying");
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stops.shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Connects, checks the topology, consumes until shutdown or a failure.
async fn session(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    stops: &Stops,
    declared: &mut bool,
    next_node: &mut Option<usize>,
) -> Result<SessionEnd, BrokerError> {
    let amqp = &shared.settings.amqp;
    let timeout = amqp.operation_timeout();
    let host = hostname();
    let name = format!("jelou-worker {host} pid {}", std::process::id());
    let broker::Connected {
        connection,
        node,
        next_start,
    } = broker::connect_from(amqp, &name, *next_node).await?;
    *next_node = Some(next_start);
    shared.metrics.connected_to(&node);
    tracing::info!(node, "connected to the broker");
    let tag = format!(
        "jelou-worker-{host}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let (publisher, channel, mut jobs) = match set_up(shared, &connection, &tag, declared).await {
        Ok(set) => set,
        Err(e) => {
            // Close what was opened. Left open, the connection lives on, and a
            // basic.consume that the broker completes after our timeout (one on a
            // queue whose leader is on a frozen node does) hands it up to
            // amqp.prefetch jobs that nobody reads or acks, for as long as the
            // process runs.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                connection.close(320, "setting up failed".into()),
            )
            .await;
            return Err(e);
        }
    };
    let session = Arc::new(Session {
        publisher,
        lost: CancellationToken::new(),
    });
    // Each consuming channel acks through its own task (delivery tags are per channel).
    let jobs_acks = Acks::start(channel.clone(), session.lost.clone());
    shared.set_ready(true);
    tracing::info!(queue = %amqp.jobs_queue, prefetch = amqp.prefetch, "consuming");
    // The retry queue (jobs coming back for another attempt) is subscribed beside the
    // jobs queue, never before it, on a channel of its own: on RabbitMQ 3.x a
    // basic.consume on a quorum queue whose leader is on a frozen node hangs until the
    // node comes back or is declared down (net_ticktime, 60 s by default), and new jobs
    // must not wait for that. Until it is subscribed its jobs wait on the broker.
    let retry_tag = format!("{tag}-retry");
    let mut retries: Option<(lapin::Channel, lapin::Consumer, Acks)> = None;
    let subscribe = || subscribe_retries(shared, &connection, &retry_tag);
    let mut subscribing = Some(Box::pin(subscribe()));
    let mut resubscribe_at: Option<tokio::time::Instant> = None;
    let end = loop {
        let next = tokio::select! {
            _ = stops.shutdown.cancelled() => break SessionEnd::Shutdown,
            _ = session.lost.cancelled() => break SessionEnd::Lost("publishing failed".into()),
            subscribed = async { subscribing.as_mut().expect("guarded").await }, if subscribing.is_some() => {
                subscribing = None;
                match subscribed {
                    Ok((retry_channel, consumer)) => {
                        let acks = Acks::start(retry_channel.clone(), session.lost.clone());
                        retries = Some((retry_channel, consumer, acks));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, queue = %shared.topology.retry_queue(), "cannot consume the retry queue yet; consuming new jobs meanwhile");
                        resubscribe_at = Some(tokio::time::Instant::now() + timeout);
                    }
                }
                continue;
            }
            _ = async { tokio::time::sleep_until(resubscribe_at.expect("guarded")).await }, if resubscribe_at.is_some() => {
                resubscribe_at = None;
                subscribing = Some(Box::pin(subscribe()));
                continue;
            }
            next = jobs.next() => (next, &jobs_acks),
            next = async { retries.as_mut().expect("guarded").1.next().await }, if retries.is_some() => {
                (next, &retries.as_ref().expect("guarded").2)
            }
        };
        match next {
            (Some(Ok(delivery)), acks) => {
                tracker.spawn(pipeline::process(
                    shared.clone(),
                    session.clone(),
                    acks.clone(),
                    delivery,
                    stops.clone(),
                ));
            }
            (Some(Err(e)), _) => break SessionEnd::Lost(e.to_string()),
            (None, _) => {
                break SessionEnd::Lost("the broker cancelled a consumer (queue deleted?)".into());
            }
        }
    };
    drop(subscribing);
    shared.set_ready(false);
    match end {
        SessionEnd::Shutdown => {
            tracing::info!("shutting down: no new jobs; finishing those in flight");
            let _ = bounded(
                timeout,
                "basic.cancel",
                channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
            )
            .await;
            if let Some((retry_channel, _, _)) = &retries {
                let _ = bounded(
                    timeout,
                    "basic.cancel",
                    retry_channel
                        .basic_cancel(retry_tag.as_str().into(), BasicCancelOptions::default()),
                )
                .await;
            }
            // Jobs of this session still need the connection to publish and ack.
            let tracker = tracker.clone();
            tracker.close();
            drain(&tracker, stops, shared.settings.shutdown.grace_period_ms).await;
            // The finished jobs' acks must be on the wire before the close frame.
            let _ = tokio::time::timeout(timeout, async {
                jobs_acks.flush().await;
                if let Some((_, _, acks)) = &retries {
                    acks.flush().await;
                }
            })
            .await;
            // Closing returns every unacked delivery to the queue.
            let _ = bounded(
                timeout,
                "connection.close",
                connection.close(200, "shutdown".into()),
            )
            .await;
            tracing::info!("stopped");
        }
        SessionEnd::Lost(_) => {
            session.lost.cancel();
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                connection.close(320, "reconnecting".into()),
            )
            .await;
        }
    }
    Ok(end)
}

/// Checks (or declares) the topology, opens the publisher, and consumes the jobs queue.
async fn set_up(
    shared: &Arc<Shared>,
    connection: &lapin::Connection,
    tag: &str,
    declared: &mut bool,
) -> Result<(Publisher, lapin::Channel, lapin::Consumer), BrokerError> {
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
    let publisher = Publisher::open(connection, timeout)
        .await?
        .counting_refusals(shared.metrics.publishes_refused.clone());
    let channel = bounded(timeout, "channel.open", connection.create_channel()).await?;
    let jobs = consume(&channel, &amqp.jobs_queue, tag, amqp.prefetch, timeout).await?;
    Ok((publisher, channel, jobs))
}

/// Subscribes to the retry queue on a new channel, with a quarter of `amqp.prefetch`
/// on top of the jobs queue's. A channel whose subscription got no answer is closed
/// (the broker may still complete it later: closing hands back what it delivered).
async fn subscribe_retries(
    shared: &Arc<Shared>,
    connection: &lapin::Connection,
    tag: &str,
) -> Result<(lapin::Channel, lapin::Consumer), BrokerError> {
    let amqp = &shared.settings.amqp;
    let timeout = amqp.operation_timeout();
    let channel = bounded(timeout, "channel.open", connection.create_channel()).await?;
    let subscribed = consume(
        &channel,
        &shared.topology.retry_queue(),
        tag,
        (amqp.prefetch / 4).max(1),
        timeout,
    )
    .await;
    match subscribed {
        Ok(consumer) => Ok((channel, consumer)),
        Err(e) => {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(60),
                    channel.close(200, "subscribing failed".into()),
                )
                .await;
            });
            Err(e)
        }
    }
}

/// `basic.qos` then `basic.consume` on `channel`. (Quorum queues have no channel-wide
/// prefetch: each consumer gets its own.)
async fn consume(
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

/// Waits for the jobs in flight, at most the grace period; then tells the rest to
/// stop at once and gives them a moment to do so.
async fn drain(tracker: &TaskTracker, stops: &Stops, grace_ms: u64) {
    if tokio::time::timeout(Duration::from_millis(grace_ms), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = tracker.len(),
            "grace period over: handing the remaining jobs back to the queue"
        );
        stops.hard.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    }
}

/// This machine's name, for connection names and consumer tags (so operators can
/// tell workers apart in the management UI).
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
