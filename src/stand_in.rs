//! A stand-in for Jelou's API on loopback: what `demo`, the benchmark and the tests
//! send to instead of the real service.
//!
//! It answers `POST /v1/bots/{botId}/messages` as Jelou does on success
//! (`{"success": true, "messageId": "..."}`), and the template send
//! `POST /v2/whatsapp/{botId}/hsm` likewise (`[{"id": "...", "destination": "..."}]`,
//! one entry per destination of the request), or as a handler decides: any status,
//! body and headers, after any delay. It records every request it saw (raw path,
//! `Authorization`, body) so a test can assert what reached "Jelou".

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A request as the stand-in received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query exactly as sent (still percent-encoded).
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: Bytes,
    /// When it arrived.
    pub at: std::time::Instant,
}

impl Seen {
    /// The body as JSON (Null when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// Whether this is a template send (`/v2/whatsapp/{botId}/hsm`).
    pub fn is_hsm(&self) -> bool {
        self.path.starts_with("/v2/whatsapp/") && self.path.ends_with("/hsm")
    }

    /// The recipient: a message's `userId`, or a template send's first destination.
    pub fn recipient(&self) -> String {
        let body = self.json();
        let user = if self.is_hsm() {
            &body["destinations"][0]
        } else {
            &body["userId"]
        };
        user.as_str().unwrap_or("").to_string()
    }
}

/// How to answer one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Jelou's success body with a fresh messageId.
    Success,
    /// Any status, body and headers.
    Status {
        status: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
    /// Answer after a pause.
    After(Duration, Box<Reply>),
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Reply::Status {
            status,
            body: String::new(),
            headers: vec![],
        }
    }

    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Reply::Status {
            status,
            body: body.to_string(),
            headers: vec![("content-type".into(), "application/json".into())],
        }
    }

    pub fn with_header(self, name: &str, value: &str) -> Self {
        match self {
            Reply::Status {
                status,
                body,
                mut headers,
            } => {
                headers.push((name.into(), value.into()));
                Reply::Status {
                    status,
                    body,
                    headers,
                }
            }
            other => other,
        }
    }

    pub fn after(self, delay: Duration) -> Self {
        Reply::After(delay, Box::new(self))
    }
}

/// Decides the reply to a request; `n` counts requests from 1.
pub type Handler = Arc<dyn Fn(&Seen, u64) -> Reply + Send + Sync>;

struct Inner {
    handler: Mutex<Handler>,
    seen: Mutex<Vec<Seen>>,
    record: bool,
    count: AtomicU64,
    ids: AtomicU64,
    notify: Notify,
}

/// A running stand-in; stops when dropped.
pub struct StandIn {
    addr: SocketAddr,
    inner: Arc<Inner>,
    stop: CancellationToken,
}

impl StandIn {
    /// Starts on an ephemeral loopback port, answering success to everything.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().expect("valid"), true).await
    }

    /// Starts on `addr`. With `record` false requests are only counted (benchmarks).
    pub async fn start_on(addr: SocketAddr, record: bool) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            handler: Mutex::new(Arc::new(|_: &Seen, _| Reply::Success)),
            seen: Mutex::new(Vec::new()),
            record,
            count: AtomicU64::new(0),
            ids: AtomicU64::new(0),
            notify: Notify::new(),
        });
        let stop = CancellationToken::new();
        let app = Router::new().fallback(answer).with_state(inner.clone());
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
        });
        Ok(Self { addr, inner, stop })
    }

    /// `http://127.0.0.1:PORT`: the `jelou.base_url` to use.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces how requests are answered.
    pub fn set_handler(&self, handler: impl Fn(&Seen, u64) -> Reply + Send + Sync + 'static) {
        *self.inner.handler.lock().expect("not poisoned") = Arc::new(handler);
    }

    /// Answers every request with `reply`.
    pub fn always(&self, reply: Reply) {
        self.set_handler(move |_, _| reply.clone());
    }

    /// Requests received so far.
    pub fn count(&self) -> u64 {
        self.inner.count.load(Ordering::SeqCst)
    }

    /// Copies of the requests received so far (empty when not recording).
    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().expect("not poisoned").clone()
    }

    /// Waits until at least `n` requests arrived; false if `timeout` passed first.
    pub async fn wait_for(&self, n: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.notify.notified();
            if self.count() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.count() >= n;
            }
        }
    }

    /// Stops serving (new connections are refused).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn answer(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let seen = Seen {
        method: method.to_string(),
        path: uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        authorization: header("authorization"),
        content_type: header("content-type"),
        body,
        at: std::time::Instant::now(),
    };
    let hsm_destinations: Option<Vec<serde_json::Value>> =
        seen.is_hsm()
            .then(|| match seen.json().get("destinations") {
                Some(serde_json::Value::Array(d)) => d.clone(),
                _ => Vec::new(),
            });
    let handler = inner.handler.lock().expect("not poisoned").clone();
    let n = inner.count.load(Ordering::SeqCst) + 1;
    let mut reply = handler(&seen, n);
    if inner.record {
        inner.seen.lock().expect("not poisoned").push(seen);
    }
    inner.count.fetch_add(1, Ordering::SeqCst);
    inner.notify.notify_waiters();
    loop {
        match reply {
            Reply::After(delay, next) => {
                tokio::time::sleep(delay).await;
                reply = *next;
            }
            Reply::Success => {
                let next_id = || inner.ids.fetch_add(1, Ordering::Relaxed) + 1;
                let body = match &hsm_destinations {
                    // The HSM send answers one entry per destination.
                    Some(destinations) => serde_json::Value::Array(
                        destinations
                            .iter()
                            .map(|d| serde_json::json!({"id": format!("hsm-{}", next_id()), "destination": d}))
                            .collect(),
                    )
                    .to_string(),
                    None => format!(r#"{{"success":true,"messageId":"msg-{}"}}"#, next_id()),
                };
                return ([("content-type", "application/json")], body).into_response();
            }
            Reply::Status {
                status,
                body,
                headers,
            } => {
                let mut response = (
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    body,
                )
                    .into_response();
                for (k, v) in headers {
                    if let (Ok(k), Ok(v)) = (
                        axum::http::HeaderName::from_bytes(k.as_bytes()),
                        axum::http::HeaderValue::from_str(&v),
                    ) {
                        response.headers_mut().insert(k, v);
                    }
                }
                return response;
            }
        }
    }
}
