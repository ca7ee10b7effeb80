//! Jelou's rules per message type (`job::rules`) and for templates (`job::template`)
//! on any bytes: never a panic nor a recursion past the shapes the rules know, and
//! what they decide is consistent with reading the job:
//! - a job valid with the rules on is valid with them off (the rules only narrow);
//! - a refusal names the field it is about (`message.…` or `template.…`);
//! - a template job's body is the template as written plus exactly one destination,
//!   its userId.
#![no_main]

use jelou_worker::job::{JobKind, parse_job_with, rules, template};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

/// The envelope a fuzzed object is put in, picked by the first byte.
fn envelope(knob: u8, inner: &str) -> String {
    match knob % 3 {
        0 => format!(r#"{{"botId":"B","message":{inner}}}"#),
        1 => format!(r#"{{"botId":"B","userId":"593","template":{inner}}}"#),
        _ => inner.to_string(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    // The rules straight on any JSON value.
    if let Ok(raw) = serde_json::from_str::<&RawValue>(text) {
        match rules::check_message(raw) {
            Ok(rules::Verdict::UnknownType(t)) => {
                assert!(!rules::KNOWN_TYPES.contains(&t.as_str()), "{t}");
            }
            Ok(rules::Verdict::Valid) => assert!(raw.get().starts_with('{')),
            Err(p) => assert!(p.field.starts_with("message"), "{p}"),
        }
        if let Err(p) = template::check_template(raw) {
            assert!(p.field.starts_with("template"), "{p}");
        } else {
            assert!(template::check_shape(raw).is_ok());
        }
    }
    // Whole jobs, as the worker reads them.
    let body = envelope(knob, text);
    let checked = parse_job_with(body.as_bytes(), None, 262_144, true);
    let unchecked = parse_job_with(body.as_bytes(), None, 262_144, false);
    match (&checked, &unchecked) {
        (Ok(_), Err(e)) => panic!("valid with the rules, invalid without: {}", e.reason),
        (Err(e), Ok(_)) => {
            assert!(
                e.reason.starts_with("message") || e.reason.starts_with("template"),
                "{}",
                e.reason
            );
        }
        _ => {}
    }
    if let Ok(job) = &unchecked
        && job.kind == JobKind::Template
    {
        let sent: serde_json::Value =
            serde_json::from_str(job.message.get()).expect("the HSM body is JSON");
        assert_eq!(sent["destinations"], serde_json::json!([job.user_id]));
        assert!(
            job.message
                .get()
                .starts_with(r#"{"destinations":["#),
            "{}",
            job.message.get()
        );
    }
});
