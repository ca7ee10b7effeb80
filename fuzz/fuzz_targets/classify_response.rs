//! `outcome::classify_response` (messages) and `outcome::classify_hsm_response`
//! (template sends) on any status, `Retry-After` and body: never a panic, and the
//! contract's section 2 table holds whatever the body says.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use jelou_worker::outcome::{Attempt, AttemptFailure, classify_hsm_response, classify_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let status = u16::from_le_bytes([data[0], data[1]]) % 1000;
    // Byte 2: length of the Retry-After value that follows (0xff: no header).
    let (retry_after, body) = match data[2] {
        0xff => (None, &data[3..]),
        n => {
            let n = (n as usize).min(data.len() - 3);
            let value = std::str::from_utf8(&data[3..3 + n]).ok();
            (value, &data[3 + n..])
        }
    };
    let now = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    match classify_response(status, retry_after, body, now) {
        Attempt::Delivered { message_id } => {
            assert!((200..300).contains(&status), "{status}");
            let v: serde_json::Value = serde_json::from_slice(body).expect("success is JSON");
            assert_eq!(v["success"], true);
            assert_eq!(v["messageId"], message_id.as_str());
        }
        Attempt::Failed(f) => failure_holds(status, &f),
    }
    let destination = "593987654321";
    match classify_hsm_response(status, retry_after, body, destination, now) {
        Attempt::Delivered { message_id } => {
            assert!((200..300).contains(&status), "{status}");
            let v: Vec<serde_json::Value> =
                serde_json::from_slice(body).expect("success is a JSON array");
            assert!(v.iter().any(|e| e["destination"] == destination
                && e["id"] == message_id.as_str()));
        }
        Attempt::Failed(f) => failure_holds(status, &f),
    }
});

fn failure_holds(status: u16, f: &AttemptFailure) {
    assert_eq!(f.http_status, Some(status));
    let retryable = status == 408 || status == 429 || (500..600).contains(&status);
    assert_eq!(f.retryable, retryable, "{status}");
    assert!(f.retry_after.is_none() || matches!(status, 429 | 503));
    assert!(f.message.chars().count() < 1_000, "{}", f.message.len());
    assert!(f.code.as_ref().is_none_or(|c| c.chars().count() <= 201));
}
