//! `job::parse_job` on any bytes, with the retry headers read alongside: it never
//! panics, and what it accepts keeps the contract's invariants (a non-empty botId
//! that stays one path segment, a verbatim message, a bounded jobId).
#![no_main]

use jelou_worker::{
    jelou::encode_segment,
    job::{MAX_JOB_ID_CHARS, RetryState, parse_job},
};
use lapin::types::{AMQPValue, FieldTable};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the size limit and whether there is a message_id.
    let Some((&knob, body)) = data.split_first() else {
        return;
    };
    let max = if knob & 1 == 0 { 262_144 } else { 64 };
    let message_id = (knob & 2 != 0).then_some("mid-1");
    match parse_job(body, message_id, max) {
        Ok(job) => {
            assert!(body.len() <= max);
            let text = std::str::from_utf8(body).expect("an accepted job is UTF-8");
            assert!(!job.bot_id.is_empty() && !job.user_id.is_empty());
            let id_chars = job.job_id.chars().count();
            assert!((1..=MAX_JOB_ID_CHARS).contains(&id_chars));
            let message = job.message.get();
            assert!(message.starts_with('{'), "{message}");
            assert!(text.contains(message), "the message is sent byte for byte");
            let segment = encode_segment(&job.bot_id);
            assert!(!segment.is_empty());
            assert!(!segment.contains(['/', '?', '#']), "{segment}");
            assert!(segment != "." && segment != "..");
            let url = format!("http://h/v1/bots/{segment}/messages");
            let uri: http::Uri = url.parse().expect("always a valid request target");
            assert_eq!(uri.path(), &url["http://h".len()..]);
            assert_eq!(uri.query(), None);
        }
        Err(invalid) => {
            let id_chars = invalid.job_id.chars().count();
            assert!((1..=MAX_JOB_ID_CHARS).contains(&id_chars));
            assert!(!invalid.reason.is_empty());
            assert!(invalid.bot_id.as_deref() != Some(""));
        }
    }

    // The same bytes as retry headers of every integer and string type.
    let mut headers = FieldTable::default();
    for (i, chunk) in body.chunks(8).take(6).enumerate() {
        let mut n = [0u8; 8];
        n[..chunk.len()].copy_from_slice(chunk);
        let v = i64::from_le_bytes(n);
        let value = match knob >> 4 {
            0 => AMQPValue::LongLongInt(v),
            1 => AMQPValue::LongInt(v as i32),
            2 => AMQPValue::Timestamp(v as u64),
            3 => AMQPValue::ShortShortInt(v as i8),
            _ => AMQPValue::LongString(chunk.to_vec().into()),
        };
        let name = [
            "x-jelou-attempts",
            "x-jelou-first-attempt-at",
            "x-jelou-not-before",
            "x-jelou-last-status",
            "x-jelou-last-error",
            "x-jelou-last-code",
        ][i];
        headers.insert(name.into(), value);
    }
    let state = RetryState::from_headers(Some(&headers));
    assert!(state.attempts <= 1_000_000);
    assert!(state.last_status.is_none_or(|s| (100..=599).contains(&s)));
    let bounded = state
        .clone()
        .bounded(1_700_000_000_000, std::time::Duration::from_secs(900));
    assert!(
        bounded
            .not_before_ms
            .is_none_or(|at| at <= 1_700_000_000_000 + 960_000)
    );
    let mut written = FieldTable::default();
    state.write_headers(&mut written);
    assert_eq!(RetryState::from_headers(Some(&written)), state);
});
