//! The command line.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use jelou_worker::config::QueueType;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "jelou-bench",
    version,
    about = "Measures jelou-worker on the local RabbitMQ: jobs/s against a null pipeline, latency, CPU, memory",
    after_help = "Needs RabbitMQ (guest/guest on 127.0.0.1:5672 unless --amqp-url). \
                  Exit status: 0 every job got exactly one result, 1 a check failed, 2 the bench could not run."
)]
pub(crate) struct Args {
    /// Scenarios to run (repeatable or comma-separated; default: all). They always run
    /// in the order instant, latency, idle, backlog, conversations.
    #[arg(
        long = "scenario",
        value_enum,
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub(crate) scenarios: Vec<ScenarioName>,
    /// Jobs in `instant` and `latency` (default: 50000 and 5000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) jobs: Option<u64>,
    /// Runs `instant` (as back-to-back pairs: null pipeline, then worker) and `latency`
    /// this many times, and checks the targets against the median. On a small machine
    /// shared with the broker one run can be 15 % off the next.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=20))]
    pub(crate) repeat: u8,
    /// Prefetch of the worker and the null pipeline in `instant` and `latency`.
    #[arg(long, default_value_t = 256, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) prefetch: u16,
    /// The stand-in's answer delay in `latency`, in ms.
    #[arg(long, default_value_t = 150, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) latency_ms: u64,
    /// Spread each delayed answer uniformly over the delay ± this many percent, as a
    /// real service's latency varies. 0: every answer takes exactly the delay, which
    /// makes the jobs move in lockstep waves (see the README's Performance section).
    #[arg(long, default_value_t = 0, value_name = "PCT", value_parser = clap::value_parser!(u8).range(0..=100))]
    pub(crate) jitter_pct: u8,
    /// How long `idle` watches a worker with nothing to do, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) idle_secs: u64,
    /// Jobs queued in the large `backlog` run (the small one has 200).
    #[arg(long, default_value_t = 200_000, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) backlog_jobs: u64,
    /// How long each `backlog` run lets the worker work, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) backlog_secs: u64,
    /// Per-user order in the worker (`order.enabled`), for every scenario but
    /// `conversations`, which runs both ways. Passed as JELOU_WORKER__ORDER__ENABLED.
    #[arg(long, default_value = "on", action = clap::ArgAction::Set, value_parser = parse_on_off, value_name = "on|off")]
    pub(crate) order: bool,
    /// Partitions with order on (`order.partitions`). Passed as
    /// JELOU_WORKER__ORDER__PARTITIONS.
    #[arg(long, default_value_t = 16, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) partitions: u16,
    /// The worker's `log.level` (`info` is the default of a deployed worker, and logs
    /// one line per finished job: compare both to see what logging costs).
    #[arg(long, default_value = "warn", value_name = "LEVEL")]
    pub(crate) log_level: String,
    /// Users in `conversations`, each sending `--messages-per-user` messages.
    #[arg(long, default_value_t = 50, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) users: u64,
    /// Messages per user in `conversations`.
    #[arg(long, default_value_t = 20, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) messages_per_user: u64,
    /// The stand-in's answer delay in `conversations`, in ms.
    #[arg(long, default_value_t = 20, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) conversation_latency_ms: u64,
    /// The broker; comma-separated URLs name the nodes of one cluster. Passed to the
    /// worker and the null pipeline as JELOU_WORKER__AMQP__URL.
    #[arg(
        long,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        value_name = "URL"
    )]
    pub(crate) amqp_url: String,
    /// Type of the jobs queue (and the worker's other queues).
    #[arg(long, default_value = "quorum", value_parser = parse_queue_type, value_name = "quorum|classic")]
    pub(crate) queue_type: QueueType,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "PATH")]
    pub(crate) json: Option<PathBuf>,
    /// The jelou-worker binary to measure (default: the one next to jelou-bench,
    /// rebuilt first when run through cargo).
    #[arg(long, value_name = "PATH")]
    pub(crate) worker_bin: Option<PathBuf>,
    /// Internal: be the null pipeline (configured by JELOU_WORKER__* variables).
    #[arg(long, hide = true)]
    pub(crate) null_pipeline: bool,
}

pub(crate) fn parse_queue_type(s: &str) -> Result<QueueType, String> {
    match s {
        "quorum" => Ok(QueueType::Quorum),
        "classic" => Ok(QueueType::Classic),
        other => Err(format!("`{other}`: expected quorum or classic")),
    }
}

pub(crate) fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("`{other}`: expected on or off")),
    }
}

/// What the bench can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ScenarioName {
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
    /// `--users` users sending `--messages-per-user` messages each, Jelou answering
    /// after `--conversation-latency-ms`: jobs/s and latency with order on, then the
    /// same with order off; with order on, the stand-in checks that each user's
    /// messages came one at a time and in order.
    Conversations,
}

impl Args {
    /// The scenarios to run, each once, in the order instant, latency, idle, backlog,
    /// conversations.
    pub(crate) fn scenarios(&self) -> Vec<ScenarioName> {
        let mut scenarios = if self.scenarios.is_empty() {
            vec![
                ScenarioName::Instant,
                ScenarioName::Latency,
                ScenarioName::Idle,
                ScenarioName::Backlog,
                ScenarioName::Conversations,
            ]
        } else {
            self.scenarios.clone()
        };
        scenarios.sort();
        scenarios.dedup();
        scenarios
    }
}
