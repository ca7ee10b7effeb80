//! The command line.

use std::path::PathBuf;

use clap::Parser;
use jelou_worker::config::QueueType;

use crate::faults::{ALL, Kind};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "jelou-chaos",
    version,
    about = "Runs a fleet of jelou-worker processes under faults (kill -9, SIGTERM, dropped \
             broker connections, a failing Jelou) and checks that no job was lost",
    after_help = "Needs RabbitMQ (guest/guest on 127.0.0.1:5672 unless --amqp-url). \
                  Exit status: 0 every check held, 1 a check failed, 2 the run could not start."
)]
pub(crate) struct Args {
    /// How long faults are injected, in seconds (then the fleet drains).
    #[arg(long, default_value_t = 300, value_name = "SECS", value_parser = clap::value_parser!(u64).range(10..))]
    pub(crate) duration: u64,
    /// Seed of the fault schedule and of the jobs (default: random, printed).
    #[arg(long, value_name = "N")]
    pub(crate) seed: Option<u64>,
    /// Workers in the fleet.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16))]
    pub(crate) workers: u16,
    /// Jobs published per second.
    #[arg(long, default_value_t = 40, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=2000))]
    pub(crate) rate: u32,
    /// Mean seconds between two injected faults.
    #[arg(long, default_value_t = 10, value_name = "SECS", value_parser = clap::value_parser!(u64).range(2..))]
    pub(crate) every: u64,
    /// The faults to inject (repeatable or comma-separated; default: all).
    #[arg(
        long = "faults",
        value_enum,
        value_delimiter = ',',
        value_name = "KIND"
    )]
    pub(crate) faults: Vec<Kind>,
    /// The broker; comma-separated URLs name the nodes of one cluster.
    #[arg(
        long,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        value_name = "URL"
    )]
    pub(crate) amqp_url: String,
    /// `amqp.queue_type` of the fleet's queues: `quorum` (the default, as in
    /// production) or `classic`.
    #[arg(long, default_value = "quorum", value_parser = parse_queue_type, value_name = "quorum|classic")]
    pub(crate) queue_type: QueueType,
    /// How long the fleet may take to finish every job once faults stop, in seconds.
    #[arg(long, default_value_t = 240, value_name = "SECS")]
    pub(crate) drain_timeout: u64,
    /// A surviving worker's RSS at the end may exceed its RSS after warm-up by this much.
    #[arg(long, default_value_t = 8, value_name = "MIB")]
    pub(crate) rss_slack_mib: u64,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "PATH")]
    pub(crate) json: Option<PathBuf>,
    /// The jelou-worker binary (default: the one next to jelou-chaos).
    #[arg(long, value_name = "PATH")]
    pub(crate) worker_bin: Option<PathBuf>,
    /// Keep the workers' logs (in the temporary directory) even when every check held.
    #[arg(long)]
    pub(crate) keep_logs: bool,
}

impl Args {
    /// The kinds of fault to inject.
    pub(crate) fn kinds(&self) -> Vec<Kind> {
        if self.faults.is_empty() {
            ALL.to_vec()
        } else {
            self.faults.clone()
        }
    }
}

fn parse_queue_type(s: &str) -> Result<QueueType, String> {
    match s {
        "quorum" => Ok(QueueType::Quorum),
        "classic" => Ok(QueueType::Classic),
        other => Err(format!("`{other}` is not quorum or classic")),
    }
}
