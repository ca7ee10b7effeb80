//! The scenarios, and the runs (one child process each) they are made of.

use std::time::Duration;

use crate::args::{Args, ScenarioName};

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

/// The runs a scenario is made of.
pub(crate) fn specs_for(scenario: ScenarioName, args: &Args) -> Vec<RunSpec> {
    match scenario {
        ScenarioName::Instant => instant(args),
        ScenarioName::Latency => latency(args),
        ScenarioName::Idle => vec![RunSpec {
            mode: Mode::Watch(Duration::from_secs(args.idle_secs)),
            ..RunSpec::worker("idle".into(), scenario, 0, args)
        }],
        ScenarioName::Backlog => backlog(args),
        ScenarioName::Conversations => conversations(args),
    }
}

/// Back-to-back pairs: the null pipeline, then the worker, `--repeat` times.
fn instant(args: &Args) -> Vec<RunSpec> {
    let jobs = args.jobs.unwrap_or(INSTANT_JOBS);
    (1..=args.repeat)
        .flat_map(|n| {
            [
                (numbered("null-pipeline", n), Pipeline::Null),
                (numbered("instant", n), Pipeline::Worker),
            ]
        })
        .map(|(name, pipeline)| RunSpec {
            pipeline,
            ..RunSpec::worker(name, ScenarioName::Instant, jobs, args)
        })
        .collect()
}

/// The worker with Jelou answering after `--latency-ms`, `--repeat` times.
fn latency(args: &Args) -> Vec<RunSpec> {
    (1..=args.repeat)
        .map(|n| RunSpec {
            latency: Duration::from_millis(args.latency_ms),
            ..RunSpec::worker(
                numbered("latency", n),
                ScenarioName::Latency,
                args.jobs.unwrap_or(LATENCY_JOBS),
                args,
            )
        })
        .collect()
}

/// A small and a large backlog, each watched for `--backlog-secs`.
fn backlog(args: &Args) -> Vec<RunSpec> {
    let mut sizes = vec![SMALL_BACKLOG.min(args.backlog_jobs), args.backlog_jobs];
    sizes.dedup();
    sizes
        .into_iter()
        .map(|jobs| RunSpec {
            prefetch: BACKLOG_PREFETCH,
            latency: BACKLOG_LATENCY,
            mode: Mode::Watch(Duration::from_secs(args.backlog_secs)),
            ..RunSpec::worker(format!("backlog-{jobs}"), ScenarioName::Backlog, jobs, args)
        })
        .collect()
}

/// Many messages per user, with order on and then off, `--repeat` times. The jobs
/// are queued round-robin over the users (message k of every user, then message k+1),
/// as conversations interleave.
fn conversations(args: &Args) -> Vec<RunSpec> {
    let jobs = args.users * args.messages_per_user;
    (1..=args.repeat)
        .flat_map(|n| {
            [
                (numbered("conv-order-on", n), true),
                (numbered("conv-order-off", n), false),
            ]
        })
        .map(|(name, order)| RunSpec {
            latency: Duration::from_millis(args.conversation_latency_ms),
            users: args.users,
            order,
            check_order: true,
            ..RunSpec::worker(name, ScenarioName::Conversations, jobs, args)
        })
        .collect()
}

/// With --repeat, the second and later runs are named `<name>.<n>`.
fn numbered(name: &str, n: u8) -> String {
    if n == 1 {
        name.to_string()
    } else {
        format!("{name}.{n}")
    }
}

/// Which program consumes the jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pipeline {
    /// `jelou-worker run`, the program under test.
    Worker,
    /// `jelou-bench --null-pipeline`, the ceiling.
    Null,
}

impl Pipeline {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Pipeline::Worker => "jelou-worker",
            Pipeline::Null => "null-pipeline",
        }
    }
}

/// How long a run lasts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Mode {
    /// Until every job has its result.
    Drain,
    /// This long after the child starts consuming, whatever is left in the queue.
    Watch(Duration),
}

/// One child process's run.
pub(crate) struct RunSpec {
    pub(crate) name: String,
    pub(crate) scenario: ScenarioName,
    pub(crate) pipeline: Pipeline,
    pub(crate) jobs: u64,
    pub(crate) prefetch: u16,
    /// The stand-in's answer delay (its mean, with jitter).
    pub(crate) latency: Duration,
    /// Spread of the delay, ± percent.
    pub(crate) jitter_pct: u8,
    pub(crate) mode: Mode,
    /// Distinct users the jobs come from: job `seq` is user `seq % users`'s.
    pub(crate) users: u64,
    /// Per-user order in the worker (`order.enabled`).
    pub(crate) order: bool,
    /// Record what the stand-in receives, to check each user's messages came one at a
    /// time and in order.
    pub(crate) check_order: bool,
}

impl RunSpec {
    pub(crate) fn describe(&self) -> String {
        let length = match self.mode {
            Mode::Drain => "until every job has its result".to_string(),
            Mode::Watch(d) => format!("for {} s", d.as_secs()),
        };
        let jitter = if self.jitter_pct > 0 && !self.latency.is_zero() {
            format!(" ± {} %", self.jitter_pct)
        } else {
            String::new()
        };
        let order = match (self.pipeline, self.order) {
            (Pipeline::Null, _) => "",
            (Pipeline::Worker, true) => ", order on",
            (Pipeline::Worker, false) => ", order off",
        };
        let jobs = match self.jobs {
            0 => "no jobs".to_string(),
            n => format!("{n} jobs of {} users", self.users),
        };
        format!(
            "{jobs}, {}{order}, prefetch {}, Jelou answering after {} ms{jitter}, {length}",
            self.pipeline.name(),
            self.prefetch,
            self.latency.as_millis()
        )
    }

    /// The most a consumer can do with `prefetch` jobs in flight that each take
    /// `latency`: prefetch / latency; with order on, at most one job per user is in
    /// flight, so min(prefetch, users) / latency.
    pub(crate) fn bound(&self) -> Option<f64> {
        let in_flight = if self.order && self.pipeline == Pipeline::Worker {
            u64::from(self.prefetch).min(self.users)
        } else {
            u64::from(self.prefetch)
        };
        (!self.latency.is_zero()).then(|| in_flight as f64 / self.latency.as_secs_f64())
    }
}

impl RunSpec {
    /// A run of the worker: `jobs` jobs each from a user of its own, `--prefetch`,
    /// `--order`, Jelou answering at once (with `--jitter-pct` should a delay be set),
    /// until every job has its result.
    fn worker(name: String, scenario: ScenarioName, jobs: u64, args: &Args) -> Self {
        RunSpec {
            name,
            scenario,
            pipeline: Pipeline::Worker,
            jobs,
            prefetch: args.prefetch,
            latency: Duration::ZERO,
            jitter_pct: args.jitter_pct,
            mode: Mode::Drain,
            users: jobs.max(1),
            order: args.order,
            check_order: false,
        }
    }
}
