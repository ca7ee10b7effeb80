//! The delivery pipeline's types and its pure decisions: what one HTTP attempt came to
//! ([`Attempt`]), and how a job ended ([`JobOutcome`]). Classification of Jelou's
//! answers (contract section 2) lives here, apart from the HTTP client, so that every
//! row of the contract's table is unit-tested without a socket.

use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::retry::parse_retry_after;

/// How one HTTP attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// 2xx with `success: true` and a string `messageId`.
    Delivered { message_id: String },
    /// Anything else.
    Failed(AttemptFailure),
}

/// A failed attempt, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptFailure {
    /// 408, 429, 5xx, connect error, timeout, reset: worth another attempt.
    pub retryable: bool,
    /// Status of the response, `None` when none came.
    pub http_status: Option<u16>,
    /// Jelou's error code or key, when its body had one.
    pub code: Option<String>,
    /// For a human: what happened.
    pub message: String,
    /// `Retry-After` of a 429 or 503: the minimum wait before the next attempt.
    pub retry_after: Option<Duration>,
}

impl AttemptFailure {
    /// A failure without a response (connect error, timeout, reset): retryable.
    pub fn transport(message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            http_status: None,
            code: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 401 or 403: the credentials are wrong or revoked.
    pub fn is_auth(&self) -> bool {
        matches!(self.http_status, Some(401 | 403))
    }

    /// 429: Jelou or WhatsApp asks us to slow down.
    pub fn is_rate_limited(&self) -> bool {
        self.http_status == Some(429)
    }

    /// A sign that Jelou itself is unwell (5xx, 408, no response), as opposed to a
    /// verdict on this job or a rate limit.
    pub fn is_outage(&self) -> bool {
        self.retryable && !self.is_rate_limited()
    }
}

/// The failure kinds of the contract's section 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    InvalidJob,
    Rejected,
    RetriesExhausted,
    Expired,
    DeliveryLimit,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::InvalidJob,
        ErrorKind::Rejected,
        ErrorKind::RetriesExhausted,
        ErrorKind::Expired,
        ErrorKind::DeliveryLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidJob => "invalid_job",
            ErrorKind::Rejected => "rejected",
            ErrorKind::RetriesExhausted => "retries_exhausted",
            ErrorKind::Expired => "expired",
            ErrorKind::DeliveryLimit => "delivery_limit",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// How a job ended: what its result says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    Success { message_id: String },
    Failure(JobFailure),
}

/// A failed job: the result's `error` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    pub kind: ErrorKind,
    pub message: String,
    pub http_status: Option<u16>,
    pub code: Option<String>,
}

impl JobFailure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            http_status: None,
            code: None,
        }
    }

    /// A failure carrying the details of the last attempt.
    pub fn from_attempt(
        kind: ErrorKind,
        message: impl Into<String>,
        last: Option<&AttemptFailure>,
    ) -> Self {
        Self {
            kind,
            message: message.into(),
            http_status: last.and_then(|l| l.http_status),
            code: last.and_then(|l| l.code.clone()),
        }
    }
}

impl JobOutcome {
    pub fn failure(kind: ErrorKind, message: impl Into<String>) -> Self {
        JobOutcome::Failure(JobFailure::new(kind, message))
    }

    /// `"success"` or the failure kind, for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            JobOutcome::Success { .. } => "success",
            JobOutcome::Failure(f) => f.kind.as_str(),
        }
    }
}

#[derive(Deserialize)]
struct SuccessBody {
    success: bool,
    #[serde(rename = "messageId")]
    message_id: serde_json::Value,
}

/// Classifies a response (contract section 2). `body` is at most the capped prefix
/// that was read; `retry_after` is the raw header; `now` dates an HTTP-date header.
pub fn classify_response(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    now: SystemTime,
) -> Attempt {
    if (200..300).contains(&status) {
        // serde reads a JSON array positionally into a struct (`[true, "m"]`): only an
        // object is Jelou's success body.
        let is_object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        if is_object
            && let Ok(SuccessBody {
                success: true,
                message_id: serde_json::Value::String(id),
            }) = serde_json::from_slice::<SuccessBody>(body)
        {
            return Attempt::Delivered { message_id: id };
        }
        let (detail, code) = error_details(body);
        return Attempt::Failed(AttemptFailure {
            retryable: false,
            http_status: Some(status),
            code,
            message: format!(
                "Jelou answered {status} without `success: true` and a string `messageId`{}; \
                 the message may have been accepted, so it is not resent",
                detail.map(|d| format!(" ({d})")).unwrap_or_default()
            ),
            retry_after: None,
        });
    }
    classify_failure(status, retry_after, body, now)
}

/// Classifies an answer of Jelou's template send (`POST /v2/whatsapp/{botId}/hsm`),
/// made for one `destination`. Success is a 2xx whose JSON array holds an entry
/// `{"id": "<string>", "destination": destination}`: that `id` is the messageId.
/// Any other 2xx is a verdict, never resent (as for messages); every other status is
/// classified as for messages. Jelou's HSM errors look like
/// `{"message": ["Template does not exist"], "status": "failed"}`.
pub fn classify_hsm_response(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    destination: &str,
    now: SystemTime,
) -> Attempt {
    if !(200..300).contains(&status) {
        return classify_failure(status, retry_after, body, now);
    }
    let is_array = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    if is_array && let Ok(entries) = serde_json::from_slice::<Vec<serde_json::Value>>(body) {
        let id = entries
            .iter()
            .find_map(|e| match (e.get("destination"), e.get("id")) {
                (Some(serde_json::Value::String(d)), Some(serde_json::Value::String(id)))
                    if d == destination =>
                {
                    Some(id.clone())
                }
                _ => None,
            });
        if let Some(id) = id {
            return Attempt::Delivered { message_id: id };
        }
    }
    let (detail, code) = error_details(body);
    Attempt::Failed(AttemptFailure {
        retryable: false,
        http_status: Some(status),
        code,
        message: format!(
            "Jelou answered {status} without an entry for destination {destination} with a string `id`{}; \
             the template may have been sent, so it is not resent",
            detail.map(|d| format!(" ({d})")).unwrap_or_default()
        ),
        retry_after: None,
    })
}

/// Classifies a response that is not a 2xx: 408, 429 and 5xx are retryable, the rest
/// verdicts.
fn classify_failure(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    now: SystemTime,
) -> Attempt {
    let retryable = status == 408 || status == 429 || (500..600).contains(&status);
    let retry_after = if matches!(status, 429 | 503) {
        retry_after.and_then(|v| parse_retry_after(v, now))
    } else {
        None
    };
    let (detail, code) = error_details(body);
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut message = format!("Jelou answered {status} {reason}")
        .trim_end()
        .to_string();
    if (300..400).contains(&status) {
        message
            .push_str(" (redirects are never followed: credentials must not go to another host)");
    }
    if let Some(d) = detail {
        message.push_str(": ");
        message.push_str(&d);
    }
    Attempt::Failed(AttemptFailure {
        retryable,
        http_status: Some(status),
        code,
        message,
        retry_after,
    })
}

/// The longest error text kept from a response, in characters.
const MAX_DETAIL_CHARS: usize = 500;

/// Reads Jelou's error body leniently. The shapes it has been seen to use:
/// `{"message": "..." | ["...", ...], "error": {"code" | "key": ...}}`; the documented
/// `{"code": "bot_not_found", "description": "..."}` (codes `bot_not_found` 404,
/// `forbidden_bot` 403, `message_could_not_be_send` 400,
/// `notification_could_not_be_send` 400, `unauthorized` 401, `unprocessable_entity`
/// 422, `internal_server_error` 500); and the HSM send's
/// `{"message": ["Template does not exist"], "status": "failed"}`. The text is
/// `message`, else `error.message`, else `description`, else `error.description`;
/// the code is `error.code`, `error.key`, or a top-level `code`/`key`. Returns the
/// human text and the code. A body that is not JSON gives neither.
pub fn error_details(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (None, None);
    };
    let text = |v: &serde_json::Value| -> Option<String> {
        match v {
            serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
            serde_json::Value::Array(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .filter_map(|i| match i {
                        serde_json::Value::String(s) => Some(s.clone()),
                        serde_json::Value::Null => None,
                        other => Some(other.to_string()),
                    })
                    .collect();
                (!parts.is_empty()).then(|| parts.join("; "))
            }
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let error = v.get("error");
    let message = v
        .get("message")
        .and_then(text)
        .or_else(|| error.and_then(|e| e.get("message")).and_then(text))
        .or_else(|| v.get("description").and_then(text))
        .or_else(|| error.and_then(|e| e.get("description")).and_then(text))
        .or_else(|| error.and_then(text))
        .map(|m| truncate_chars(&m, MAX_DETAIL_CHARS));
    let code = [
        error.and_then(|e| e.get("code")),
        error.and_then(|e| e.get("key")),
        v.get("code"),
        v.get("key"),
    ]
    .into_iter()
    .flatten()
    .find_map(|c| match c {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
    .map(|c| truncate_chars(&c, 200));
    (message, code)
}

fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        httpdate::parse_http_date("Tue, 24 Nov 2026 17:00:00 GMT").unwrap()
    }

    fn failed(status: u16, body: &str) -> AttemptFailure {
        match classify_response(status, None, body.as_bytes(), now()) {
            Attempt::Failed(f) => f,
            other => panic!("{status}: {other:?}"),
        }
    }

    #[test]
    fn success_needs_success_true_and_a_string_message_id() {
        for status in [200, 201, 202, 299] {
            assert_eq!(
                classify_response(
                    status,
                    None,
                    br#"{"success":true,"messageId":"m1","x":1}"#,
                    now()
                ),
                Attempt::Delivered {
                    message_id: "m1".into()
                }
            );
        }
        for body in [
            r#"{"success":false,"messageId":"m1"}"#,
            r#"{"success":true,"messageId":5}"#,
            r#"{"success":true}"#,
            r#"{"success":"true","messageId":"m"}"#,
            "",
            "<html>",
            "[]",
        ] {
            let f = failed(200, body);
            assert!(!f.retryable, "{body}");
            assert_eq!(f.http_status, Some(200));
            assert!(f.message.contains("not resent"), "{}", f.message);
        }
    }

    #[test]
    fn only_a_json_object_is_a_success_body() {
        // Found by fuzzing (fuzz/fuzz_targets/classify_response.rs): serde read the
        // array positionally into the success struct.
        for body in [
            r#"[true,""]"#,
            r#"[true,"m1"]"#,
            r#" [true, "m1"] "#,
            r#"{"success":false,"success":true,"messageId":"m"}"#,
        ] {
            let f = failed(200, body);
            assert!(!f.retryable, "{body}");
        }
        assert_eq!(
            classify_response(200, None, br#" {"success":true,"messageId":"m1"} "#, now()),
            Attempt::Delivered {
                message_id: "m1".into()
            }
        );
    }

    #[test]
    fn retryable_statuses() {
        for status in [408, 429, 500, 502, 503, 504, 599] {
            assert!(failed(status, "").retryable, "{status}");
        }
        for status in [
            300, 301, 302, 307, 400, 401, 403, 404, 409, 422, 451, 100, 600,
        ] {
            let f = failed(status, "");
            assert!(!f.retryable, "{status}");
            assert_eq!(f.http_status, Some(status));
        }
        assert!(failed(302, "").message.contains("redirect"));
        assert!(
            failed(401, "").is_auth() && failed(403, "").is_auth() && !failed(404, "").is_auth()
        );
        assert!(failed(503, "").is_outage() && !failed(429, "").is_outage());
    }

    #[test]
    fn retry_after_only_on_429_and_503() {
        let ra = |status| match classify_response(status, Some("7"), b"", now()) {
            Attempt::Failed(f) => f.retry_after,
            _ => unreachable!(),
        };
        assert_eq!(ra(429), Some(Duration::from_secs(7)));
        assert_eq!(ra(503), Some(Duration::from_secs(7)));
        assert_eq!(ra(500), None);
        assert_eq!(ra(408), None);
    }

    #[test]
    fn jelou_error_bodies_are_read_leniently() {
        let f = failed(
            400,
            r#"{"message":"userId invalid","error":{"code":"E_USER"}}"#,
        );
        assert_eq!(f.code.as_deref(), Some("E_USER"));
        assert!(
            f.message.contains("400 Bad Request: userId invalid"),
            "{}",
            f.message
        );
        let f = failed(
            422,
            r#"{"message":["a is bad","b is bad"],"error":{"key":"validation"}}"#,
        );
        assert_eq!(f.code.as_deref(), Some("validation"));
        assert!(f.message.ends_with("a is bad; b is bad"), "{}", f.message);
        let f = failed(500, r#"{"error":{"message":"boom","code":1234}}"#);
        assert_eq!(f.code.as_deref(), Some("1234"));
        assert!(f.message.ends_with("boom"));
        let f = failed(404, "<html>not found</html>");
        assert_eq!(
            (f.code, f.message.as_str()),
            (None, "Jelou answered 404 Not Found")
        );
        let long = format!(r#"{{"message":"{}"}}"#, "x".repeat(5000));
        assert!(failed(400, &long).message.chars().count() < 600);
    }

    #[test]
    fn jelou_documented_error_codes_and_descriptions() {
        let cases = [
            (404, "bot_not_found", "The bot does not exist"),
            (
                403,
                "forbidden_bot",
                "The bot does not belong to this client",
            ),
            (
                400,
                "message_could_not_be_send",
                "The message could not be sent",
            ),
            (
                400,
                "notification_could_not_be_send",
                "The notification could not be sent",
            ),
            (401, "unauthorized", "Invalid credentials"),
            (422, "unprocessable_entity", "type is required"),
            (500, "internal_server_error", "Something went wrong"),
        ];
        for (status, code, description) in cases {
            let body = format!(r#"{{"code":"{code}","description":"{description}"}}"#);
            let f = failed(status, &body);
            assert_eq!(f.code.as_deref(), Some(code), "{body}");
            assert!(f.message.ends_with(description), "{}", f.message);
            assert_eq!(f.retryable, status == 500, "{status}");
        }
        // Nested under `error` too; `message` wins over `description`.
        let f = failed(
            404,
            r#"{"error":{"code":"bot_not_found","description":"gone"}}"#,
        );
        assert_eq!(
            (f.code.as_deref(), f.message.ends_with("gone")),
            (Some("bot_not_found"), true)
        );
        let f = failed(400, r#"{"message":"m","description":"d","code":"c"}"#);
        assert!(f.message.ends_with(": m"), "{}", f.message);
    }

    fn hsm(status: u16, body: &str, destination: &str) -> Attempt {
        classify_hsm_response(status, None, body.as_bytes(), destination, now())
    }

    #[test]
    fn hsm_success_needs_an_entry_for_the_destination_with_a_string_id() {
        assert_eq!(
            hsm(
                200,
                r#"[{"id":"wamid.1","destination":"593987654321"}]"#,
                "593987654321"
            ),
            Attempt::Delivered {
                message_id: "wamid.1".into()
            }
        );
        assert_eq!(
            hsm(
                201,
                r#" [{"id":"a","destination":"1"},{"destination":"2","id":"b","x":1}] "#,
                "2"
            ),
            Attempt::Delivered {
                message_id: "b".into()
            }
        );
        for body in [
            r#"[{"id":"a","destination":"other"}]"#,
            r#"[{"id":5,"destination":"593"}]"#,
            r#"[{"destination":"593"}]"#,
            r#"[]"#,
            r#"{"id":"a","destination":"593"}"#,
            r#"{"success":true,"messageId":"m"}"#,
            r#"[1,"a",null]"#,
            "",
            "<html>",
        ] {
            match hsm(200, body, "593") {
                Attempt::Failed(f) => {
                    assert!(!f.retryable, "{body}");
                    assert_eq!(f.http_status, Some(200));
                    assert!(f.message.contains("not resent"), "{}", f.message);
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn hsm_errors_are_classified_as_for_messages() {
        let body = r#"{"message":["Template does not exist"],"status":"failed"}"#;
        for (status, retryable) in [(400, false), (404, false), (429, true), (503, true)] {
            match hsm(status, body, "593") {
                Attempt::Failed(f) => {
                    assert_eq!(f.retryable, retryable, "{status}");
                    assert!(
                        f.message.ends_with("Template does not exist"),
                        "{}",
                        f.message
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        // A failed status inside a 2xx is a verdict that says why.
        match hsm(200, body, "593") {
            Attempt::Failed(f) => {
                assert!(!f.retryable);
                assert!(
                    f.message.contains("Template does not exist"),
                    "{}",
                    f.message
                );
            }
            other => panic!("{other:?}"),
        }
        let ra = classify_hsm_response(429, Some("3"), b"", "593", now());
        assert!(matches!(ra, Attempt::Failed(f) if f.retry_after == Some(Duration::from_secs(3))));
    }

    #[test]
    fn error_kinds_round_trip() {
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(ErrorKind::parse("nope"), None);
    }
}
