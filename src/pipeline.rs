//! One delivery, from the broker's hand to its acknowledgement.
//!
//! ```text
//! delivery ─► read (job.rs) ─► delivery limit ─► [wait / park] ─► gate ─► attempt ─┐
//!                 │                                  ▲                              │
//!                 │ invalid                          └── retryable, time left ◄─────┤
//!                 ▼                                                                 ▼
//!            complete: failed? keep the job in the DLQ (confirmed) ─► publish the result (confirmed) ─► ack
//! ```
//!
//! The ack always comes last: a crash anywhere before it makes the broker redeliver
//! the job (at least once). After a failed attempt the job's retry state is saved on
//! the broker: a copy carrying it in headers is published (to a delay queue for a long
//! wait, else to the retry queue, whose consumer sleeps out the rest), confirmed, and
//! only then is the original acked. So no crash can reset a job's attempt count.

use std::{
    collections::{HashMap, VecDeque},
    hash::{Hash, Hasher},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use chrono::Utc;
use lapin::{
    BasicProperties,
    message::Delivery,
    options::BasicNackOptions,
    types::{AMQPValue, FieldTable, ShortString},
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    acks::Acks,
    broker::{BrokerError, Published},
    config::QueueType,
    job::{Job, RetryState, header, int_header, parse_job_with},
    outcome::{Attempt, AttemptFailure, ErrorKind, JobFailure, JobOutcome},
    result::{ResultFor, result_body},
    retry::RetryDecision,
    worker::{Session, Shared},
};

/// The signals a job watches while it works.
#[derive(Clone)]
pub struct Stops {
    /// Shutdown began: take no new step; hand back a job that is waiting.
    pub shutdown: CancellationToken,
    /// The grace period is over: abandon the job (the broker requeues it).
    pub hard: CancellationToken,
}

/// What the result says about the job, read as far as the job could be read.
struct Ident {
    job_id: String,
    bot_id: Option<String>,
    user_id: Option<String>,
}

/// Processes one delivery to the end: result published and job acked, or parked,
/// or handed back, or left unacked for the broker to redeliver.
pub async fn process(
    shared: Arc<Shared>,
    session: Arc<Session>,
    acks: Acks,
    delivery: Delivery,
    stops: Stops,
) {
    shared.metrics.jobs_in_flight.inc();
    let parsed = parse_job_with(
        &delivery.data,
        delivery
            .properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str),
        shared.settings.amqp.max_job_bytes,
        shared.settings.jelou.validate_messages,
    );
    let ident = match &parsed {
        Ok(job) => Ident {
            job_id: job.job_id.clone(),
            bot_id: Some(job.bot_id.clone()),
            user_id: Some(job.user_id.clone()),
        },
        Err(invalid) => Ident {
            job_id: invalid.job_id.clone(),
            bot_id: invalid.bot_id.clone(),
            user_id: invalid.user_id.clone(),
        },
    };
    let span = tracing::info_span!("job", job_id = %ident.job_id, bot_id = ident.bot_id.as_deref().unwrap_or(""));
    let run = JobRun {
        shared: shared.clone(),
        session,
        acks,
        delivery,
        ident,
        started: tokio::time::Instant::now(),
        stops,
    };
    // Boxed: the job's state machine (hyper and lapin futures inside) is several KiB,
    // and a task copies its future when spawned (callgrind: -4.5 % instructions).
    Box::pin(run.drive(parsed)).instrument(span).await;
    shared.metrics.jobs_in_flight.dec();
}

struct JobRun {
    shared: Arc<Shared>,
    session: Arc<Session>,
    /// Acks this delivery (coalesced with others of its channel).
    acks: Acks,
    delivery: Delivery,
    ident: Ident,
    started: tokio::time::Instant,
    stops: Stops,
}

/// How the waiting between attempts ended.
enum Waited {
    Ready,
    /// The job left this worker (parked, handed back, or its session died).
    Left,
}

impl JobRun {
    async fn drive(self, parsed: Result<Job, crate::job::InvalidJob>) {
        let mut state = RetryState::from_headers(self.delivery.properties.headers().as_ref())
            .bounded(
                Utc::now().timestamp_millis(),
                self.shared.policy.max_elapsed,
            );
        // A redelivered job whose outcome this worker already knows is finished
        // without a new send: its result could not be published before the connection
        // dropped, or it was, and only the ack was lost with the connection.
        if self.delivery.redelivered
            && let Some(known) = self.shared.finished.take(self.cache_key())
        {
            tracing::info!(
                "redelivered job already finished here: completing it from what is known, not sending it again"
            );
            return self
                .complete(known.outcome, known.attempts, known.progress)
                .await;
        }
        let job = match parsed {
            Ok(job) => job,
            Err(invalid) => {
                tracing::warn!(reason = %invalid.reason, "invalid job");
                let outcome = JobOutcome::failure(ErrorKind::InvalidJob, invalid.reason);
                return self
                    .complete(outcome, state.attempts, Progress::default())
                    .await;
            }
        };
        match self.delivery_count() {
            Deliveries::Over(n) => {
                let outcome = JobOutcome::failure(
                    ErrorKind::DeliveryLimit,
                    format!(
                        "delivered {n} times without finishing (amqp.max_deliveries is {}): it may crash or hang workers",
                        self.shared.settings.amqp.max_deliveries
                    ),
                );
                return self
                    .complete(outcome, state.attempts, Progress::default())
                    .await;
            }
            Deliveries::CountAndRequeue(n) => return self.requeue_counted(n).await,
            Deliveries::Fine => {}
        }
        let body = Bytes::copy_from_slice(job.message.get().as_bytes());
        let mut last: Option<AttemptFailure> = state.last_status.map(|status| AttemptFailure {
            retryable: true,
            http_status: Some(status),
            code: state.last_code.clone(),
            message: state.last_error.clone().unwrap_or_default(),
            retry_after: None,
        });
        loop {
            if let Waited::Left = self.wait_until_due(&state).await {
                return;
            }
            if let Some(deadline) = job.deadline
                && Utc::now() >= deadline
            {
                let failure = JobFailure::from_attempt(
                    ErrorKind::Expired,
                    format!(
                        "deadline {} passed before the job could be sent",
                        deadline.to_rfc3339()
                    ),
                    last.as_ref(),
                );
                return self
                    .complete(
                        JobOutcome::Failure(failure),
                        state.attempts,
                        Progress::default(),
                    )
                    .await;
            }
            // Wait for the gate (circuit, rate limit), but not past the deadline.
            let until_deadline = job
                .deadline
                .map(|d| (d - Utc::now()).to_std().unwrap_or_default())
                .unwrap_or(Duration::MAX);
            tokio::select! {
                _ = self.shared.gate.admit(&job.bot_id) => {}
                _ = sleep_long(until_deadline) => continue,
                _ = self.stops.shutdown.cancelled() => return self.hand_back(&state).await,
                _ = self.session.lost.cancelled() => return,
            }
            let now_ms = Utc::now().timestamp_millis();
            state.first_attempt_at_ms.get_or_insert(now_ms);
            state.not_before_ms = None;
            let sent_at = tokio::time::Instant::now();
            let attempt = tokio::select! {
                a = self.shared.jelou.send_job(&job, body.clone()) => a,
                _ = self.stops.hard.cancelled() => {
                    tracing::warn!("grace period over during an attempt: the job goes back to the queue");
                    return;
                }
            };
            state.attempts += 1;
            let status = match &attempt {
                Attempt::Delivered { .. } => Some(200),
                Attempt::Failed(f) => f.http_status,
            };
            self.shared
                .metrics
                .attempt(status, sent_at.elapsed().as_secs_f64());
            self.shared.gate.report(&job.bot_id, &attempt);
            let failure = match attempt {
                Attempt::Delivered { message_id } => {
                    return self
                        .complete(
                            JobOutcome::Success { message_id },
                            state.attempts,
                            Progress::default(),
                        )
                        .await;
                }
                Attempt::Failed(f) if !f.retryable => {
                    let failure =
                        JobFailure::from_attempt(ErrorKind::Rejected, f.message.clone(), Some(&f));
                    return self
                        .complete(
                            JobOutcome::Failure(failure),
                            state.attempts,
                            Progress::default(),
                        )
                        .await;
                }
                Attempt::Failed(f) => f,
            };
            tracing::debug!(attempt = state.attempts, error = %failure.message, "attempt failed; may retry");
            let elapsed_ms = (now_ms - state.first_attempt_at_ms.unwrap_or(now_ms)).max(0) as u64
                + sent_at.elapsed().as_millis() as u64;
            let decision = self.shared.policy.decide(
                state.attempts,
                Duration::from_millis(elapsed_ms),
                failure.retry_after,
                fastrand::f64(),
            );
            let wait = match decision {
                RetryDecision::Exhausted => {
                    let message = format!(
                        "gave up after {} attempts: {}",
                        state.attempts, failure.message
                    );
                    let failure = JobFailure::from_attempt(
                        ErrorKind::RetriesExhausted,
                        message,
                        Some(&failure),
                    );
                    return self
                        .complete(
                            JobOutcome::Failure(failure),
                            state.attempts,
                            Progress::default(),
                        )
                        .await;
                }
                RetryDecision::Wait(wait) => wait,
            };
            // `wait` is at most retry.max_elapsed_ms (validated to fit), so this holds.
            let next_at = chrono::Duration::from_std(wait)
                .ok()
                .and_then(|w| Utc::now().checked_add_signed(w))
                .unwrap_or(chrono::DateTime::<Utc>::MAX_UTC);
            if let Some(deadline) = job.deadline
                && next_at > deadline
            {
                let message = format!(
                    "the next attempt would start after the deadline {}: {}",
                    deadline.to_rfc3339(),
                    failure.message
                );
                let failure = JobFailure::from_attempt(ErrorKind::Expired, message, Some(&failure));
                return self
                    .complete(
                        JobOutcome::Failure(failure),
                        state.attempts,
                        Progress::default(),
                    )
                    .await;
            }
            state.not_before_ms = Some(next_at.timestamp_millis());
            state.last_status = failure.http_status;
            state.last_error = Some(failure.message.clone());
            state.last_code = failure.code.clone();
            last = Some(failure);
            if let Waited::Left = self.checkpoint(&state, wait).await {
                return;
            }
        }
    }

    /// After a failed attempt: saves the retry state on the broker, so that no crash
    /// can reset it, by moving the job (a copy carrying the state in its headers) to
    /// where it waits: a delay queue for a long wait, else the retry queue, whose
    /// consumer sleeps out the rest. Returns `Ready` when the move failed and the job
    /// must wait here instead.
    async fn checkpoint(&self, state: &RetryState, wait: Duration) -> Waited {
        let (queue, mode) = match self.delay_queue_for(wait) {
            Some(queue) => (queue, "delay_queue"),
            None => (self.shared.topology.retry_queue(), "retry_queue"),
        };
        match self.republish(&queue, state, None).await {
            Ok(()) => {
                self.count_retry(mode);
                tracing::debug!(
                    wait_ms = wait.as_millis() as u64,
                    queue,
                    "the job waits for its next attempt on the broker"
                );
                Waited::Left
            }
            Err(e) => {
                tracing::warn!(error = %e, queue, "could not move the job for its retry; it waits in this worker");
                Waited::Ready
            }
        }
    }

    /// Waits until `state.not_before`: in this worker when short, parked on a delay
    /// queue when long.
    async fn wait_until_due(&self, state: &RetryState) -> Waited {
        let Some(not_before) = state.not_before_ms else {
            return Waited::Ready;
        };
        let wait_ms = not_before - Utc::now().timestamp_millis();
        if wait_ms <= 0 {
            return Waited::Ready;
        }
        let wait = Duration::from_millis(wait_ms as u64);
        if let Some(queue) = self.delay_queue_for(wait) {
            match self.republish(&queue, state, None).await {
                Ok(()) => {
                    self.count_retry("delay_queue");
                    return Waited::Left;
                }
                Err(e) => {
                    tracing::warn!(error = %e, queue, "could not park the job; it waits in this worker")
                }
            }
        }
        self.count_retry("in_process");
        self.sleep_in_process(wait, state).await
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

    async fn sleep_in_process(&self, wait: Duration, state: &RetryState) -> Waited {
        tokio::select! {
            _ = tokio::time::sleep(wait) => Waited::Ready,
            _ = self.stops.shutdown.cancelled() => {
                self.hand_back(state).await;
                Waited::Left
            }
            _ = self.session.lost.cancelled() => Waited::Left,
        }
    }

    /// Shutdown: puts the job back on the broker (the retry queue) with its retry
    /// state, at once.
    async fn hand_back(&self, state: &RetryState) {
        let queue = self.shared.topology.retry_queue();
        match self.republish(&queue, state, None).await {
            Ok(()) => {
                self.shared.metrics.jobs_handed_back.inc();
                tracing::info!(
                    attempts = state.attempts,
                    "handed the job back to the queue for shutdown"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not hand the job back with its state; requeueing it as it came");
                let nacked = self
                    .delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
                if let Ok(true) = nacked {
                    self.acks.settled_elsewhere(self.delivery.delivery_tag);
                }
            }
        }
    }

    /// Classic queues do not count deliveries: a redelivered job is republished with a
    /// counter header (confirmed), and the original acked; the copy comes round again.
    async fn requeue_counted(self, deliveries: u32) {
        let state = RetryState::from_headers(self.delivery.properties.headers().as_ref());
        let queue = self.shared.topology.retry_queue();
        if let Err(e) = self.republish(&queue, &state, Some(deliveries)).await {
            tracing::warn!(error = %e, "could not count a redelivery; leaving the job to the broker");
        }
    }

    /// Publishes a copy of the job (same body and properties, `state` in its headers)
    /// to `queue`, waits for the confirm, then acks the original.
    async fn republish(
        &self,
        queue: &str,
        state: &RetryState,
        deliveries: Option<u32>,
    ) -> Result<(), BrokerError> {
        let mut headers = self
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        // The broker's own bookkeeping belongs to the original, not to the copy.
        for name in [
            header::QUORUM_DELIVERY_COUNT,
            "x-death",
            "x-first-death-exchange",
            "x-first-death-queue",
            "x-first-death-reason",
        ] {
            crate::job::remove(&mut headers, name);
        }
        state.write_headers(&mut headers);
        if let Some(n) = deliveries {
            headers.insert(header::DELIVERIES.into(), AMQPValue::LongLongInt(n.into()));
        }
        let properties = self
            .delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        match self
            .session
            .publisher
            .publish("", queue, &self.delivery.data, properties)
            .await
        {
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

    /// For a failure, keeps the job in the dead-letter queue first (so that whoever
    /// sees the failure result can already replay it); then publishes the result;
    /// both confirmed; then acks. What could not be published is remembered, so a
    /// redelivery of this job to this worker finishes it without sending it again.
    async fn complete(self, outcome: JobOutcome, attempts: u32, mut progress: Progress) {
        let s = &self.shared.settings.amqp;
        let completed_at = Utc::now();
        if let JobOutcome::Failure(f) = &outcome
            && !progress.dead_lettered
        {
            let mut headers = self
                .delivery
                .properties
                .headers()
                .clone()
                .unwrap_or_default();
            RetryState::clear_headers(&mut headers);
            headers.insert(
                header::ERROR_KIND.into(),
                AMQPValue::LongString(f.kind.as_str().into()),
            );
            headers.insert(
                header::ERROR_MESSAGE.into(),
                AMQPValue::LongString(f.message.as_str().into()),
            );
            headers.insert(
                header::FAILED_AT.into(),
                AMQPValue::LongString(completed_at.to_rfc3339().into()),
            );
            headers.insert(
                header::ATTEMPTS.into(),
                AMQPValue::LongLongInt(attempts.into()),
            );
            headers.insert(
                header::JOB_ID.into(),
                AMQPValue::LongString(self.ident.job_id.as_str().into()),
            );
            let properties = self
                .delivery
                .properties
                .clone()
                .with_headers(headers)
                .with_delivery_mode(2);
            let routing_key = self.delivery.routing_key.as_str().to_string();
            match self
                .session
                .publisher
                .publish(
                    &s.dead_letter_exchange,
                    &routing_key,
                    &self.delivery.data,
                    properties,
                )
                .await
            {
                Ok(Published::Routed) => {}
                Ok(Published::Unroutable) => {
                    tracing::error!(exchange = %s.dead_letter_exchange, "no queue is bound to the dead-letter exchange: the failed job's body is not kept");
                }
                Err(e) => return self.remember(outcome, attempts, progress, e),
            }
            progress.dead_lettered = true;
        }
        if !progress.result_published {
            let body = result_body(
                ResultFor {
                    job_id: &self.ident.job_id,
                    bot_id: self.ident.bot_id.as_deref(),
                    user_id: self.ident.user_id.as_deref(),
                },
                &outcome,
                attempts,
                completed_at,
            );
            let routing_key = match outcome {
                JobOutcome::Success { .. } => &s.success_routing_key,
                JobOutcome::Failure(_) => &s.failure_routing_key,
            };
            match self
                .session
                .publisher
                .publish(
                    &s.result_exchange,
                    routing_key,
                    &body,
                    self.result_properties(),
                )
                .await
            {
                Ok(Published::Routed) => {}
                Ok(Published::Unroutable) => {
                    self.shared.metrics.results_unroutable.inc();
                    tracing::warn!(
                        exchange = %s.result_exchange,
                        routing_key,
                        "no queue is bound to receive this result: it is lost to consumers, but the job is done and is not sent again"
                    );
                }
                Err(e) => return self.remember(outcome, attempts, progress, e),
            }
            progress.result_published = true;
        }
        self.ack();
        let (status, kind) = match &outcome {
            JobOutcome::Success { .. } => ("success", "none"),
            JobOutcome::Failure(f) => ("failure", f.kind.as_str()),
        };
        self.shared
            .metrics
            .jobs_finished
            .get_or_create(&crate::metrics::OutcomeLabels { status, kind })
            .inc();
        if let Some(ts) = self.delivery.properties.timestamp() {
            let age = completed_at.timestamp_millis() as f64 / 1000.0 - *ts as f64;
            if age >= 0.0 {
                self.shared.metrics.job_latency.observe(age);
            }
        }
        let duration_ms = self.started.elapsed().as_millis() as u64;
        match &outcome {
            JobOutcome::Success { message_id } => {
                tracing::info!(
                    outcome = "success",
                    message_id,
                    attempts,
                    duration_ms,
                    "job finished"
                )
            }
            JobOutcome::Failure(f) => tracing::info!(
                outcome = "failure",
                kind = f.kind.as_str(),
                http_status = f.http_status,
                error = %f.message,
                attempts,
                duration_ms,
                "job finished"
            ),
        }
        // Remembered even when acked: an ack is only written to the socket, and is lost
        // if the node dies before reading it (kill -9 of the worker's node). The broker
        // then redelivers the job, and without this it would be sent to Jelou again.
        self.keep(outcome, attempts, progress);
    }

    fn remember(&self, outcome: JobOutcome, attempts: u32, progress: Progress, error: BrokerError) {
        tracing::warn!(error = %error, "could not publish the outcome; it is kept here for the job's redelivery");
        self.session.fail(&error);
        self.keep(outcome, attempts, progress);
    }

    /// Remembers how this job ended, for a redelivery of it to this worker.
    fn keep(&self, outcome: JobOutcome, attempts: u32, progress: Progress) {
        let finished = Finished {
            outcome,
            attempts,
            progress,
        };
        self.shared.finished.put(self.cache_key(), finished);
    }

    /// Acks the delivery. The ack is coalesced with those of other jobs and written
    /// shortly after; if it is lost (the connection drops first) the broker redelivers
    /// the job, and [`FinishedCache`] finishes it without a second send.
    fn ack(&self) {
        self.acks.ack(self.delivery.delivery_tag);
    }

    fn result_properties(&self) -> BasicProperties {
        let correlation = self
            .delivery
            .properties
            .correlation_id()
            .clone()
            .or_else(|| ShortString::try_new(self.ident.job_id.as_str()).ok());
        let mut headers = FieldTable::default();
        headers.insert(
            header::JOB_ID.into(),
            AMQPValue::LongString(self.ident.job_id.as_str().into()),
        );
        let mut p = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(Utc::now().timestamp().max(0) as u64)
            .with_headers(headers);
        if let Some(c) = correlation {
            p = p.with_correlation_id(c);
        }
        p
    }

    fn delivery_count(&self) -> Deliveries {
        let max = self.shared.settings.amqp.max_deliveries;
        let headers = self.delivery.properties.headers();
        match self.shared.settings.amqp.queue_type {
            // The broker sets `x-delivery-count` on redeliveries; on a first delivery the
            // header can only be a producer's (or a copy's leftover): ignored.
            QueueType::Quorum if self.delivery.redelivered => {
                let n = headers
                    .as_ref()
                    .and_then(|h| int_header(h, header::QUORUM_DELIVERY_COUNT))
                    .unwrap_or(0)
                    .max(0) as u64;
                if n > max as u64 {
                    Deliveries::Over(n)
                } else {
                    Deliveries::Fine
                }
            }
            QueueType::Quorum => Deliveries::Fine,
            QueueType::Classic if self.delivery.redelivered => {
                let n = headers
                    .as_ref()
                    .and_then(|h| int_header(h, header::DELIVERIES))
                    .unwrap_or(0)
                    .clamp(0, u32::MAX as i64 - 1) as u32
                    + 1;
                if n > max {
                    Deliveries::Over(n.into())
                } else {
                    Deliveries::CountAndRequeue(n)
                }
            }
            QueueType::Classic => {
                let n = headers
                    .as_ref()
                    .and_then(|h| int_header(h, header::DELIVERIES))
                    .unwrap_or(0)
                    .max(0) as u64;
                if n > max as u64 {
                    Deliveries::Over(n)
                } else {
                    Deliveries::Fine
                }
            }
        }
    }

    fn cache_key(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.ident.job_id.hash(&mut h);
        self.delivery.data.hash(&mut h);
        h.finish()
    }
}

enum Deliveries {
    Fine,
    Over(u64),
    CountAndRequeue(u32),
}

/// `tokio::time::sleep` that accepts `Duration::MAX` (no deadline).
async fn sleep_long(d: Duration) {
    match tokio::time::Instant::now().checked_add(d) {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What of a job's completion already reached the broker.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    result_published: bool,
    dead_lettered: bool,
}

/// A job whose outcome is known but whose completion did not finish.
#[derive(Debug, Clone)]
pub struct Finished {
    outcome: JobOutcome,
    attempts: u32,
    progress: Progress,
}

/// Outcomes of jobs whose completion was cut short by a lost connection, kept for
/// their redelivery. Bounded: the oldest entries go first.
pub struct FinishedCache {
    inner: Mutex<(HashMap<u64, Finished>, VecDeque<u64>)>,
    capacity: usize,
}

impl FinishedCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
            capacity,
        }
    }

    fn put(&self, key: u64, value: Finished) {
        let mut guard = self.inner.lock().expect("not poisoned");
        let (map, order) = &mut *guard;
        if map.insert(key, value).is_none() {
            order.push_back(key);
        }
        while map.len() > self.capacity {
            match order.pop_front() {
                Some(old) => {
                    map.remove(&old);
                }
                None => break,
            }
        }
    }

    fn take(&self, key: u64) -> Option<Finished> {
        let mut guard = self.inner.lock().expect("not poisoned");
        let (map, order) = &mut *guard;
        let v = map.remove(&key)?;
        order.retain(|k| *k != key);
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_cache_is_bounded_and_takes_once() {
        let c = FinishedCache::new(2);
        let f = || Finished {
            outcome: JobOutcome::Success {
                message_id: "m".into(),
            },
            attempts: 1,
            progress: Progress::default(),
        };
        c.put(1, f());
        c.put(2, f());
        c.put(3, f());
        assert!(c.take(1).is_none());
        assert!(c.take(2).is_some());
        assert!(c.take(2).is_none());
        assert!(c.take(3).is_some());
    }
}
