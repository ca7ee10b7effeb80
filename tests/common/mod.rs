//! Shared test harness: a real RabbitMQ (never a mock), a stand-in Jelou on
//! loopback, and names unique to each test so tests run in parallel and clean up.
#![allow(dead_code)]

use std::{collections::HashMap, time::Duration};

use futures_util::StreamExt;
use jelou_worker::{
    config::{AmqpUrls, QueueType, Settings},
    stand_in::StandIn,
};
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
    message::Delivery,
    options::*,
    types::{AMQPValue, FieldTable},
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const CLIENT_ID: &str = "test-client";
pub const CLIENT_SECRET: &str = "test-secret";

/// The broker URL tests use (`JELOU_TEST_AMQP_URL` overrides).
pub fn broker_url() -> String {
    std::env::var("JELOU_TEST_AMQP_URL").unwrap_or_else(|_| BROKER.to_string())
}

/// Connects, or fails the test with a message that says how to start RabbitMQ.
pub async fn connect() -> Connection {
    match tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&broker_url(), ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "RabbitMQ is not reachable at {} ({e}). These tests need the real broker: \
             start it with `rabbitmq-server -detached` and wait for `rabbitmqctl await_startup`",
            broker_url()
        ),
        Err(_) => panic!(
            "RabbitMQ at {} did not answer within 10 s. Start it with `rabbitmq-server -detached`",
            broker_url()
        ),
    }
}

/// One test's world: its own queue and exchange names, a results queue that receives
/// every result, and a stand-in Jelou.
pub struct TestEnv {
    pub name: String,
    pub settings: Settings,
    pub jelou: StandIn,
    pub conn: Connection,
    pub channel: Channel,
    pub results_queue: String,
    pub extra_queues: Vec<String>,
}

impl TestEnv {
    pub async fn new(test: &str) -> Self {
        Self::with_queue_type(test, QueueType::Quorum).await
    }

    pub async fn with_queue_type(test: &str, queue_type: QueueType) -> Self {
        let conn = connect().await;
        let channel = conn.create_channel().await.unwrap();
        let jelou = StandIn::start().await.unwrap();
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let name = format!("test.{test}.{id}");
        let mut settings = Settings::default();
        settings.amqp.url = AmqpUrls::parse(&broker_url()).unwrap();
        settings.amqp.jobs_queue = format!("{name}.jobs");
        settings.amqp.queue_type = queue_type;
        settings.amqp.result_exchange = format!("{name}.results");
        settings.amqp.dead_letter_exchange = format!("{name}.dead");
        settings.amqp.dead_letter_queue = format!("{name}.jobs.dead");
        settings.amqp.prefetch = 32;
        settings.amqp.operation_timeout_ms = 5_000;
        settings.jelou.base_url = jelou.base_url();
        settings.jelou.client_id = Some(CLIENT_ID.into());
        settings.jelou.client_secret = Some(CLIENT_SECRET.into());
        settings.jelou.request_timeout_ms = 2_000;
        settings.retry.initial_interval_ms = 20;
        settings.retry.max_interval_ms = 200;
        settings.retry.max_attempts = 4;
        settings.retry.max_elapsed_ms = 30_000;
        settings.retry.park_threshold_ms = 5_000;
        settings.server.listen = "127.0.0.1:0".parse().unwrap();
        settings.shutdown.grace_period_ms = 5_000;
        // The results queue exists before the worker so no result is unroutable.
        let results_queue = format!("{name}.collected");
        channel
            .exchange_declare(
                settings.amqp.result_exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_declare(
                results_queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                results_queue.as_str().into(),
                settings.amqp.result_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Self {
            name,
            settings,
            jelou,
            conn,
            channel,
            results_queue,
            extra_queues: vec![],
        }
    }

    /// Declares the worker's topology (as the worker would) so jobs can be published
    /// before it starts.
    pub async fn declare(&self) {
        jelou_worker::broker::Topology::for_settings(&self.settings)
            .declare(&self.conn, Duration::from_secs(5))
            .await
            .unwrap();
    }

    /// Starts the worker in this process; stop it with the returned handle.
    pub fn start_worker(&self) -> Worker {
        self.start_worker_with(self.settings.clone())
    }

    pub fn start_worker_with(&self, settings: Settings) -> Worker {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(jelou_worker::worker::run(settings, shutdown.clone()));
        Worker { shutdown, handle }
    }

    /// Publishes a raw body to the jobs queue (publisher-confirmed).
    pub async fn publish_raw(&self, body: &[u8], props: BasicProperties) {
        let ch = self.conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let confirm = ch
            .basic_publish(
                "".into(),
                self.settings.amqp.jobs_queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props.with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "the broker refused a test job");
        assert!(
            confirm.take_message().is_none(),
            "test job unroutable: declare the topology first"
        );
        let _ = ch.close(200, "done".into()).await;
    }

    pub async fn publish(&self, job: &Value) {
        self.publish_raw(job.to_string().as_bytes(), BasicProperties::default())
            .await;
    }

    /// Waits for `n` results, at most `timeout`; fails the test if fewer came.
    pub async fn results(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let ch = self.conn.create_channel().await.unwrap();
        let mut consumer = ch
            .basic_consume(
                self.results_queue.as_str().into(),
                format!("collector-{}", uuid::Uuid::new_v4())
                    .as_str()
                    .into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < n {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(Ok(d))) => out.push(Received::from(d)),
                Ok(other) => panic!("results consumer ended: {other:?}"),
                Err(_) => panic!(
                    "only {} of {n} results within {timeout:?}: {:#?}",
                    out.len(),
                    out
                ),
            }
        }
        let _ = ch.close(200, "done".into()).await;
        out
    }

    /// Waits for exactly one result.
    pub async fn result(&self) -> Received {
        self.results(1, Duration::from_secs(20)).await.remove(0)
    }

    /// Asserts that no further result arrives within `window`.
    pub async fn no_more_results(&self, window: Duration) {
        tokio::time::sleep(window).await;
        assert_eq!(
            self.message_count(&self.results_queue.clone()).await,
            0,
            "an unexpected extra result"
        );
    }

    /// Takes every message now in `queue`.
    pub async fn drain(&self, queue: &str) -> Vec<Received> {
        let ch = self.conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push(Received::from(m.delivery));
        }
        let _ = ch.close(200, "done".into()).await;
        out
    }

    pub async fn dead_letters(&self) -> Vec<Received> {
        let q = self.settings.amqp.dead_letter_queue.clone();
        self.drain(&q).await
    }

    pub async fn message_count(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = ch.close(200, "done".into()).await;
        q.message_count()
    }

    /// Deletes everything this test declared.
    pub async fn cleanup(self) {
        let ch = self.conn.create_channel().await.unwrap();
        let a = &self.settings.amqp;
        // Every queue the worker declares, as the worker names them.
        let topology = jelou_worker::broker::Topology::for_settings(&self.settings);
        let mut queues = topology.queue_names();
        queues.push(self.results_queue.clone());
        // A worker started with other retry settings than `self.settings` may have
        // declared other delay queues: every power of two a test could produce.
        queues.extend((0..13).map(|k| format!("{}.delay.{}s", a.jobs_queue, 1u64 << k)));
        queues.extend(self.extra_queues.iter().cloned());
        for q in queues {
            let ch2 = self.conn.create_channel().await.unwrap();
            let _ = ch2
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for x in [&a.result_exchange, &a.dead_letter_exchange] {
            let _ = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.conn.close(200, "done".into()).await;
    }
}

/// A worker running in this process.
pub struct Worker {
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    /// Stops it as SIGTERM would and returns how `run` ended.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("the worker stops within its grace period")
            .expect("the worker task did not panic")
    }
}

/// A message read back from the broker.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: Vec<u8>,
    pub routing_key: String,
    pub properties: BasicProperties,
}

impl From<Delivery> for Received {
    fn from(d: Delivery) -> Self {
        Self {
            body: d.data,
            routing_key: d.routing_key.to_string(),
            properties: d.properties,
        }
    }
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn header(&self, name: &str) -> Option<AMQPValue> {
        self.properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name).cloned())
    }

    pub fn header_str(&self, name: &str) -> Option<String> {
        match self.header(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        }
    }

    pub fn correlation_id(&self) -> Option<String> {
        self.properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string())
    }
}

/// Results indexed by jobId.
pub fn by_job_id(results: &[Received]) -> HashMap<String, Value> {
    results
        .iter()
        .map(|r| {
            let v = r.json();
            (v["jobId"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

/// A valid text job.
pub fn text_job(job_id: &str, bot: &str) -> Value {
    serde_json::json!({
        "jobId": job_id,
        "botId": bot,
        "message": {"type": "text", "userId": "593987654321", "text": "Hello"}
    })
}

/// A free loopback port (bound then released: good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The environment that configures a `jelou-worker` child process like `settings`.
pub fn env_for(settings: &Settings) -> Vec<(String, String)> {
    let a = &settings.amqp;
    let j = &settings.jelou;
    let r = &settings.retry;
    let mut env: Vec<(&str, String)> = vec![
        ("AMQP__URL", broker_url()),
        ("AMQP__JOBS_QUEUE", a.jobs_queue.clone()),
        ("AMQP__QUEUE_TYPE", a.queue_type.as_str().to_string()),
        ("AMQP__RESULT_EXCHANGE", a.result_exchange.clone()),
        ("AMQP__DEAD_LETTER_EXCHANGE", a.dead_letter_exchange.clone()),
        ("AMQP__DEAD_LETTER_QUEUE", a.dead_letter_queue.clone()),
        ("AMQP__PREFETCH", a.prefetch.to_string()),
        ("AMQP__MAX_DELIVERIES", a.max_deliveries.to_string()),
        (
            "AMQP__OPERATION_TIMEOUT_MS",
            a.operation_timeout_ms.to_string(),
        ),
        ("AMQP__HEARTBEAT_SECS", a.heartbeat_secs.to_string()),
        ("JELOU__BASE_URL", j.base_url.clone()),
        ("JELOU__CLIENT_ID", CLIENT_ID.to_string()),
        ("JELOU__CLIENT_SECRET", CLIENT_SECRET.to_string()),
        (
            "JELOU__REQUEST_TIMEOUT_MS",
            j.request_timeout_ms.to_string(),
        ),
        (
            "JELOU__RATE_LIMIT_PER_SECOND",
            j.rate_limit_per_second.to_string(),
        ),
        ("JELOU__VALIDATE_MESSAGES", j.validate_messages.to_string()),
        (
            "JELOU__CIRCUIT_FAILURE_THRESHOLD",
            j.circuit_failure_threshold.to_string(),
        ),
        (
            "JELOU__CIRCUIT_PROBE_INTERVAL_MS",
            j.circuit_probe_interval_ms.to_string(),
        ),
        (
            "JELOU__CIRCUIT_MAX_PROBE_INTERVAL_MS",
            j.circuit_max_probe_interval_ms.to_string(),
        ),
        (
            "RETRY__INITIAL_INTERVAL_MS",
            r.initial_interval_ms.to_string(),
        ),
        ("RETRY__MULTIPLIER", r.multiplier.to_string()),
        ("RETRY__MAX_INTERVAL_MS", r.max_interval_ms.to_string()),
        ("RETRY__MAX_ATTEMPTS", r.max_attempts.to_string()),
        ("RETRY__MAX_ELAPSED_MS", r.max_elapsed_ms.to_string()),
        ("RETRY__PARK_THRESHOLD_MS", r.park_threshold_ms.to_string()),
        ("SERVER__LISTEN", settings.server.listen.to_string()),
        (
            "SHUTDOWN__GRACE_PERIOD_MS",
            settings.shutdown.grace_period_ms.to_string(),
        ),
        ("LOG__FORMAT", "json".to_string()),
    ];
    env.drain(..)
        .map(|(k, v)| (format!("JELOU_WORKER__{k}"), v))
        .collect()
}

/// The `jelou-worker` binary, configured by `settings`, with its stderr captured.
pub fn command(settings: &Settings, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_jelou-worker"));
    cmd.args(args)
        .envs(env_for(settings))
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// A `jelou-worker run` child process.
pub struct Daemon {
    pub child: tokio::process::Child,
    pub listen: std::net::SocketAddr,
    pub log: std::path::PathBuf,
}

impl Daemon {
    /// Starts `jelou-worker run` on a free metrics port and waits until it consumes.
    pub async fn start(settings: &Settings) -> Daemon {
        let mut settings = settings.clone();
        settings.server.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::env::temp_dir().join(format!(
            "jelou-worker-test-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let child = command(&settings, &["run"])
            .stderr(file)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let daemon = Daemon {
            child,
            listen: settings.server.listen,
            log,
        };
        daemon.wait_ready(true, Duration::from_secs(20)).await;
        daemon
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// HTTP status of GET `path` on the metrics server, None when it does not answer.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.listen, path).await
    }

    /// Waits until `/readyz` answers 200 (`ready`) or anything else (`!ready`).
    pub async fn wait_ready(&self, ready: bool, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.get("/readyz").await.map(|(s, _)| s);
            if (status == Some(200)) == ready {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/readyz did not become {} within {timeout:?} (last: {status:?}); log:\n{}",
                if ready { "200" } else { "non-200" },
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of a metric line starting with `prefix` (e.g. `name{labels}`).
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics").await?;
        text.lines()
            .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9.
    pub async fn kill(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// Sends a signal (`TERM`, `INT`, ...).
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `timeout`; its exit code.
    pub async fn exit_code(&mut self, timeout: Duration) -> Option<i32> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the worker did not exit within {timeout:?}; log:\n{}",
                    self.log_text()
                )
            })
            .unwrap();
        status.code()
    }
}

/// A minimal HTTP/1.0 GET on loopback: (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .ok()
        .flatten()
}

/// Waits (bounded) until `cond` holds, polling every 50 ms.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `jelou-worker ARGS` configured by `settings`, asserts it succeeded, and
/// returns its stdout.
pub async fn run_ok(settings: &Settings, args: &[&str]) -> String {
    let out = command(settings, args).output().await.unwrap();
    assert!(
        out.status.success(),
        "jelou-worker {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
