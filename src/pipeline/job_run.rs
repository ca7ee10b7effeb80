//! One delivery, from the broker's hand to its acknowledgement.
//!
//! ```text
//! delivery ─► read (job.rs) ─► delivery limit ─► [wait] ─► gate ─► attempt ──┐
//!                 │                                 ▲                        │
//!                 │ invalid                         └─ retryable, time left ◄┤
//!                 ▼                                                          ▼
//!            complete: failed? keep the job in the DLQ (confirmed) ─► publish the result (confirmed) ─► ack
//! ```
//!
//! The ack always comes last: a crash anywhere before it makes the broker redeliver
//! the job (at least once). After a failed attempt the job's retry state is saved on
//! the broker: a copy carrying it in headers is published to where it waits (see
//! [`super::waiting`]), confirmed, and only then is the original acked. So no crash
//! can reset a job's attempt count.

use std::sync::Arc;

use chrono::Utc;
use lapin::{message::Delivery, types::ShortString};
use tracing::Instrument;

use super::{
    Session, Shared, Stops,
    decide::{self, AfterFailure, Deliveries},
    finished::cache_key,
    waiting::WaitPlace,
};
use crate::{
    broker::acks::Acks,
    gate::Admission,
    job::{Job, RetryState, parse_job_with},
    outcome::{Attempt, AttemptFailure, ErrorKind, JobFailure, JobOutcome},
};

/// How a job left this worker's hands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Its outcome is published and the delivery acked (or about to be).
    Completed,
    /// A copy carrying its state waits on the broker (for a retry, a paused or paced
    /// bot, a hand-back); the delivery is acked.
    Moved,
    /// Left unacked for the broker to redeliver (the session died, or the grace
    /// period ran out).
    Abandoned,
}

/// What the result says about the job, read as far as the job could be read.
pub(crate) struct Ident {
    pub(crate) job_id: String,
    pub(crate) bot_id: Option<String>,
    pub(crate) user_id: Option<String>,
}

/// Processes one delivery to the end: result published and job acked, or moved, or
/// handed back, or left unacked for the broker to redeliver.
pub(crate) async fn process(
    shared: Arc<Shared>,
    session: Arc<Session>,
    acks: Acks,
    delivery: Delivery,
    stops: Stops,
    place: WaitPlace,
) -> Ended {
    shared.metrics.jobs_in_flight.inc();
    let message_id = delivery.properties.message_id().clone();
    let parsed = parse_job_with(
        &delivery.data,
        message_id.as_ref().map(ShortString::as_str),
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
        place,
    };
    // Boxed: the job's state machine (hyper and lapin futures inside) is several KiB,
    // and a task copies its future when spawned (callgrind: -4.5 % instructions).
    let ended = Box::pin(run.drive(parsed)).instrument(span).await;
    shared.metrics.jobs_in_flight.dec();
    ended
}

/// One delivery being worked on; its methods are the steps of [`JobRun::drive`],
/// spread over this file, [`super::waiting`] and [`super::complete`].
pub(crate) struct JobRun {
    pub(crate) shared: Arc<Shared>,
    pub(crate) session: Arc<Session>,
    /// Acks this delivery (coalesced with others of its channel).
    pub(crate) acks: Acks,
    pub(crate) delivery: Delivery,
    pub(crate) ident: Ident,
    pub(crate) started: tokio::time::Instant,
    pub(crate) stops: Stops,
    /// Where the job waits when it must wait on the broker.
    pub(crate) place: WaitPlace,
}

/// What the gate said, as the loop sees it.
enum Gate {
    Go,
    /// Look again from the top (the deadline may have passed meanwhile).
    Again,
    Left(Ended),
}

impl JobRun {
    async fn drive(self, parsed: Result<Job, crate::job::InvalidJob>) -> Ended {
        let now_ms = Utc::now().timestamp_millis();
        let headers = self.delivery.properties.headers();
        let mut state = RetryState::from_headers(headers.as_ref())
            .bounded(now_ms, self.shared.policy.max_elapsed);
        if let Some(ended) = self.finish_known().await {
            return ended;
        }
        let job = match parsed {
            Ok(job) => job,
            Err(invalid) => {
                tracing::warn!(reason = %invalid.reason, "invalid job");
                let outcome = JobOutcome::failure(ErrorKind::InvalidJob, invalid.reason);
                return self.finish(outcome, state.attempts).await;
            }
        };
        if let Some(ended) = self.check_deliveries(&state).await {
            return ended;
        }
        let mut last = state.last_status.map(|status| AttemptFailure {
            retryable: true,
            http_status: Some(status),
            code: state.last_code.clone(),
            message: state.last_error.clone().unwrap_or_default(),
            retry_after: None,
        });
        loop {
            if let Some(ended) = self.step(&job, &mut state, &mut last).await {
                return ended;
            }
        }
    }

    /// A redelivered job whose outcome this worker already knows is finished without
    /// a new send: its result could not be published before the connection dropped,
    /// or it was, and only the ack was lost with the connection.
    async fn finish_known(&self) -> Option<Ended> {
        if !self.delivery.redelivered {
            return None;
        }
        let known = self.shared.finished.take(self.cache_key())?;
        tracing::info!(
            "redelivered job already finished here: completing it from what is known, not sending it again"
        );
        Some(
            self.complete(known.outcome, known.attempts, known.progress)
                .await,
        )
    }

    /// One turn of the job's loop: the deadline, the wait for its time, the gate, an
    /// attempt, and what follows it. `None`: go round again.
    async fn step(
        &self,
        job: &Job,
        state: &mut RetryState,
        last: &mut Option<AttemptFailure>,
    ) -> Option<Ended> {
        // The deadline first: a job held back (behind its user's earlier jobs, or
        // parked) fails at its own deadline, without waiting any further.
        if let Some(failure) = expired(job, last.as_ref()) {
            return Some(
                self.finish(JobOutcome::Failure(failure), state.attempts)
                    .await,
            );
        }
        if let Some(ended) = self.wait_until_due(state).await {
            return Some(ended);
        }
        if let Some(failure) = expired(job, last.as_ref()) {
            return Some(
                self.finish(JobOutcome::Failure(failure), state.attempts)
                    .await,
            );
        }
        match self.pass_gate(job, state).await {
            Gate::Go => {}
            Gate::Again => return None,
            Gate::Left(ended) => return Some(ended),
        }
        let Some(attempt) = self.attempt(job, state).await else {
            return Some(Ended::Abandoned);
        };
        let failure = match attempt {
            Attempt::Delivered { message_id } => {
                let outcome = JobOutcome::Success { message_id };
                return Some(self.finish(outcome, state.attempts).await);
            }
            Attempt::Failed(f) if !f.retryable => {
                let failure =
                    JobFailure::from_attempt(ErrorKind::Rejected, f.message.clone(), Some(&f));
                return Some(
                    self.finish(JobOutcome::Failure(failure), state.attempts)
                        .await,
                );
            }
            Attempt::Failed(f) => f,
        };
        self.after_failure(job, state, last, failure).await
    }

    /// After a retryable failure: gives up, or saves the job's state and waits.
    async fn after_failure(
        &self,
        job: &Job,
        state: &mut RetryState,
        last: &mut Option<AttemptFailure>,
        failure: AttemptFailure,
    ) -> Option<Ended> {
        tracing::debug!(attempt = state.attempts, error = %failure.message, "attempt failed; may retry");
        let wait = match self.decide_after(job, state, &failure) {
            AfterFailure::GiveUp(f) => {
                return Some(self.finish(JobOutcome::Failure(f), state.attempts).await);
            }
            AfterFailure::RetryAt { next_at_ms, wait } => {
                state.not_before_ms = Some(next_at_ms);
                wait
            }
        };
        state.last_status = failure.http_status;
        state.last_error = Some(failure.message.clone());
        state.last_code = failure.code.clone();
        *last = Some(failure);
        self.checkpoint(state, wait).await
    }

    /// The delivery limit (`amqp.max_deliveries`): a job that keeps coming back
    /// without finishing fails; a classic queue's redelivery is counted first.
    async fn check_deliveries(&self, state: &RetryState) -> Option<Ended> {
        let amqp = &self.shared.settings.amqp;
        let counted = decide::delivery_count(
            amqp.queue_type,
            self.delivery.redelivered,
            self.delivery.properties.headers().as_ref(),
            amqp.max_deliveries,
        );
        match counted {
            Deliveries::Fine => None,
            Deliveries::Over(n) => {
                let outcome = JobOutcome::failure(
                    ErrorKind::DeliveryLimit,
                    format!(
                        "delivered {n} times without finishing (amqp.max_deliveries is {}): it may crash or hang workers",
                        amqp.max_deliveries
                    ),
                );
                Some(self.finish(outcome, state.attempts).await)
            }
            Deliveries::CountAndRequeue(n) => Some(self.requeue_counted(n).await),
        }
    }

    /// Waits for the circuit and the bot's pause and pacing, never past the deadline.
    /// A wait longer than `order.wait_bound_ms` is not slept here: the job goes back
    /// to the broker to wait, without spending an attempt.
    async fn pass_gate(&self, job: &Job, state: &mut RetryState) -> Gate {
        let until_deadline = job
            .deadline
            .map(|d| (d - Utc::now()).to_std().unwrap_or_default())
            .unwrap_or(std::time::Duration::MAX);
        tokio::select! {
            _ = self.shared.gate.circuit_closed() => {}
            _ = super::sleep_long(until_deadline) => return Gate::Again,
            _ = self.stops.shutdown.cancelled() => return Gate::Left(self.hand_back(state).await),
            _ = self.session.lost.cancelled() => return Gate::Left(Ended::Abandoned),
        }
        let bound = self.shared.settings.order.wait_bound();
        match self.shared.gate.reserve(&job.bot_id, bound) {
            Admission::Now(wait) if wait.is_zero() => Gate::Go,
            Admission::Now(wait) => match self.sleep_here(wait, state).await {
                Some(ended) => Gate::Left(ended),
                None => Gate::Go,
            },
            Admission::Later { wait, reason } => {
                self.shared.metrics.order.waited(reason.as_str());
                match self.wait_elsewhere(job, state, wait, reason.as_str()).await {
                    Some(ended) => Gate::Left(ended),
                    None => Gate::Again,
                }
            }
        }
    }

    /// One HTTP attempt; `None` when the grace period ran out during it.
    async fn attempt(&self, job: &Job, state: &mut RetryState) -> Option<Attempt> {
        let now_ms = Utc::now().timestamp_millis();
        state.first_attempt_at_ms.get_or_insert(now_ms);
        state.not_before_ms = None;
        let sent_at = tokio::time::Instant::now();
        let body = bytes::Bytes::copy_from_slice(job.message.get().as_bytes());
        let attempt = tokio::select! {
            a = self.shared.jelou.send_job(job, body) => a,
            _ = self.stops.hard.cancelled() => {
                tracing::warn!("grace period over during an attempt: the job goes back to the queue");
                return None;
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
        Some(attempt)
    }

    fn decide_after(
        &self,
        job: &Job,
        state: &RetryState,
        failure: &AttemptFailure,
    ) -> AfterFailure {
        let now = Utc::now();
        let first = state.first_attempt_at_ms.unwrap_or(now.timestamp_millis());
        let elapsed =
            std::time::Duration::from_millis((now.timestamp_millis() - first).max(0) as u64);
        decide::after_failure(
            &self.shared.policy,
            state.attempts,
            elapsed,
            failure,
            job.deadline,
            now,
            fastrand::f64(),
        )
    }

    pub(crate) fn cache_key(&self) -> u64 {
        cache_key(&self.ident.job_id, &self.delivery.data)
    }
}

/// The `expired` failure of a job whose deadline has passed, if it has.
fn expired(job: &Job, last: Option<&AttemptFailure>) -> Option<JobFailure> {
    let deadline = job.deadline?;
    (Utc::now() >= deadline).then(|| decide::expired_before_send(deadline, last))
}
