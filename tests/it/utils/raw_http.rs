//! A raw HTTP/1.1 server on a `TcpListener`, so that every byte of a misbehaving
//! Jelou is the test's: one request per connection, answered by a script.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A request as the raw server read it.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// 1 for the first request the server received.
    pub n: usize,
    pub head: String,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl RawRequest {
    /// The request target, exactly as sent.
    pub fn path(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or("")
    }

    /// The botId segment of `/v1/bots/{botId}/messages`, still encoded.
    pub fn bot(&self) -> &str {
        self.path()
            .trim_start_matches("/v1/bots/")
            .trim_end_matches("/messages")
    }
}

/// A hand-written HTTP/1.1 server on loopback. Every connection carries one request;
/// `script` writes whatever bytes it likes in answer and then drops the connection.
pub struct RawHttp {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<RawRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawHttp {
    pub async fn start<F, Fut>(script: F) -> Self
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

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<RawRequest> {
        self.requests.lock().unwrap().clone()
    }

    pub fn requests_for(&self, bot: &str) -> Vec<RawRequest> {
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
pub async fn read_request(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
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
pub async fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, &str)], body: &[u8]) {
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

pub async fn success(stream: &mut TcpStream, id: &str) {
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
pub async fn stream_body(
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
