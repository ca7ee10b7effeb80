//! Where a job waits when it cannot be sent yet (its next retry, its bot's pause or
//! pacing), and how it is handed back at shutdown.
//!
//! A short wait (up to `order.wait_bound_ms`, or `retry.park_threshold_ms` for an
//! unordered retry) is slept in the worker. A longer one is not: the job goes back to
//! the broker, as a copy carrying its retry state in headers, published and confirmed
//! before the original is acked, so that it holds no slot another bot's jobs need and
//! no crash can reset its state:
//!
//! - unordered: to a delay queue (`<jobs_queue>.delay.<n>s`), whose expired messages
//!   come back through the retry queue, or straight to the retry queue, whose
//!   consumer sleeps out what is left;
//! - ordered: to its partition's wait queue (`<jobs_queue>.order.<n>.wait`), which the
//!   partition's owner holds in memory and releases each job when it is due and its
//!   user's earlier jobs are done (see the `order` module).

use std::time::Duration;

use chrono::Utc;
use lapin::options::BasicNackOptions;

use super::{
    decide::{self, RETRY},
    job_run::{Ended, JobRun},
};
use crate::{
    broker::{BrokerError, Published},
    job::{Job, RetryState},
};

/// Where the jobs of one consumer wait on the broker.
#[derive(Debug, Clone)]
pub(crate) enum WaitPlace {
    /// Delay queues and the retry queue (order off).
    Unordered,
    /// The wait queue of the job's partition (order on): every wait goes there, even a
    /// short retry, so that the job's state is saved on the broker.
    Partition { wait_queue: String },
}

impl JobRun {
    /// Waits until `state.not_before`: here when short, on the broker when long.
    /// `Some` when the job left this worker meanwhile.
    pub(crate) async fn wait_until_due(&self, state: &RetryState) -> Option<Ended> {
        let not_before = state.not_before_ms?;
        let wait_ms = not_before - Utc::now().timestamp_millis();
        if wait_ms <= 0 {
            return None;
        }
        let wait = Duration::from_millis(wait_ms as u64);
        let far = match &self.place {
            WaitPlace::Unordered => self.delay_queue_for(wait),
            WaitPlace::Partition { wait_queue } => {
                (wait > self.shared.settings.order.wait_bound()).then(|| wait_queue.clone())
            }
        };
        if let Some(queue) = far {
            match self.republish(&queue, state, None, Some(RETRY)).await {
                Ok(()) => {
                    self.count_retry("delay_queue");
                    return Some(Ended::Moved);
                }
                Err(e) => {
                    tracing::warn!(error = %e, queue, "could not park the job; it waits in this worker")
                }
            }
        }
        self.count_retry("in_process");
        self.sleep_here(wait, state).await
    }

    /// After a failed attempt: saves the retry state on the broker by moving the job
    /// to where it waits. `None` when the move failed and the job waits here instead.
    pub(crate) async fn checkpoint(&self, state: &RetryState, wait: Duration) -> Option<Ended> {
        let (queue, mode) = match (&self.place, self.delay_queue_for(wait)) {
            (WaitPlace::Partition { wait_queue }, _) => (wait_queue.clone(), "wait_queue"),
            (WaitPlace::Unordered, Some(queue)) => (queue, "delay_queue"),
            (WaitPlace::Unordered, None) => (self.shared.topology.retry_queue(), "retry_queue"),
        };
        match self.republish(&queue, state, None, Some(RETRY)).await {
            Ok(()) => {
                self.count_retry(mode);
                tracing::debug!(
                    wait_ms = wait.as_millis() as u64,
                    queue,
                    "the job waits for its next attempt on the broker"
                );
                Some(Ended::Moved)
            }
            Err(e) => {
                tracing::warn!(error = %e, queue, "could not move the job for its retry; it waits in this worker");
                None
            }
        }
    }

    /// The gate asked for a wait longer than the bound (a paused or paced bot): the
    /// job goes back to the broker until then (never past its deadline), its attempts
    /// untouched. `None` when that failed and the wait was slept here instead.
    pub(crate) async fn wait_elsewhere(
        &self,
        job: &Job,
        state: &mut RetryState,
        wait: Duration,
        reason: &'static str,
    ) -> Option<Ended> {
        let mut until = Utc::now().timestamp_millis() + wait.as_millis() as i64;
        if let Some(deadline) = job.deadline {
            until = until.min(deadline.timestamp_millis());
        }
        state.not_before_ms = Some(until);
        let queue = match &self.place {
            WaitPlace::Partition { wait_queue } => wait_queue.clone(),
            WaitPlace::Unordered => self
                .delay_queue_for(wait)
                .unwrap_or_else(|| self.shared.topology.retry_queue()),
        };
        match self.republish(&queue, state, None, Some(reason)).await {
            Ok(()) => Some(Ended::Moved),
            Err(e) => {
                tracing::warn!(error = %e, queue, "could not send the job back to wait; it waits in this worker");
                state.not_before_ms = None;
                self.sleep_here(wait, state).await
            }
        }
    }

    /// Sleeps `wait` here; at shutdown the job is handed back instead.
    pub(crate) async fn sleep_here(&self, wait: Duration, state: &RetryState) -> Option<Ended> {
        tokio::select! {
            _ = tokio::time::sleep(wait) => None,
            _ = self.stops.shutdown.cancelled() => Some(self.hand_back(state).await),
            _ = self.session.lost.cancelled() => Some(Ended::Abandoned),
        }
    }

    /// Shutdown: puts the job back on the broker with its retry state, at once.
    pub(crate) async fn hand_back(&self, state: &RetryState) -> Ended {
        let queue = self.hand_back_queue();
        match self.republish(&queue, state, None, None).await {
            Ok(()) => {
                self.shared.metrics.jobs_handed_back.inc();
                tracing::info!(
                    attempts = state.attempts,
                    "handed the job back to the queue for shutdown"
                );
                Ended::Moved
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not hand the job back with its state; requeueing it as it came");
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                };
                if let Ok(true) = self.delivery.acker.nack(requeue).await {
                    self.acks.settled_elsewhere(self.delivery.delivery_tag);
                }
                Ended::Abandoned
            }
        }
    }

    /// Classic queues do not count deliveries: a redelivered job is republished with a
    /// counter header (confirmed), and the original acked; the copy comes round again.
    pub(crate) async fn requeue_counted(&self, deliveries: u32) -> Ended {
        let state = RetryState::from_headers(self.delivery.properties.headers().as_ref());
        match self
            .republish(&self.hand_back_queue(), &state, Some(deliveries), None)
            .await
        {
            Ok(()) => Ended::Moved,
            Err(e) => {
                tracing::warn!(error = %e, "could not count a redelivery; leaving the job to the broker");
                Ended::Abandoned
            }
        }
    }

    fn hand_back_queue(&self) -> String {
        match &self.place {
            WaitPlace::Partition { wait_queue } => wait_queue.clone(),
            WaitPlace::Unordered => self.shared.topology.retry_queue(),
        }
    }

    /// The delay queue for a wait long enough to be parked, if any fits.
    fn delay_queue_for(&self, wait: Duration) -> Option<String> {
        let threshold = Duration::from_millis(self.shared.settings.retry.park_threshold_ms);
        let topology = &self.shared.topology;
        (wait >= threshold)
            .then(|| topology.delay_for(wait))
            .flatten()
            .map(|d| topology.delay_queue(d))
    }

    fn count_retry(&self, mode: &'static str) {
        self.shared
            .metrics
            .retries_scheduled
            .get_or_create(&crate::metrics::RetryLabels { mode })
            .inc();
    }

    /// Publishes a copy of the job (same body and properties, `state` in its headers)
    /// to `queue`, waits for the confirm, then acks the original.
    async fn republish(
        &self,
        queue: &str,
        state: &RetryState,
        deliveries: Option<u32>,
        reason: Option<&'static str>,
    ) -> Result<(), BrokerError> {
        let original = self.delivery.properties.headers().as_ref();
        let headers = decide::copy_headers(original, state, deliveries, reason);
        let properties = self
            .delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        let published = self
            .session
            .publisher
            .publish("", queue, &self.delivery.data, properties)
            .await;
        match published {
            Ok(Published::Routed) => {}
            Ok(Published::Unroutable) => {
                return Err(BrokerError::Missing {
                    what: format!("queue `{queue}`"),
                    key: "amqp.jobs_queue",
                });
            }
            Err(e) => {
                self.session.fail(&e);
                return Err(e);
            }
        }
        self.ack();
        Ok(())
    }
}
