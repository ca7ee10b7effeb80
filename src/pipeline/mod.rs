//! One delivery, from the broker's hand to its acknowledgement: read, decide, send,
//! publish the outcome, ack. The consumers (the `worker` module without order,
//! the `order` module with it) hand each delivery to [`process`] and learn how it
//! ended ([`Ended`]).
//!
//! | file | concern |
//! |---|---|
//! | [`job_run`] | the loop of one job: read, delivery limit, wait, gate, attempt, decide |
//! | [`decide`] | the pure decisions: after a failed attempt, the delivery limit, headers |
//! | [`waiting`] | where a job waits: here, a delay or retry queue, its partition's wait queue |
//! | [`complete`] | dead-letter, result, ack, in that order, all confirmed |
//! | [`finished`] | outcomes kept for a redelivery, so it is not sent twice |

pub(crate) mod complete;
pub(crate) mod decide;
pub(crate) mod finished;
pub(crate) mod job_run;
pub(crate) mod waiting;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub(crate) use job_run::{Ended, process};
pub(crate) use waiting::WaitPlace;

use crate::{
    broker::{BrokerError, Publisher, Topology},
    config::Settings,
    gate::Gate,
    jelou::JelouClient,
    metrics::Metrics,
    retry::RetryPolicy,
};
use finished::FinishedCache;

/// What every job task shares, for the life of the process.
pub(crate) struct Shared {
    pub(crate) settings: Settings,
    pub(crate) jelou: JelouClient,
    pub(crate) policy: RetryPolicy,
    pub(crate) topology: Topology,
    pub(crate) gate: Arc<Gate>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) finished: FinishedCache,
    /// `amqp.prefetch` permits: the jobs of one worker that run at once (order on,
    /// where a worker holds more deliveries than it runs).
    pub(crate) running: Arc<Semaphore>,
    /// True while consuming: what `/readyz` reports.
    pub(crate) ready: Arc<AtomicBool>,
}

impl Shared {
    pub(crate) fn new(settings: Settings) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        let prefetch = settings.amqp.prefetch as usize;
        let jelou = JelouClient::new(&settings.jelou, prefetch)?;
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
            running: Arc::new(Semaphore::new(prefetch)),
            ready: Arc::new(AtomicBool::new(false)),
            settings,
        })
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.metrics.broker_connected.set(ready.into());
    }
}

/// One broker connection's worth of state, shared by the jobs it delivered.
pub(crate) struct Session {
    pub(crate) publisher: Publisher,
    /// Cancelled when the session is dead: its jobs stop waiting, and the supervisor
    /// reconnects.
    pub(crate) lost: CancellationToken,
}

impl Session {
    /// Marks the session dead when `error` means its channel or connection is gone,
    /// or that the broker keeps refusing its publishes: dropping the connection hands
    /// its unacked jobs back to the queue.
    pub(crate) fn fail(&self, error: &BrokerError) {
        let fatal = matches!(
            error,
            BrokerError::Timeout { .. } | BrokerError::Refused { .. }
        );
        if !self.publisher.is_open() || fatal {
            self.lost.cancel();
        }
    }
}

/// The signals a job watches while it works.
#[derive(Clone)]
pub(crate) struct Stops {
    /// Shutdown began: take no new step; hand back a job that is waiting.
    pub(crate) shutdown: CancellationToken,
    /// The grace period is over: abandon the job (the broker requeues it).
    pub(crate) hard: CancellationToken,
}

/// `tokio::time::sleep` that accepts `Duration::MAX` (no deadline).
pub(crate) async fn sleep_long(d: Duration) {
    match tokio::time::Instant::now().checked_add(d) {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
