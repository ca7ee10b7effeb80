//! The HTTP client for Jelou's `POST /v1/bots/{botId}/messages`, and for template
//! jobs its HSM send, `POST /v2/whatsapp/{botId}/hsm`.
//!
//! Built on hyper directly rather than reqwest: reqwest parses every URL with the
//! WHATWG rules of the `url` crate, which turn a `%2E%2E` path segment back into `..`
//! and collapse it, so a botId of `..` could never reach Jelou as the contract requires.
//! hyper takes the request target as written.
//!
//! One pooled client per worker; every attempt is bounded by `jelou.request_timeout_ms`
//! from connect to the last byte read, and at most `jelou.max_response_bytes` of a body
//! are read. Redirects are never followed.

use std::{sync::Arc, time::Duration};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use secrecy::ExposeSecret;

use crate::{
    config::JelouSettings,
    job::{Job, JobKind},
    outcome::{Attempt, AttemptFailure, classify_hsm_response, classify_response},
};

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("jelou.base_url: {0}")]
    BaseUrl(String),
    #[error("jelou.tls_ca_file: {0}")]
    CaFile(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// A cheap-to-clone handle on the pooled client.
#[derive(Clone)]
pub struct JelouClient {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client<HttpsConnector, Full<Bytes>>,
    /// `base_url` without its trailing slash.
    base: String,
    authorization: HeaderValue,
    timeout: Duration,
    max_body: usize,
}

/// Characters kept as they are in a path segment: RFC 3986 unreserved ones. Everything
/// else (`/`, `?`, `#`, `%`, spaces, controls, non-ASCII) is percent-encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'~')
    .remove(b'.');

/// Encodes a botId as one path segment. `.` and `..` get their dots encoded so that
/// no server or proxy treats them as dot-segments.
pub fn encode_segment(raw: &str) -> String {
    if raw == "." || raw == ".." {
        return "%2E".repeat(raw.len());
    }
    utf8_percent_encode(raw, SEGMENT).to_string()
}

impl JelouClient {
    /// Builds the client; needs the credentials (`jelou.client_id`/`client_secret`).
    pub fn new(settings: &JelouSettings, max_idle_per_host: usize) -> Result<Self, ClientError> {
        let (id, secret) = settings.credentials()?;
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{id}:{}", secret.expose_secret()));
        let mut authorization = HeaderValue::from_str(&format!("Basic {token}"))
            .map_err(|_| ClientError::Tls("credentials are not valid header text".into()))?;
        authorization.set_sensitive(true);
        Self::with_authorization(settings, authorization, max_idle_per_host)
    }

    fn with_authorization(
        settings: &JelouSettings,
        authorization: HeaderValue,
        max_idle_per_host: usize,
    ) -> Result<Self, ClientError> {
        let base =
            url::Url::parse(&settings.base_url).map_err(|e| ClientError::BaseUrl(e.to_string()))?;
        let base = base.as_str().trim_end_matches('/').to_string();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.request_timeout()));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(settings)?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(max_idle_per_host)
            .build(connector);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                base,
                authorization,
                timeout: settings.request_timeout(),
                max_body: settings.max_response_bytes,
            }),
        })
    }

    /// The URL a job for `bot_id` is posted to.
    pub fn message_url(&self, bot_id: &str) -> String {
        format!(
            "{}/v1/bots/{}/messages",
            self.inner.base,
            encode_segment(bot_id)
        )
    }

    /// The URL a template job for `bot_id` is posted to (Jelou's HSM send).
    pub fn hsm_url(&self, bot_id: &str) -> String {
        format!(
            "{}/v2/whatsapp/{}/hsm",
            self.inner.base,
            encode_segment(bot_id)
        )
    }

    /// Makes one attempt for `job`: posts `body` (the job's request body) to the
    /// endpoint of its kind and classifies the answer.
    pub async fn send_job(&self, job: &Job, body: Bytes) -> Attempt {
        match job.kind {
            JobKind::Message => self.send(&job.bot_id, body).await,
            JobKind::Template => {
                let deadline = tokio::time::Instant::now() + self.inner.timeout;
                let url = self.hsm_url(&job.bot_id);
                match self.exchange(&url, body, deadline).await {
                    Ok((status, retry_after, answer)) => classify_hsm_response(
                        status,
                        retry_after.as_deref(),
                        &answer,
                        &job.user_id,
                        std::time::SystemTime::now(),
                    ),
                    Err(failure) => Attempt::Failed(failure),
                }
            }
        }
    }

    /// Makes one attempt: posts `body` as a message for `bot_id` and classifies the
    /// answer.
    pub async fn send(&self, bot_id: &str, body: Bytes) -> Attempt {
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        match self
            .exchange(&self.message_url(bot_id), body, deadline)
            .await
        {
            Ok((status, retry_after, body)) => classify_response(
                status,
                retry_after.as_deref(),
                &body,
                std::time::SystemTime::now(),
            ),
            Err(failure) => Attempt::Failed(failure),
        }
    }

    fn timed_out(&self) -> AttemptFailure {
        AttemptFailure::transport(format!(
            "no complete answer from Jelou within jelou.request_timeout_ms ({} ms)",
            self.inner.timeout.as_millis()
        ))
    }

    /// Posts and reads the status, `Retry-After` and at most `max_body` bytes of the
    /// body, all before `deadline`. A 2xx whose body is not complete by then is
    /// classified from what was read, like one whose body broke off: Jelou may have
    /// accepted the message, so it must not be resent.
    async fn exchange(
        &self,
        url: &str,
        body: Bytes,
        deadline: tokio::time::Instant,
    ) -> Result<(u16, Option<String>, Vec<u8>), AttemptFailure> {
        let uri: Uri = url
            .parse()
            .map_err(|e| AttemptFailure::transport(format!("cannot build the request URL: {e}")))?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::AUTHORIZATION, self.inner.authorization.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("jelou-worker/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(body))
            .map_err(|e| AttemptFailure::transport(format!("cannot build the request: {e}")))?;
        let response = match tokio::time::timeout_at(deadline, self.inner.client.request(request))
            .await
        {
            Ok(response) => response.map_err(|e| AttemptFailure::transport(describe_error(&e)))?,
            Err(_) => return Err(self.timed_out()),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = response.into_body();
        let mut read = Vec::new();
        let success = (200..300).contains(&status);
        while read.len() < self.inner.max_body {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(frame) => frame,
                Err(_) if success => {
                    tracing::debug!("a 2xx body did not complete within jelou.request_timeout_ms");
                    break;
                }
                Err(_) => return Err(self.timed_out()),
            };
            match frame {
                None => break,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        let room = self.inner.max_body - read.len();
                        read.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
                Some(Err(e)) if success => {
                    // A 2xx whose body broke off: Jelou may have accepted the message,
                    // so this is a verdict (classified from what was read), not a retry.
                    tracing::debug!(error = %e, "response body broke off");
                    break;
                }
                Some(Err(e)) => {
                    return Err(AttemptFailure::transport(format!(
                        "reading Jelou's answer: {e}"
                    )));
                }
            }
        }
        Ok((status, retry_after, read))
    }

    /// Checks reachability and credentials without sending a message: posts an empty
    /// JSON object, which Jelou must refuse as a message (no `type`, no `userId`).
    /// 401/403 means bad credentials; any other answer below 500 means reachable and
    /// authenticated; 5xx or no answer means unreachable.
    pub async fn probe(&self, bot_id: &str) -> Probe {
        match self.send(bot_id, Bytes::from_static(b"{}")).await {
            Attempt::Delivered { .. } => Probe::Healthy("Jelou accepted an empty message".into()),
            Attempt::Failed(f) if f.is_auth() => Probe::BadCredentials(f.message),
            Attempt::Failed(f) if f.is_outage() => Probe::Unreachable(f.message),
            Attempt::Failed(f) => Probe::Healthy(f.message),
        }
    }
}

/// What a [`JelouClient::probe`] found; each carries what Jelou answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Healthy(String),
    BadCredentials(String),
    Unreachable(String),
}

fn describe_error(e: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error;
    let mut text = if e.is_connect() {
        "cannot connect to Jelou".to_string()
    } else {
        "the connection to Jelou failed".to_string()
    };
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// rustls with the system's roots, plus `jelou.tls_ca_file` when set.
fn tls_config(settings: &JelouSettings) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &settings.tls_ca_file {
        for cert in read_pem_certs(path).map_err(ClientError::CaFile)? {
            roots
                .add(cert)
                .map_err(|e| ClientError::CaFile(format!("{}: {e}", path.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Reads every certificate of a PEM file.
pub fn read_pem_certs(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect();
    let certs = certs.map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_bot_ids_stay_one_segment() {
        let cases = [
            ("BOT_1", "BOT_1"),
            ("../x", "..%2Fx"),
            (".", "%2E"),
            ("..", "%2E%2E"),
            ("...", "..."),
            ("a.b", "a.b"),
            ("a/b", "a%2Fb"),
            ("?", "%3F"),
            ("#", "%23"),
            ("%2F", "%252F"),
            ("a b", "a%20b"),
            ("a\0\n", "a%00%0A"),
            ("ñ", "%C3%B1"),
        ];
        for (raw, want) in cases {
            assert_eq!(encode_segment(raw), want, "{raw:?}");
        }
    }

    /// A server on loopback that answers every connection with `answer` (written at
    /// once) and then keeps the connection open, silent, for a minute.
    async fn stalling_server(answer: &'static [u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(answer).await;
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        });
        format!("http://{addr}")
    }

    fn quick_client(base_url: String) -> JelouClient {
        let settings = JelouSettings {
            base_url,
            request_timeout_ms: 300,
            ..JelouSettings::default()
        };
        JelouClient::with_authorization(&settings, HeaderValue::from_static("Basic x"), 1).unwrap()
    }

    #[tokio::test]
    async fn a_2xx_whose_body_stalls_is_a_verdict_not_a_retry() {
        let base =
            stalling_server(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"success\":true,")
                .await;
        match quick_client(base)
            .send("B", Bytes::from_static(b"{}"))
            .await
        {
            Attempt::Failed(f) => {
                assert!(!f.retryable, "a 2xx may have been accepted: {f:?}");
                assert_eq!(f.http_status, Some(200));
            }
            other => panic!("{other:?}"),
        }
        // A complete success body is a success even if the connection then stalls.
        let base = stalling_server(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"success\":true,\"messageId\":\"m\"}",
        )
        .await;
        assert_eq!(
            quick_client(base)
                .send("B", Bytes::from_static(b"{}"))
                .await,
            Attempt::Delivered {
                message_id: "m".into()
            }
        );
    }

    #[tokio::test]
    async fn a_stall_before_the_status_or_in_a_5xx_body_is_retried() {
        for answer in [
            &b"HTTP/1.1 2"[..],
            &b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 100\r\n\r\n{"[..],
        ] {
            let base = stalling_server(answer).await;
            let started = std::time::Instant::now();
            match quick_client(base)
                .send("B", Bytes::from_static(b"{}"))
                .await
            {
                Attempt::Failed(f) => {
                    assert!(f.retryable, "{f:?}");
                    assert_eq!(f.http_status, None);
                    assert!(f.message.contains("request_timeout_ms"), "{}", f.message);
                }
                other => panic!("{other:?}"),
            }
            assert!(started.elapsed() < Duration::from_secs(5));
        }
    }

    #[test]
    fn message_url_is_built_under_the_base_path() {
        let settings = JelouSettings {
            base_url: "http://127.0.0.1:1/api/".into(),
            ..JelouSettings::default()
        };
        let client =
            JelouClient::with_authorization(&settings, HeaderValue::from_static("Basic x"), 1)
                .unwrap();
        assert_eq!(
            client.message_url(".."),
            "http://127.0.0.1:1/api/v1/bots/%2E%2E/messages"
        );
        assert_eq!(
            client.hsm_url(".."),
            "http://127.0.0.1:1/api/v2/whatsapp/%2E%2E/hsm"
        );
        let uri: Uri = client.hsm_url("a/b").parse().unwrap();
        assert_eq!(uri.path(), "/api/v2/whatsapp/a%2Fb/hsm");
        let uri: Uri = client.message_url("a/b?c#d").parse().unwrap();
        assert_eq!(uri.path(), "/api/v1/bots/a%2Fb%3Fc%23d/messages");
        assert_eq!(uri.query(), None);
    }
}
