//! The `jelou-worker` binary as a child process: its environment, a one-shot run,
//! and the daemon (`run`) with its metrics server.

use std::time::Duration;

use jelou_worker::config::Settings;

use super::{
    broker::{CLIENT_ID, CLIENT_SECRET, broker_url},
    http::http_get,
};

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
        ("ORDER__ENABLED", settings.order.enabled.to_string()),
        ("ORDER__PARTITIONS", settings.order.partitions.to_string()),
        (
            "ORDER__WAIT_BOUND_MS",
            settings.order.wait_bound_ms.to_string(),
        ),
        (
            "ORDER__USER_MIN_INTERVAL_MS",
            settings.order.user_min_interval_ms.to_string(),
        ),
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
