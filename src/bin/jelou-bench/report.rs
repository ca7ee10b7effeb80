//! The report: each run's figures and checks, the targets, and the whole invocation's
//! JSON.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::{
    amqp::Tally,
    args::{Args, ScenarioName},
    lean_jelou::Received,
    probes::{Memory, Sample},
    run::Bench,
    scenarios::{Mode, Pipeline, RunSpec},
    table::render_table,
};

/// The whole report: what `--json` writes and the last line of stdout.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// True when every run passed its checks.
    pub(crate) ok: bool,
    pub(crate) machine: Machine,
    pub(crate) options: Options,
    pub(crate) runs: Vec<RunReport>,
    pub(crate) targets: Vec<Target>,
    pub(crate) problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) clock_ticks_per_second: f64,
    /// Processes listening on the broker's loopback port(s), whose CPU time is the
    /// runs' `broker_cpu_share` (0: the broker is elsewhere, not measured).
    pub(crate) broker_processes_measured: usize,
}

#[derive(Debug, Serialize)]
pub(crate) struct Options {
    /// Passwords redacted.
    pub(crate) amqp_url: String,
    pub(crate) queue_type: &'static str,
    pub(crate) prefetch: u16,
    pub(crate) latency_ms: u64,
    pub(crate) jitter_pct: u8,
    /// Runs of `instant` and `latency`; the targets use the median.
    pub(crate) repeat: u8,
    /// `--order`: per-user order in the worker (all scenarios but `conversations`,
    /// which runs both ways).
    pub(crate) order: bool,
    pub(crate) partitions: u16,
    pub(crate) worker_bin: String,
}

/// One run's figures. Shares are of one CPU core over the window (1.0 = a full core).
#[derive(Debug, Serialize)]
pub(crate) struct RunReport {
    pub(crate) name: String,
    pub(crate) scenario: ScenarioName,
    /// `jelou-worker` or `null-pipeline`.
    pub(crate) pipeline: &'static str,
    pub(crate) jobs: u64,
    /// Distinct users the jobs came from.
    pub(crate) users: u64,
    /// Per-user order in the worker (meaningless for the null pipeline).
    pub(crate) order: bool,
    pub(crate) prefetch: u16,
    pub(crate) jelou_latency_ms: u64,
    /// The stand-in's delay varied by ± this many percent.
    pub(crate) jelou_jitter_pct: u8,
    pub(crate) prefill_jobs_per_sec: Option<f64>,
    /// From spawning the child to its consumer appearing on the queue.
    pub(crate) startup_ms: f64,
    /// From the consume start to the last result (drains) or the end of the watch.
    pub(crate) window_secs: f64,
    pub(crate) jobs_done_in_window: u64,
    /// Only while the queue never ran dry.
    pub(crate) jobs_per_sec: Option<f64>,
    pub(crate) vs_null_pipeline: Option<f64>,
    /// prefetch / Jelou's latency.
    pub(crate) bound_jobs_per_sec: Option<f64>,
    pub(crate) vs_bound: Option<f64>,
    pub(crate) first_result_ms: Option<f64>,
    pub(crate) latency_p50_ms: Option<f64>,
    pub(crate) latency_p99_ms: Option<f64>,
    pub(crate) latency_max_ms: Option<f64>,
    /// The child's utime + stime over the window.
    pub(crate) cpu_seconds: f64,
    pub(crate) cpu_seconds_per_1000_jobs: Option<f64>,
    pub(crate) cpu_share_of_a_core: f64,
    pub(crate) peak_rss_mib: Option<f64>,
    pub(crate) rss_mib: Option<f64>,
    pub(crate) stand_in_cpu_share: f64,
    pub(crate) bench_cpu_share: f64,
    pub(crate) broker_cpu_share: Option<f64>,
    /// Fraction of all the machine's CPUs in use over the window.
    pub(crate) machine_busy: Option<f64>,
    pub(crate) results: ResultCheck,
    /// What the stand-in saw of each user's messages (`conversations`).
    pub(crate) order_check: Option<OrderCheck>,
    pub(crate) problems: Vec<String>,
}

/// Each user's messages as the stand-in Jelou received them.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub(crate) struct OrderCheck {
    /// Messages received.
    pub(crate) messages: u64,
    pub(crate) users: u64,
    /// Messages that arrived after a later message of the same user.
    pub(crate) out_of_order: u64,
    /// Messages that arrived while another of the same user was still unanswered.
    pub(crate) overlapping: u64,
}

impl OrderCheck {
    /// Walks the arrivals and answers in the order they happened.
    pub(crate) fn of(received: &[Received]) -> Self {
        use std::collections::HashMap;
        #[derive(Default)]
        struct User {
            last_seq: Option<u64>,
            in_flight: u64,
        }
        let mut users: HashMap<&str, User> = HashMap::new();
        let mut check = OrderCheck {
            messages: 0,
            users: 0,
            out_of_order: 0,
            overlapping: 0,
        };
        for r in received {
            let user = users.entry(r.user.as_str()).or_default();
            if r.answered {
                user.in_flight = user.in_flight.saturating_sub(1);
                continue;
            }
            check.messages += 1;
            if user.in_flight > 0 {
                check.overlapping += 1;
            }
            user.in_flight += 1;
            if let Some(seq) = r.seq {
                if user.last_seq.is_some_and(|last| seq < last) {
                    check.out_of_order += 1;
                }
                user.last_seq = Some(user.last_seq.map_or(seq, |last| last.max(seq)));
            }
        }
        check.users = users.len() as u64;
        check
    }

    /// Order on promises neither.
    fn problem(&self) -> Option<String> {
        (self.out_of_order > 0 || self.overlapping > 0).then(|| {
            format!(
                "per-user order broken with order on: {} messages out of order, {} sent while \
                 the same user's previous one was unanswered",
                self.out_of_order, self.overlapping
            )
        })
    }
}

impl RunReport {
    /// One line for the progress log, printed as each run ends.
    pub(crate) fn summary(&self) -> String {
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
pub(crate) struct ResultCheck {
    pub(crate) expected: u64,
    /// Messages the stand-in Jelou received (one per job for the worker, none for the
    /// null pipeline).
    pub(crate) jelou_requests: u64,
    /// Jobs with a result.
    pub(crate) done: u64,
    /// Jobs still in the queue after the child stopped (a watched run stops early).
    pub(crate) left_in_queue: u64,
    pub(crate) duplicates: u64,
    pub(crate) failures: u64,
    pub(crate) strays: u64,
    /// Drains: every job has exactly one result and none is left. Watched runs: every
    /// job has exactly one result or is still in the queue.
    pub(crate) exactly_one_result_each: bool,
}

/// One of issue 5's targets, checked against this invocation's figures.
#[derive(Debug, Serialize)]
pub(crate) struct Target {
    pub(crate) what: &'static str,
    pub(crate) value: f64,
    pub(crate) limit: f64,
    /// `>=` or `<=`.
    pub(crate) op: &'static str,
    pub(crate) met: bool,
}

/// What a run measured, before it is turned into a report.
pub(crate) struct Measured {
    pub(crate) start: Sample,
    pub(crate) end: Sample,
    pub(crate) memory: Memory,
    pub(crate) startup_ms: f64,
    pub(crate) prefill_rate: Option<f64>,
    pub(crate) left: u64,
    /// Messages the stand-in Jelou answered while the child ran.
    pub(crate) jelou_requests: u64,
    /// What the stand-in noted, when the run checks per-user order.
    pub(crate) received: Option<Vec<Received>>,
    pub(crate) tally: Tally,
    pub(crate) problems: Vec<String>,
}

/// Each `instant` run against the null pipeline run just before it.
pub(crate) fn compare_with_null_pipeline(runs: &mut [RunReport]) {
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
}

impl Report {
    /// The report of every run, with the targets checked and the problems gathered.
    pub(crate) fn new(args: &Args, bench: &Bench, runs: Vec<RunReport>) -> Self {
        let targets = targets(&runs);
        let problems: Vec<String> = runs
            .iter()
            .flat_map(|r| r.problems.iter().map(move |p| format!("{}: {p}", r.name)))
            .collect();
        Report {
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
                order: args.order,
                partitions: args.partitions,
                worker_bin: bench.worker_bin.display().to_string(),
            },
            ok: problems.is_empty(),
            runs,
            targets,
            problems,
        }
    }

    /// Prints the table and the JSON line to stdout, and writes the JSON to `json_file`
    /// if one was named.
    pub(crate) fn publish(&self, json_file: Option<&Path>) -> anyhow::Result<()> {
        println!("{}", render_table(self));
        let json = serde_json::to_string(self).context("serialising the report")?;
        if let Some(path) = json_file {
            let pretty = serde_json::to_string_pretty(self).context("serialising the report")?;
            std::fs::write(path, pretty + "\n")
                .with_context(|| format!("writing the JSON report to {}", path.display()))?;
        }
        println!("{json}");
        Ok(())
    }
}

impl RunReport {
    /// Turns what a run measured into its figures and checks.
    pub(crate) fn new(spec: &RunSpec, m: Measured) -> Self {
        let Measured {
            start,
            end,
            memory,
            startup_ms,
            prefill_rate,
            left,
            jelou_requests,
            received,
            tally,
            mut problems,
        } = m;
        let order_check = received.as_deref().map(OrderCheck::of);
        if spec.order && spec.pipeline == Pipeline::Worker {
            problems.extend(order_check.as_ref().and_then(OrderCheck::problem));
        }
        let window = Window::of(spec, &start, &end, &tally);
        let results = check_results(spec, &tally, left, jelou_requests, &mut problems);
        let bound = spec.bound();
        let stand_in_cpu_share = window.share(start.stand_in_cpu, end.stand_in_cpu);
        problems.extend(stand_in_problem(stand_in_cpu_share));
        let cpu_seconds = (end.child_cpu - start.child_cpu).max(0.0);
        let done = window.done;
        RunReport {
            name: spec.name.clone(),
            scenario: spec.scenario,
            pipeline: spec.pipeline.name(),
            jobs: spec.jobs,
            users: spec.users,
            order: spec.order,
            prefetch: spec.prefetch,
            jelou_latency_ms: spec.latency.as_millis() as u64,
            jelou_jitter_pct: if spec.latency.is_zero() {
                0
            } else {
                spec.jitter_pct
            },
            prefill_jobs_per_sec: prefill_rate,
            startup_ms,
            window_secs: window.secs,
            jobs_done_in_window: done,
            jobs_per_sec: window.jobs_per_sec,
            vs_null_pipeline: None,
            bound_jobs_per_sec: bound,
            vs_bound: window.jobs_per_sec.zip(bound).map(|(a, b)| a / b),
            first_result_ms: window.first_result_ms,
            latency_p50_ms: percentile(&window.latencies, 50.0).map(ms),
            latency_p99_ms: percentile(&window.latencies, 99.0).map(ms),
            latency_max_ms: window.latencies.last().copied().map(ms),
            cpu_seconds,
            cpu_seconds_per_1000_jobs: (done > 0).then(|| cpu_seconds / done as f64 * 1000.0),
            cpu_share_of_a_core: window.share(start.child_cpu, end.child_cpu),
            peak_rss_mib: memory.peak_kib.map(|k| k as f64 / 1024.0),
            rss_mib: memory.current_kib.map(|k| k as f64 / 1024.0),
            stand_in_cpu_share,
            bench_cpu_share: window.share(start.bench_cpu, end.bench_cpu),
            broker_cpu_share: start
                .broker_cpu
                .zip(end.broker_cpu)
                .map(|(a, b)| window.share(a, b)),
            machine_busy: machine_busy(&start, &end),
            results,
            order_check,
            problems,
        }
    }
}

/// A stand-in that kept its thread busy may be the limit, not the worker.
fn stand_in_problem(share: f64) -> Option<String> {
    (share > 0.85).then(|| {
        format!(
            "the stand-in Jelou used {:.0} % of its thread: it may be the limit, not the worker",
            share * 100.0
        )
    })
}

/// Microseconds as milliseconds.
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Fraction of all the machine's CPUs in use between two samples.
fn machine_busy(start: &Sample, end: &Sample) -> Option<f64> {
    start
        .machine
        .zip(end.machine)
        .and_then(|((busy0, total0), (busy1, total1))| {
            (total1 > total0).then(|| (busy1 - busy0) as f64 / (total1 - total0) as f64)
        })
}

/// The results that came within a run's window, and what they say about speed.
struct Window {
    /// Jobs whose first result came in the window.
    done: u64,
    /// From the consume start to the last result (drains) or the end of the watch.
    secs: f64,
    /// From the first sample to the last: what CPU shares are of.
    wall_secs: f64,
    jobs_per_sec: Option<f64>,
    /// Each job's latency in µs, sorted.
    latencies: Vec<u64>,
    first_result_ms: Option<f64>,
}

impl Window {
    fn of(spec: &RunSpec, start: &Sample, end: &Sample, tally: &Tally) -> Self {
        let in_window: Vec<&(u64, u64)> = tally
            .times
            .iter()
            .filter(|(_, received)| *received <= end.at_us)
            .collect();
        let done = in_window.len() as u64;
        let last_us = in_window.iter().map(|(_, r)| *r).max();
        let window_end = match spec.mode {
            Mode::Drain => last_us.unwrap_or(end.at_us),
            Mode::Watch(_) => end.at_us,
        };
        let secs = window_end.saturating_sub(start.at_us) as f64 / 1e6;
        // Throughput means something while the queue was never empty: always for a
        // drain, and for a watched run only when jobs were still waiting at its end.
        let saturated = match spec.mode {
            Mode::Drain => done == spec.jobs && spec.jobs > 0,
            Mode::Watch(_) => done > 0 && done < spec.jobs,
        };
        let mut latencies: Vec<u64> = in_window
            .iter()
            .map(|(enqueued, received)| received.saturating_sub((*enqueued).max(start.at_us)))
            .collect();
        latencies.sort_unstable();
        Self {
            done,
            secs,
            wall_secs: end.at_us.saturating_sub(start.at_us) as f64 / 1e6,
            jobs_per_sec: (saturated && secs > 0.0).then(|| done as f64 / secs),
            latencies,
            first_result_ms: in_window
                .iter()
                .map(|(_, r)| *r)
                .min()
                .map(|r| ms(r.saturating_sub(start.at_us))),
        }
    }

    /// Share of one core between two readings of CPU seconds, over the window.
    fn share(&self, a: f64, b: f64) -> f64 {
        if self.wall_secs > 0.0 {
            (b - a).max(0.0) / self.wall_secs
        } else {
            0.0
        }
    }
}

/// Did every job get exactly one result, and Jelou one message per job? What is
/// wrong goes to `problems`.
fn check_results(
    spec: &RunSpec,
    tally: &Tally,
    left: u64,
    jelou_requests: u64,
    problems: &mut Vec<String>,
) -> ResultCheck {
    let exactly_one_result_each = tally.duplicates == 0
        && tally.strays == 0
        && match spec.mode {
            Mode::Drain => tally.unique == spec.jobs && left == 0,
            Mode::Watch(_) => tally.unique + left == spec.jobs,
        };
    problems.extend(tally_problems(tally));
    if !exactly_one_result_each && tally.duplicates == 0 && tally.strays == 0 {
        problems.push(missing_results(spec, tally, left));
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
    ResultCheck {
        expected: spec.jobs,
        jelou_requests,
        done: tally.unique,
        left_in_queue: left,
        duplicates: tally.duplicates,
        failures: tally.failures,
        strays: tally.strays,
        exactly_one_result_each,
    }
}

/// Duplicates, strays and failures among the results.
fn tally_problems(tally: &Tally) -> Vec<String> {
    let mut problems = Vec::new();
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
    problems
}

/// Why the results and the jobs left in the queue do not add up to the run's jobs.
fn missing_results(spec: &RunSpec, tally: &Tally, left: u64) -> String {
    match spec.mode {
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
    }
}

/// Issue 5's targets, checked against the median of each figure over its runs.
fn targets(runs: &[RunReport]) -> Vec<Target> {
    [
        Target::check(
            "instant jobs/s ÷ null pipeline jobs/s",
            median(runs, "instant", |r| r.vs_null_pipeline),
            ">=",
            0.85,
        ),
        Target::check(
            "latency jobs/s ÷ (prefetch / latency)",
            median(runs, "latency", |r| r.vs_bound),
            ">=",
            0.95,
        ),
        Target::check(
            "instant worker CPU, ms per job",
            median(runs, "instant", |r| r.cpu_seconds_per_1000_jobs),
            "<=",
            0.08,
        ),
        Target::check(
            "instant peak RSS, MiB",
            median(runs, "instant", |r| r.peak_rss_mib),
            "<=",
            32.0,
        ),
        Target::check(
            "idle peak RSS, MiB",
            median(runs, "idle", |r| r.peak_rss_mib),
            "<=",
            16.0,
        ),
    ]
    .into_iter()
    .flatten()
    .collect()
}

impl Target {
    /// The target `value op limit`, when there is a value to check.
    fn check(what: &'static str, value: Option<f64>, op: &'static str, limit: f64) -> Option<Self> {
        let value = value?;
        let met = if op == ">=" {
            value >= limit
        } else {
            value <= limit
        };
        Some(Target {
            what,
            value,
            limit,
            op,
            met,
        })
    }
}

/// The median of a figure over the runs of one name (`name`, `name.2`, ...).
fn median(runs: &[RunReport], name: &str, figure: fn(&RunReport) -> Option<f64>) -> Option<f64> {
    let repeated = format!("{name}.");
    let mut values: Vec<f64> = runs
        .iter()
        .filter(|r| r.name == name || r.name.starts_with(&repeated))
        .filter_map(figure)
        .collect();
    values.sort_by(f64::total_cmp);
    median_of(&values)
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

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::{OrderCheck, median_of};
    use crate::lean_jelou::Received;

    fn arrived(user: &str, seq: u64) -> Received {
        Received {
            user: user.into(),
            seq: Some(seq),
            answered: false,
        }
    }

    fn answered(user: &str, seq: u64) -> Received {
        Received {
            answered: true,
            ..arrived(user, seq)
        }
    }

    #[test]
    fn the_order_check_counts_late_and_overlapping_messages_per_user() {
        let in_order = [
            arrived("a", 0),
            arrived("b", 1),
            answered("a", 0),
            arrived("a", 2),
            answered("b", 1),
            answered("a", 2),
        ];
        let check = OrderCheck::of(&in_order);
        assert_eq!((check.messages, check.users), (3, 2));
        assert_eq!((check.out_of_order, check.overlapping), (0, 0));
        assert_eq!(check.problem(), None);

        let broken = [
            arrived("a", 2),
            arrived("a", 0),
            answered("a", 2),
            answered("a", 0),
            arrived("a", 4),
        ];
        let check = OrderCheck::of(&broken);
        assert_eq!((check.out_of_order, check.overlapping), (1, 1));
        assert!(check.problem().is_some());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median_of(&[]), None);
        assert_eq!(median_of(&[0.7]), Some(0.7));
        assert_eq!(median_of(&[0.7, 0.8, 0.9]), Some(0.8));
        assert_eq!(median_of(&[0.5, 0.75, 1.0, 2.0]), Some(0.875));
    }
}
