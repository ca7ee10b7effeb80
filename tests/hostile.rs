//! Hostile input, end to end against the real local RabbitMQ: jobs built to break a
//! parser or a URL, headers of the wrong AMQP type, and a Jelou that misbehaves on
//! the wire (redirects, endless or trickling bodies, absurd `Retry-After`), served by
//! a hand-written HTTP/1.1 server on a raw `TcpListener` so that every byte is ours.
//! Each case gets the contract's answer, and the worker keeps working.

mod common;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldArray, FieldTable, LongString},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------
// A raw HTTP/1.1 server: one request per connection, answered by a script.
// ---------------------------------------------------------------------------------

/// A request as the raw server read it.
#[derive(Debug, Clone)]
struct RawRequest {
    /// 1 for the first request the server received.
    n: usize,
    head: String,
    body: Vec<u8>,
    at: Instant,
}

impl RawRequest {
    /// The request target, exactly as sent.
    fn path(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or("")
    }

    /// The botId segment of `/v1/bots/{botId}/messages`, still encoded.
    fn bot(&self) -> &str {
        self.path()
            .trim_start_matches("/v1/bots/")
            .trim_end_matches("/messages")
    }
}

/// A hand-written HTTP/1.1 server on loopback. Every connection carries one request;
/// `script` writes whatever bytes it likes in answer and then drops the connection.
struct RawHttp {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<RawRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawHttp {
    async fn start<F, Fut>(script: F) -> Self
    where
        F: Fn(RawRequest, TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<RawRequest>>> = Arc::default();
        let script = Arc::new(script);
        let log = requests.clone();
        let counter = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let (script, log, counter) = (script.clone(), log.clone(), counter.clone());
                tokio::spawn(async move {
                    let Some((head, body)) = read_request(&mut stream).await else {
                        return;
                    };
                    let request = RawRequest {
                        n: counter.fetch_add(1, Ordering::SeqCst) + 1,
                        head,
                        body,
                        at: Instant::now(),
                    };
                    log.lock().unwrap().push(request.clone());
                    script(request, stream).await;
                });
            }
        });
        Self {
            addr,
            requests,
            task,
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<RawRequest> {
        self.requests.lock().unwrap().clone()
    }

    fn requests_for(&self, bot: &str) -> Vec<RawRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.bot() == bot)
            .collect()
    }
}

impl Drop for RawHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (head and `content-length` body); None if the client went away.
async fn read_request(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 1 << 20 {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((head, body))
}

/// Writes a whole response and closes the connection.
async fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
}

async fn success(stream: &mut TcpStream, id: &str) {
    let body = format!(r#"{{"success":true,"messageId":"{id}"}}"#);
    respond(
        stream,
        "200 OK",
        &[("content-type", "application/json")],
        body.as_bytes(),
    )
    .await;
}

/// Writes `chunk` again and again (after `head`) until `limit` bytes are out, the
/// client hangs up, or a write stalls for 20 s (the client stopped reading but kept
/// the connection open). Returns the body bytes written and how long it took.
async fn stream_body(
    stream: &mut TcpStream,
    head: &str,
    chunk: &[u8],
    limit: u64,
) -> (u64, Duration) {
    let started = Instant::now();
    if stream.write_all(head.as_bytes()).await.is_err() {
        return (0, started.elapsed());
    }
    let mut sent = 0u64;
    while sent < limit {
        match tokio::time::timeout(Duration::from_secs(20), stream.write_all(chunk)).await {
            Ok(Ok(())) => sent += chunk.len() as u64,
            _ => break,
        }
    }
    (sent, started.elapsed())
}

/// Resident memory of this test process, in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Settings for a worker that sends to `jelou`.
fn settings_for(env: &TestEnv, jelou: &RawHttp) -> jelou_worker::config::Settings {
    let mut settings = env.settings.clone();
    settings.jelou.base_url = jelou.base_url();
    settings
}

fn job(job_id: &str, bot: &str) -> Value {
    text_job(job_id, bot)
}

fn headers(pairs: Vec<(&str, AMQPValue)>) -> BasicProperties {
    let mut table = FieldTable::default();
    for (k, v) in pairs {
        table.insert(k.into(), v);
    }
    BasicProperties::default().with_headers(table)
}

// ---------------------------------------------------------------------------------
// 1. Hostile jobs (the stand-in Jelou answers success).
// ---------------------------------------------------------------------------------

/// One hostile job: published with `message_id` = `label`; `result_id` is the jobId
/// its result must carry; `outcome` is "success" or the failure kind.
struct Case {
    label: &'static str,
    result_id: String,
    body: Vec<u8>,
    props: BasicProperties,
    outcome: &'static str,
}

fn case(label: &'static str, body: impl Into<Vec<u8>>, outcome: &'static str) -> Case {
    Case {
        label,
        result_id: label.to_string(),
        body: body.into(),
        props: BasicProperties::default(),
        outcome,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_jobs_get_the_contracts_answer_and_the_worker_keeps_working() {
    let env = TestEnv::new("hostile_jobs").await;
    let max = env.settings.amqp.max_job_bytes;
    let mut cases: Vec<Case> = Vec::new();
    // Messages that must reach Jelou byte for byte.
    let mut verbatim: Vec<(&str, String)> = Vec::new();

    // Deep nesting: inside the message (kept as raw bytes, sent as is), in an
    // ignored field, and as the whole body.
    let depth = 100_000;
    let deep_message = format!(
        r#"{{"type":"text","userId":"u","text":"deep","x":{}{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let body = format!(r#"{{"jobId":"deep-msg","botId":"B","message":{deep_message}}}"#);
    verbatim.push(("deep-msg", deep_message));
    cases.push(case("deep-msg", body, "success"));
    let body = format!(
        r#"{{"jobId":"deep-extra","botId":"B","extra":{}1{},"message":{{"type":"text","userId":"u","text":"t"}}}}"#,
        "{\"a\":".repeat(depth / 5),
        "}".repeat(depth / 5)
    );
    cases.push(case("deep-extra", body, "success"));
    let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    cases.push(case("deep-body", body, "invalid_job"));
    cases.push(case("deep-unclosed", "[".repeat(max), "invalid_job"));

    // A huge string: exactly amqp.max_job_bytes is processed (and sent intact); one
    // byte more is invalid. (In a field of its own: `text` has WhatsApp's limit.)
    let frame = |id: &str, text: &str| {
        format!(
            r#"{{"jobId":"{id}","botId":"B","message":{{"type":"text","userId":"u","text":"t","pad":"{text}"}}}}"#
        )
    };
    let room = max - frame("huge-at-max", "").len();
    let text = "é".repeat(room / 2) + &"a".repeat(room % 2);
    let body = frame("huge-at-max", &text);
    assert_eq!(body.len(), max);
    verbatim.push((
        "huge-at-max",
        format!(r#"{{"type":"text","userId":"u","text":"t","pad":"{text}"}}"#),
    ));
    cases.push(case("huge-at-max", body, "success"));
    let body = frame("huge-over-1", &format!("{text}a"));
    assert_eq!(body.len(), max + 1);
    cases.push(case("huge-over-1", body, "invalid_job"));

    // Invalid UTF-8: in the message (which is sent to Jelou), in the botId, and in a
    // field that is otherwise ignored (a body that is not UTF-8 is not JSON).
    let mut body =
        br#"{"jobId":"utf8-msg","botId":"B","message":{"type":"text","userId":"u","text":"#
            .to_vec();
    body.extend_from_slice(b"\"\xc3\x28\xff\"}}");
    cases.push(case("utf8-msg", body, "invalid_job"));
    let mut body = br#"{"jobId":"utf8-bot","botId":""#.to_vec();
    body.extend_from_slice(b"\xed\xa0\x80\",\"message\":{\"type\":\"text\",\"userId\":\"u\"}}");
    cases.push(case("utf8-bot", body, "invalid_job"));
    let mut body = br#"{"jobId":"utf8-extra","botId":"B","note":""#.to_vec();
    body.extend_from_slice(b"\xfe\",\"message\":{\"type\":\"text\",\"userId\":\"u\"}}");
    cases.push(case("utf8-extra", body, "invalid_job"));

    // NUL, controls, CRLF (header injection), ANSI escapes, RTL override, dots and
    // slashes in botId: data, never structure. The path stays one segment.
    let bots = [
        ("bot-nul", "a\u{0}b", "/v1/bots/a%00b/messages"),
        (
            "bot-crlf",
            "x\r\nX-Evil: 1\r\n\r\nGET / HTTP/1.1",
            "/v1/bots/x%0D%0AX-Evil%3A%201%0D%0A%0D%0AGET%20%2F%20HTTP%2F1.1/messages",
        ),
        (
            "bot-ctl",
            "\u{1b}[31m\u{7f}\u{1}",
            "/v1/bots/%1B%5B31m%7F%01/messages",
        ),
        (
            "bot-rtl",
            "\u{202e}gnp.exe",
            "/v1/bots/%E2%80%AEgnp.exe/messages",
        ),
        (
            "bot-dots",
            "../../admin",
            "/v1/bots/..%2F..%2Fadmin/messages",
        ),
        ("bot-query", "b?x=1#f", "/v1/bots/b%3Fx%3D1%23f/messages"),
    ];
    for (id, bot, _) in bots {
        cases.push(case(id, job(id, bot).to_string(), "success"));
    }

    // Duplicate keys: ambiguous (which one would Jelou read?), so invalid, also when
    // one of them is spelled with an escape; a duplicate the worker does not read is
    // the producer's business and goes through as written.
    let dups = [
        (
            "dup-bot",
            r#"{"jobId":"dup-bot","botId":"B","botId":"C","message":{"type":"text","userId":"u"}}"#,
            "invalid_job",
        ),
        (
            "dup-escaped",
            r#"{"jobId":"dup-escaped","botId":"B","botI\u0064":"C","message":{"type":"text","userId":"u"}}"#,
            "invalid_job",
        ),
        (
            "dup-type",
            r#"{"jobId":"dup-type","botId":"B","message":{"type":"text","type":"image","userId":"u"}}"#,
            "invalid_job",
        ),
        (
            "dup-user",
            r#"{"jobId":"dup-user","botId":"B","message":{"type":"text","userId":"u","userId":"v"}}"#,
            "invalid_job",
        ),
        (
            "dup-text",
            r#"{"jobId":"dup-text","botId":"B","message":{"type":"text","userId":"u","text":"a","text":"b"}}"#,
            "success",
        ),
    ];
    for (id, body, outcome) in dups {
        cases.push(case(id, body, outcome));
    }
    verbatim.push((
        "dup-text",
        r#"{"type":"text","userId":"u","text":"a","text":"b"}"#.into(),
    ));

    // Deadlines at the ends of RFC 3339's range, and an impossible date.
    let with_deadline = |id: &str, d: &str| {
        let mut j = job(id, "B");
        j["deadline"] = json!(d);
        j.to_string()
    };
    cases.push(case(
        "deadline-year1",
        with_deadline("deadline-year1", "0001-01-01T00:00:00Z"),
        "expired",
    ));
    cases.push(case(
        "deadline-9999",
        with_deadline("deadline-9999", "9999-12-31T23:59:59.999999999+14:00"),
        "success",
    ));
    cases.push(case(
        "deadline-feb30",
        with_deadline("deadline-feb30", "2026-02-30T00:00:00Z"),
        "invalid_job",
    ));

    // Retry headers of the wrong AMQP type, or absurd, are ignored.
    let attempts = "x-jelou-attempts";
    let header_cases: Vec<(&'static str, BasicProperties)> = vec![
        (
            "hdr-string",
            headers(vec![(attempts, AMQPValue::LongString("3".into()))]),
        ),
        (
            "hdr-negative",
            headers(vec![(attempts, AMQPValue::LongLongInt(-5))]),
        ),
        (
            "hdr-max",
            headers(vec![(attempts, AMQPValue::LongLongInt(i64::MAX))]),
        ),
        (
            "hdr-double",
            headers(vec![(attempts, AMQPValue::Double(2.5))]),
        ),
        (
            "hdr-array",
            headers(vec![(
                attempts,
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongLongInt(1)])),
            )]),
        ),
        (
            "hdr-table",
            headers(vec![(
                attempts,
                AMQPValue::FieldTable(FieldTable::default()),
            )]),
        ),
        ("hdr-void", headers(vec![(attempts, AMQPValue::Void)])),
        (
            "hdr-garbage-state",
            headers(vec![
                (
                    "x-jelou-not-before",
                    AMQPValue::LongString("tomorrow".into()),
                ),
                ("x-jelou-first-attempt-at", AMQPValue::Boolean(true)),
                ("x-jelou-last-status", AMQPValue::LongLongInt(70_000)),
                (
                    "x-jelou-last-error",
                    AMQPValue::LongString(LongString::from(b"\xff\xfe".to_vec())),
                ),
            ]),
        ),
        (
            "hdr-not-before-negative",
            headers(vec![(
                "x-jelou-not-before",
                AMQPValue::LongLongInt(i64::MIN),
            )]),
        ),
    ];
    for (id, props) in header_cases {
        cases.push(Case {
            props,
            ..case(id, job(id, "B").to_string(), "success")
        });
    }

    // jobIds that a correlation_id cannot hold (800 bytes), or that hold a NUL.
    let wide = "🦀".repeat(200);
    let body = json!({"jobId": wide, "botId": "B", "message": {"type": "text", "userId": "u", "text": "t"}});
    cases.push(Case {
        result_id: wide.clone(),
        ..case("wide-id", body.to_string(), "success")
    });
    let body = json!({"jobId": "a\u{0}b", "botId": "B", "message": {"type": "text", "userId": "u", "text": "t"}});
    cases.push(Case {
        result_id: "a\u{0}b".into(),
        ..case("nul-id", body.to_string(), "success")
    });

    // After all that, an ordinary job.
    cases.push(case("plain", job("plain", "B").to_string(), "success"));

    env.declare().await;
    for c in &cases {
        env.publish_raw(&c.body, c.props.clone().with_message_id(c.label.into()))
            .await;
    }
    let worker = env.start_worker();
    let results = env.results(cases.len(), Duration::from_secs(60)).await;
    let by_id = by_job_id(&results);
    for c in &cases {
        let r = by_id
            .get(&c.result_id)
            .unwrap_or_else(|| panic!("no result for {}: {by_id:#?}", c.label));
        let id = c.label;
        match c.outcome {
            "success" => {
                assert_eq!(r["status"], "success", "{id}: {r}");
                assert_eq!(r["attempts"], 1, "{id}: retry headers must not count: {r}");
            }
            kind => {
                assert_eq!(r["status"], "failure", "{id}: {r}");
                assert_eq!(r["error"]["kind"], kind, "{id}: {r}");
                assert_eq!(r["attempts"], 0, "{id}: {r}");
            }
        }
    }
    // Reasons name what is wrong; what was readable is kept.
    let reason = |id: &str| by_id[id]["error"]["message"].as_str().unwrap().to_string();
    assert!(
        reason("huge-over-1").contains("amqp.max_job_bytes"),
        "{}",
        reason("huge-over-1")
    );
    assert!(
        reason("dup-bot").contains("duplicate"),
        "{}",
        reason("dup-bot")
    );
    assert!(
        reason("dup-type").contains("duplicate field `type`"),
        "{}",
        reason("dup-type")
    );
    assert!(
        reason("deadline-feb30").contains("deadline"),
        "{}",
        reason("deadline-feb30")
    );
    assert_eq!(by_id["dup-type"]["botId"], "B");

    // Long and odd jobIds: kept whole in the body and x-job-id; a correlation_id only
    // when it fits (255 bytes).
    let find = |id: &str| {
        results
            .iter()
            .find(|r| r.json()["jobId"] == id)
            .unwrap_or_else(|| panic!("no result for jobId {id:?}"))
    };
    let wide_result = find(&wide);
    assert_eq!(
        wide_result.header_str("x-job-id").as_deref(),
        Some(wide.as_str())
    );
    assert_eq!(wide_result.correlation_id(), None);
    assert_eq!(find("a\u{0}b").correlation_id().as_deref(), Some("a\u{0}b"));

    // What reached Jelou: encoded paths, verbatim bodies, nothing for invalid jobs.
    let seen = env.jelou.seen();
    let successes = cases.iter().filter(|c| c.outcome == "success").count();
    assert_eq!(seen.len(), successes, "only valid, unexpired jobs are sent");
    for (_, bot, path) in bots {
        let sent = seen.iter().filter(|s| s.path == path).count();
        assert_eq!(sent, 1, "botId {bot:?} must be sent to exactly {path}");
    }
    for s in &seen {
        let segment = s
            .path
            .strip_prefix("/v1/bots/")
            .and_then(|p| p.strip_suffix("/messages"))
            .unwrap_or_else(|| panic!("sent outside /v1/bots/*/messages: {}", s.path));
        assert!(
            !segment.contains(['/', '?', '#']),
            "botId escaped its segment: {}",
            s.path
        );
    }
    for (id, message) in &verbatim {
        assert!(
            seen.iter().any(|s| &s.body[..] == message.as_bytes()),
            "{id}: the message did not reach Jelou byte for byte"
        );
    }
    // Every failed job's original body is kept, and the worker is still running.
    let failed = cases.len() - successes;
    assert_eq!(env.dead_letters().await.len(), failed);
    assert!(!worker.handle.is_finished(), "the worker stopped");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// A parked job carries `x-jelou-not-before`; a producer can forge one. A value no
/// worker could have written (further away than `retry.max_elapsed_ms`) must not
/// hold the job: it is ignored (`RetryState::bounded`), and the job is processed, or
/// expires. (Without that, the job was parked on the longest delay queue again and
/// again, for ever, before its deadline was even looked at.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_far_future_not_before_does_not_hold_a_job_forever() {
    let env = TestEnv::new("notbefore").await;
    env.declare().await;
    let far = headers(vec![(
        "x-jelou-not-before",
        AMQPValue::LongLongInt(i64::MAX),
    )]);
    env.publish_raw(job("nb-plain", "B").to_string().as_bytes(), far.clone())
        .await;
    let mut expired = job("nb-expired", "B");
    expired["deadline"] = json!("2020-01-01T00:00:00Z");
    env.publish_raw(expired.to_string().as_bytes(), far).await;
    let worker = env.start_worker();
    let results = by_job_id(&env.results(2, Duration::from_secs(15)).await);
    assert_eq!(results["nb-plain"]["status"], "success", "{results:#?}");
    assert_eq!(
        results["nb-expired"]["error"]["kind"], "expired",
        "{results:#?}"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

// ---------------------------------------------------------------------------------
// 2. A hostile or broken Jelou.
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_never_followed_and_credentials_never_replayed() {
    let env = TestEnv::new("redirects").await;
    // The place a redirect points to: it must never be contacted.
    let elsewhere = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let elsewhere_addr = elsewhere.local_addr().unwrap();
    let contacted: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = contacted.clone();
    let bystander = tokio::spawn(async move {
        while let Ok((mut s, _)) = elsewhere.accept().await {
            let head = read_request(&mut s)
                .await
                .map(|(h, _)| h)
                .unwrap_or_default();
            log.lock().unwrap().push(head);
        }
    });
    let location = format!("http://{elsewhere_addr}/v1/bots/B/messages");
    let jelou = RawHttp::start(move |req, mut s| {
        let location = location.clone();
        async move {
            let status = match req.bot() {
                "r301" => "301 Moved Permanently",
                "r302" => "302 Found",
                "r303" => "303 See Other",
                "r307" => "307 Temporary Redirect",
                _ => "308 Permanent Redirect",
            };
            respond(&mut s, status, &[("location", &location)], b"").await;
        }
    })
    .await;
    env.declare().await;
    let statuses = [301, 302, 303, 307, 308];
    for s in statuses {
        env.publish(&job(&format!("j{s}"), &format!("r{s}"))).await;
    }
    let worker = env.start_worker_with(settings_for(&env, &jelou));
    let results = by_job_id(&env.results(statuses.len(), WAIT).await);
    for s in statuses {
        let r = &results[&format!("j{s}")];
        assert_eq!(r["error"]["kind"], "rejected", "{s}: {r}");
        assert_eq!(r["error"]["httpStatus"], s, "{r}");
        assert_eq!(r["attempts"], 1, "{r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("redirect"),
            "{r}"
        );
    }
    let requests = jelou.requests();
    assert_eq!(requests.len(), statuses.len(), "one request per job");
    for r in &requests {
        assert!(
            r.head
                .to_ascii_lowercase()
                .contains("authorization: basic ")
        );
        let sent: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(sent, job("", "")["message"]);
    }
    assert!(
        contacted.lock().unwrap().is_empty(),
        "a redirect was followed (credentials replayed?): {:?}",
        contacted.lock().unwrap()
    );
    bystander.abort();
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_200_body_is_cut_at_max_response_bytes() {
    let env = TestEnv::new("endless").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    // 8 GB announced, produced lazily: only as fast as the client reads.
    let announced: u64 = 8_000_000_000;
    let jelou = RawHttp::start(move |_, mut s| {
        let tx = tx.clone();
        async move {
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{{\"success\":true,\"messageId\":\"m-endless\",\"pad\":\"",
                announced
            );
            let chunk = vec![b'x'; 64 * 1024];
            let _ = tx.send(stream_body(&mut s, &head, &chunk, announced).await);
        }
    })
    .await;
    let mut settings = settings_for(&env, &jelou);
    settings.jelou.max_response_bytes = 65_536;
    env.declare().await;
    env.publish(&job("j-endless", "B")).await;
    let rss_before = rss_bytes();
    let worker = env.start_worker_with(settings);
    let r = env.result().await.json();
    assert_eq!(r["error"]["kind"], "rejected", "{r}");
    assert_eq!(r["error"]["httpStatus"], 200, "{r}");
    assert_eq!(r["attempts"], 1, "a 2xx is never resent: {r}");
    let (sent, took) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the server learns that the client hung up")
        .unwrap();
    assert!(
        sent < 64 << 20,
        "the client read {sent} bytes of an endless body (cap 64 KiB + socket buffers)"
    );
    assert!(
        took < Duration::from_secs(15),
        "the client kept the connection open without reading for {took:?}"
    );
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 256 << 20, "memory grew by {grown} bytes");
    assert_eq!(jelou.requests().len(), 1);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_trickling_one_byte_per_second_is_cut_by_the_timeout_and_retried() {
    let env = TestEnv::new("trickle").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let jelou = RawHttp::start(move |req, mut s| {
        let tx = tx.clone();
        async move {
            if req.n > 1 {
                return success(&mut s, "m-after-trickle").await;
            }
            // The status line itself, one byte per second.
            let started = Instant::now();
            let mut written = 0;
            for b in b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}" {
                if s.write_all(&[*b]).await.is_err() {
                    break;
                }
                written += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let _ = tx.send((written, started.elapsed()));
        }
    })
    .await;
    let mut settings = settings_for(&env, &jelou);
    settings.jelou.request_timeout_ms = 1_000;
    env.declare().await;
    env.publish(&job("j-trickle", "B")).await;
    let worker = env.start_worker_with(settings);
    let r = env.result().await.json();
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["attempts"], 2, "{r}");
    let requests = jelou.requests();
    let gap = requests[1].at - requests[0].at;
    assert!(
        gap >= Duration::from_millis(900) && gap < Duration::from_secs(5),
        "the retry came {gap:?} after the trickle began: the 1 s timeout should cut it"
    );
    let (written, took) = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        written < 10 && took < Duration::from_secs(10),
        "the client listened to the trickle for {took:?} ({written} bytes)"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// A 2xx whose body then stalls: Jelou may well have accepted the message, so the
/// timeout is a verdict (`rejected`, never resent), as for a body that breaks off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_whose_body_stalls_past_the_timeout_is_not_resent() {
    let env = TestEnv::new("stall2xx").await;
    let jelou = RawHttp::start(|_, mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n{\"success\":true,")
            .await;
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if s.write_all(b" ").await.is_err() {
                return;
            }
        }
    })
    .await;
    let mut settings = settings_for(&env, &jelou);
    settings.jelou.request_timeout_ms = 1_000;
    env.declare().await;
    env.publish(&job("j-stall", "B")).await;
    let worker = env.start_worker_with(settings);
    let r = env.result().await.json();
    assert_eq!(r["error"]["kind"], "rejected", "{r}");
    assert_eq!(r["error"]["httpStatus"], 200, "{r}");
    assert_eq!(r["attempts"], 1, "{r}");
    assert_eq!(jelou.requests().len(), 1, "a 2xx must never be resent");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_retry_after_values_give_up_at_once_and_past_dates_do_not_wait() {
    let env = TestEnv::new("retryafter").await;
    let past_seen = Arc::new(AtomicUsize::new(0));
    let jelou = RawHttp::start(move |req, mut s| {
        let past_seen = past_seen.clone();
        async move {
            let ra = match req.bot() {
                "years" => "99999999999",
                "overflow" => "99999999999999999999999999999999",
                "year9999" => "Fri, 31 Dec 9999 23:59:59 GMT",
                "past" if past_seen.fetch_add(1, Ordering::SeqCst) > 0 => {
                    return success(&mut s, "m-past").await;
                }
                "past" => "Sat, 01 Jan 2000 00:00:00 GMT",
                _ => "0",
            };
            let status = if req.bot() == "overflow" {
                "503 Service Unavailable"
            } else {
                "429 Too Many Requests"
            };
            respond(&mut s, status, &[("retry-after", ra)], b"").await;
        }
    })
    .await;
    // max_elapsed 30 s (TestEnv): any Retry-After past it ends the job at once.
    let settings = settings_for(&env, &jelou);
    assert_eq!(settings.retry.max_elapsed_ms, 30_000);
    env.declare().await;
    for bot in ["years", "overflow", "year9999", "past"] {
        env.publish(&job(&format!("j-{bot}"), bot)).await;
    }
    let started = Instant::now();
    let worker = env.start_worker_with(settings);
    let results = by_job_id(&env.results(4, WAIT).await);
    let took = started.elapsed();
    for bot in ["years", "overflow", "year9999"] {
        let r = &results[&format!("j-{bot}")];
        assert_eq!(r["error"]["kind"], "retries_exhausted", "{bot}: {r}");
        assert_eq!(
            r["attempts"], 1,
            "{bot}: no pointless wait, no second attempt: {r}"
        );
        assert_eq!(jelou.requests_for(bot).len(), 1);
    }
    assert!(took < Duration::from_secs(10), "it waited: {took:?}");
    let past = &results["j-past"];
    assert_eq!(past["status"], "success", "{past}");
    assert_eq!(past["attempts"], 2);
    let tries = jelou.requests_for("past");
    let gap = tries[1].at - tries[0].at;
    assert!(
        gap < Duration::from_secs(1),
        "a Retry-After in the past made it wait {gap:?}"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_answers_are_clean_verdicts_or_retries() {
    let env = TestEnv::new("malformed").await;
    let jelou = RawHttp::start(|req, mut s| async move {
        let json = ("content-type", "application/json");
        match req.bot() {
            // 50 MB of a body that would be a success if read whole.
            "fifty" => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{{\"success\":true,\"messageId\":\"m\",\"pad\":\"",
                    50_000_000 + 2
                );
                let _ = stream_body(&mut s, &head, &vec![b'x'; 1 << 20], 50_000_000).await;
            }
            "invalid" => respond(&mut s, "200 OK", &[json], br#"{"success":true,"messageId":"#).await,
            "trailing" => respond(&mut s, "200 OK", &[json], br#"{"success":true,"messageId":"m"} and more"#).await,
            "html" => respond(&mut s, "200 OK", &[("content-type", "text/html")], b"<html>ok</html>").await,
            "utf8" => respond(&mut s, "200 OK", &[json], b"{\"success\":true,\"messageId\":\"\xff\"}").await,
            "chunked" => {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n")
                    .await;
            }
            // A complete success, then the connection drops short of content-length.
            "short" => {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n{\"success\":true,\"messageId\":\"m-short\"}")
                    .await;
            }
            // No usable status line or head: no answer, so retried.
            "huge-header" => {
                let head = format!("HTTP/1.1 200 OK\r\nx-pad: {}\r\n\r\n", "a".repeat(2 << 20));
                let _ = s.write_all(head.as_bytes()).await;
            }
            "many-headers" => {
                let mut head = "HTTP/1.1 200 OK\r\n".to_string();
                for i in 0..500 {
                    head.push_str(&format!("x-h{i}: v\r\n"));
                }
                head.push_str("content-length: 0\r\n\r\n");
                let _ = s.write_all(head.as_bytes()).await;
            }
            "garbage" => {
                let _ = s.write_all(b"\x00\x01SSH-2.0-OpenSSH\r\n\r\n").await;
            }
            _ => respond(&mut s, "500 Internal Server Error", &[], b"").await,
        }
    })
    .await;
    let mut settings = settings_for(&env, &jelou);
    settings.retry.max_attempts = 2;
    env.declare().await;
    let verdicts = ["fifty", "invalid", "trailing", "html", "utf8", "chunked"];
    let retried = ["huge-header", "many-headers", "garbage"];
    for bot in verdicts.iter().chain(&retried).chain(&["short"]) {
        env.publish(&job(&format!("j-{bot}"), bot)).await;
    }
    env.publish(&job("j-after", "after")).await;
    let rss_before = rss_bytes();
    let worker = env.start_worker_with(settings);
    let n = verdicts.len() + retried.len() + 2;
    let results = by_job_id(&env.results(n, WAIT).await);
    for bot in verdicts {
        let r = &results[&format!("j-{bot}")];
        assert_eq!(r["error"]["kind"], "rejected", "{bot}: {r}");
        assert_eq!(r["error"]["httpStatus"], 200, "{bot}: {r}");
        assert_eq!(r["attempts"], 1, "{bot}: a 2xx is never resent: {r}");
        assert!(
            r["error"]["message"].as_str().unwrap().len() < 1000,
            "{bot}: the error message must stay short"
        );
        assert_eq!(jelou.requests_for(bot).len(), 1, "{bot}");
    }
    for bot in retried {
        let r = &results[&format!("j-{bot}")];
        assert_eq!(r["error"]["kind"], "retries_exhausted", "{bot}: {r}");
        assert_eq!(r["error"]["httpStatus"], Value::Null, "{bot}: {r}");
        assert_eq!(r["attempts"], 2, "{bot}: {r}");
    }
    let short = &results["j-short"];
    assert_eq!(
        short["status"], "success",
        "a complete success body counts: {short}"
    );
    assert_eq!(short["messageId"], "m-short");
    // (The "after" bot gets 500s: the worker still works and still retries.)
    assert_eq!(results["j-after"]["error"]["kind"], "retries_exhausted");
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 256 << 20, "memory grew by {grown} bytes");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

// ---------------------------------------------------------------------------------
// 3. Plain http:// to a remote host is refused at start.
// ---------------------------------------------------------------------------------

/// Runs the binary with only `env` as configuration (in an empty directory, so no
/// config/default.toml), returning (exit code, stderr lines).
async fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_jelou-worker"));
    cmd.args(args)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("JELOU_WORKER__LOG__FORMAT", "text")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("the binary exits promptly")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect();
    (out.status.code(), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_a_remote_host_is_refused_at_start_naming_the_key() {
    let creds = [
        ("JELOU_WORKER__JELOU__CLIENT_ID", "id"),
        ("JELOU_WORKER__JELOU__CLIENT_SECRET", "secret-value"),
        // Nothing may be reached: the start must fail before any connection.
        (
            "JELOU_WORKER__AMQP__URL",
            "amqp://guest:guest@127.0.0.1:1/%2f",
        ),
    ];
    for url in [
        "http://example.com",
        "http://localhost.example.com",
        "http://127.0.0.1.example.com",
        "ftp://127.0.0.1",
        "http://user:pw@127.0.0.1",
    ] {
        let mut env = creds.to_vec();
        env.push(("JELOU_WORKER__JELOU__BASE_URL", url));
        let (code, stderr) = run_binary(&["run"], &env).await;
        assert_ne!(code, Some(0), "{url} was accepted");
        assert!(code.is_some(), "{url}: killed by a signal");
        assert_eq!(stderr.len(), 1, "{url}: one line expected: {stderr:#?}");
        assert!(stderr[0].contains("jelou.base_url"), "{url}: {}", stderr[0]);
        assert!(
            !stderr[0].contains("secret-value") && !stderr[0].contains("pw@"),
            "{}",
            stderr[0]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_accepted_with_allow_insecure_http_or_to_loopback() {
    // `enqueue` with nothing to publish stops right after loading the configuration
    // (before any connection), so what it complains about shows whether the
    // configuration was accepted.
    let cases = [
        ("http://example.com", Some("true")),
        ("http://127.0.0.2:8080", None),
        ("http://[::1]:8080", None),
        ("http://localhost", None),
        ("https://example.com", None),
    ];
    for (url, allow) in cases {
        let mut env = vec![("JELOU_WORKER__JELOU__BASE_URL", url)];
        if let Some(v) = allow {
            env.push(("JELOU_WORKER__JELOU__ALLOW_INSECURE_HTTP", v));
        }
        let (code, stderr) = run_binary(&["enqueue", "--file", "/dev/null"], &env).await;
        let text = stderr.join("\n");
        assert_ne!(code, Some(0), "{url}: nothing was given to enqueue");
        assert!(!text.contains("jelou.base_url"), "{url} refused: {text}");
        assert!(text.contains("no job given"), "{url}: {text}");
    }
    // And `run` gets past the URL to the next missing thing: the credentials.
    let (code, stderr) = run_binary(
        &["run"],
        &[
            ("JELOU_WORKER__JELOU__BASE_URL", "http://example.com"),
            ("JELOU_WORKER__JELOU__ALLOW_INSECURE_HTTP", "true"),
            (
                "JELOU_WORKER__AMQP__URL",
                "amqp://guest:guest@127.0.0.1:1/%2f",
            ),
        ],
    )
    .await;
    let text = stderr.join("\n");
    assert_ne!(code, Some(0));
    assert!(!text.contains("jelou.base_url"), "{text}");
    assert!(text.contains("jelou.client_id"), "{text}");
}
