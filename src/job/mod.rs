//! Reading a job: the contract's section 1, and the retry state the worker keeps in
//! the job's AMQP headers. Pure (but for one warning per unknown message type), so
//! every rule is unit-tested here.
//!
//! A job carries either a `message` (sent to `POST /v1/bots/{botId}/messages`) or a
//! `template` and a top-level `userId` (sent to the HSM endpoint, see [`template`]).
//! The `message` is kept as the producer wrote it ([`RawValue`]) and sent to Jelou byte
//! for byte: the worker checks it against Jelou's documented rules for its type
//! ([`rules`], unless `jelou.validate_messages` is off) but never re-serialises it.

pub mod rules;
pub mod shape;
pub mod template;

use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldTable};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest accepted `jobId`, in characters.
pub const MAX_JOB_ID_CHARS: usize = 200;

/// Names of the AMQP headers the worker reads and writes.
pub mod header {
    /// On results: the jobId (a long string, unlike `correlation_id`).
    pub const JOB_ID: &str = "x-job-id";
    /// On a parked or handed-back job: HTTP attempts made so far.
    pub const ATTEMPTS: &str = "x-jelou-attempts";
    /// On a parked job: when its first attempt started (ms since the Unix epoch).
    pub const FIRST_ATTEMPT_AT: &str = "x-jelou-first-attempt-at";
    /// On a parked job: no attempt before this time (ms since the Unix epoch).
    pub const NOT_BEFORE: &str = "x-jelou-not-before";
    /// On a parked job: HTTP status of the last response, if any.
    pub const LAST_STATUS: &str = "x-jelou-last-status";
    /// On a parked job: why the last attempt failed.
    pub const LAST_ERROR: &str = "x-jelou-last-error";
    /// On a parked job: Jelou's error code of the last response, if any.
    pub const LAST_CODE: &str = "x-jelou-last-code";
    /// On a job in a classic queue: deliveries that ended without a result.
    pub const DELIVERIES: &str = "x-jelou-deliveries";
    /// Why a copy waits on the broker (`retry`, `bot_pause`, `bot_pace`, `user_pace`).
    pub const WAIT_REASON: &str = "x-jelou-wait-reason";
    /// The order of a job among its user's jobs (order on): stamped by the router,
    /// microseconds, increasing in the order jobs left the jobs queue.
    pub const SEQ: &str = "x-jelou-seq";
    /// Marks the ownership token of a router or partition queue (order on).
    pub const TOKEN: &str = "x-jelou-token";
    /// Set by quorum queues on redelivered messages.
    pub const QUORUM_DELIVERY_COUNT: &str = "x-delivery-count";
    /// On a dead-lettered job: the failure kind, message and time, for `dlq list`.
    pub const ERROR_KIND: &str = "x-jelou-error-kind";
    pub const ERROR_MESSAGE: &str = "x-jelou-error-message";
    pub const FAILED_AT: &str = "x-jelou-failed-at";
}

/// A job that passed validation.
#[derive(Debug, Clone)]
pub struct Job {
    pub job_id: String,
    pub bot_id: String,
    /// The recipient: `message.userId`, or a template job's top-level `userId`. With
    /// the botId, the key that orders a user's jobs.
    pub user_id: String,
    /// The request body: the `message` object exactly as the producer sent it, or for
    /// a template job the `template` object as sent plus `"destinations": [userId]`.
    pub message: Box<RawValue>,
    pub deadline: Option<DateTime<Utc>>,
    /// Which Jelou endpoint the body goes to.
    pub kind: JobKind,
    /// A message `type` the worker has no rules for: sent as given, not checked.
    pub unchecked_type: Option<String>,
}

/// The two kinds of job, by the endpoint they are sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// `message`: `POST {base_url}/v1/bots/{botId}/messages`.
    Message,
    /// `template`: `POST {base_url}/v2/whatsapp/{botId}/hsm`.
    Template,
}

/// A job that cannot be processed, with what could still be read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidJob {
    pub job_id: String,
    pub bot_id: Option<String>,
    pub user_id: Option<String>,
    /// What is wrong, for a human: names the field.
    pub reason: String,
}

#[derive(Deserialize)]
struct RawJob<'a> {
    #[serde(rename = "jobId", default, borrow)]
    job_id: Option<&'a RawValue>,
    #[serde(rename = "botId", default, borrow)]
    bot_id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    message: Option<&'a RawValue>,
    #[serde(default, borrow)]
    template: Option<&'a RawValue>,
    /// A template job's recipient (a message job's is `message.userId`).
    #[serde(rename = "userId", default, borrow)]
    user_id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    deadline: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawMessage<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Option<&'a RawValue>,
    #[serde(rename = "userId", default, borrow)]
    user_id: Option<&'a RawValue>,
}

/// Reads a job from an AMQP body, checking its message against Jelou's rules.
/// `message_id` is the AMQP property, the jobId's fallback; `max_bytes` is
/// `amqp.max_job_bytes`.
pub fn parse_job(
    body: &[u8],
    message_id: Option<&str>,
    max_bytes: usize,
) -> Result<Job, InvalidJob> {
    parse_job_with(body, message_id, max_bytes, true)
}

/// [`parse_job`], with Jelou's rules per message type checked only when `validate`
/// (`jelou.validate_messages`); the contract's base checks always apply.
///
/// The steps, in the order their errors are reported: the body as a whole
/// ([`read_raw`]), the jobId, the botId, message vs template, then the chosen kind's
/// own fields ([`template_job`], [`message_job`]).
pub fn parse_job_with(
    body: &[u8],
    message_id: Option<&str>,
    max_bytes: usize,
    validate: bool,
) -> Result<Job, InvalidJob> {
    let unnamed = Known {
        message_id,
        job_id: None,
        bot_id: None,
        user_id: None,
    };
    let raw = read_raw(body, max_bytes).map_err(|reason| unnamed.fail(reason))?;
    let job_id = read_job_id(raw.job_id).map_err(|reason| unnamed.fail(reason))?;
    // Read what we can first, so an invalid job's result still names it.
    let head = read_head(raw.message);
    let is_template = raw.template.is_some() && raw.message.is_none();
    let user_id = if is_template {
        lenient_string(raw.user_id)
    } else {
        head.as_ref().ok().and_then(|h| lenient_string(h.user_id))
    };
    let known = Known {
        message_id,
        job_id,
        bot_id: lenient_string(raw.bot_id),
        user_id,
    };
    let bot = required(
        raw.bot_id,
        &known.bot_id,
        "botId is missing",
        "botId must be a non-empty string",
    )
    .map_err(|reason| known.fail(reason))?;
    if raw.message.is_some() && raw.template.is_some() {
        return Err(known
            .fail("a job carries either message or template (with a top-level userId), not both"));
    }
    if let Some(template) = raw.template {
        return template_job(template, &raw, known, bot, validate);
    }
    let Some(message) = raw.message else {
        return Err(known.fail(
            "message is missing (or template, with a top-level userId, for a template job)",
        ));
    };
    message_job(message, head, &raw, known, bot, validate)
}

/// What could be read of a job so far, so that an invalid job's result still
/// names it.
struct Known<'m> {
    /// The AMQP `message_id`: the jobId's fallback.
    message_id: Option<&'m str>,
    job_id: Option<String>,
    bot_id: Option<String>,
    user_id: Option<String>,
}

impl Known<'_> {
    /// The invalid job, with what is known of it (an empty botId or userId is left
    /// out) and the jobId's fallback if it had none.
    fn fail(&self, reason: impl Into<String>) -> InvalidJob {
        InvalidJob {
            job_id: self
                .job_id
                .clone()
                .unwrap_or_else(|| fallback_job_id(self.message_id)),
            bot_id: self.bot_id.clone().filter(|b| !b.is_empty()),
            user_id: self.user_id.clone().filter(|u| !u.is_empty()),
            reason: reason.into(),
        }
    }

    /// The jobId of a valid job: its own, else the fallback.
    fn into_job_id(self) -> String {
        let message_id = self.message_id;
        self.job_id.unwrap_or_else(|| fallback_job_id(message_id))
    }
}

/// A job without a jobId of its own is named by its AMQP `message_id` if that would
/// be a valid jobId, else by a fresh UUID.
fn fallback_job_id(message_id: Option<&str>) -> String {
    message_id
        .filter(|id| valid_job_id(id))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// The body as a whole: its size, UTF-8, a JSON object; then its top-level fields,
/// borrowed from `body`.
fn read_raw(body: &[u8], max_bytes: usize) -> Result<RawJob<'_>, String> {
    if body.len() > max_bytes {
        return Err(format!(
            "job is {} bytes, larger than amqp.max_job_bytes ({max_bytes})",
            body.len()
        ));
    }
    // JSON is UTF-8 (RFC 8259): serde_json checks the strings it reads, but not those
    // of fields it skips, so the whole body is checked here.
    if std::str::from_utf8(body).is_err() {
        return Err("job is not UTF-8 JSON".into());
    }
    // serde would also read a JSON array positionally into the struct: refuse it.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        let reason = if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
            "job is not valid JSON"
        } else {
            "job must be a JSON object"
        };
        return Err(reason.into());
    }
    serde_json::from_slice(body).map_err(|e| format!("job is not valid JSON: {e}"))
}

/// The `jobId`: absent or null is `None`; anything but a valid one is an error.
fn read_job_id(raw: Option<&RawValue>) -> Result<Option<String>, String> {
    match raw.map(string_of) {
        None | Some(Ok(None)) => Ok(None),
        Some(Ok(Some(id))) if valid_job_id(&id) => Ok(Some(id)),
        Some(_) => Err(format!(
            "jobId must be a string of 1 to {MAX_JOB_ID_CHARS} characters"
        )),
    }
}

/// The `message`'s `type` and `userId`. A message that is an object but cannot be
/// read (a duplicate `type` or `userId`: which one would Jelou read?) says why.
fn read_head(message: Option<&RawValue>) -> Result<RawMessage<'_>, String> {
    match message {
        Some(m) if m.get().starts_with('{') => {
            serde_json::from_str(m.get()).map_err(|e| format!("message: {e}"))
        }
        _ => Err("message must be a JSON object".into()),
    }
}

/// A string field as far as it can be read: `None` if absent, null or not a string.
fn lenient_string(raw: Option<&RawValue>) -> Option<String> {
    raw.and_then(|v| string_of(v).ok().flatten())
}

/// A required non-empty string field, from its raw value and what
/// [`lenient_string`] read of it: `missing` if absent, `bad` if not a non-empty
/// string.
fn required(
    raw: Option<&RawValue>,
    read: &Option<String>,
    missing: &'static str,
    bad: &'static str,
) -> Result<String, &'static str> {
    match (raw, read) {
        (None, _) => Err(missing),
        (Some(_), Some(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(bad),
    }
}

/// A template job: its top-level `userId`, its deadline, its template (the shape
/// only, unless `validate`); the body is the template plus its destination.
fn template_job(
    template: &RawValue,
    raw: &RawJob<'_>,
    known: Known<'_>,
    bot: String,
    validate: bool,
) -> Result<Job, InvalidJob> {
    let user = required(
        raw.user_id,
        &known.user_id,
        "userId is missing (a template job names its recipient)",
        "userId must be a non-empty string",
    )
    .map_err(|reason| known.fail(reason))?;
    let deadline = read_deadline(raw.deadline).map_err(|reason| known.fail(reason))?;
    let checked = if validate {
        template::check_template(template)
    } else {
        template::check_shape(template)
    };
    checked.map_err(|p| known.fail(p.to_string()))?;
    Ok(Job {
        job_id: known.into_job_id(),
        bot_id: bot,
        message: template::hsm_body(template, &user),
        user_id: user,
        deadline,
        kind: JobKind::Template,
        unchecked_type: None,
    })
}

/// A message job: its message's head (`type`, `userId`), its deadline, then Jelou's
/// rules for its type if `validate`; the body is the message as sent.
fn message_job(
    message: &RawValue,
    head: Result<RawMessage<'_>, String>,
    raw: &RawJob<'_>,
    known: Known<'_>,
    bot: String,
    validate: bool,
) -> Result<Job, InvalidJob> {
    let head = head.map_err(|reason| known.fail(reason))?;
    match head.kind.map(string_of) {
        None => return Err(known.fail("message.type is missing")),
        Some(Ok(Some(t))) if !t.is_empty() => {}
        Some(_) => return Err(known.fail("message.type must be a non-empty string")),
    }
    let user = required(
        head.user_id,
        &known.user_id,
        "message.userId is missing",
        "message.userId must be a non-empty string",
    )
    .map_err(|reason| known.fail(reason))?;
    let deadline = read_deadline(raw.deadline).map_err(|reason| known.fail(reason))?;
    let unchecked_type = if validate {
        check_rules(message).map_err(|reason| known.fail(reason))?
    } else {
        None
    };
    Ok(Job {
        job_id: known.into_job_id(),
        bot_id: bot,
        user_id: user,
        message: message.to_owned(),
        deadline,
        kind: JobKind::Message,
        unchecked_type,
    })
}

/// Jelou's rules for the message's type: `Some(type)` for a type the worker has no
/// rules for (warned about once), the problem if it breaks them.
fn check_rules(message: &RawValue) -> Result<Option<String>, String> {
    match rules::check_message(message) {
        Ok(rules::Verdict::Valid) => Ok(None),
        Ok(rules::Verdict::UnknownType(t)) => {
            warn_unknown_type(&t);
            Ok(Some(t))
        }
        Err(p) => Err(p.to_string()),
    }
}

fn read_deadline(raw: Option<&RawValue>) -> Result<Option<DateTime<Utc>>, String> {
    match raw.map(string_of) {
        None | Some(Ok(None)) => Ok(None),
        Some(Ok(Some(text))) => match DateTime::parse_from_rfc3339(&text) {
            Ok(t) => Ok(Some(t.with_timezone(&Utc))),
            Err(e) => Err(format!("deadline is not an RFC 3339 time: {e}")),
        },
        Some(Err(())) => Err("deadline must be an RFC 3339 time string".into()),
    }
}

/// Distinct unknown types warned about; past this many, new ones are not remembered
/// (nor warned about), so a producer inventing types cannot grow the set.
const MAX_UNKNOWN_TYPES_WARNED: usize = 64;

/// Unknown types already warned about in this process.
static UNKNOWN_TYPES_WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Whether `t` is an unknown type not yet warned about (and there is room to
/// remember it); remembers it.
fn first_sighting(t: &str) -> bool {
    let mut seen = UNKNOWN_TYPES_WARNED
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if seen.len() >= MAX_UNKNOWN_TYPES_WARNED || seen.iter().any(|s| s == t) {
        return false;
    }
    seen.push(t.to_string());
    true
}

/// Logs once per process, at warn, each message type the worker has no rules for.
fn warn_unknown_type(t: &str) {
    if !first_sighting(t) {
        return;
    }
    let shown: String = t.chars().take(64).collect();
    tracing::warn!(
        message_type = %shown,
        "a message type with no rules in this worker: sent as given, not checked (logged once per type)"
    );
}

/// `Ok(Some(s))` for a JSON string, `Ok(None)` for null, `Err` for anything else.
fn string_of(raw: &RawValue) -> Result<Option<String>, ()> {
    if raw.get() == "null" {
        return Ok(None);
    }
    serde_json::from_str::<String>(raw.get())
        .map(Some)
        .map_err(|_| ())
}

fn valid_job_id(id: &str) -> bool {
    !id.is_empty() && id.chars().count() <= MAX_JOB_ID_CHARS
}

/// What the worker remembers about a job between deliveries, carried in its headers
/// when it is parked for a later retry or handed back at shutdown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryState {
    /// HTTP attempts made so far.
    pub attempts: u32,
    /// When the first attempt started, ms since the Unix epoch.
    pub first_attempt_at_ms: Option<i64>,
    /// No attempt before this, ms since the Unix epoch.
    pub not_before_ms: Option<i64>,
    /// Status of the last response, if the last attempt got one.
    pub last_status: Option<u16>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// Jelou's error code of the last response.
    pub last_code: Option<String>,
}

/// Counters above this are treated as garbage (a producer's stray header), not data.
const MAX_SANE_COUNT: i64 = 1_000_000;

/// How far apart the clocks of two workers may be, for [`RetryState::bounded`].
const CLOCK_SKEW_MS: i64 = 60_000;

impl RetryState {
    /// Reads the state from a job's headers. A header of the wrong AMQP type, negative
    /// or absurdly large is ignored as if absent: a producer's mistake must not crash
    /// the worker or fail the job.
    pub fn from_headers(headers: Option<&FieldTable>) -> Self {
        let Some(h) = headers else {
            return Self::default();
        };
        let count = |name| {
            int_header(h, name)
                .filter(|v| (0..=MAX_SANE_COUNT).contains(v))
                .map(|v| v as u32)
        };
        Self {
            attempts: count(header::ATTEMPTS).unwrap_or(0),
            first_attempt_at_ms: int_header(h, header::FIRST_ATTEMPT_AT).filter(|v| *v > 0),
            not_before_ms: int_header(h, header::NOT_BEFORE).filter(|v| *v > 0),
            last_status: int_header(h, header::LAST_STATUS)
                .filter(|v| (100..=599).contains(v))
                .map(|v| v as u16),
            last_error: string_header(h, header::LAST_ERROR),
            last_code: string_header(h, header::LAST_CODE),
        }
    }

    /// Drops a `not_before` that no worker could have written: one further than
    /// `max_elapsed` (`retry.max_elapsed_ms`, plus a minute for clock skew between
    /// workers) after `now_ms`. The worker never schedules an attempt later than
    /// `max_elapsed` after the first one, so such a value is a producer's forgery or
    /// garbage; honouring it would park the job again and again, for ever, before its
    /// deadline is even looked at.
    pub fn bounded(mut self, now_ms: i64, max_elapsed: std::time::Duration) -> Self {
        let limit = i64::try_from(max_elapsed.as_millis())
            .unwrap_or(i64::MAX)
            .saturating_add(CLOCK_SKEW_MS);
        if self
            .not_before_ms
            .is_some_and(|at| at.saturating_sub(now_ms) > limit)
        {
            self.not_before_ms = None;
        }
        self
    }

    /// Writes the state into `headers`, replacing earlier values.
    pub fn write_headers(&self, headers: &mut FieldTable) {
        headers.insert(
            header::ATTEMPTS.into(),
            AMQPValue::LongLongInt(self.attempts.into()),
        );
        let mut opt = |name: &str, v: Option<i64>| match v {
            Some(v) => {
                headers.insert(name.into(), AMQPValue::LongLongInt(v));
            }
            None => remove(headers, name),
        };
        opt(header::FIRST_ATTEMPT_AT, self.first_attempt_at_ms);
        opt(header::NOT_BEFORE, self.not_before_ms);
        opt(header::LAST_STATUS, self.last_status.map(i64::from));
        for (name, value) in [
            (header::LAST_ERROR, &self.last_error),
            (header::LAST_CODE, &self.last_code),
        ] {
            match value {
                Some(v) => {
                    headers.insert(name.into(), AMQPValue::LongString(v.as_str().into()));
                }
                None => remove(headers, name),
            }
        }
    }

    /// Removes every retry header: what `dlq replay` does for a fresh attempt count.
    pub fn clear_headers(headers: &mut FieldTable) {
        for name in [
            header::ATTEMPTS,
            header::FIRST_ATTEMPT_AT,
            header::NOT_BEFORE,
            header::LAST_STATUS,
            header::LAST_ERROR,
            header::LAST_CODE,
            header::DELIVERIES,
            header::ERROR_KIND,
            header::ERROR_MESSAGE,
            header::FAILED_AT,
            "x-death",
            "x-first-death-exchange",
            "x-first-death-queue",
            "x-first-death-reason",
        ] {
            remove(headers, name);
        }
    }
}

/// Removes a header (FieldTable has no `remove`).
pub fn remove(headers: &mut FieldTable, name: &str) {
    if headers.contains_key(name) {
        let kept: Vec<_> = headers
            .inner()
            .iter()
            .filter(|(k, _)| k.as_str() != name)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut fresh = FieldTable::default();
        for (k, v) in kept {
            fresh.insert(k, v);
        }
        *headers = fresh;
    }
}

/// An integer header of any AMQP integer type.
pub fn int_header(h: &FieldTable, name: &str) -> Option<i64> {
    match h.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => Some((*v).into()),
        AMQPValue::ShortShortUInt(v) => Some((*v).into()),
        AMQPValue::ShortInt(v) => Some((*v).into()),
        AMQPValue::ShortUInt(v) => Some((*v).into()),
        AMQPValue::LongInt(v) => Some((*v).into()),
        AMQPValue::LongUInt(v) => Some((*v).into()),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

/// A string header (long or short string), if it is valid UTF-8.
pub fn string_header(h: &FieldTable, name: &str) -> Option<String> {
    match h.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 262_144;

    fn ok(body: &str) -> Job {
        parse_job(body.as_bytes(), None, MAX).unwrap()
    }

    fn err(body: &str) -> InvalidJob {
        parse_job(body.as_bytes(), None, MAX).unwrap_err()
    }

    #[test]
    fn reads_a_full_job_and_keeps_the_message_verbatim() {
        let body = r#"{"jobId":"order-42","botId":"B1","message":{"type":"text","userId":"593","text":"Hola \u00e9","x":[1, 2]},"deadline":"2026-11-24T18:00:00Z","extra":true}"#;
        let job = ok(body);
        assert_eq!(job.job_id, "order-42");
        assert_eq!(job.bot_id, "B1");
        assert_eq!(job.user_id, "593");
        assert_eq!(
            job.message.get(),
            r#"{"type":"text","userId":"593","text":"Hola \u00e9","x":[1, 2]}"#
        );
        assert_eq!(
            job.deadline.unwrap().to_rfc3339(),
            "2026-11-24T18:00:00+00:00"
        );
    }

    #[test]
    fn job_id_falls_back_to_message_id_then_uuid() {
        let body = r#"{"botId":"B","message":{"type":"text","userId":"u","text":"t"}}"#;
        assert_eq!(
            parse_job(body.as_bytes(), Some("mid-1"), MAX)
                .unwrap()
                .job_id,
            "mid-1"
        );
        let generated = ok(body).job_id;
        assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
        let null_id = r#"{"jobId":null,"botId":"B","message":{"type":"t","userId":"u"}}"#;
        assert_eq!(
            parse_job(null_id.as_bytes(), Some("m"), MAX)
                .unwrap()
                .job_id,
            "m"
        );
    }

    #[test]
    fn job_id_length_is_counted_in_characters() {
        let at_limit = "é".repeat(200);
        let body = format!(
            r#"{{"jobId":"{at_limit}","botId":"B","message":{{"type":"t","userId":"u"}}}}"#
        );
        assert_eq!(ok(&body).job_id, at_limit);
        let too_long = "a".repeat(201);
        let body = format!(
            r#"{{"jobId":"{too_long}","botId":"B","message":{{"type":"t","userId":"u"}}}}"#
        );
        assert!(err(&body).reason.contains("jobId"));
        assert!(
            err(r#"{"jobId":"","botId":"B","message":{"type":"t","userId":"u"}}"#)
                .reason
                .contains("jobId")
        );
        assert!(
            err(r#"{"jobId":42,"botId":"B","message":{"type":"t","userId":"u"}}"#)
                .reason
                .contains("jobId")
        );
    }

    #[test]
    fn invalid_jobs_say_why_and_keep_what_was_readable() {
        let cases = [
            ("not json", "not valid JSON"),
            ("[1,2,3]", "JSON object"),
            ("\"text\"", "JSON object"),
            (r#"{"botId":"B""#, "not valid JSON"),
            (
                r#"{"message":{"type":"t","userId":"u"}}"#,
                "botId is missing",
            ),
            (
                r#"{"botId":"","message":{"type":"t","userId":"u"}}"#,
                "botId must be",
            ),
            (
                r#"{"botId":7,"message":{"type":"t","userId":"u"}}"#,
                "botId must be",
            ),
            (r#"{"botId":"B"}"#, "message is missing"),
            (r#"{"botId":"B","message":"hi"}"#, "JSON object"),
            (
                r#"{"botId":"B","message":{"userId":"u"}}"#,
                "message.type is missing",
            ),
            (
                r#"{"botId":"B","message":{"type":"","userId":"u"}}"#,
                "message.type must",
            ),
            (
                r#"{"botId":"B","message":{"type":"t"}}"#,
                "message.userId is missing",
            ),
            (
                r#"{"botId":"B","message":{"type":"t","userId":5}}"#,
                "message.userId must",
            ),
            (
                r#"{"botId":"B","message":{"type":"t","userId":"u"},"deadline":"tomorrow"}"#,
                "deadline",
            ),
            (
                r#"{"botId":"B","message":{"type":"t","userId":"u"},"deadline":5}"#,
                "deadline",
            ),
            (
                r#"{"botId":"B","botId":"C","message":{"type":"t","userId":"u"}}"#,
                "duplicate",
            ),
        ];
        for (body, want) in cases {
            let e = err(body);
            assert!(e.reason.contains(want), "{body}: {}", e.reason);
        }
        let e =
            err(r#"{"jobId":"j1","botId":"B","message":{"type":"t","userId":"u"},"deadline":"x"}"#);
        assert_eq!(
            (e.job_id.as_str(), e.bot_id.as_deref(), e.user_id.as_deref()),
            ("j1", Some("B"), Some("u"))
        );
    }

    #[test]
    fn invalid_utf8_and_oversized_bodies_are_invalid() {
        let e = parse_job(b"\xff\xfe{}", None, MAX).unwrap_err();
        assert!(e.reason.contains("UTF-8"), "{}", e.reason);
        let e = parse_job(b"{\"botId\":\"\xff\"}", None, MAX).unwrap_err();
        assert!(e.reason.contains("JSON"), "{}", e.reason);
        let e = parse_job(&[b' '; 11], Some("big-1"), 10).unwrap_err();
        assert!(e.reason.contains("amqp.max_job_bytes"), "{}", e.reason);
        assert_eq!(e.job_id, "big-1");
    }

    #[test]
    fn invalid_utf8_anywhere_is_invalid_even_in_an_ignored_field() {
        let mut body = br#"{"botId":"B","note":""#.to_vec();
        body.extend_from_slice(b"\xfe\",\"message\":{\"type\":\"t\",\"userId\":\"u\"}}");
        let e = parse_job(&body, Some("m"), MAX).unwrap_err();
        assert!(e.reason.contains("UTF-8"), "{}", e.reason);
        assert_eq!(e.job_id, "m");
    }

    #[test]
    fn duplicate_keys_the_worker_reads_make_the_job_invalid_and_say_so() {
        let e = err(r#"{"botId":"B","message":{"type":"t","type":"u","userId":"u"}}"#);
        assert!(e.reason.contains("duplicate field `type`"), "{}", e.reason);
        assert_eq!(e.bot_id.as_deref(), Some("B"));
        let e = err(r#"{"botId":"B","message":{"type":"t","userId":"u","userI\u0064":"v"}}"#);
        assert!(
            e.reason.contains("duplicate field `userId`"),
            "{}",
            e.reason
        );
        let e = err(r#"{"botId":"B","botI\u0064":"C","message":{"type":"t","userId":"u"}}"#);
        assert!(e.reason.contains("duplicate field `botId`"), "{}", e.reason);
        // A duplicate the worker does not read is sent as written.
        let job = ok(r#"{"botId":"B","message":{"type":"t","userId":"u","text":"a","text":"b"}}"#);
        assert_eq!(
            job.message.get(),
            r#"{"type":"t","userId":"u","text":"a","text":"b"}"#
        );
    }

    #[test]
    fn deeply_nested_json_is_read_without_recursion() {
        // The message is kept as raw bytes, never walked recursively: a hostile depth
        // neither overflows the stack nor changes what is sent.
        let depth = 100_000;
        let deep = format!(
            r#"{{"botId":"B","message":{{"type":"t","userId":"u","x":{}{}}}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let job =
            parse_job(deep.as_bytes(), None, usize::MAX).expect("valid JSON, processed normally");
        assert_eq!(
            job.message.get().len(),
            2 * depth + r#"{"type":"t","userId":"u","x":}"#.len()
        );
        let unbalanced = format!(
            r#"{{"botId":"B","message":{{"type":"t","userId":"u","x":{}}}}}"#,
            "[".repeat(depth)
        );
        assert!(parse_job(unbalanced.as_bytes(), None, usize::MAX).is_err());
    }

    #[test]
    fn a_message_that_breaks_a_rule_is_invalid_unless_validation_is_off() {
        let body = r#"{"jobId":"j","botId":"B","message":{"type":"quick_reply","userId":"u","text":"?","quick_replies":[{"title":"a"},{"title":"b"},{"title":"c"},{"title":"d"}]}}"#;
        let e = err(body);
        assert_eq!(e.reason, "message.quick_replies: 4 buttons, at most 3");
        assert_eq!(
            (e.job_id.as_str(), e.bot_id.as_deref(), e.user_id.as_deref()),
            ("j", Some("B"), Some("u"))
        );
        let job = parse_job_with(body.as_bytes(), None, MAX, false).unwrap();
        assert_eq!(job.kind, JobKind::Message);
        // The base checks stay.
        let e = parse_job_with(
            br#"{"botId":"B","message":{"type":"text"}}"#,
            None,
            MAX,
            false,
        )
        .unwrap_err();
        assert!(
            e.reason.contains("message.userId is missing"),
            "{}",
            e.reason
        );
    }

    #[test]
    fn an_unknown_type_is_sent_unchecked() {
        let job = ok(r#"{"botId":"B","message":{"type":"poll","userId":"u","q":[]}}"#);
        assert_eq!(job.unchecked_type.as_deref(), Some("poll"));
        let job = ok(r#"{"botId":"B","message":{"type":"text","userId":"u","text":"x"}}"#);
        assert_eq!(job.unchecked_type, None);
    }

    #[test]
    fn unknown_types_are_warned_about_once_each_in_a_bounded_set() {
        first_sighting("once-only-type");
        assert!(!first_sighting("once-only-type"));
        for i in 0..2 * MAX_UNKNOWN_TYPES_WARNED {
            first_sighting(&format!("invented-{i}"));
        }
        let seen = UNKNOWN_TYPES_WARNED.lock().unwrap().len();
        assert_eq!(seen, MAX_UNKNOWN_TYPES_WARNED);
        assert!(!first_sighting("one-more"));
    }

    #[test]
    fn a_template_job_is_sent_to_its_user_with_the_template_as_written() {
        let job = ok(
            r#"{"jobId":"t1","botId":"B","userId":"593","template":{"elementName":"order_shipped","language":"es","parameters":["Ana"]},"deadline":"2026-11-24T18:00:00Z"}"#,
        );
        assert_eq!(job.kind, JobKind::Template);
        assert_eq!((job.bot_id.as_str(), job.user_id.as_str()), ("B", "593"));
        assert_eq!(
            job.message.get(),
            r#"{"destinations":["593"],"elementName":"order_shipped","language":"es","parameters":["Ana"]}"#
        );
        assert!(job.deadline.is_some());
        let cases = [
            (
                r#"{"botId":"B","userId":"u","template":{"elementName":"x","language":"es"},"message":{"type":"t","userId":"u"}}"#,
                "either message or template",
            ),
            (r#"{"botId":"B","userId":"u"}"#, "message is missing"),
            (
                r#"{"botId":"B","template":{"elementName":"x","language":"es"}}"#,
                "userId is missing",
            ),
            (
                r#"{"botId":"B","userId":"","template":{"elementName":"x","language":"es"}}"#,
                "userId must be a non-empty string",
            ),
            (
                r#"{"botId":"B","userId":"u","template":["x"]}"#,
                "template: must be a JSON object",
            ),
            (
                r#"{"botId":"B","userId":"u","template":{"elementName":"x"}}"#,
                "template.language: required",
            ),
            (
                r#"{"botId":"B","userId":"u","template":{"elementName":"x","language":"es","destinations":["v"]}}"#,
                "template.destinations: must not be given",
            ),
            (
                r#"{"botId":"B","userId":"u","userId":"v","template":{"elementName":"x","language":"es"}}"#,
                "duplicate field `userId`",
            ),
            (
                r#"{"botId":"B","userId":"u","template":{"elementName":"x","language":"es"},"deadline":"x"}"#,
                "deadline",
            ),
        ];
        for (body, want) in cases {
            let e = err(body);
            assert!(e.reason.contains(want), "{body}: {}", e.reason);
        }
        let e = err(r#"{"jobId":"t2","botId":"B","userId":"593","template":{}}"#);
        assert_eq!(
            (e.user_id.as_deref(), e.reason.as_str()),
            (Some("593"), "template.elementName: required")
        );
        // Validation off: only the shape is checked.
        let body = br#"{"botId":"B","userId":"u","template":{}}"#;
        assert!(parse_job_with(body, None, MAX, false).is_ok());
        let body = br#"{"botId":"B","userId":"u","template":{"destinations":[]}}"#;
        assert!(parse_job_with(body, None, MAX, false).is_err());
    }

    #[test]
    fn control_characters_in_bot_id_are_data_not_structure() {
        let job = ok(r#"{"botId":"a\u0000b\n/../c","message":{"type":"t","userId":"u"}}"#);
        assert_eq!(job.bot_id, "a\0b\n/../c");
    }

    #[test]
    fn retry_state_round_trips_through_headers() {
        let state = RetryState {
            attempts: 3,
            first_attempt_at_ms: Some(1_700_000_000_000),
            not_before_ms: Some(1_700_000_005_000),
            last_status: Some(503),
            last_error: Some("HTTP 503".into()),
            last_code: Some("E1".into()),
        };
        let mut h = FieldTable::default();
        h.insert("keep".into(), AMQPValue::Boolean(true));
        state.write_headers(&mut h);
        assert_eq!(RetryState::from_headers(Some(&h)), state);
        let cleared = RetryState {
            last_status: None,
            last_error: None,
            last_code: None,
            ..state.clone()
        };
        cleared.write_headers(&mut h);
        assert_eq!(RetryState::from_headers(Some(&h)), cleared);
        RetryState::clear_headers(&mut h);
        assert_eq!(RetryState::from_headers(Some(&h)), RetryState::default());
        assert!(h.contains_key("keep"));
    }

    #[test]
    fn hostile_retry_headers_are_ignored() {
        let mut h = FieldTable::default();
        h.insert(header::ATTEMPTS.into(), AMQPValue::LongString("3".into()));
        assert_eq!(RetryState::from_headers(Some(&h)).attempts, 0);
        h.insert(header::ATTEMPTS.into(), AMQPValue::LongLongInt(-4));
        assert_eq!(RetryState::from_headers(Some(&h)).attempts, 0);
        h.insert(header::ATTEMPTS.into(), AMQPValue::LongLongInt(i64::MAX));
        assert_eq!(RetryState::from_headers(Some(&h)).attempts, 0);
        h.insert(header::ATTEMPTS.into(), AMQPValue::ShortShortUInt(2));
        assert_eq!(RetryState::from_headers(Some(&h)).attempts, 2);
        h.insert(header::LAST_STATUS.into(), AMQPValue::LongInt(70000));
        assert_eq!(RetryState::from_headers(Some(&h)).last_status, None);
    }

    #[test]
    fn a_not_before_no_worker_could_have_written_is_dropped() {
        let now = 1_700_000_000_000;
        let max = std::time::Duration::from_secs(900);
        let at = |nb: i64| {
            RetryState {
                not_before_ms: Some(nb),
                ..RetryState::default()
            }
            .bounded(now, max)
            .not_before_ms
        };
        // Within max_elapsed (and the clock skew allowance): kept.
        assert_eq!(at(now + 900_000), Some(now + 900_000));
        assert_eq!(at(now + 960_000), Some(now + 960_000));
        assert_eq!(at(now - 5_000), Some(now - 5_000));
        // Beyond: garbage.
        assert_eq!(at(now + 960_001), None);
        assert_eq!(at(i64::MAX), None);
        let huge = RetryState {
            not_before_ms: Some(i64::MAX),
            ..RetryState::default()
        };
        assert_eq!(
            huge.bounded(i64::MIN, std::time::Duration::MAX)
                .not_before_ms,
            Some(i64::MAX)
        );
    }
}
