//! The retry schedule (contract section 2): when the next attempt may start, or that
//! there is none. Pure: time and randomness come in as arguments.
//!
//! The nominal wait before attempt n+1 is `min(max_interval, initial × multiplier^(n−1))`,
//! taken from [`backon`]'s exponential schedule; it is then moved by a random jitter of
//! at most half of it either way. A `Retry-After` is a floor, not capped by
//! `max_interval`. The job gives up at once (no pointless last wait) when it has made
//! `max_attempts` attempts or when the wait would end past `max_elapsed` after the
//! first attempt.

use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::RetrySettings;

/// The retry knobs, as durations.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub multiplier: f64,
    pub max_interval: Duration,
    pub max_attempts: u32,
    pub max_elapsed: Duration,
}

impl From<&RetrySettings> for RetryPolicy {
    fn from(r: &RetrySettings) -> Self {
        Self {
            initial: Duration::from_millis(r.initial_interval_ms),
            multiplier: r.multiplier,
            max_interval: Duration::from_millis(r.max_interval_ms),
            max_attempts: r.max_attempts,
            max_elapsed: Duration::from_millis(r.max_elapsed_ms),
        }
    }
}

/// What to do after a retryable failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Wait this long, then make the next attempt.
    Wait(Duration),
    /// Stop: the job fails with `retries_exhausted`.
    Exhausted,
}

impl RetryPolicy {
    /// The nominal (un-jittered) wait after `attempts_made` attempts (≥ 1).
    pub fn nominal_delay(&self, attempts_made: u32) -> Duration {
        let steps = attempts_made.saturating_sub(1) as usize;
        // backon's factor is an f32; the schedule saturates at max_interval long before
        // the precision matters.
        let delay = ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_factor(self.multiplier as f32)
            .with_max_delay(self.max_interval)
            .without_max_times()
            .build()
            .nth(steps)
            .unwrap_or(self.max_interval);
        delay.min(self.max_interval)
    }

    /// Decides the next step after `attempts_made` attempts, the last of which failed
    /// in a retryable way, `elapsed` after the first attempt started. `retry_after` is
    /// the server's minimum wait, if it gave one; `unit_random` is uniform in [0, 1).
    pub fn decide(
        &self,
        attempts_made: u32,
        elapsed: Duration,
        retry_after: Option<Duration>,
        unit_random: f64,
    ) -> RetryDecision {
        if attempts_made >= self.max_attempts {
            return RetryDecision::Exhausted;
        }
        let nominal = self.nominal_delay(attempts_made);
        let jittered = nominal.mul_f64(0.5 + unit_random.clamp(0.0, 1.0));
        let wait = match retry_after {
            Some(floor) => jittered.max(floor),
            None => jittered,
        };
        match elapsed.checked_add(wait) {
            Some(end) if end <= self.max_elapsed => RetryDecision::Wait(wait),
            _ => RetryDecision::Exhausted,
        }
    }
}

/// Parses a `Retry-After` header value: delay-seconds or an HTTP date (RFC 9110).
/// A date in the past means "no wait"; garbage means no header. The result is not
/// bounded here: [`RetryPolicy::decide`] turns a wait past `max_elapsed` into
/// `Exhausted`, which bounds a `Retry-After` of years.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than a u64 holds is still "very long", not garbage.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(500),
            multiplier: 2.0,
            max_interval: Duration::from_secs(60),
            max_attempts: 8,
            max_elapsed: Duration::from_secs(900),
        }
    }

    #[test]
    fn nominal_schedule_is_exponential_and_capped() {
        let p = policy();
        let got: Vec<u64> = (1..=10)
            .map(|n| p.nominal_delay(n).as_millis() as u64)
            .collect();
        assert_eq!(
            got,
            [
                500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000
            ]
        );
        let p = RetryPolicy {
            multiplier: 1.0,
            ..policy()
        };
        assert_eq!(p.nominal_delay(7), Duration::from_millis(500));
    }

    #[test]
    fn jitter_stays_within_half_either_way() {
        let p = policy();
        let at = |r| p.decide(3, Duration::ZERO, None, r);
        assert_eq!(at(0.0), RetryDecision::Wait(Duration::from_millis(1000)));
        assert_eq!(at(0.5), RetryDecision::Wait(Duration::from_millis(2000)));
        assert_eq!(
            at(0.999_999),
            RetryDecision::Wait(Duration::from_micros(2_999_998))
        );
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let p = policy();
        assert!(matches!(
            p.decide(7, Duration::ZERO, None, 0.5),
            RetryDecision::Wait(_)
        ));
        assert_eq!(
            p.decide(8, Duration::ZERO, None, 0.5),
            RetryDecision::Exhausted
        );
        let one = RetryPolicy {
            max_attempts: 1,
            ..policy()
        };
        assert_eq!(
            one.decide(1, Duration::ZERO, None, 0.5),
            RetryDecision::Exhausted
        );
    }

    #[test]
    fn gives_up_at_once_when_the_wait_would_end_past_max_elapsed() {
        let p = RetryPolicy {
            max_elapsed: Duration::from_secs(10),
            ..policy()
        };
        // nominal 4 s after 4 attempts, 7 s elapsed: 11 s > 10 s.
        assert_eq!(
            p.decide(4, Duration::from_secs(7), None, 0.5),
            RetryDecision::Exhausted
        );
        assert_eq!(
            p.decide(4, Duration::from_secs(6), None, 0.5),
            RetryDecision::Wait(Duration::from_secs(4))
        );
    }

    #[test]
    fn retry_after_is_a_floor_beyond_max_interval() {
        let p = policy();
        let long = Some(Duration::from_secs(120));
        assert_eq!(
            p.decide(1, Duration::ZERO, long, 0.5),
            RetryDecision::Wait(Duration::from_secs(120))
        );
        let short = Some(Duration::from_millis(10));
        assert_eq!(
            p.decide(1, Duration::ZERO, short, 0.5),
            RetryDecision::Wait(Duration::from_millis(500))
        );
        let years = parse_retry_after("99999999999", SystemTime::now());
        assert_eq!(
            p.decide(1, Duration::ZERO, years, 0.5),
            RetryDecision::Exhausted
        );
    }

    #[test]
    fn parses_retry_after_seconds_and_dates() {
        let now = httpdate::parse_http_date("Tue, 24 Nov 2026 17:00:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Tue, 24 Nov 2026 17:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Tue, 24 Nov 2026 16:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("184467440737095516150", now),
            Some(Duration::from_secs(u64::MAX))
        );
        for bad in ["", "-5", "1.5", "soon", "Tue, 99 Nov 2026 17:00:30 GMT"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
    }
}
