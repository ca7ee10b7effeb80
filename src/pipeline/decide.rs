//! The decisions of a job's life, pure: what follows a failed attempt, whether a
//! delivery is over the limit, and which headers travel with a job's copies. Each is
//! a small function of its inputs, tested without a broker or a clock.

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldTable};

use crate::{
    config::QueueType,
    job::{RetryState, header, int_header, remove},
    outcome::{AttemptFailure, ErrorKind, JobFailure},
    retry::{RetryDecision, RetryPolicy},
};

/// What follows a failed, retryable attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AfterFailure {
    /// The job fails for good (`retries_exhausted`, or `expired` when the next
    /// attempt would start after its deadline).
    GiveUp(JobFailure),
    /// The next attempt starts at `next_at_ms` (ms since the Unix epoch), `wait`
    /// from now.
    RetryAt { next_at_ms: i64, wait: Duration },
}

/// Decides after a retryable failure, from the attempts made, the time since the
/// first attempt, the job's deadline and a random number in [0, 1) for the jitter.
pub(crate) fn after_failure(
    policy: &RetryPolicy,
    attempts: u32,
    elapsed: Duration,
    failure: &AttemptFailure,
    deadline: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    unit_random: f64,
) -> AfterFailure {
    let wait = match policy.decide(attempts, elapsed, failure.retry_after, unit_random) {
        RetryDecision::Wait(wait) => wait,
        RetryDecision::Exhausted => {
            let message = format!("gave up after {attempts} attempts: {}", failure.message);
            return AfterFailure::GiveUp(JobFailure::from_attempt(
                ErrorKind::RetriesExhausted,
                message,
                Some(failure),
            ));
        }
    };
    // `wait` is at most retry.max_elapsed_ms (validated to fit), so this holds.
    let next_at = chrono::Duration::from_std(wait)
        .ok()
        .and_then(|w| now.checked_add_signed(w))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    if let Some(deadline) = deadline
        && next_at > deadline
    {
        let message = format!(
            "the next attempt would start after the deadline {}: {}",
            deadline.to_rfc3339(),
            failure.message
        );
        return AfterFailure::GiveUp(JobFailure::from_attempt(
            ErrorKind::Expired,
            message,
            Some(failure),
        ));
    }
    AfterFailure::RetryAt {
        next_at_ms: next_at.timestamp_millis(),
        wait,
    }
}

/// The failure of a job whose deadline passed before it could be sent.
pub(crate) fn expired_before_send(
    deadline: DateTime<Utc>,
    last: Option<&AttemptFailure>,
) -> JobFailure {
    JobFailure::from_attempt(
        ErrorKind::Expired,
        format!(
            "deadline {} passed before the job could be sent",
            deadline.to_rfc3339()
        ),
        last,
    )
}

/// How many times a delivery has been delivered, against `amqp.max_deliveries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deliveries {
    Fine,
    /// Over the limit: the job fails with `delivery_limit`.
    Over(u64),
    /// A classic queue's redelivery: republish the job with this count in a header
    /// (classic queues do not count deliveries themselves).
    CountAndRequeue(u32),
}

/// Quorum queues count redeliveries in `x-delivery-count`; on a first delivery that
/// header can only be a producer's (or a copy's leftover), so it is ignored. Classic
/// queues do not count: the worker keeps its own count in `x-jelou-deliveries`.
pub(crate) fn delivery_count(
    queue_type: QueueType,
    redelivered: bool,
    headers: Option<&FieldTable>,
    max: u32,
) -> Deliveries {
    let read = |name| {
        headers
            .and_then(|h| int_header(h, name))
            .unwrap_or(0)
            .max(0) as u64
    };
    match (queue_type, redelivered) {
        (QueueType::Quorum, false) => Deliveries::Fine,
        (QueueType::Quorum, true) => {
            over_or(read(header::QUORUM_DELIVERY_COUNT), max, Deliveries::Fine)
        }
        (QueueType::Classic, false) => over_or(read(header::DELIVERIES), max, Deliveries::Fine),
        (QueueType::Classic, true) => {
            let n = read(header::DELIVERIES).min(u32::MAX as u64 - 1) as u32 + 1;
            over_or(n.into(), max, Deliveries::CountAndRequeue(n))
        }
    }
}

fn over_or(n: u64, max: u32, otherwise: Deliveries) -> Deliveries {
    if n > max as u64 {
        Deliveries::Over(n)
    } else {
        otherwise
    }
}

/// Headers of the broker's own bookkeeping: they belong to a delivery, never to a
/// copy the worker publishes.
const BROKER_HEADERS: [&str; 5] = [
    header::QUORUM_DELIVERY_COUNT,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
];

/// Why a copy of a job waits on the broker (`x-jelou-wait-reason`): `retry`, or a
/// reason of [`crate::metrics::WaitLabels`].
pub(crate) const RETRY: &str = "retry";

/// The headers of a copy of a job that carries its retry state (for a retry, a
/// parked wait, a hand-back), the worker's delivery count when counting, and why it
/// waits, if it does.
pub(crate) fn copy_headers(
    original: Option<&FieldTable>,
    state: &RetryState,
    deliveries: Option<u32>,
    reason: Option<&str>,
) -> FieldTable {
    let mut headers = original.cloned().unwrap_or_default();
    for name in BROKER_HEADERS {
        remove(&mut headers, name);
    }
    state.write_headers(&mut headers);
    match reason {
        Some(r) => {
            headers.insert(header::WAIT_REASON.into(), AMQPValue::LongString(r.into()));
        }
        None => remove(&mut headers, header::WAIT_REASON),
    }
    if let Some(n) = deliveries {
        headers.insert(header::DELIVERIES.into(), AMQPValue::LongLongInt(n.into()));
    }
    headers
}

/// The headers of a failed job's copy in the dead-letter queue: the original's,
/// without retry state, plus why and when it failed (what `dlq list` shows).
pub(crate) fn dead_letter_headers(
    original: Option<&FieldTable>,
    failure: &JobFailure,
    attempts: u32,
    job_id: &str,
    failed_at: DateTime<Utc>,
) -> FieldTable {
    let mut headers = original.cloned().unwrap_or_default();
    RetryState::clear_headers(&mut headers);
    let text = |s: &str| AMQPValue::LongString(s.into());
    headers.insert(header::ERROR_KIND.into(), text(failure.kind.as_str()));
    headers.insert(header::ERROR_MESSAGE.into(), text(&failure.message));
    headers.insert(header::FAILED_AT.into(), text(&failed_at.to_rfc3339()));
    headers.insert(
        header::ATTEMPTS.into(),
        AMQPValue::LongLongInt(attempts.into()),
    );
    headers.insert(header::JOB_ID.into(), text(job_id));
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::string_header;

    fn policy() -> RetryPolicy {
        RetryPolicy::from(&crate::config::RetrySettings::default())
    }

    fn failure(retry_after: Option<Duration>) -> AttemptFailure {
        AttemptFailure {
            retryable: true,
            http_status: Some(503),
            code: Some("busy".into()),
            message: "Jelou answered 503".into(),
            retry_after,
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().into()
    }

    #[test]
    fn a_retryable_failure_waits_with_jitter_inside_the_nominal_band() {
        let now = at("2026-01-01T00:00:00Z");
        let d = after_failure(&policy(), 1, Duration::ZERO, &failure(None), None, now, 0.0);
        // initial 500 ms, jitter 0.0 → half of it.
        assert_eq!(
            d,
            AfterFailure::RetryAt {
                next_at_ms: now.timestamp_millis() + 250,
                wait: Duration::from_millis(250)
            }
        );
    }

    #[test]
    fn the_last_attempt_gives_up_as_retries_exhausted() {
        let p = policy();
        let now = at("2026-01-01T00:00:00Z");
        let AfterFailure::GiveUp(f) = after_failure(
            &p,
            p.max_attempts,
            Duration::ZERO,
            &failure(None),
            None,
            now,
            0.5,
        ) else {
            panic!("expected to give up")
        };
        assert_eq!(f.kind, ErrorKind::RetriesExhausted);
        assert_eq!(f.http_status, Some(503));
        assert_eq!(f.code.as_deref(), Some("busy"));
        assert!(
            f.message.starts_with("gave up after 8 attempts"),
            "{}",
            f.message
        );
    }

    #[test]
    fn a_retry_after_the_deadline_expires_now_and_one_before_it_waits() {
        let now = at("2026-01-01T00:00:00Z");
        let wait_10s = failure(Some(Duration::from_secs(10)));
        let soon = Some(at("2026-01-01T00:00:05Z"));
        let AfterFailure::GiveUp(f) =
            after_failure(&policy(), 1, Duration::ZERO, &wait_10s, soon, now, 0.5)
        else {
            panic!("expected to give up")
        };
        assert_eq!(f.kind, ErrorKind::Expired);
        let later = Some(at("2026-01-01T00:00:11Z"));
        assert!(matches!(
            after_failure(&policy(), 1, Duration::ZERO, &wait_10s, later, now, 0.5),
            AfterFailure::RetryAt { wait, .. } if wait == Duration::from_secs(10)
        ));
    }

    fn with(name: &str, n: i64) -> FieldTable {
        let mut h = FieldTable::default();
        h.insert(name.into(), AMQPValue::LongLongInt(n));
        h
    }

    #[test]
    fn quorum_deliveries_are_read_only_on_redeliveries() {
        let h = with(header::QUORUM_DELIVERY_COUNT, 9);
        assert_eq!(
            delivery_count(QueueType::Quorum, false, Some(&h), 5),
            Deliveries::Fine
        );
        assert_eq!(
            delivery_count(QueueType::Quorum, true, Some(&h), 5),
            Deliveries::Over(9)
        );
        let h = with(header::QUORUM_DELIVERY_COUNT, 5);
        assert_eq!(
            delivery_count(QueueType::Quorum, true, Some(&h), 5),
            Deliveries::Fine
        );
        assert_eq!(
            delivery_count(QueueType::Quorum, true, None, 5),
            Deliveries::Fine
        );
    }

    #[test]
    fn classic_redeliveries_are_counted_by_the_worker() {
        assert_eq!(
            delivery_count(QueueType::Classic, true, None, 5),
            Deliveries::CountAndRequeue(1)
        );
        let h = with(header::DELIVERIES, 4);
        assert_eq!(
            delivery_count(QueueType::Classic, true, Some(&h), 5),
            Deliveries::CountAndRequeue(5)
        );
        let h = with(header::DELIVERIES, 5);
        assert_eq!(
            delivery_count(QueueType::Classic, true, Some(&h), 5),
            Deliveries::Over(6)
        );
        // A copy that comes round with a count over the limit fails on its first delivery.
        let h = with(header::DELIVERIES, 6);
        assert_eq!(
            delivery_count(QueueType::Classic, false, Some(&h), 5),
            Deliveries::Over(6)
        );
        let h = with(header::DELIVERIES, -3);
        assert_eq!(
            delivery_count(QueueType::Classic, false, Some(&h), 5),
            Deliveries::Fine
        );
    }

    #[test]
    fn copies_drop_the_brokers_bookkeeping_and_carry_the_state() {
        let mut original = with(header::QUORUM_DELIVERY_COUNT, 2);
        original.insert("x-death".into(), AMQPValue::LongString("d".into()));
        original.insert("trace".into(), AMQPValue::LongString("keep".into()));
        let state = RetryState {
            attempts: 3,
            ..Default::default()
        };
        let h = copy_headers(Some(&original), &state, Some(2), Some("bot_pause"));
        assert_eq!(
            string_header(&h, header::WAIT_REASON).as_deref(),
            Some("bot_pause")
        );
        assert!(!h.inner().contains_key(header::QUORUM_DELIVERY_COUNT));
        assert!(!h.inner().contains_key("x-death"));
        assert_eq!(string_header(&h, "trace").as_deref(), Some("keep"));
        assert_eq!(int_header(&h, header::ATTEMPTS), Some(3));
        assert_eq!(int_header(&h, header::DELIVERIES), Some(2));
    }

    #[test]
    fn dead_letter_headers_say_why_and_drop_the_retry_state() {
        let mut original = FieldTable::default();
        RetryState {
            attempts: 2,
            not_before_ms: Some(5),
            ..Default::default()
        }
        .write_headers(&mut original);
        let f = JobFailure::new(ErrorKind::Rejected, "Jelou answered 400");
        let h = dead_letter_headers(Some(&original), &f, 2, "job-1", at("2026-01-01T00:00:00Z"));
        assert_eq!(
            string_header(&h, header::ERROR_KIND).as_deref(),
            Some("rejected")
        );
        assert_eq!(
            string_header(&h, header::ERROR_MESSAGE).as_deref(),
            Some("Jelou answered 400")
        );
        assert_eq!(string_header(&h, header::JOB_ID).as_deref(), Some("job-1"));
        assert_eq!(int_header(&h, header::ATTEMPTS), Some(2));
        assert!(!h.inner().contains_key(header::NOT_BEFORE));
    }
}
