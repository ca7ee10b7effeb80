//! `jelou-bench`: how fast and how lean the worker is, measured on the local RabbitMQ.
//!
//! ```sh
//! cargo run --release --bin jelou-bench -- [--scenario instant,latency,idle,backlog] [--jobs N] ...
//! ```
//!
//! # What runs
//!
//! Every run starts a fresh child process, so that its CPU time and its peak memory
//! (`VmHWM`) belong to that run alone:
//!
//! - the worker under test is the real `jelou-worker run` binary (the one built next to
//!   this one), configured only through `JELOU_WORKER__*` variables. It runs in the
//!   temporary directory, so no `config/default.toml` is read: what is not set here is
//!   the built-in default;
//! - the *null pipeline* is this binary re-executed with `--null-pipeline`: the same
//!   consume → publish a fixed result with publisher confirms → ack path, with no HTTP
//!   and no parsing, written as a minimal lapin program would be. It is the ceiling the
//!   worker is compared with, on the same broker, back to back.
//!
//! Jelou is a [`LeanJelou`] on loopback inside this process, on a runtime thread of its
//! own (named `stand-in`) whose CPU time is measured, to show that it is not the limit.
//! It is a minimal HTTP/1.1 server rather than the crate's axum stand-in: on a small
//! machine the stand-in's CPU is taken from the worker and the broker, while the real
//! Jelou costs the worker's machine nothing.
//!
//! # How it measures
//!
//! - Jobs are put on the queue before the child starts, with confirmed, pipelined
//!   publishing (as `jelou-worker enqueue` does), into queues and exchanges named for
//!   the run (`bench.<tag>.<run>.*`) and deleted after it, whatever happened.
//! - The clock starts when the broker reports a consumer on the jobs queue (polled every
//!   millisecond); the child's start-up until then is reported apart (`startup_ms`).
//! - Throughput is jobs / (last result − consume start).
//! - A job's latency runs from its enqueue time, carried in its jobId in µs (finer than
//!   the AMQP timestamp, which is in seconds), or from the consume start for a job
//!   enqueued before it, to its result reaching this process. With a queue filled in
//!   advance that is mostly time spent waiting in the queue (p50 ≈ half the drain); the
//!   time to the first result is the latency of a job that does not wait.
//! - CPU is the child's utime + stime (`/proc/<pid>/stat`) over the window; peak RSS is
//!   its `VmHWM` (`/proc/<pid>/status`) at the end of the window, start-up included.
//! - Every job must get exactly one result, matched by the result's `correlation_id`
//!   (the jobId); otherwise the exit status is 1. Exit status 2: the bench could not
//!   run (RabbitMQ down, worker binary missing, ...).
//!
//! The table goes to stdout, then the same figures as one JSON line (also written to
//! `--json PATH`); progress goes to stderr.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use clap::{Parser, ValueEnum};
use futures_util::{StreamExt, stream::FuturesUnordered};
use jelou_worker::{
    broker::{self, Topology},
    config::{AmqpSettings, AmqpUrls, QueueType, Settings},
};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{
        BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
        QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use serde::Serialize;
use tokio::sync::Notify;

mod lean_jelou;
use lean_jelou::LeanJelou;

/// Jobs in the `instant` scenario unless `--jobs` says otherwise.
const INSTANT_JOBS: u64 = 50_000;
/// Jobs in the `latency` scenario unless `--jobs` says otherwise.
const LATENCY_JOBS: u64 = 5_000;
/// Jobs queued in the small `backlog` run (the large one has `--backlog-jobs`).
const SMALL_BACKLOG: u64 = 200;
/// Prefetch of the `backlog` runs: small, to show that memory follows it.
const BACKLOG_PREFETCH: u16 = 64;
/// The stand-in's answer delay in the `backlog` runs, so that the queue stays long.
const BACKLOG_LATENCY: Duration = Duration::from_millis(50);
/// Publishes awaiting their confirm while filling a queue: enough to keep a quorum
/// queue's Raft log busy, as `jelou-worker enqueue` does with 256.
const PUBLISH_IN_FLIGHT: usize = 1024;
/// Bound on each broker operation of the bench itself (declaring, publishing a job,
/// deleting a queue): a stuck broker fails the run instead of hanging the bench.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);
/// A run whose results stop coming for this long has failed.
const STALL: Duration = Duration::from_secs(60);
/// How long a child may take to start consuming.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child may take to exit after SIGTERM (the worker's grace period is 30 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(40);
/// After the last expected result: time for a duplicate, if any, to arrive.
const SETTLE: Duration = Duration::from_millis(300);
/// Thread name of the stand-in's runtime, to find its threads in `/proc/self/task`.
/// (Linux keeps 15 bytes of a thread name.)
const STAND_IN_THREAD: &str = "stand-in";
/// The botId of every benchmark job.
const BOT_ID: &str = "bench-bot";
/// The userId of every benchmark job.
const USER_ID: &str = "593987654321";

#[derive(Parser, Debug)]
#[command(
    name = "jelou-bench",
    version,
    about = "Measures jelou-worker on the local RabbitMQ: jobs/s against a null pipeline, latency, CPU, memory",
    after_help = "Needs RabbitMQ (guest/guest on 127.0.0.1:5672 unless --amqp-url). \
                  Exit status: 0 every job got exactly one result, 1 a check failed, 2 the bench could not run."
)]
struct Args {
    /// Scenarios to run (repeatable or comma-separated; default: all). They always run
    /// in the order instant, latency, idle, backlog.
    #[arg(
        long = "scenario",
        value_enum,
        value_delimiter = ',',
        value_name = "NAME"
    )]
    scenarios: Vec<ScenarioName>,
    /// Jobs in `instant` and `latency` (default: 50000 and 5000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    jobs: Option<u64>,
    /// Runs `instant` (as back-to-back pairs: null pipeline, then worker) and `latency`
    /// this many times, and checks the targets against the median. On a small machine
    /// shared with the broker one run can be 15 % off the next.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=20))]
    repeat: u8,
    /// Prefetch of the worker and the null pipeline in `instant` and `latency`.
    #[arg(long, default_value_t = 256, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: u16,
    /// The stand-in's answer delay in `latency`, in ms.
    #[arg(long, default_value_t = 150, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    latency_ms: u64,
    /// Spread each delayed answer uniformly over the delay ± this many percent, as a
    /// real service's latency varies. 0: every answer takes exactly the delay, which
    /// makes the jobs move in lockstep waves (see the README's Performance section).
    #[arg(long, default_value_t = 0, value_name = "PCT", value_parser = clap::value_parser!(u8).range(0..=100))]
    jitter_pct: u8,
    /// How long `idle` watches a worker with nothing to do, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    idle_secs: u64,
    /// Jobs queued in the large `backlog` run (the small one has 200).
    #[arg(long, default_value_t = 200_000, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    backlog_jobs: u64,
    /// How long each `backlog` run lets the worker work, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    backlog_secs: u64,
    /// The broker; comma-separated URLs name the nodes of one cluster. Passed to the
    /// worker and the null pipeline as JELOU_WORKER__AMQP__URL.
    #[arg(
        long,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        value_name = "URL"
    )]
    amqp_url: String,
    /// Type of the jobs queue (and the worker's other queues).
    #[arg(long, default_value = "quorum", value_parser = parse_queue_type, value_name = "quorum|classic")]
    queue_type: QueueType,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// The jelou-worker binary to measure (default: the one next to jelou-bench,
    /// rebuilt first when run through cargo).
    #[arg(long, value_name = "PATH")]
    worker_bin: Option<PathBuf>,
    /// The worker's `log.level` (`info` is the default of a deployed worker, and logs
    /// one line per finished job: compare both to see what logging costs).
    #[arg(long, default_value = "warn", value_name = "LEVEL")]
    log_level: String,
    /// Internal: be the null pipeline (configured by JELOU_WORKER__* variables).
    #[arg(long, hide = true)]
    null_pipeline: bool,
}

fn parse_queue_type(s: &str) -> Result<QueueType, String> {
    match s {
        "quorum" => Ok(QueueType::Quorum),
        "classic" => Ok(QueueType::Classic),
        other => Err(format!("`{other}`: expected quorum or classic")),
    }
}

/// What the bench can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum ScenarioName {
    /// Jobs answered at once: the worker's own cost, against the null pipeline run
    /// just before it on the same broker.
    Instant,
    /// Jelou answers after `--latency-ms`: throughput against prefetch / latency.
    Latency,
    /// No jobs: what a waiting worker costs.
    Idle,
    /// Memory with 200 jobs queued and with `--backlog-jobs` queued (prefetch 64):
    /// it follows the prefetch, not the queue's length.
    Backlog,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.null_pipeline {
        return null_pipeline::main();
    }
    // The stand-in gets a runtime of its own so its CPU time can be told apart.
    let stand_in_runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(STAND_IN_THREAD)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jelou-bench: cannot start the stand-in's runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let stand_in = match stand_in_runtime.block_on(LeanJelou::start()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("jelou-bench: cannot start the stand-in Jelou: {e}");
            return ExitCode::from(2);
        }
    };
    // The bench's own work (filling queues, collecting results) is light: one thread,
    // so that it takes as little CPU from the worker and the broker as it can.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jelou-bench: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(run_bench(args, &stand_in));
    drop(stand_in);
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("jelou-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the chosen scenarios, prints the table and the JSON; true when every check passed.
async fn run_bench(args: Args, stand_in: &LeanJelou) -> anyhow::Result<bool> {
    let mut amqp = AmqpSettings {
        url: AmqpUrls::parse(&args.amqp_url).map_err(|e| anyhow!("--amqp-url: {e}"))?,
        queue_type: args.queue_type,
        ..AmqpSettings::default()
    };
    amqp.operation_timeout_ms = 10_000;
    let connection = connect(&amqp).await?;
    let worker_bin = locate_worker(args.worker_bin.as_deref())?;
    let self_exe = std::env::current_exe().context("locating jelou-bench's own binary")?;
    let probe = Probe::new(&amqp.url);
    let bench = Bench {
        tag: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
        clock: Clock(Instant::now()),
        amqp,
        connection,
        stand_in,
        worker_bin,
        self_exe,
        probe,
        log_level: args.log_level.clone(),
    };
    let mut scenarios = if args.scenarios.is_empty() {
        vec![
            ScenarioName::Instant,
            ScenarioName::Latency,
            ScenarioName::Idle,
            ScenarioName::Backlog,
        ]
    } else {
        args.scenarios.clone()
    };
    scenarios.sort();
    scenarios.dedup();

    let mut runs = Vec::new();
    for scenario in scenarios {
        for spec in specs_for(scenario, &args) {
            eprintln!("jelou-bench: {}: {}", spec.name, spec.describe());
            let report = bench.run(&spec).await?;
            eprintln!("jelou-bench: {}: {}", report.name, report.summary());
            for problem in &report.problems {
                eprintln!("jelou-bench: {}: PROBLEM: {problem}", report.name);
            }
            runs.push(report);
        }
    }
    let _ = on_broker(
        "connection.close",
        bench.connection.close(200, "benchmark done".into()),
    )
    .await;

    // Each instant run is compared with the null pipeline run just before it.
    let mut ceiling = None;
    for run in runs
        .iter_mut()
        .filter(|r| r.scenario == ScenarioName::Instant)
    {
        if run.pipeline == "null-pipeline" {
            ceiling = run.jobs_per_sec;
        } else {
            run.vs_null_pipeline = run.jobs_per_sec.zip(ceiling).map(|(a, b)| a / b);
        }
    }
    let targets = targets(&runs);
    let problems: Vec<String> = runs
        .iter()
        .flat_map(|r| r.problems.iter().map(move |p| format!("{}: {p}", r.name)))
        .collect();
    let report = Report {
        machine: Machine {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            clock_ticks_per_second: bench.probe.clock_ticks,
            broker_processes_measured: bench.probe.broker_pids.len(),
        },
        options: Options {
            amqp_url: bench.amqp.url.to_string(),
            queue_type: args.queue_type.as_str(),
            prefetch: args.prefetch,
            latency_ms: args.latency_ms,
            jitter_pct: args.jitter_pct,
            repeat: args.repeat,
            worker_bin: bench.worker_bin.display().to_string(),
            log_level: args.log_level.clone(),
        },
        ok: problems.is_empty(),
        runs,
        targets,
        problems,
    };
    println!("{}", render_table(&report));
    let json = serde_json::to_string(&report).context("serialising the report")?;
    if let Some(path) = &args.json {
        let pretty = serde_json::to_string_pretty(&report).context("serialising the report")?;
        std::fs::write(path, pretty + "\n")
            .with_context(|| format!("writing the JSON report to {}", path.display()))?;
    }
    println!("{json}");
    Ok(report.ok)
}

/// Runs one broker operation of the bench under [`BROKER_TIMEOUT`].
async fn on_broker<T>(
    what: &'static str,
    operation: impl std::future::Future<Output = lapin::Result<T>>,
) -> anyhow::Result<T> {
    Ok(broker::bounded(BROKER_TIMEOUT, what, operation).await?)
}

/// Connects to the broker, or says how to start it.
async fn connect(amqp: &AmqpSettings) -> anyhow::Result<Connection> {
    match broker::connect(amqp, "jelou-bench").await {
        Ok(connected) => Ok(connected.connection),
        Err(broker::BrokerError::Connect { reason, .. }) => bail!(
            "RabbitMQ is not reachable at {} ({reason}); start it with `rabbitmq-server -detached` \
             (and wait for `rabbitmqctl await_startup`), or name another broker with --amqp-url",
            amqp.url
        ),
        Err(e) => bail!("RabbitMQ at {}: {e}", amqp.url),
    }
}

/// Finds the `jelou-worker` binary to measure. Run through cargo (`cargo run --bin
/// jelou-bench` builds only this binary), it first rebuilds the worker with the same
/// profile and target directory, so that the binary measured is the current source and
/// never a stale build lying next to this one.
fn locate_worker(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.is_file() {
            bail!("--worker-bin {}: no such file", path.display());
        }
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe().context("locating jelou-bench's own binary")?;
    let profile_dir = exe
        .parent()
        .context("jelou-bench's binary has no parent directory")?;
    let worker = profile_dir.join("jelou-worker");
    if let (Some(cargo), Some(profile), Some(target_dir)) = (
        std::env::var_os("CARGO"),
        profile_dir.file_name().and_then(|n| n.to_str()),
        profile_dir.parent(),
    ) {
        // Cargo's `dev` profile builds into `debug/`; every other profile into its name.
        let profile = if profile == "debug" { "dev" } else { profile };
        eprintln!(
            "jelou-bench: building jelou-worker ({profile} profile) so that the current source is measured"
        );
        let status = Command::new(cargo)
            .args(["build", "--bin", "jelou-worker", "--profile", profile])
            .arg("--target-dir")
            .arg(target_dir)
            .arg("--manifest-path")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .status()
            .context("running cargo to build jelou-worker")?;
        if !status.success() {
            bail!("building jelou-worker failed ({status})");
        }
    }
    if !worker.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release --bins`, or pass --worker-bin PATH",
            worker.display()
        );
    }
    Ok(worker)
}

/// The runs a scenario is made of.
fn specs_for(scenario: ScenarioName, args: &Args) -> Vec<RunSpec> {
    let spec = |name: String, pipeline, jobs, prefetch, latency, mode| RunSpec {
        name,
        scenario,
        pipeline,
        jobs,
        prefetch,
        latency,
        jitter_pct: args.jitter_pct,
        mode,
    };
    // With --repeat, the second and later runs are named `<name>.<n>`.
    let numbered = |name: &str, n: u8| {
        if n == 1 {
            name.to_string()
        } else {
            format!("{name}.{n}")
        }
    };
    let repeats = 1..=args.repeat;
    match scenario {
        ScenarioName::Instant => {
            let jobs = args.jobs.unwrap_or(INSTANT_JOBS);
            repeats
                .flat_map(|n| {
                    [
                        (numbered("null-pipeline", n), Pipeline::Null),
                        (numbered("instant", n), Pipeline::Worker),
                    ]
                })
                .map(|(name, pipeline)| {
                    spec(
                        name,
                        pipeline,
                        jobs,
                        args.prefetch,
                        Duration::ZERO,
                        Mode::Drain,
                    )
                })
                .collect()
        }
        ScenarioName::Latency => repeats
            .map(|n| {
                spec(
                    numbered("latency", n),
                    Pipeline::Worker,
                    args.jobs.unwrap_or(LATENCY_JOBS),
                    args.prefetch,
                    Duration::from_millis(args.latency_ms),
                    Mode::Drain,
                )
            })
            .collect(),
        ScenarioName::Idle => vec![spec(
            "idle".into(),
            Pipeline::Worker,
            0,
            args.prefetch,
            Duration::ZERO,
            Mode::Watch(Duration::from_secs(args.idle_secs)),
        )],
        ScenarioName::Backlog => {
            let mut sizes = vec![SMALL_BACKLOG.min(args.backlog_jobs), args.backlog_jobs];
            sizes.dedup();
            sizes
                .into_iter()
                .map(|jobs| {
                    spec(
                        format!("backlog-{jobs}"),
                        Pipeline::Worker,
                        jobs,
                        BACKLOG_PREFETCH,
                        BACKLOG_LATENCY,
                        Mode::Watch(Duration::from_secs(args.backlog_secs)),
                    )
                })
                .collect()
        }
    }
}

/// Which program consumes the jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pipeline {
    /// `jelou-worker run`, the program under test.
    Worker,
    /// `jelou-bench --null-pipeline`, the ceiling.
    Null,
}

impl Pipeline {
    fn name(self) -> &'static str {
        match self {
            Pipeline::Worker => "jelou-worker",
            Pipeline::Null => "null-pipeline",
        }
    }
}

/// How long a run lasts.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Until every job has its result.
    Drain,
    /// This long after the child starts consuming, whatever is left in the queue.
    Watch(Duration),
}

/// One child process's run.
struct RunSpec {
    name: String,
    scenario: ScenarioName,
    pipeline: Pipeline,
    jobs: u64,
    prefetch: u16,
    /// The stand-in's answer delay (its mean, with jitter).
    latency: Duration,
    /// Spread of the delay, ± percent.
    jitter_pct: u8,
    mode: Mode,
}

impl RunSpec {
    fn describe(&self) -> String {
        let length = match self.mode {
            Mode::Drain => "until every job has its result".to_string(),
            Mode::Watch(d) => format!("for {} s", d.as_secs()),
        };
        let jitter = if self.jitter_pct > 0 && !self.latency.is_zero() {
            format!(" ± {} %", self.jitter_pct)
        } else {
            String::new()
        };
        format!(
            "{} jobs, {}, prefetch {}, Jelou answering after {} ms{jitter}, {length}",
            self.jobs,
            self.pipeline.name(),
            self.prefetch,
            self.latency.as_millis()
        )
    }

    /// The most a consumer can do with `prefetch` jobs in flight that each take
    /// `latency`: prefetch / latency.
    fn bound(&self) -> Option<f64> {
        (!self.latency.is_zero()).then(|| f64::from(self.prefetch) / self.latency.as_secs_f64())
    }
}

/// Microseconds since the bench started: the one clock of enqueue and receive times.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now_us(self) -> u64 {
        self.0.elapsed().as_micros() as u64
    }
}

/// The names of one run's queues and exchanges, unique to the bench invocation.
struct Names {
    settings: Settings,
    topology: Topology,
    /// The bench's own queue that receives every result.
    collected: String,
    /// Every jobId of the run starts with it: `b<tag>-`.
    job_prefix: String,
}

impl Names {
    fn new(tag: &str, run: &str, amqp: &AmqpSettings, prefetch: u16) -> Self {
        let prefix = format!("bench.{tag}.{run}");
        let settings = Settings {
            amqp: AmqpSettings {
                jobs_queue: format!("{prefix}.jobs"),
                result_exchange: format!("{prefix}.results"),
                dead_letter_exchange: format!("{prefix}.dead"),
                dead_letter_queue: format!("{prefix}.jobs.dead"),
                prefetch,
                ..amqp.clone()
            },
            ..Settings::default()
        };
        // The worker declares its retry and delay queues after its retry settings
        // (the defaults, as nothing else is set): the bench declares and deletes the
        // same ones.
        let topology = Topology::for_settings(&settings);
        Self {
            topology,
            collected: format!("{prefix}.collected"),
            job_prefix: format!("b{tag}-"),
            settings,
        }
    }

    fn queues(&self) -> Vec<String> {
        let mut queues = self.topology.queue_names();
        queues.push(self.collected.clone());
        queues
    }

    fn exchanges(&self) -> [&str; 2] {
        [
            &self.topology.result_exchange,
            &self.topology.dead_letter_exchange,
        ]
    }

    /// The configuration of the child, as `JELOU_WORKER__*` variables.
    fn child_env(&self, stand_in: &LeanJelou, log_level: &str) -> Vec<(String, String)> {
        let a = &self.settings.amqp;
        let url: Vec<&str> = a.url.expose().collect();
        [
            ("AMQP__URL", url.join(",")),
            ("AMQP__QUEUE_TYPE", a.queue_type.as_str().to_string()),
            ("AMQP__JOBS_QUEUE", a.jobs_queue.clone()),
            ("AMQP__RESULT_EXCHANGE", a.result_exchange.clone()),
            ("AMQP__DEAD_LETTER_EXCHANGE", a.dead_letter_exchange.clone()),
            ("AMQP__DEAD_LETTER_QUEUE", a.dead_letter_queue.clone()),
            ("AMQP__PREFETCH", a.prefetch.to_string()),
            ("JELOU__BASE_URL", stand_in.base_url()),
            ("JELOU__CLIENT_ID", "jelou-bench".to_string()),
            ("JELOU__CLIENT_SECRET", "jelou-bench".to_string()),
            // Port 0: the system picks a free one; the bench needs no metrics.
            ("SERVER__LISTEN", "127.0.0.1:0".to_string()),
            ("LOG__LEVEL", log_level.to_string()),
        ]
        .into_iter()
        .map(|(key, value)| (format!("JELOU_WORKER__{key}"), value))
        .collect()
    }
}

/// What the whole invocation shares.
struct Bench<'a> {
    /// Eight hex digits unique to this invocation, in every name it declares.
    tag: String,
    clock: Clock,
    amqp: AmqpSettings,
    connection: Connection,
    stand_in: &'a LeanJelou,
    worker_bin: PathBuf,
    self_exe: PathBuf,
    probe: Probe,
    /// The worker's `log.level`.
    log_level: String,
}

impl Bench<'_> {
    /// Runs one child and cleans up its queues and exchanges whatever happened, Ctrl-C
    /// included (the child is killed when its handle is dropped).
    async fn run(&self, spec: &RunSpec) -> anyhow::Result<RunReport> {
        let names = Names::new(&self.tag, &spec.name, &self.amqp, spec.prefetch);
        let outcome = tokio::select! {
            report = self.measure(spec, &names) => report,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
        self.clean_up(&names).await;
        outcome
    }

    async fn measure(&self, spec: &RunSpec, names: &Names) -> anyhow::Result<RunReport> {
        let timeout = self.amqp.operation_timeout();
        names
            .topology
            .declare(&self.connection, timeout)
            .await
            .context("declaring the run's queues and exchanges")?;
        let collector = Collector::start(&self.connection, names, spec.jobs, self.clock).await?;
        self.stand_in.answer_after(spec.latency, spec.jitter_pct);
        let prefill_rate = if spec.jobs > 0 {
            Some(prefill(&self.connection, names, spec.jobs, self.clock).await?)
        } else {
            None
        };

        let channel = on_broker("channel.open", self.connection.create_channel()).await?;
        let requests_before = self.stand_in.answered();
        let mut child = self.spawn(spec, names)?;
        wait_consuming(&channel, &names.topology.jobs_queue, &mut child).await?;
        let start = self.probe.sample(child.pid(), self.clock);
        let startup_ms = start.at_us.saturating_sub(child.spawned_us) as f64 / 1000.0;

        let mut problems = Vec::new();
        let end = match spec.mode {
            Mode::Drain => {
                if let Err(stalled) = collector.wait_for(spec.jobs).await {
                    problems.push(stalled);
                }
                let end = self.probe.sample(child.pid(), self.clock);
                tokio::time::sleep(SETTLE).await;
                end
            }
            Mode::Watch(duration) => {
                tokio::time::sleep(duration).await;
                self.probe.sample(child.pid(), self.clock)
            }
        };
        let memory = Memory::of(child.pid());
        if let Err(e) = child.stop().await {
            problems.push(e);
        }
        let jelou_requests = self.stand_in.answered() - requests_before;
        // Once the child is gone, whatever it did not ack is back in the queue.
        let left = settled_count(&channel, &names.topology.jobs_queue)
            .await
            .context("counting the jobs left in the queue")?;
        let _ = on_broker("channel.close", channel.close(200, "run measured".into())).await;
        if let Mode::Watch(_) = spec.mode {
            // Results of the jobs finished while the child stopped may still be on
            // their way: wait until every job is accounted for (or give up).
            collector
                .wait_for(spec.jobs.saturating_sub(u64::from(left)))
                .await
                .ok();
            tokio::time::sleep(SETTLE).await;
        }
        let tally = collector.snapshot();
        collector.stop().await;
        Ok(self.report(
            spec,
            Measured {
                start,
                end,
                memory,
                startup_ms,
                prefill_rate,
                left: u64::from(left),
                jelou_requests,
                tally,
                problems,
            },
        ))
    }

    fn spawn(&self, spec: &RunSpec, names: &Names) -> anyhow::Result<ChildProcess> {
        let (program, args): (&Path, &[&str]) = match spec.pipeline {
            Pipeline::Worker => (&self.worker_bin, &["run"]),
            Pipeline::Null => (&self.self_exe, &["--null-pipeline"]),
        };
        let log = std::env::temp_dir().join(format!("jelou-bench-{}-{}.log", self.tag, spec.name));
        ChildProcess::spawn(
            program,
            args,
            &names.child_env(self.stand_in, &self.log_level),
            log,
            self.clock,
        )
    }

    /// Deletes what the run declared. Failures are reported, not fatal: the names are
    /// unique to this invocation, so a leftover never disturbs another run.
    async fn clean_up(&self, names: &Names) {
        let queues = names.queues();
        let items = queues
            .iter()
            .map(|q| (q.as_str(), true))
            .chain(names.exchanges().into_iter().map(|e| (e, false)));
        let mut channel: Option<Channel> = None;
        for (name, is_queue) in items {
            let ch = match channel.take() {
                Some(ch) if ch.status().connected() => ch,
                _ => match on_broker("channel.open", self.connection.create_channel()).await {
                    Ok(ch) => ch,
                    Err(e) => {
                        eprintln!(
                            "jelou-bench: warning: cannot clean up `{name}` and the rest of the run's names: {e:#}"
                        );
                        return;
                    }
                },
            };
            let deleted = if is_queue {
                on_broker(
                    "queue.delete",
                    ch.queue_delete(name.into(), QueueDeleteOptions::default()),
                )
                .await
                .map(drop)
            } else {
                on_broker(
                    "exchange.delete",
                    ch.exchange_delete(name.into(), ExchangeDeleteOptions::default()),
                )
                .await
            };
            match deleted {
                // A timed-out channel may still get its answer later: use a new one.
                Err(e) => eprintln!("jelou-bench: warning: could not delete `{name}`: {e:#}"),
                Ok(()) => channel = Some(ch),
            }
        }
        if let Some(ch) = channel {
            let _ = on_broker("channel.close", ch.close(200, "cleaned up".into())).await;
        }
    }

    fn report(&self, spec: &RunSpec, m: Measured) -> RunReport {
        let Measured {
            start,
            end,
            memory,
            startup_ms,
            prefill_rate,
            left,
            jelou_requests,
            tally,
            mut problems,
        } = m;
        let in_window: Vec<&(u64, u64)> = tally
            .times
            .iter()
            .filter(|(_, received)| *received <= end.at_us)
            .collect();
        let done_in_window = in_window.len() as u64;
        let last_us = in_window.iter().map(|(_, r)| *r).max();
        let window_end = match spec.mode {
            Mode::Drain => last_us.unwrap_or(end.at_us),
            Mode::Watch(_) => end.at_us,
        };
        let window_secs = window_end.saturating_sub(start.at_us) as f64 / 1e6;
        let wall_secs = end.at_us.saturating_sub(start.at_us) as f64 / 1e6;
        // Throughput means something while the queue was never empty: always for a
        // drain, and for a watched run only when jobs were still waiting at its end.
        let saturated = match spec.mode {
            Mode::Drain => done_in_window == spec.jobs && spec.jobs > 0,
            Mode::Watch(_) => done_in_window > 0 && done_in_window < spec.jobs,
        };
        let jobs_per_sec =
            (saturated && window_secs > 0.0).then(|| done_in_window as f64 / window_secs);
        let mut latencies: Vec<u64> = in_window
            .iter()
            .map(|(enqueued, received)| received.saturating_sub((*enqueued).max(start.at_us)))
            .collect();
        latencies.sort_unstable();
        let ms = |us: u64| us as f64 / 1000.0;
        let first_result_ms = in_window
            .iter()
            .map(|(_, r)| *r)
            .min()
            .map(|r| ms(r.saturating_sub(start.at_us)));
        let cpu_seconds = (end.child_cpu - start.child_cpu).max(0.0);
        let share = |a: f64, b: f64| {
            if wall_secs > 0.0 {
                (b - a).max(0.0) / wall_secs
            } else {
                0.0
            }
        };

        let exactly_one_result_each = tally.duplicates == 0
            && tally.strays == 0
            && match spec.mode {
                Mode::Drain => tally.unique == spec.jobs && left == 0,
                Mode::Watch(_) => tally.unique + left == spec.jobs,
            };
        if tally.duplicates > 0 {
            problems.push(format!(
                "{} jobs got more than one result",
                tally.duplicates
            ));
        }
        if tally.strays > 0 {
            problems.push(format!(
                "{} results answer no job of this run",
                tally.strays
            ));
        }
        if tally.failures > 0 {
            problems.push(format!(
                "{} results are failures (the stand-in always answers success)",
                tally.failures
            ));
        }
        if !exactly_one_result_each && tally.duplicates == 0 && tally.strays == 0 {
            problems.push(match spec.mode {
                Mode::Drain => format!(
                    "{} of {} jobs got a result; {left} left in the queue",
                    tally.unique, spec.jobs
                ),
                Mode::Watch(_) if tally.unique + left > spec.jobs => format!(
                    "{} jobs got a result and are still queued: their ack was lost when the \
                     worker stopped, so they will be sent again ({} results, {left} queued, {} jobs)",
                    tally.unique + left - spec.jobs,
                    tally.unique,
                    spec.jobs
                ),
                Mode::Watch(_) => format!(
                    "{} jobs neither got a result nor are queued ({} results, {left} queued, {} jobs)",
                    spec.jobs - tally.unique - left,
                    tally.unique,
                    spec.jobs
                ),
            });
        }
        // Jelou answers every message with success at the first attempt: a job sent more
        // than once is a duplicate WhatsApp message, even if it got one result.
        let sends_expected = match spec.pipeline {
            Pipeline::Worker => tally.unique,
            Pipeline::Null => 0,
        };
        if matches!(spec.mode, Mode::Drain) && jelou_requests != sends_expected {
            problems.push(format!(
                "Jelou received {jelou_requests} messages for {sends_expected} finished jobs"
            ));
        }
        let check = ResultCheck {
            expected: spec.jobs,
            jelou_requests,
            done: tally.unique,
            left_in_queue: left,
            duplicates: tally.duplicates,
            failures: tally.failures,
            strays: tally.strays,
            exactly_one_result_each,
        };
        let bound = spec.bound();
        let stand_in_cpu_share = share(start.stand_in_cpu, end.stand_in_cpu);
        if stand_in_cpu_share > 0.85 {
            problems.push(format!(
                "the stand-in Jelou used {:.0} % of its thread: it may be the limit, not the worker",
                stand_in_cpu_share * 100.0
            ));
        }
        RunReport {
            name: spec.name.clone(),
            scenario: spec.scenario,
            pipeline: spec.pipeline.name(),
            jobs: spec.jobs,
            prefetch: spec.prefetch,
            jelou_latency_ms: spec.latency.as_millis() as u64,
            jelou_jitter_pct: if spec.latency.is_zero() {
                0
            } else {
                spec.jitter_pct
            },
            prefill_jobs_per_sec: prefill_rate,
            startup_ms,
            window_secs,
            jobs_done_in_window: done_in_window,
            jobs_per_sec,
            vs_null_pipeline: None,
            bound_jobs_per_sec: bound,
            vs_bound: jobs_per_sec.zip(bound).map(|(a, b)| a / b),
            first_result_ms,
            latency_p50_ms: percentile(&latencies, 50.0).map(ms),
            latency_p99_ms: percentile(&latencies, 99.0).map(ms),
            latency_max_ms: latencies.last().copied().map(ms),
            cpu_seconds,
            cpu_seconds_per_1000_jobs: (done_in_window > 0)
                .then(|| cpu_seconds / done_in_window as f64 * 1000.0),
            cpu_share_of_a_core: share(start.child_cpu, end.child_cpu),
            peak_rss_mib: memory.peak_kib.map(|k| k as f64 / 1024.0),
            rss_mib: memory.current_kib.map(|k| k as f64 / 1024.0),
            stand_in_cpu_share,
            bench_cpu_share: share(start.bench_cpu, end.bench_cpu),
            broker_cpu_share: start
                .broker_cpu
                .zip(end.broker_cpu)
                .map(|(a, b)| share(a, b)),
            machine_busy: start.machine.zip(end.machine).and_then(
                |((busy0, total0), (busy1, total1))| {
                    (total1 > total0).then(|| (busy1 - busy0) as f64 / (total1 - total0) as f64)
                },
            ),
            results: check,
            problems,
        }
    }
}

/// What a run measured, before it is turned into a report.
struct Measured {
    start: Sample,
    end: Sample,
    memory: Memory,
    startup_ms: f64,
    prefill_rate: Option<f64>,
    left: u64,
    /// Messages the stand-in Jelou answered while the child ran.
    jelou_requests: u64,
    tally: Tally,
    problems: Vec<String>,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// A job's body, as a producer would write it.
fn job_body(job_id: &str) -> Vec<u8> {
    format!(
        r#"{{"jobId":"{job_id}","botId":"{BOT_ID}","message":{{"type":"text","userId":"{USER_ID}","text":"Hola, este es un mensaje de prueba del benchmark"}}}}"#
    )
    .into_bytes()
}

/// Fills the jobs queue with confirmed, pipelined publishing; returns the jobs/s reached.
/// Each jobId is `b<tag>-<seq>-<enqueue time in µs>`; it is also the AMQP `message_id`,
/// which is what the null pipeline, which does not read bodies, answers with.
async fn prefill(
    connection: &Connection,
    names: &Names,
    jobs: u64,
    clock: Clock,
) -> anyhow::Result<f64> {
    let channel = on_broker("channel.open", connection.create_channel()).await?;
    on_broker(
        "confirm.select",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    let queue = names.topology.jobs_queue.as_str();
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for seq in 0..jobs {
        let job_id = format!("{}{seq}-{}", names.job_prefix, clock.now_us());
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64)
            .with_message_id(job_id.as_str().into());
        let body = job_body(&job_id);
        let confirm = on_broker(
            "basic.publish",
            channel.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            ),
        )
        .await
        .with_context(|| format!("publishing job {seq} to `{queue}`"))?;
        pending.push(confirm);
        if pending.len() >= PUBLISH_IN_FLIGHT {
            expect_routed(next_confirm(&mut pending).await?, queue)?;
        }
    }
    while !pending.is_empty() {
        expect_routed(next_confirm(&mut pending).await?, queue)?;
    }
    let _ = on_broker("channel.close", channel.close(200, "jobs published".into())).await;
    Ok(jobs as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// The next publisher confirm to arrive, within [`BROKER_TIMEOUT`].
async fn next_confirm(
    pending: &mut FuturesUnordered<lapin::PublisherConfirm>,
) -> anyhow::Result<lapin::Result<Confirmation>> {
    match tokio::time::timeout(BROKER_TIMEOUT, pending.next()).await {
        Ok(Some(confirmation)) => Ok(confirmation),
        Ok(None) => bail!("no publish is waiting for a confirm"),
        Err(_) => bail!(
            "the broker confirmed no job within {} s",
            BROKER_TIMEOUT.as_secs()
        ),
    }
}

fn expect_routed(confirmation: lapin::Result<Confirmation>, queue: &str) -> anyhow::Result<()> {
    match confirmation.context("waiting for a publisher confirm")? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => bail!("the broker has no queue `{queue}` to take the job"),
        Confirmation::Nack(_) => bail!("the broker refused (nack) a job for `{queue}`"),
        Confirmation::NotRequested => bail!("the broker did not confirm a job (confirms are off)"),
    }
}

/// Polls the jobs queue until the broker reports a consumer: the moment the clock
/// starts. Fails early, with its log, if the child exits first.
async fn wait_consuming(
    channel: &Channel,
    queue: &str,
    child: &mut ChildProcess,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.exited() {
            bail!(
                "{} exited ({status}) before consuming; its log:\n{}",
                child.program,
                child.log_tail()
            );
        }
        let declared = passive_declare(channel, queue)
            .await
            .context("checking the jobs queue for a consumer")?;
        if declared.consumer_count() > 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not start consuming within {} s; its log:\n{}",
                child.program,
                START_TIMEOUT.as_secs(),
                child.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The queue's counts, without declaring it.
async fn passive_declare(channel: &Channel, queue: &str) -> anyhow::Result<lapin::Queue> {
    on_broker(
        "queue.declare",
        channel.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
}

/// The queue's message count once it stops changing: a quorum queue applies the acks
/// and returns of a closed connection through its log, a moment after the close.
async fn settled_count(channel: &Channel, queue: &str) -> anyhow::Result<u32> {
    let mut last = passive_declare(channel, queue).await?.message_count();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = passive_declare(channel, queue).await?.message_count();
        if now == last {
            break;
        }
        last = now;
    }
    Ok(last)
}

/// Receives every result of a run (auto-ack, from a queue bound to the run's result
/// exchange with `#`) and counts them per job.
struct Collector {
    /// Closing it ends the consumer; the queue, auto-delete, goes with it.
    channel: Channel,
    tally: Mutex<Tally>,
    progress: Notify,
}

/// What the results said so far.
#[derive(Debug, Default, Clone)]
struct Tally {
    /// Results per job, by sequence number.
    counts: Vec<u8>,
    /// (enqueued, received) in µs of [`Clock`], for each job's first result.
    times: Vec<(u64, u64)>,
    /// Jobs with at least one result.
    unique: u64,
    /// Results beyond the first for a job.
    duplicates: u64,
    /// Failure results (routing key `failure`).
    failures: u64,
    /// Results whose correlation_id names no job of this run.
    strays: u64,
}

impl Collector {
    async fn start(
        connection: &Connection,
        names: &Names,
        jobs: u64,
        clock: Clock,
    ) -> anyhow::Result<Arc<Self>> {
        let channel = on_broker("channel.open", connection.create_channel()).await?;
        let queue = names.collected.as_str();
        on_broker(
            "queue.declare",
            channel.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .with_context(|| format!("declaring the results queue `{queue}`"))?;
        on_broker(
            "queue.bind",
            channel.queue_bind(
                queue.into(),
                names.topology.result_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        let mut consumer = on_broker(
            "basic.consume",
            channel.basic_consume(
                queue.into(),
                "jelou-bench-results".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        let collector = Arc::new(Self {
            channel,
            tally: Mutex::new(Tally {
                counts: vec![0; jobs as usize],
                times: Vec::with_capacity(jobs as usize),
                ..Tally::default()
            }),
            progress: Notify::new(),
        });
        let prefix = names.job_prefix.clone();
        let sink = collector.clone();
        // Ends when the channel closes ([`Collector::stop`], or the run's clean-up).
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let received = clock.now_us();
                let job = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .and_then(|id| parse_job_id(id.as_str(), &prefix));
                let success = delivery.routing_key.as_str() != "failure";
                sink.tally
                    .lock()
                    .expect("not poisoned")
                    .record(job, success, received);
                sink.progress.notify_one();
            }
        });
        Ok(collector)
    }

    /// Waits until `n` jobs have a result; fails when none came for [`STALL`].
    async fn wait_for(&self, n: u64) -> Result<(), String> {
        loop {
            let notified = self.progress.notified();
            let unique = self.tally.lock().expect("not poisoned").unique;
            if unique >= n {
                return Ok(());
            }
            if tokio::time::timeout(STALL, notified).await.is_err() {
                return Err(format!(
                    "stalled: {unique} of {n} jobs have a result, and none came in {} s",
                    STALL.as_secs()
                ));
            }
        }
    }

    /// Stops receiving: closes the channel, which deletes the auto-delete queue.
    async fn stop(&self) {
        let _ = on_broker(
            "channel.close",
            self.channel.close(200, "results collected".into()),
        )
        .await;
    }

    fn snapshot(&self) -> Tally {
        self.tally.lock().expect("not poisoned").clone()
    }
}

/// `b<tag>-<seq>-<µs>` → (seq, enqueue µs), for jobIds of this run only.
fn parse_job_id(id: &str, prefix: &str) -> Option<(usize, u64)> {
    let (seq, enqueued) = id.strip_prefix(prefix)?.split_once('-')?;
    Some((seq.parse().ok()?, enqueued.parse().ok()?))
}

impl Tally {
    fn record(&mut self, job: Option<(usize, u64)>, success: bool, received: u64) {
        let Some((seq, enqueued)) = job.filter(|(seq, _)| *seq < self.counts.len()) else {
            self.strays += 1;
            return;
        };
        if !success {
            self.failures += 1;
        }
        if self.counts[seq] == 0 {
            self.unique += 1;
            self.times.push((enqueued, received));
        } else {
            self.duplicates += 1;
        }
        self.counts[seq] = self.counts[seq].saturating_add(1);
    }
}

/// The worker or the null pipeline, killed if the bench stops before it does.
struct ChildProcess {
    child: Child,
    program: String,
    log: PathBuf,
    spawned_us: u64,
}

impl ChildProcess {
    fn spawn(
        program: &Path,
        args: &[&str],
        env: &[(String, String)],
        log: PathBuf,
        clock: Clock,
    ) -> anyhow::Result<Self> {
        let out = std::fs::File::create(&log)
            .with_context(|| format!("creating the child's log {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("opening the child's log {}", log.display()))?;
        let mut command = Command::new(program);
        command
            .args(args)
            // No config/default.toml: the child sees only the built-in defaults and
            // the variables below, wherever the bench is started from.
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (key, _) in std::env::vars_os() {
            let inherited = key.to_string_lossy();
            if inherited.starts_with("JELOU_WORKER") || inherited == "RUST_LOG" {
                command.env_remove(&key);
            }
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        let spawned_us = clock.now_us();
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Self {
            child,
            program: program.display().to_string(),
            log,
            spawned_us,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines the child wrote.
    fn log_tail(&self) -> String {
        match std::fs::read_to_string(&self.log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(20)..].join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", self.log.display()),
        }
    }

    /// SIGTERM, as an orchestrator stops the worker, and waits for a clean exit.
    async fn stop(&mut self) -> Result<(), String> {
        // SAFETY: kill(2) with a pid this process spawned and has not reaped yet (the
        // `Child` still owns it), so the pid cannot name another process.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        if sent != 0 {
            return Err(format!(
                "cannot signal {}: {}",
                self.program,
                std::io::Error::last_os_error()
            ));
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => {
                    let _ = std::fs::remove_file(&self.log);
                    return Ok(());
                }
                Ok(Some(status)) => {
                    return Err(format!(
                        "{} exited with {status} after SIGTERM; its log ({}):\n{}",
                        self.program,
                        self.log.display(),
                        self.log_tail()
                    ));
                }
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!(
                        "{} did not exit within {} s of SIGTERM and was killed",
                        self.program,
                        STOP_TIMEOUT.as_secs()
                    ));
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => return Err(format!("waiting for {}: {e}", self.program)),
            }
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads CPU times from `/proc`: the child's, the stand-in's threads', the bench's
/// own, RabbitMQ's (when it runs on this machine) and the whole machine's.
struct Probe {
    clock_ticks: f64,
    /// The processes listening on the broker's ports, when it runs on this machine.
    broker_pids: Vec<u32>,
}

/// CPU seconds used so far, at one moment.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_us: u64,
    child_cpu: f64,
    stand_in_cpu: f64,
    /// This process without the stand-in's threads.
    bench_cpu: f64,
    broker_cpu: Option<f64>,
    /// (busy, total) ticks of all CPUs, from `/proc/stat`.
    machine: Option<(u64, u64)>,
}

impl Probe {
    fn new(urls: &AmqpUrls) -> Self {
        // SAFETY: sysconf only reads a constant of the system.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Self {
            clock_ticks: if ticks > 0 { ticks as f64 } else { 100.0 },
            broker_pids: local_broker_pids(urls),
        }
    }

    fn sample(&self, child: u32, clock: Clock) -> Sample {
        let secs = |path: &str| cpu_ticks(path).map(|t| t as f64 / self.clock_ticks);
        let stand_in_cpu: f64 = std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|task| {
                std::fs::read_to_string(task.path().join("comm"))
                    .is_ok_and(|comm| comm.trim().starts_with(STAND_IN_THREAD))
            })
            .filter_map(|task| secs(&task.path().join("stat").to_string_lossy()))
            .sum();
        let broker_cpu = (!self.broker_pids.is_empty())
            .then(|| {
                self.broker_pids
                    .iter()
                    .map(|pid| secs(&format!("/proc/{pid}/stat")))
                    .sum::<Option<f64>>()
            })
            .flatten();
        Sample {
            at_us: clock.now_us(),
            child_cpu: secs(&format!("/proc/{child}/stat")).unwrap_or(0.0),
            bench_cpu: secs("/proc/self/stat").unwrap_or(0.0) - stand_in_cpu,
            stand_in_cpu,
            broker_cpu,
            machine: machine_ticks(),
        }
    }
}

/// The processes listening on the loopback ports of `urls`: the RabbitMQ node(s) under
/// test, and no other broker that happens to run on this machine.
fn local_broker_pids(urls: &AmqpUrls) -> Vec<u32> {
    let ports: Vec<u16> = urls
        .expose()
        .filter_map(|raw| url::Url::parse(raw).ok())
        // `amqp` is not a scheme the URL standard knows, so its host stays a plain
        // string (never an `Ipv4`): compare the text.
        .filter(|u| {
            u.host_str().is_some_and(|host| {
                host.eq_ignore_ascii_case("localhost")
                    || host
                        .trim_matches(['[', ']'])
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            })
        })
        .map(|u| {
            u.port()
                .unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 })
        })
        .collect();
    // Inodes of the listening sockets (state 0A) on those ports.
    let sockets: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
                    let inode = fields.get(9)?;
                    (fields.get(3) == Some(&"0A") && ports.contains(&port))
                        .then(|| format!("socket:[{inode}]"))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if sockets.is_empty() {
        return Vec::new();
    }
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|target| {
                        sockets.iter().any(|s| target.as_os_str() == s.as_str())
                    })
                })
        })
        .collect()
}

/// utime + stime of a `/proc/.../stat` file, in clock ticks.
fn cpu_ticks(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count the
    // fields after its closing one. utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// (busy, total) ticks of all CPUs since boot.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// A process's memory, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
struct Memory {
    /// `VmHWM`: the most resident memory it ever had.
    peak_kib: Option<u64>,
    /// `VmRSS`: resident memory now.
    current_kib: Option<u64>,
}

impl Memory {
    fn of(pid: u32) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        };
        Self {
            peak_kib: field("VmHWM:"),
            current_kib: field("VmRSS:"),
        }
    }
}

/// The whole report: what `--json` writes and the last line of stdout.
#[derive(Debug, Serialize)]
struct Report {
    /// True when every run passed its checks.
    ok: bool,
    machine: Machine,
    options: Options,
    runs: Vec<RunReport>,
    targets: Vec<Target>,
    problems: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Machine {
    cpus: usize,
    clock_ticks_per_second: f64,
    /// Processes listening on the broker's loopback port(s), whose CPU time is the
    /// runs' `broker_cpu_share` (0: the broker is elsewhere, not measured).
    broker_processes_measured: usize,
}

#[derive(Debug, Serialize)]
struct Options {
    /// Passwords redacted.
    amqp_url: String,
    queue_type: &'static str,
    prefetch: u16,
    latency_ms: u64,
    jitter_pct: u8,
    /// Runs of `instant` and `latency`; the targets use the median.
    repeat: u8,
    worker_bin: String,
    /// The worker's `log.level`.
    log_level: String,
}

/// One run's figures. Shares are of one CPU core over the window (1.0 = a full core).
#[derive(Debug, Serialize)]
struct RunReport {
    name: String,
    scenario: ScenarioName,
    /// `jelou-worker` or `null-pipeline`.
    pipeline: &'static str,
    jobs: u64,
    prefetch: u16,
    jelou_latency_ms: u64,
    /// The stand-in's delay varied by ± this many percent.
    jelou_jitter_pct: u8,
    prefill_jobs_per_sec: Option<f64>,
    /// From spawning the child to its consumer appearing on the queue.
    startup_ms: f64,
    /// From the consume start to the last result (drains) or the end of the watch.
    window_secs: f64,
    jobs_done_in_window: u64,
    /// Only while the queue never ran dry.
    jobs_per_sec: Option<f64>,
    vs_null_pipeline: Option<f64>,
    /// prefetch / Jelou's latency.
    bound_jobs_per_sec: Option<f64>,
    vs_bound: Option<f64>,
    first_result_ms: Option<f64>,
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    latency_max_ms: Option<f64>,
    /// The child's utime + stime over the window.
    cpu_seconds: f64,
    cpu_seconds_per_1000_jobs: Option<f64>,
    cpu_share_of_a_core: f64,
    peak_rss_mib: Option<f64>,
    rss_mib: Option<f64>,
    stand_in_cpu_share: f64,
    bench_cpu_share: f64,
    broker_cpu_share: Option<f64>,
    /// Fraction of all the machine's CPUs in use over the window.
    machine_busy: Option<f64>,
    results: ResultCheck,
    problems: Vec<String>,
}

impl RunReport {
    /// One line for the progress log, printed as each run ends.
    fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(rate) = self.jobs_per_sec {
            parts.push(format!("{rate:.0} jobs/s"));
        }
        if let Some(cpu) = self.cpu_seconds_per_1000_jobs {
            parts.push(format!("CPU {cpu:.3} s per 1000 jobs"));
        }
        parts.push(format!(
            "CPU {:.1} % of a core",
            self.cpu_share_of_a_core * 100.0
        ));
        if let Some(rss) = self.peak_rss_mib {
            parts.push(format!("peak RSS {rss:.1} MiB"));
        }
        parts.push(if self.results.exactly_one_result_each {
            "every job exactly one result".to_string()
        } else {
            "RESULTS CHECK FAILED".to_string()
        });
        parts.join(", ")
    }
}

/// Did every job get exactly one result?
#[derive(Debug, Serialize)]
struct ResultCheck {
    expected: u64,
    /// Messages the stand-in Jelou received (one per job for the worker, none for the
    /// null pipeline).
    jelou_requests: u64,
    /// Jobs with a result.
    done: u64,
    /// Jobs still in the queue after the child stopped (a watched run stops early).
    left_in_queue: u64,
    duplicates: u64,
    failures: u64,
    strays: u64,
    /// Drains: every job has exactly one result and none is left. Watched runs: every
    /// job has exactly one result or is still in the queue.
    exactly_one_result_each: bool,
}

/// One of issue 5's targets, checked against this invocation's figures.
#[derive(Debug, Serialize)]
struct Target {
    what: &'static str,
    value: f64,
    limit: f64,
    /// `>=` or `<=`.
    op: &'static str,
    met: bool,
}

fn targets(runs: &[RunReport]) -> Vec<Target> {
    // The median of a figure over the runs of one name (`name`, `name.2`, ...).
    let median = |name: &str, figure: fn(&RunReport) -> Option<f64>| {
        let repeated = format!("{name}.");
        let mut values: Vec<f64> = runs
            .iter()
            .filter(|r| r.name == name || r.name.starts_with(&repeated))
            .filter_map(figure)
            .collect();
        values.sort_by(f64::total_cmp);
        median_of(&values)
    };
    let mut out = Vec::new();
    let mut add = |what, value: Option<f64>, op, limit| {
        if let Some(value) = value {
            let met = if op == ">=" {
                value >= limit
            } else {
                value <= limit
            };
            out.push(Target {
                what,
                value,
                limit,
                op,
                met,
            });
        }
    };
    add(
        "instant jobs/s ÷ null pipeline jobs/s",
        median("instant", |r| r.vs_null_pipeline),
        ">=",
        0.85,
    );
    add(
        "latency jobs/s ÷ (prefetch / latency)",
        median("latency", |r| r.vs_bound),
        ">=",
        0.95,
    );
    add(
        "instant worker CPU, ms per job",
        median("instant", |r| r.cpu_seconds_per_1000_jobs),
        "<=",
        0.08,
    );
    add(
        "instant peak RSS, MiB",
        median("instant", |r| r.peak_rss_mib),
        "<=",
        32.0,
    );
    add(
        "idle peak RSS, MiB",
        median("idle", |r| r.peak_rss_mib),
        "<=",
        16.0,
    );
    out
}

/// The middle value of sorted `values` (the mean of the middle two for an even count).
fn median_of(values: &[f64]) -> Option<f64> {
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// The human-readable table, notes and targets.
fn render_table(report: &Report) -> String {
    let opt = |v: Option<f64>, decimals: usize| match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "-".to_string(),
    };
    let pct = |v: Option<f64>| match v {
        Some(v) => format!("{:.0} %", v * 100.0),
        None => "-".to_string(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:>5} {:>6} {:>9} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8} {:>5}",
        "run",
        "jobs",
        "pref.",
        "Jelou",
        "jobs/s",
        "vs null",
        "vs bound",
        "1st res.",
        "p50",
        "p99",
        "CPU s/1k",
        "CPU",
        "peak RSS",
        "1 res"
    );
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:>5} {:>6} {:>9} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8} {:>5}",
        "", "", "", "ms", "", "", "", "ms", "ms", "ms", "jobs", "% core", "MiB", "each"
    );
    for r in &report.runs {
        let _ = writeln!(
            out,
            "{:<16} {:>7} {:>5} {:>6} {:>9} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8} {:>5}",
            r.name,
            r.jobs,
            r.prefetch,
            r.jelou_latency_ms,
            opt(r.jobs_per_sec, 0),
            pct(r.vs_null_pipeline),
            pct(r.vs_bound),
            opt(r.first_result_ms, 1),
            opt(r.latency_p50_ms, 0),
            opt(r.latency_p99_ms, 0),
            opt(r.cpu_seconds_per_1000_jobs, 3),
            format!("{:.1}", r.cpu_share_of_a_core * 100.0),
            opt(r.peak_rss_mib, 1),
            if r.results.exactly_one_result_each {
                "yes"
            } else {
                "NO"
            },
        );
    }
    let _ = writeln!(out);
    for r in &report.runs {
        let _ = writeln!(
            out,
            "{}: {}; started in {:.0} ms; window {:.2} s, {} jobs done; RSS now {} MiB; CPU over the window, % of a core: stand-in {:.0}, bench {:.0}, RabbitMQ {}, machine busy {}{}",
            r.name,
            r.pipeline,
            r.startup_ms,
            r.window_secs,
            r.jobs_done_in_window,
            opt(r.rss_mib, 1),
            r.stand_in_cpu_share * 100.0,
            r.bench_cpu_share * 100.0,
            r.broker_cpu_share
                .map_or("-".to_string(), |s| format!("{:.0}", s * 100.0)),
            pct(r.machine_busy),
            r.prefill_jobs_per_sec.map_or(String::new(), |p| format!(
                "; queue filled at {p:.0} jobs/s"
            )),
        );
    }
    if !report.targets.is_empty() {
        if report.options.repeat > 1 {
            let _ = writeln!(out, "\ntargets (median of {} runs):", report.options.repeat);
        } else {
            let _ = writeln!(out, "\ntargets:");
        }
        for t in &report.targets {
            let _ = writeln!(
                out,
                "  {:<42} {:>9.3} {} {:<6} {}",
                t.what,
                t.value,
                t.op,
                t.limit,
                if t.met { "met" } else { "MISSED" }
            );
        }
    }
    let _ = write!(
        out,
        "\n{}",
        if report.ok {
            "every job got exactly one result".to_string()
        } else {
            format!("FAILED: {}", report.problems.join("; "))
        }
    );
    out
}

/// The ceiling: the worker's broker path (consume with a prefetch, publish a result
/// with publisher confirms, ack) and nothing else: no HTTP, no parsing, no logs, no
/// metrics. Written as a minimal, well-tuned lapin program: one channel consuming,
/// one publishing, a task per delivery so that confirms overlap, on the same runtime
/// as the worker's (tokio's multi-threaded default).
mod null_pipeline {
    use std::{process::ExitCode, sync::Arc};

    use anyhow::{Context, bail};
    use futures_util::StreamExt;
    use jelou_worker::{
        broker,
        config::Settings,
        outcome::JobOutcome,
        result::{ResultFor, result_body},
    };
    use lapin::{
        BasicProperties, Channel, Confirmation,
        message::Delivery,
        options::{
            BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
            ConfirmSelectOptions,
        },
        types::{FieldTable, ShortString},
    };
    use tokio::signal::unix::{SignalKind, signal};

    pub fn main() -> ExitCode {
        let settings = match Settings::load(None) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("null pipeline: {e}");
                return ExitCode::from(2);
            }
        };
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("null pipeline: cannot start the async runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        match runtime.block_on(run(settings)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("null pipeline: {e:#}");
                ExitCode::FAILURE
            }
        }
    }

    /// Consumes until SIGTERM.
    async fn run(settings: Settings) -> anyhow::Result<()> {
        let amqp = &settings.amqp;
        let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        let broker::Connected { connection, .. } =
            broker::connect(amqp, "jelou-bench null pipeline").await?;
        let publishing = connection
            .create_channel()
            .await
            .context("opening the publishing channel")?;
        publishing
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enabling publisher confirms")?;
        let consuming = connection
            .create_channel()
            .await
            .context("opening the consuming channel")?;
        consuming
            .basic_qos(amqp.prefetch, BasicQosOptions::default())
            .await
            .context("setting the prefetch")?;
        let mut consumer = consuming
            .basic_consume(
                amqp.jobs_queue.as_str().into(),
                "jelou-bench-null-pipeline".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("consuming the jobs queue")?;
        // A real success result, built once: the same size on the wire as the worker's.
        let body: Arc<[u8]> = result_body(
            ResultFor {
                job_id: "b00000000-0-0",
                bot_id: Some(super::BOT_ID),
                user_id: Some(super::USER_ID),
            },
            &JobOutcome::Success {
                message_id: "msg-1".into(),
            },
            1,
            chrono::Utc::now(),
        )
        .into();
        let exchange = ShortString::from(amqp.result_exchange.as_str());
        let routing_key = ShortString::from(amqp.success_routing_key.as_str());
        loop {
            tokio::select! {
                _ = term.recv() => break,
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        tokio::spawn(finish(
                            publishing.clone(),
                            exchange.clone(),
                            routing_key.clone(),
                            body.clone(),
                            delivery,
                        ));
                    }
                    Some(Err(e)) => return Err(e).context("consuming"),
                    None => bail!("the broker cancelled the consumer (queue deleted?)"),
                },
            }
        }
        let _ = connection.close(200, "done".into()).await;
        Ok(())
    }

    /// Publishes the fixed result (correlation_id = the job's message_id), waits for
    /// its confirm, acks the job.
    async fn finish(
        channel: Channel,
        exchange: ShortString,
        routing_key: ShortString,
        body: Arc<[u8]>,
        delivery: Delivery,
    ) {
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if let Some(id) = delivery.properties.message_id().clone() {
            properties = properties.with_correlation_id(id);
        }
        let finished = async {
            let confirm = channel
                .basic_publish(
                    exchange,
                    routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    properties,
                )
                .await
                .context("publishing a result")?;
            match confirm.await.context("waiting for a result's confirm")? {
                Confirmation::Ack(None) => {}
                _ => bail!("the broker did not take a result"),
            }
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .context("acking a job")?;
            anyhow::Ok(())
        };
        if let Err(e) = finished.await {
            eprintln!("null pipeline: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::median_of;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median_of(&[]), None);
        assert_eq!(median_of(&[0.7]), Some(0.7));
        assert_eq!(median_of(&[0.7, 0.8, 0.9]), Some(0.8));
        assert_eq!(median_of(&[0.5, 0.75, 1.0, 2.0]), Some(0.875));
    }
}
