//! TLS, end to end: `amqps://` to the real local RabbitMQ through a TLS-terminating
//! proxy started in the test (tokio-rustls, forwarding bytes to 127.0.0.1:5672), with
//! a throwaway CA, server and client certificates made by rcgen; mutual TLS; and
//! HTTPS to a stand-in Jelou behind the same kind of proxy.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::utils::*;
use jelou_worker::{
    broker,
    config::{AmqpSettings, AmqpUrls, Settings},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------
// A throwaway PKI.
// ---------------------------------------------------------------------------------

/// PEM files of a CA, a server certificate for 127.0.0.1/localhost and a client
/// certificate, all signed by the CA; and a client certificate from another CA.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    rogue_client_cert: PathBuf,
    rogue_client_key: PathBuf,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    name: &str,
    purpose: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![purpose];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key, issuer).unwrap();
    // serialize_pem is PKCS#8 ("BEGIN PRIVATE KEY"), as amqp.tls_client_key_file wants.
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (ca_params, ca_key, ca_pem) = ca("jelou-worker test CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let (server_cert, server_key) =
            leaf(&issuer, "test server", ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert, client_key) =
            leaf(&issuer, "jelou-worker", ExtendedKeyUsagePurpose::ClientAuth);
        let (rogue_params, rogue_key, _) = ca("someone else's CA");
        let rogue = Issuer::new(rogue_params, rogue_key);
        let (rogue_cert, rogue_key) =
            leaf(&rogue, "jelou-worker", ExtendedKeyUsagePurpose::ClientAuth);
        Self {
            ca: write("ca.pem", &ca_pem),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
            rogue_client_cert: write("rogue.pem", &rogue_cert),
            rogue_client_key: write("rogue.key", &rogue_key),
            _dir: dir,
        }
    }

    /// A TLS server configuration; with `mutual`, a client certificate signed by the
    /// CA is required.
    fn server_config(&self, mutual: bool) -> ServerConfig {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.server_cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&self.server_key).unwrap();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if mutual {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(&self.ca).unwrap() {
                roots.add(cert.unwrap()).unwrap();
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        builder.with_single_cert(chain, key).unwrap()
    }
}

// ---------------------------------------------------------------------------------
// A TLS-terminating proxy.
// ---------------------------------------------------------------------------------

/// Accepts TLS on an ephemeral loopback port and forwards the plain bytes to
/// `upstream`. Counts completed handshakes and records failed ones.
struct TlsProxy {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    async fn start(config: ServerConfig, upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let (ok, failed) = (handshakes.clone(), failures.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, ok, failed) = (acceptor.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(e) => {
                            failed.lock().unwrap().push(e.to_string());
                            return;
                        }
                    };
                    ok.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut plain) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Self {
            addr,
            handshakes,
            failures,
            task,
        }
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    /// Waits (bounded) for a failed handshake to be recorded.
    async fn wait_failure(&self) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(f) = self.failures().pop() {
                return f;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the proxy saw no failed handshake"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The local broker's plain address, from the tests' broker URL.
fn broker_addr() -> SocketAddr {
    let url = url::Url::parse(&broker_url()).unwrap();
    let host = url.host_str().unwrap_or("127.0.0.1");
    let port = url.port().unwrap_or(5672);
    format!("{host}:{port}").parse().unwrap()
}

fn amqps_url(proxy: &TlsProxy) -> AmqpUrls {
    AmqpUrls::parse(&format!(
        "amqps://guest:guest@127.0.0.1:{}/%2f",
        proxy.addr.port()
    ))
    .unwrap()
}

fn amqps_settings(env: &TestEnv, proxy: &TlsProxy, pki: &Pki) -> Settings {
    let mut settings = env.settings.clone();
    settings.amqp.url = amqps_url(proxy);
    settings.amqp.tls_ca_file = Some(pki.ca.clone());
    settings
}

async fn connect_error(amqp: &AmqpSettings) -> String {
    match broker::connect(amqp, "tls-test").await {
        Ok(c) => {
            let _ = c.connection.close(200, "done".into()).await;
            panic!("connected where it must not")
        }
        Err(e) => format!("{e:#}"),
    }
}

// ---------------------------------------------------------------------------------
// amqps://
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_the_ca_file_processes_a_job_end_to_end() {
    let pki = Pki::new();
    let proxy = TlsProxy::start(pki.server_config(false), broker_addr()).await;
    let env = TestEnv::new("amqps").await;
    let settings = amqps_settings(&env, &proxy, &pki);
    env.declare().await;
    env.publish(&text_job("j-amqps", "B")).await;
    let worker = env.start_worker_with(settings.clone());
    let r = env.result().await.json();
    assert_eq!(r["status"], "success", "{r}");
    assert!(proxy.handshakes() >= 1, "the worker did not go through TLS");
    worker.stop().await.unwrap();

    // Without amqp.tls_ca_file the throwaway CA is not trusted (system roots only).
    let mut untrusted = settings.amqp.clone();
    untrusted.tls_ca_file = None;
    let e = connect_error(&untrusted).await;
    assert!(
        e.contains("UnknownIssuer") || e.to_lowercase().contains("certificate"),
        "{e}"
    );
    assert!(!e.contains("guest:guest"), "the password leaked: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_succeeds_with_the_client_certificate_and_fails_without() {
    let pki = Pki::new();
    let proxy = TlsProxy::start(pki.server_config(true), broker_addr()).await;
    let env = TestEnv::new("mtls").await;
    let mut settings = amqps_settings(&env, &proxy, &pki);
    settings.amqp.tls_client_cert_file = Some(pki.client_cert.clone());
    settings.amqp.tls_client_key_file = Some(pki.client_key.clone());

    // With the certificate: a job goes through.
    env.declare().await;
    env.publish(&text_job("j-mtls", "B")).await;
    let worker = env.start_worker_with(settings.clone());
    let r = env.result().await.json();
    assert_eq!(r["status"], "success", "{r}");
    worker.stop().await.unwrap();
    assert!(proxy.failures().is_empty(), "{:?}", proxy.failures());

    // Without it: the proxy refuses the handshake, and connecting fails.
    let mut anonymous = settings.amqp.clone();
    anonymous.tls_client_cert_file = None;
    anonymous.tls_client_key_file = None;
    let e = connect_error(&anonymous).await;
    assert!(e.contains("cannot connect to the broker"), "{e}");
    assert!(e.contains("CertificateRequired"), "{e}");
    let refused = proxy.wait_failure().await;
    assert!(
        refused.to_lowercase().contains("certificate"),
        "the proxy refused for another reason: {refused}"
    );

    // With a certificate from another CA: refused too.
    let mut rogue = settings.amqp.clone();
    rogue.tls_client_cert_file = Some(pki.rogue_client_cert.clone());
    rogue.tls_client_key_file = Some(pki.rogue_client_key.clone());
    let before = proxy.failures().len();
    let e = connect_error(&rogue).await;
    assert!(e.contains("cannot connect to the broker"), "{e}");
    assert!(e.contains("UnknownCA"), "{e}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while proxy.failures().len() == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refusal recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = proxy.failures().pop().unwrap();
    assert!(
        refused.contains("UnknownIssuer") || refused.to_lowercase().contains("certificate"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_tls_files_fail_the_start_naming_the_key() {
    let pki = Pki::new();
    let proxy = TlsProxy::start(pki.server_config(true), broker_addr()).await;
    let env = TestEnv::new("tlsfiles").await;
    let base = amqps_settings(&env, &proxy, &pki);
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").unwrap();
    let missing = dir.path().join("missing.pem");

    let mut cases: Vec<(&str, Settings)> = Vec::new();
    let mut s = base.clone();
    s.amqp.tls_ca_file = Some(missing.clone());
    cases.push(("amqp.tls_ca_file", s));
    let mut s = base.clone();
    s.amqp.tls_ca_file = Some(pki.client_key.clone()); // a key, not a certificate
    cases.push(("amqp.tls_ca_file", s));
    let mut s = base.clone();
    s.amqp.tls_client_cert_file = Some(garbage.clone());
    s.amqp.tls_client_key_file = Some(pki.client_key.clone());
    cases.push(("amqp.tls_client_cert_file", s));
    let mut s = base.clone();
    s.amqp.tls_client_cert_file = Some(pki.client_cert.clone());
    s.amqp.tls_client_key_file = Some(garbage.clone());
    cases.push(("amqp.tls_client_key_file", s));
    let mut s = base.clone();
    s.amqp.tls_client_cert_file = Some(pki.client_cert.clone());
    s.amqp.tls_client_key_file = Some(pki.client_cert.clone()); // a certificate, not a key
    cases.push(("amqp.tls_client_key_file", s));
    let mut s = base.clone();
    s.jelou.tls_ca_file = Some(garbage.clone());
    cases.push(("jelou.tls_ca_file", s));

    for (key, settings) in cases {
        let worker = env.start_worker_with(settings);
        let err = tokio::time::timeout(WAIT, worker.handle)
            .await
            .unwrap_or_else(|_| panic!("{key}: the worker kept retrying instead of failing"))
            .unwrap()
            .expect_err("the start must fail");
        let text = format!("{err:#}");
        assert!(text.contains(key), "{key}: {text}");
        assert_eq!(text.lines().count(), 1, "{text}");
    }
    assert_eq!(proxy.handshakes(), 0, "nothing reached the broker");
}

// ---------------------------------------------------------------------------------
// HTTPS to Jelou.
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_to_jelou_trusts_jelou_tls_ca_file_and_nothing_else() {
    let pki = Pki::new();
    let env = TestEnv::new("https").await;
    let proxy = TlsProxy::start(pki.server_config(false), env.jelou.addr()).await;
    let mut settings = env.settings.clone();
    settings.jelou.base_url = format!("https://127.0.0.1:{}", proxy.addr.port());
    settings.jelou.tls_ca_file = Some(pki.ca.clone());
    env.declare().await;

    env.publish(&text_job("j-https", "B")).await;
    let worker = env.start_worker_with(settings.clone());
    let r = env.result().await.json();
    assert_eq!(r["status"], "success", "{r}");
    worker.stop().await.unwrap();
    let seen = env.jelou.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/bots/B/messages");
    assert!(seen[0].authorization.is_some());
    assert!(proxy.handshakes() >= 1);

    // Without the CA: every attempt fails in the handshake (no request is sent, so
    // no credentials either), is retried, and the job ends retries_exhausted.
    settings.jelou.tls_ca_file = None;
    env.publish(&text_job("j-untrusted", "B")).await;
    let worker = env.start_worker_with(settings.clone());
    let r = env.result().await.json();
    assert_eq!(r["error"]["kind"], "retries_exhausted", "{r}");
    assert_eq!(r["attempts"], settings.retry.max_attempts, "{r}");
    assert_eq!(r["error"]["httpStatus"], serde_json::Value::Null, "{r}");
    let message = r["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("UnknownIssuer") || message.to_lowercase().contains("certificate"),
        "{message}"
    );
    assert_eq!(env.jelou.count(), 1, "nothing reached Jelou without trust");
    worker.stop().await.unwrap();
}
