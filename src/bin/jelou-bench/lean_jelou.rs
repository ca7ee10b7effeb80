//! The benchmark's Jelou: HTTP/1.1 keep-alive on loopback, answering every
//! `POST /v1/bots/{botId}/messages` with Jelou's success body
//! (`{"success":true,"messageId":"..."}`), after a set delay.
//!
//! Why not the crate's [`jelou_worker::stand_in::StandIn`] (axum, recording every
//! request for the tests' assertions): here the stand-in shares the machine's cores
//! with the worker and the broker, and every microsecond it spends on a request is
//! taken from them, while the real Jelou costs the worker's machine nothing. This one
//! does as little as an HTTP server can: per request one read, a parse of the head
//! (httparse), and one write. Anything else than a well-formed POST to the messages
//! path gets a 404 or a 400, so a worker that sent something wrong would not pass as
//! a fast one.
//!
//! On request ([`LeanJelou::record`]) it also notes, for each message, its userId and
//! the sequence number the bench wrote at the head of its text, when it arrived and
//! when it was answered: enough to check that each user's messages came one at a time
//! and in order. Off by default, so that `instant` measures no bookkeeping.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    io,
    net::SocketAddr,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};
use tokio_util::sync::CancellationToken;

/// A request head larger than this is refused (the worker's are a few hundred bytes).
const MAX_REQUEST: usize = 1 << 20;

/// How long to wait before answering, shared with the connections.
#[derive(Default)]
struct Delay {
    /// Mean delay, in µs.
    mean_us: AtomicU64,
    /// Each delay is drawn uniformly from mean ± this many percent.
    jitter_pct: AtomicU64,
}

impl Delay {
    fn next(&self) -> Duration {
        let mean = self.mean_us.load(Ordering::Relaxed) as f64;
        let spread = mean * self.jitter_pct.load(Ordering::Relaxed) as f64 / 100.0;
        let us = if spread > 0.0 {
            mean + spread * (2.0 * fastrand::f64() - 1.0)
        } else {
            mean
        };
        Duration::from_micros(us.max(0.0) as u64)
    }
}

struct Shared {
    delay: Delay,
    alarm: Arc<Alarm>,
    /// Requests answered with success; also the next messageId.
    answered: AtomicU64,
    /// Whether to note what arrives in `received`.
    recording: AtomicBool,
    received: Mutex<Vec<Received>>,
}

/// A message's arrival or its answer, in the order they happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Received {
    /// The message's userId (empty if the body had none).
    pub(crate) user: String,
    /// The number after `m` at the head of its text (the job's sequence number).
    pub(crate) seq: Option<u64>,
    /// False when it arrived, true when it was answered.
    pub(crate) answered: bool,
}

impl Shared {
    /// Notes a message's arrival or answer, if recording.
    fn note(&self, request: &[u8], answered: bool) {
        if self.recording.load(Ordering::Relaxed) {
            let (user, seq) = user_and_seq(request);
            self.received.lock().expect("not poisoned").push(Received {
                user,
                seq,
                answered,
            });
        }
    }
}

/// The userId and the `m<seq>:` head of the text of a message request, found by
/// searching the bytes (the bench writes the body, so no JSON parser is needed).
fn user_and_seq(request: &[u8]) -> (String, Option<u64>) {
    let after = |key: &[u8]| {
        request
            .windows(key.len())
            .position(|w| w == key)
            .map(|i| &request[i + key.len()..])
    };
    let user = after(br#""userId":""#)
        .and_then(|rest| {
            let end = rest.iter().position(|&b| b == b'"')?;
            std::str::from_utf8(&rest[..end]).ok()
        })
        .unwrap_or_default()
        .to_string();
    let seq = after(br#""text":"m"#).and_then(|rest| {
        let end = rest.iter().position(|b| !b.is_ascii_digit())?;
        std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
    });
    (user, seq)
}

/// Wakes delayed answers at their deadline, to within a few tens of microseconds.
/// tokio's timer rounds every sleep up to the next millisecond tick: a 150 ms answer
/// came out at 151.1 ms on average, which would charge the stand-in's lateness (0.7 %)
/// to the worker in the `latency` scenario. A thread of its own waits on a condition
/// variable with the next deadline as its timeout instead.
struct Alarm {
    due: Mutex<BinaryHeap<Reverse<Due>>>,
    changed: Condvar,
    stopped: AtomicBool,
}

/// An answer waiting for its time; ordered by that time alone.
struct Due {
    at: Instant,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

impl Alarm {
    fn start() -> io::Result<Arc<Self>> {
        let alarm = Arc::new(Self {
            due: Mutex::new(BinaryHeap::new()),
            changed: Condvar::new(),
            stopped: AtomicBool::new(false),
        });
        let ringing = alarm.clone();
        std::thread::Builder::new()
            .name(format!("{}-alarm", crate::STAND_IN_THREAD))
            .spawn(move || ringing.ring())?;
        Ok(alarm)
    }

    /// Resolves at `at`.
    async fn until(&self, at: Instant) {
        let (wake, woken) = oneshot::channel();
        {
            let mut due = self.due.lock().expect("not poisoned");
            let earliest = due.peek().is_none_or(|Reverse(first)| at < first.at);
            due.push(Reverse(Due { at, wake }));
            if earliest {
                self.changed.notify_one();
            }
        }
        let _ = woken.await;
    }

    fn ring(&self) {
        let mut due = self.due.lock().expect("not poisoned");
        while !self.stopped.load(Ordering::Relaxed) {
            let now = Instant::now();
            while due.peek().is_some_and(|Reverse(first)| first.at <= now) {
                if let Some(Reverse(first)) = due.pop() {
                    let _ = first.wake.send(());
                }
            }
            due = match due.peek() {
                Some(Reverse(first)) => {
                    let wait = first.at - now;
                    self.changed
                        .wait_timeout(due, wait)
                        .expect("not poisoned")
                        .0
                }
                None => self.changed.wait(due).expect("not poisoned"),
            };
        }
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        let _guard = self.due.lock().expect("not poisoned");
        self.changed.notify_one();
    }
}

/// A running lean Jelou; stops when dropped.
pub struct LeanJelou {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl LeanJelou {
    /// Listens on an ephemeral loopback port; must be called on the runtime that is to
    /// serve it.
    pub async fn start() -> io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            delay: Delay::default(),
            alarm: Alarm::start()?,
            answered: AtomicU64::new(0),
            recording: AtomicBool::new(false),
            received: Mutex::new(Vec::new()),
        });
        let stop = CancellationToken::new();
        let (serving, stopped) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stopped.cancelled() => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                let (shared, stopped) = (serving.clone(), stopped.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = serve(stream, &shared) => {}
                        _ = stopped.cancelled() => {}
                    }
                });
            }
        });
        Ok(Self { addr, shared, stop })
    }

    /// `http://127.0.0.1:PORT`: the `jelou.base_url` to give the worker.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers after `mean`, each delay drawn uniformly from mean ± `jitter_pct` %.
    pub fn answer_after(&self, mean: Duration, jitter_pct: u8) {
        let delay = &self.shared.delay;
        delay
            .mean_us
            .store(mean.as_micros() as u64, Ordering::Relaxed);
        delay
            .jitter_pct
            .store(u64::from(jitter_pct), Ordering::Relaxed);
    }

    /// Starts (`true`) or stops noting what arrives; returns what was noted since the
    /// last call, and forgets it.
    pub fn record(&self, on: bool) -> Vec<Received> {
        self.shared.recording.store(on, Ordering::Relaxed);
        std::mem::take(&mut *self.shared.received.lock().expect("not poisoned"))
    }

    /// Requests answered with success so far.
    pub fn answered(&self) -> u64 {
        self.shared.answered.load(Ordering::Relaxed)
    }
}

impl Drop for LeanJelou {
    fn drop(&mut self) {
        self.stop.cancel();
        self.shared.alarm.stop();
    }
}

/// Serves one keep-alive connection until the peer closes it or sends garbage.
async fn serve(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(256);
    loop {
        // Answer every complete request in the buffer, in order.
        let mut used = 0;
        loop {
            match parse(&buf[used..]) {
                Parsed::Complete { len, messages_post } => {
                    let request = used..used + len;
                    used += len;
                    if messages_post {
                        shared.note(&buf[request.clone()], false);
                        let delay = shared.delay.next();
                        if !delay.is_zero() {
                            let at = Instant::now() + delay;
                            if !out.is_empty() {
                                stream.write_all(&out).await?;
                                out.clear();
                            }
                            shared.alarm.until(at).await;
                        }
                        shared.note(&buf[request], true);
                        let id = shared.answered.fetch_add(1, Ordering::Relaxed) + 1;
                        success(&mut out, id);
                    } else {
                        out.extend_from_slice(
                            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
                        );
                    }
                }
                Parsed::Partial => break,
                Parsed::Invalid => {
                    out.extend_from_slice(
                        b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
                    );
                    stream.write_all(&out).await?;
                    return Ok(());
                }
            }
        }
        buf.drain(..used);
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if buf.len() >= MAX_REQUEST {
            stream
                .write_all(b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                .await?;
            return Ok(());
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

#[derive(Debug, PartialEq)]
enum Parsed {
    /// A whole request of `len` bytes (head and body); `messages_post` when it is a
    /// POST to `/v1/bots/{botId}/messages` with a body.
    Complete { len: usize, messages_post: bool },
    /// More bytes are needed.
    Partial,
    /// Not HTTP/1.1 this server can read (no Content-Length body framing, bad head).
    Invalid,
}

fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let head = match request.parse(buf) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Invalid,
    };
    let mut body = 0usize;
    for h in request.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
            {
                Some(n) => body = n,
                None => return Parsed::Invalid,
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Invalid;
        }
    }
    if buf.len() < head + body {
        return Parsed::Partial;
    }
    let path = request.path.unwrap_or("");
    let messages_post = request.method == Some("POST")
        && body > 0
        && path
            .strip_prefix("/v1/bots/")
            .and_then(|rest| rest.strip_suffix("/messages"))
            .is_some_and(|bot| !bot.is_empty() && !bot.contains('/'));
    Parsed::Complete {
        len: head + body,
        messages_post,
    }
}

/// Appends Jelou's success answer, messageId `msg-<id>`.
fn success(out: &mut Vec<u8>, id: u64) {
    let mut digits = itoa::Buffer::new();
    let id = digits.format(id);
    // {"success":true,"messageId":"msg-"} is 35 bytes.
    let body_len = 35 + id.len();
    let mut len = itoa::Buffer::new();
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ");
    out.extend_from_slice(len.format(body_len).as_bytes());
    out.extend_from_slice(b"\r\n\r\n{\"success\":true,\"messageId\":\"msg-");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\"}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_post_to_the_messages_path_with_its_body() {
        let req =
            b"POST /v1/bots/b%2F1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(
            parse(req),
            Parsed::Complete {
                len: req.len(),
                messages_post: true
            }
        );
        assert_eq!(parse(&req[..req.len() - 1]), Parsed::Partial);
        assert_eq!(parse(&req[..10]), Parsed::Partial);
    }

    #[test]
    fn other_requests_are_not_messages_posts() {
        for req in [
            &b"GET /v1/bots/b/messages HTTP/1.1\r\ncontent-length: 0\r\n\r\n"[..],
            b"POST /v1/bots//messages HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}",
            b"POST /v1/bots/a/b/messages HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}",
            b"POST /v2/bots/b/messages HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}",
        ] {
            assert!(
                matches!(
                    parse(req),
                    Parsed::Complete {
                        messages_post: false,
                        ..
                    }
                ),
                "{}",
                String::from_utf8_lossy(req)
            );
        }
        assert_eq!(
            parse(b"POST /v1/bots/b/messages HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"),
            Parsed::Invalid
        );
        assert_eq!(parse(b"\x00\x01garbage\r\n\r\n"), Parsed::Invalid);
    }

    #[test]
    fn finds_the_user_and_the_sequence_number_of_a_bench_message() {
        let req = br#"POST /v1/bots/b/messages HTTP/1.1
content-length: 60

{"type":"text","userId":"593900000007","text":"m42: Hola"}"#;
        assert_eq!(user_and_seq(req), ("593900000007".to_string(), Some(42)));
        assert_eq!(user_and_seq(b"{}"), (String::new(), None));
    }

    #[test]
    fn the_success_answer_is_jelous_body_with_a_right_length() {
        let mut out = Vec::new();
        success(&mut out, 12345);
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, r#"{"success":true,"messageId":"msg-12345"}"#);
        assert!(head.ends_with(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["messageId"], "msg-12345");
    }
}
