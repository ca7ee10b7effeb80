//! `retry::parse_retry_after` on any header text and any clock, then the retry
//! decision it feeds: never a panic, never a wait past `max_elapsed`.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use jelou_worker::retry::{RetryDecision, RetryPolicy, parse_retry_after};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (clock, rest) = data.split_at(8);
    let clock = u64::from_le_bytes(clock.try_into().unwrap());
    // Any time from 1970 to about the year 36800.
    let now = UNIX_EPOCH + Duration::from_secs(clock % (1 << 40));
    let Ok(value) = std::str::from_utf8(rest) else {
        return;
    };
    let parsed = parse_retry_after(value, now);
    let trimmed = value.trim();
    if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        assert!(parsed.is_some(), "delay-seconds always parse: {value:?}");
    }
    if let Some(wait) = parsed
        && !trimmed.bytes().all(|b| b.is_ascii_digit())
    {
        // An HTTP date: the wait ends at that date.
        let _ = now
            .checked_add(wait)
            .expect("a date's wait ends at the date");
    }
    let policy = RetryPolicy {
        initial: Duration::from_millis(1 + (clock >> 40) % 10_000),
        multiplier: 1.0 + ((clock >> 50) % 8) as f64,
        max_interval: Duration::from_secs(60),
        max_attempts: 8,
        max_elapsed: Duration::from_secs(900),
    };
    let attempts = (clock % 10) as u32 + 1;
    let elapsed = Duration::from_millis((clock >> 8) % 2_000_000);
    match policy.decide(attempts, elapsed, parsed, (clock % 1000) as f64 / 1000.0) {
        RetryDecision::Wait(wait) => {
            assert!(attempts < policy.max_attempts);
            assert!(elapsed + wait <= policy.max_elapsed);
            if let Some(floor) = parsed {
                assert!(wait >= floor, "Retry-After is a minimum");
            }
        }
        RetryDecision::Exhausted => {}
    }
});
