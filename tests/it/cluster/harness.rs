//! What the cluster tests stand on: the 3-node cluster of `scripts/cluster.sh`, the
//! worker as a real child process, and a producer, a result collector and an observer
//! that keep working while nodes die.
//!
//! The producer and the collector are ordinary AMQP clients, written here rather than
//! taken from the crate, so that they test the worker from the outside, as a
//! producer and a result consumer in production would. Both reconnect to another
//! node when theirs fails; the tests point them at a node they do not fail, so that
//! what is measured is the worker's failover, not theirs.

use crate::utils::http_get;
use std::{
    collections::{HashMap, HashSet},
    hash::{Hash, Hasher},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use tokio::{process::Command, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// The nodes of the test cluster: cN@localhost, AMQP on 127.0.0.1:568N.
pub const NODES: [u8; 3] = [1, 2, 3];

/// When a node other than `old` logged that it became the leader of quorum queue
/// `queue` (`candidate -> leader`), at or after `after`: the earliest such time. Read
/// from the nodes' own logs (`scripts/cluster.sh` keeps them under
/// `$JELOU_CLUSTER_DIR/cN/log`), which are written whatever state the cluster is in,
/// where asking a node (`rabbitmqctl`) can hang while a member is frozen.
pub fn leader_elected_at(queue: &str, old: u8, after: SystemTime) -> Option<SystemTime> {
    let dir = std::env::var("JELOU_CLUSTER_DIR").unwrap_or_else(|_| "/tmp/jelou-cluster".into());
    let marker = format!("queue '{queue}' in vhost");
    NODES
        .into_iter()
        .filter(|n| *n != old)
        .filter_map(|n| std::fs::read_to_string(format!("{dir}/c{n}/log/c{n}@localhost.log")).ok())
        .flat_map(|log| {
            log.lines()
                .filter(|l| l.contains(&marker) && l.contains("candidate -> leader"))
                .filter_map(|l| {
                    // 2026-11-25 04:03:46.780309+00:00 [notice] ...
                    let stamp = l.get(..32)?;
                    chrono::DateTime::parse_from_str(stamp, "%Y-%m-%d %H:%M:%S%.f%:z").ok()
                })
                .map(SystemTime::from)
                .collect::<Vec<_>>()
        })
        .filter(|t| *t >= after)
        .min()
}

/// The environment variable that enables these tests.
pub const ENABLE: &str = "JELOU_CLUSTER_TESTS";

/// AMQP port of node `n`.
pub fn port(n: u8) -> u16 {
    5680 + u16::from(n)
}

/// The node listening on `port`, if it is one of the cluster's.
pub fn node_of_port(port: u16) -> Option<u8> {
    NODES.into_iter().find(|n| self::port(*n) == port)
}

/// The URL of node `n`. A 2 s heartbeat lets the test's own clients notice a frozen
/// node quickly.
pub fn url(n: u8) -> String {
    format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat=2&connection_timeout=3000",
        port(n)
    )
}

/// `amqp.url` for the worker: the nodes in the given order, comma-separated.
pub fn worker_urls(order: &[u8]) -> String {
    order
        .iter()
        .map(|n| format!("amqp://guest:guest@127.0.0.1:{}/%2f", port(*n)))
        .collect::<Vec<_>>()
        .join(",")
}

/// `nodes` starting at `first`, then the others: the order the test's clients try.
pub fn starting_at(first: u8) -> Vec<u8> {
    let mut order = vec![first];
    order.extend(NODES.into_iter().filter(|n| *n != first));
    order
}

/// Where each test leaves its workers' logs and the measurements (kept after the run).
pub fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster");
    std::fs::create_dir_all(&dir).expect("create the test output folder");
    dir
}

/// Appends a line to `report.txt` in [`output_dir`] (and prints it: `--nocapture`).
pub fn report(line: &str) {
    use std::io::Write;
    eprintln!("{line}");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(output_dir().join("report.txt"))
        .expect("open report.txt");
    writeln!(file, "{line}").expect("write report.txt");
}

/// The cluster, driven through `scripts/cluster.sh`.
pub struct Cluster {
    script: PathBuf,
}

impl Cluster {
    /// Checks that the tests are enabled and the cluster is whole. What an earlier
    /// test may have left behind (it failed before undoing its fault) is mended: a
    /// frozen node is resumed, a dead one started again.
    pub async fn require() -> Cluster {
        if std::env::var(ENABLE).as_deref() != Ok("1") {
            panic!(
                "the cluster tests need {ENABLE}=1 and a running 3-node cluster: \
                 run scripts/ci-cluster.sh, or scripts/cluster.sh start and then \
                 {ENABLE}=1 cargo test --test it -- --ignored --test-threads=1 cluster::"
            );
        }
        let cluster = Cluster {
            script: Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh"),
        };
        if cluster.script(&["status"]).await.is_ok() {
            return cluster;
        }
        for n in NODES {
            match cluster.pid(n).await {
                Some(pid) => {
                    let _ = Command::new("kill")
                        .args(["-CONT", &pid.to_string()])
                        .status()
                        .await;
                }
                None => {
                    eprintln!("node c{n} is not running: reviving it");
                    if let Err(e) = cluster.script(&["revive", &n.to_string()]).await {
                        panic!(
                            "the cluster is not running ({e}): start it with scripts/cluster.sh start"
                        );
                    }
                }
            }
        }
        // A partition left by a node that was away too long heals itself (autoheal).
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            match cluster.script(&["status"]).await {
                Ok(_) => return cluster,
                Err(e) if Instant::now() > deadline => panic!(
                    "the cluster is not whole ({e}); restart it with scripts/cluster.sh start"
                ),
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }

    async fn script(&self, args: &[&str]) -> Result<String, String> {
        let out = tokio::time::timeout(
            Duration::from_secs(180),
            Command::new(&self.script)
                .args(args)
                // All three nodes, whatever the caller's environment says.
                .env("JELOU_CLUSTER_SIZE", "3")
                .stdin(Stdio::null())
                .output(),
        )
        .await
        .map_err(|_| format!("cluster.sh {args:?} did not finish within 180 s"))?
        .map_err(|e| format!("cannot run {}: {e}", self.script.display()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "cluster.sh {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// The OS pid of node `n`, if it runs.
    pub async fn pid(&self, n: u8) -> Option<u32> {
        self.script(&["pid", &n.to_string()])
            .await
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Sends `signal` to node `n` (its own pid, never by name).
    async fn signal(&self, n: u8, signal: &str) -> u32 {
        let pid = self
            .pid(n)
            .await
            .unwrap_or_else(|| panic!("node c{n} is not running"));
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
        pid
    }

    /// kill -9 of node `n`.
    pub async fn kill(&self, n: u8) {
        self.signal(n, "-KILL").await;
    }

    /// SIGSTOP of node `n`; the guard sends SIGCONT when dropped, so a failing test
    /// never leaves a node frozen.
    pub async fn freeze(&self, n: u8) -> Frozen {
        Frozen(self.signal(n, "-STOP").await)
    }

    /// Starts node `n` again after a kill; returns once it is back in the cluster.
    pub async fn revive(&self, n: u8) {
        self.script(&["revive", &n.to_string()])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The node that leads quorum queue `queue`, asked of node `via`.
    pub async fn leader(&self, queue: &str, via: u8) -> u8 {
        let out = self
            .script(&[
                "ctl",
                &via.to_string(),
                "list_queues",
                "--no-table-headers",
                "name",
                "leader",
            ])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let leader = out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .map(|(_, leader)| leader.trim().to_string())
            .unwrap_or_else(|| panic!("queue {queue} is not listed: {out}"));
        NODES
            .into_iter()
            .find(|n| leader == format!("c{n}@localhost"))
            .unwrap_or_else(|| panic!("queue {queue} has no leader on the cluster: {leader:?}"))
    }

    /// Queues whose names start with `prefix`, asked of node `via`.
    pub async fn queues_named(&self, prefix: &str, via: u8) -> Vec<String> {
        let out = self
            .script(&[
                "ctl",
                &via.to_string(),
                "list_queues",
                "--no-table-headers",
                "name",
            ])
            .await
            .unwrap_or_default();
        out.lines()
            .map(str::trim)
            .filter(|q| q.starts_with(prefix))
            .map(str::to_string)
            .collect()
    }
}

/// A frozen node; SIGCONT when dropped.
pub struct Frozen(u32);

impl Frozen {
    /// Resumes the node now.
    pub fn thaw(self) {}
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// Connects to the first of `order` that answers.
pub async fn connect(order: &[u8]) -> Result<(Connection, u8), String> {
    let mut errors = Vec::new();
    for n in order {
        match tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(&url(*n), ConnectionProperties::default()),
        )
        .await
        {
            Ok(Ok(c)) => return Ok((c, *n)),
            Ok(Err(e)) => errors.push(format!("c{n}: {e}")),
            Err(_) => errors.push(format!("c{n}: no answer within 5 s")),
        }
    }
    Err(errors.join("; "))
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// The names one test uses on the cluster, all starting with `prefix`.
#[derive(Clone, Debug)]
pub struct Names {
    pub prefix: String,
    pub jobs_queue: String,
    pub result_exchange: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub results_queue: String,
}

impl Names {
    pub fn new(test: &str) -> Self {
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let prefix = format!("cluster.{test}.{id}");
        let amqp = jelou_worker::config::AmqpSettings::default().namespaced(&prefix);
        Names {
            jobs_queue: amqp.jobs_queue,
            result_exchange: amqp.result_exchange,
            dead_letter_exchange: amqp.dead_letter_exchange,
            dead_letter_queue: amqp.dead_letter_queue,
            results_queue: format!("{prefix}.collected"),
            prefix,
        }
    }

    /// Declares the jobs queue through node `n`, which makes `n` its leader (a quorum
    /// queue's first leader is the node that declared it). The arguments are the
    /// contract's (section 5), so the worker's own declaration agrees.
    pub async fn declare_jobs_queue_on(&self, n: u8) {
        let (conn, _) = connect(&[n])
            .await
            .expect("connect to declare the jobs queue");
        let ch = conn.create_channel().await.unwrap();
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long_string("quorum"));
        args.insert(
            "x-dead-letter-exchange".into(),
            long_string(&self.dead_letter_exchange),
        );
        ch.queue_declare(
            self.jobs_queue.as_str().into(),
            QueueDeclareOptions::durable(),
            args,
        )
        .await
        .expect("declare the jobs queue");
        let _ = conn.close(200, "declared".into()).await;
    }

    /// Declares the result exchange and a quorum queue bound to it that receives
    /// every result, through node `n` (its leader).
    pub async fn declare_results_queue_on(&self, n: u8) {
        let (conn, _) = connect(&[n])
            .await
            .expect("connect to declare the results queue");
        let ch = conn.create_channel().await.unwrap();
        ch.exchange_declare(
            self.result_exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare the result exchange");
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long_string("quorum"));
        ch.queue_declare(
            self.results_queue.as_str().into(),
            QueueDeclareOptions::durable(),
            args,
        )
        .await
        .expect("declare the results queue");
        ch.queue_bind(
            self.results_queue.as_str().into(),
            self.result_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the results queue");
        let _ = conn.close(200, "declared".into()).await;
    }

    /// The number of messages ready in the jobs queue, asked of the first live node.
    pub async fn jobs_ready(&self, order: &[u8]) -> Option<u32> {
        let (conn, _) = connect(order).await.ok()?;
        let ch = conn.create_channel().await.ok()?;
        let q = ch
            .queue_declare(
                self.jobs_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .ok();
        let _ = conn.close(200, "checked".into()).await;
        q.map(|q| q.message_count())
    }

    /// Deletes every queue and exchange of this test (the worker's own delay and retry
    /// queues included: they are found by name).
    pub async fn cleanup(&self, cluster: &Cluster, via: u8) {
        let queues = cluster.queues_named(&self.prefix, via).await;
        let Ok((conn, _)) = connect(&starting_at(via)).await else {
            return;
        };
        for q in queues {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        if let Ok(ch) = conn.create_channel().await {
            for x in [&self.result_exchange, &self.dead_letter_exchange] {
                let _ = ch
                    .exchange_delete(x.as_str().into(), Default::default())
                    .await;
            }
        }
        let _ = conn.close(200, "cleaned up".into()).await;
    }
}

/// How a worker process is configured (environment variables, as in production).
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub names: Names,
    pub jelou_base_url: String,
    pub prefetch: u16,
}

/// The worker binary running as a child process. Killed (SIGKILL) if dropped while
/// running, so a failing test leaves nothing behind.
pub struct WorkerProcess {
    child: tokio::process::Child,
    pub listen: SocketAddr,
    pub log: PathBuf,
}

/// A free loopback port for the worker's `/metrics` server.
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

impl WorkerProcess {
    /// Starts `jelou-worker run` with `amqp.url` = `urls`; its output goes to `log`.
    pub fn start(config: &WorkerConfig, urls: &str, log: PathBuf) -> Self {
        let listen = free_port();
        let out = std::fs::File::create(&log).expect("create the worker's log file");
        let err = out.try_clone().expect("clone the log file handle");
        let names = &config.names;
        let child = Command::new(env!("CARGO_BIN_EXE_jelou-worker"))
            .arg("run")
            .env("JELOU_WORKER__AMQP__URL", urls)
            .env("JELOU_WORKER__AMQP__JOBS_QUEUE", &names.jobs_queue)
            .env(
                "JELOU_WORKER__AMQP__RESULT_EXCHANGE",
                &names.result_exchange,
            )
            .env(
                "JELOU_WORKER__AMQP__DEAD_LETTER_EXCHANGE",
                &names.dead_letter_exchange,
            )
            .env(
                "JELOU_WORKER__AMQP__DEAD_LETTER_QUEUE",
                &names.dead_letter_queue,
            )
            .env("JELOU_WORKER__AMQP__PREFETCH", config.prefetch.to_string())
            // These scenarios measure failover by the jobs queue's backlog and send one
            // user's jobs: the unordered path (order on moves the backlog into the
            // partition queues and sends one user's jobs one at a time).
            .env("JELOU_WORKER__ORDER__ENABLED", "false")
            .env("JELOU_WORKER__AMQP__HEARTBEAT_SECS", "2")
            .env("JELOU_WORKER__AMQP__OPERATION_TIMEOUT_MS", "5000")
            .env("JELOU_WORKER__JELOU__BASE_URL", &config.jelou_base_url)
            .env("JELOU_WORKER__JELOU__CLIENT_ID", "cluster-test")
            .env("JELOU_WORKER__JELOU__CLIENT_SECRET", "cluster-test-secret")
            .env("JELOU_WORKER__SERVER__LISTEN", listen.to_string())
            .env("JELOU_WORKER__SHUTDOWN__GRACE_PERIOD_MS", "5000")
            .env("JELOU_WORKER__LOG__FORMAT", "text")
            .env("JELOU_WORKER__LOG__LEVEL", "info")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .expect("start the worker binary");
        WorkerProcess { child, listen, log }
    }

    /// The last lines of the worker's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        format!(
            "--- last {lines} lines of {}:\n{}",
            self.log.display(),
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }

    /// `/readyz`'s status code, None if the server does not answer.
    pub async fn readyz(&self) -> Option<u16> {
        http_get(self.listen, "/readyz").await.map(|(code, _)| code)
    }

    pub async fn metrics(&self) -> Option<Metrics> {
        http_get(self.listen, "/metrics")
            .await
            .map(|(_, body)| Metrics::parse(&body))
    }

    /// Waits until the worker consumes (`/readyz` 200) and returns its node.
    pub async fn wait_ready(&mut self, within: Duration) -> u8 {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the worker exited ({status}) {}", self.log_tail(30));
            }
            if self.readyz().await == Some(200)
                && let Some(node) = self.metrics().await.and_then(|m| m.node)
            {
                return node;
            }
            assert!(
                Instant::now() < deadline,
                "the worker was not consuming within {within:?} {}",
                self.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits for the exit (SIGKILL if it takes longer than `within`).
    pub async fn terminate(mut self, within: Duration) -> Result<ExitStatus, String> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(e)) => Err(format!("waiting for the worker: {e}")),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(format!(
                    "the worker did not exit within {within:?} of SIGTERM {}",
                    self.log_tail(30)
                ))
            }
        }
    }
}

/// The few metrics the tests read.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// From `jelou_worker_broker_node{node="127.0.0.1:568N"} 1`.
    pub node: Option<u8>,
    pub connects: u64,
    /// Reconnections that went to another node.
    pub failovers: u64,
    pub jobs_finished: u64,
    pub in_flight: i64,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut m = Metrics::default();
        for line in text.lines() {
            let value = line.rsplit(' ').next().unwrap_or("");
            if let Some(rest) = line.strip_prefix("jelou_worker_broker_node{node=\"") {
                if value == "1"
                    && let Some((addr, _)) = rest.split_once('"')
                {
                    m.node = addr
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok())
                        .and_then(node_of_port);
                }
            } else if line.starts_with("jelou_worker_broker_connects_total ") {
                m.connects = value.parse().unwrap_or(0);
            } else if line.starts_with("jelou_worker_broker_failovers_total ") {
                m.failovers = value.parse().unwrap_or(0);
            } else if line.starts_with("jelou_worker_jobs_finished_total{") {
                m.jobs_finished += value.parse::<u64>().unwrap_or(0);
            } else if line.starts_with("jelou_worker_jobs_in_flight ") {
                m.in_flight = value.parse().unwrap_or(0);
            }
        }
        m
    }
}

/// One sample of the worker's state.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub ready: Option<u16>,
    pub node: Option<u8>,
    pub connects: u64,
}

/// Samples `/readyz` and `/metrics` every 25 ms until stopped.
pub struct Observer {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Observer {
    pub fn start(listen: SocketAddr) -> Observer {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let samples = samples.clone();
            let stop = stop.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(25));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.is_cancelled() {
                    tick.tick().await;
                    let at = Instant::now();
                    let ready = http_get(listen, "/readyz").await.map(|(c, _)| c);
                    let m = http_get(listen, "/metrics")
                        .await
                        .map(|(_, b)| Metrics::parse(&b))
                        .unwrap_or_default();
                    samples.lock().unwrap().push(Sample {
                        at,
                        ready,
                        node: m.node,
                        connects: m.connects,
                    });
                }
            }
        });
        Observer {
            samples,
            stop,
            task,
        }
    }

    pub async fn stop(self) -> Vec<Sample> {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        self.samples.lock().unwrap().clone()
    }
}

/// A job of the steady stream: its jobId is also the message text, so the stand-in's
/// record tells which job each request was for.
pub fn job_body(job_id: &str) -> Vec<u8> {
    serde_json::json!({
        "jobId": job_id,
        "botId": "cluster-bot",
        "message": {"type": "text", "userId": "593987654321", "text": job_id}
    })
    .to_string()
    .into_bytes()
}

/// What the producer did.
#[derive(Debug, Default, Clone)]
pub struct Produced {
    pub confirmed: usize,
    /// Jobs published again after their confirm was lost (each may exist twice).
    pub republished: usize,
    pub reconnects: u32,
}

/// Publishes `count` jobs named `{prefix}-{i}` at `rate` per second to the jobs queue,
/// each confirmed by the broker; on a failure it reconnects (nodes in `order`) and
/// publishes again what was not confirmed.
pub fn produce(
    jobs_queue: String,
    prefix: String,
    count: usize,
    rate: u32,
    order: Vec<u8>,
) -> JoinHandle<Result<Produced, String>> {
    tokio::spawn(async move {
        const TICK: Duration = Duration::from_millis(50);
        let per_tick = ((rate as usize) / 20).max(1);
        let mut produced = Produced::default();
        let mut session: Option<(Connection, Channel)> = None;
        let mut next = 0;
        let mut pending: Vec<usize> = Vec::new();
        let deadline = Instant::now()
            + Duration::from_secs_f64(count as f64 / f64::from(rate))
            + Duration::from_secs(120);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while produced.confirmed < count {
            if Instant::now() > deadline {
                return Err(format!(
                    "only {} of {count} jobs confirmed in time",
                    produced.confirmed
                ));
            }
            if pending.is_empty() {
                tick.tick().await;
                let end = (next + per_tick).min(count);
                pending.extend(next..end);
                next = end;
            }
            let channel = match &session {
                Some((_, ch)) if ch.status().connected() => ch.clone(),
                _ => {
                    if session.is_some() {
                        produced.reconnects += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    let Ok((conn, _)) = connect(&order).await else {
                        continue;
                    };
                    let Ok(ch) = conn.create_channel().await else {
                        continue;
                    };
                    if ch
                        .confirm_select(ConfirmSelectOptions::default())
                        .await
                        .is_err()
                    {
                        continue;
                    }
                    session = Some((conn, ch.clone()));
                    ch
                }
            };
            let mut confirms = Vec::new();
            for i in &pending {
                let id = format!("{prefix}-{i:05}");
                let properties = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_message_id(id.as_str().into())
                    .with_delivery_mode(2)
                    .with_timestamp(chrono::Utc::now().timestamp() as u64);
                let body = job_body(&id);
                // Bounded: writing to a frozen node's socket can block once its
                // buffers are full.
                let publish = tokio::time::timeout(
                    Duration::from_secs(10),
                    channel.basic_publish(
                        "".into(),
                        jobs_queue.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &body,
                        properties,
                    ),
                )
                .await;
                let confirm = match publish {
                    Ok(Ok(confirm)) => Some(confirm),
                    _ => None,
                };
                confirms.push(async move {
                    tokio::time::timeout(Duration::from_secs(10), confirm?)
                        .await
                        .ok()?
                        .ok()
                });
            }
            let outcomes = futures_util::future::join_all(confirms).await;
            let mut failed = Vec::new();
            for (i, outcome) in pending.iter().zip(outcomes) {
                match outcome {
                    Some(lapin::Confirmation::Ack(None)) => produced.confirmed += 1,
                    _ => failed.push(*i),
                }
            }
            if !failed.is_empty() {
                // The confirm is unknown: the job may be on the queue already, so
                // publishing it again may make it exist twice.
                produced.republished += failed.len();
                session = None;
            }
            pending = failed;
        }
        if let Some((conn, _)) = session {
            let _ = conn.close(200, "produced".into()).await;
        }
        Ok(produced)
    })
}

/// One result as the collector received it.
#[derive(Debug, Clone)]
pub struct Got {
    pub status: String,
    pub at: Instant,
}

#[derive(Debug, Default)]
pub struct Collected {
    /// Distinct result messages per jobId (a result redelivered to the collector after
    /// its own reconnection has the same body and counts once).
    pub by_job: HashMap<String, Vec<Got>>,
    seen: HashSet<u64>,
    pub reconnects: u32,
}

/// Consumes the results queue, with manual acks, reconnecting (nodes in `order`) when
/// its node fails.
pub struct Collector {
    state: Arc<Mutex<Collected>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Collector {
    pub fn start(results_queue: String, order: Vec<u8>) -> Collector {
        let state = Arc::new(Mutex::new(Collected::default()));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let state = state.clone();
            let stop = stop.clone();
            async move {
                let mut first = true;
                while !stop.is_cancelled() {
                    if !first {
                        state.lock().unwrap().reconnects += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    first = false;
                    let Ok((conn, _)) = connect(&order).await else {
                        continue;
                    };
                    let consumer = async {
                        let ch = conn.create_channel().await.ok()?;
                        ch.basic_qos(500, BasicQosOptions::default()).await.ok()?;
                        ch.basic_consume(
                            results_queue.as_str().into(),
                            "cluster-test-collector".into(),
                            BasicConsumeOptions::default(),
                            FieldTable::default(),
                        )
                        .await
                        .ok()
                    };
                    let Some(mut consumer) = consumer.await else {
                        continue;
                    };
                    loop {
                        let next = tokio::select! {
                            _ = stop.cancelled() => break,
                            next = consumer.next() => next,
                        };
                        let Some(Ok(delivery)) = next else { break };
                        record(&state, &delivery.data);
                        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                    }
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        conn.close(200, "collected".into()),
                    )
                    .await;
                }
            }
        });
        Collector { state, stop, task }
    }

    /// Waits until `ids` all have a result; on timeout, says which are missing.
    pub async fn wait_for(&self, ids: &[String], within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let missing: Vec<&String> = {
                let s = self.state.lock().unwrap();
                ids.iter()
                    .filter(|id| !s.by_job.contains_key(*id))
                    .collect()
            };
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} of {} jobs have no result within {within:?}, e.g. {:?}",
                    missing.len(),
                    ids.len(),
                    &missing[..missing.len().min(10)]
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(self) -> Collected {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        std::mem::take(&mut *self.state.lock().unwrap())
    }
}

fn record(state: &Mutex<Collected>, body: &[u8]) {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut h);
    let body_hash = h.finish();
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let job_id = json["jobId"].as_str().unwrap_or("?").to_string();
    let status = json["status"].as_str().unwrap_or("?").to_string();
    let mut s = state.lock().unwrap();
    if s.seen.insert(body_hash) {
        s.by_job.entry(job_id).or_default().push(Got {
            status,
            at: Instant::now(),
        });
    }
}

/// The longest pause between consecutive instants after `from`, as (start, length).
pub fn longest_gap(times: &mut [Instant], from: Instant) -> Option<(Instant, Duration)> {
    times.sort();
    let after: Vec<Instant> = times.iter().copied().filter(|t| *t >= from).collect();
    let mut best: Option<(Instant, Duration)> = None;
    let mut prev = from;
    for t in after {
        let gap = t - prev;
        if best.is_none_or(|(_, g)| gap > g) {
            best = Some((prev, gap));
        }
        prev = t;
    }
    best
}
