//! The verdict, the table and the JSON.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{args::Args, faults::Event, fleet::WorkerReport, ledger::Ledger};

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) seed: u64,
    pub(crate) duration_s: u64,
    pub(crate) workers: u16,
    pub(crate) rate: u32,
    pub(crate) injected: BTreeMap<String, usize>,
    pub(crate) not_injected: Vec<String>,
    pub(crate) events: Vec<Event>,
    pub(crate) worker_processes: Vec<WorkerReport>,
    pub(crate) ledger: Ledger,
    pub(crate) leftovers: BTreeMap<String, u32>,
    pub(crate) drained_in_s: Option<f64>,
    pub(crate) failures: Vec<String>,
    pub(crate) verdict: &'static str,
}

/// Faults the command does not inject, and why.
const NOT_INJECTED: [&str; 2] = [
    "connection resets: the stand-in Jelou (axum) cannot reset a connection",
    "cluster node stop/restart: not implemented yet (run on one node)",
];

impl Report {
    pub(crate) fn new(
        args: &Args,
        seed: u64,
        events: Vec<Event>,
        worker_processes: Vec<WorkerReport>,
        ledger: Ledger,
        leftovers: BTreeMap<String, u32>,
        drained_in_s: Option<f64>,
    ) -> Self {
        let mut injected = BTreeMap::new();
        for e in events.iter().filter(|e| e.injected) {
            *injected.entry(format!("{:?}", e.kind)).or_insert(0) += 1;
        }
        let mut report = Self {
            seed,
            duration_s: args.duration,
            workers: args.workers,
            rate: args.rate,
            injected,
            not_injected: NOT_INJECTED.iter().map(|s| s.to_string()).collect(),
            events,
            worker_processes,
            ledger,
            leftovers,
            drained_in_s,
            failures: Vec::new(),
            verdict: "pass",
        };
        report.failures = report.check(args.rss_slack_mib * 1024);
        if !report.failures.is_empty() {
            report.verdict = "fail";
        }
        report
    }

    fn check(&self, slack_kib: u64) -> Vec<String> {
        let l = &self.ledger;
        let mut f = Vec::new();
        let mut fail = |bad: bool, what: String| {
            if bad {
                f.push(what)
            }
        };
        fail(
            self.drained_in_s.is_none(),
            "the fleet did not drain in time (a hang?)".into(),
        );
        fail(
            !l.missing.is_empty(),
            format!(
                "{} job(s) lost (no result): {:?}",
                l.missing.len(),
                first(&l.missing)
            ),
        );
        fail(
            !l.unexpected_outcome.is_empty(),
            format!(
                "{} unexpected outcome(s): {:?}",
                l.unexpected_outcome.len(),
                first(&l.unexpected_outcome)
            ),
        );
        fail(
            l.results_for_unknown_jobs > 0,
            format!(
                "{} result(s) for jobs never published",
                l.results_for_unknown_jobs
            ),
        );
        fail(
            l.jobs_with_two_results > l.duplicate_bound,
            format!(
                "{} jobs with two results > bound {}",
                l.jobs_with_two_results, l.duplicate_bound
            ),
        );
        fail(
            l.messages_received_twice > l.duplicate_bound,
            format!(
                "{} messages received twice > bound {}",
                l.messages_received_twice, l.duplicate_bound
            ),
        );
        fail(
            !l.failed_not_in_dlq.is_empty(),
            format!(
                "failed jobs missing from the DLQ: {:?}",
                first(&l.failed_not_in_dlq)
            ),
        );
        fail(
            !l.dlq_without_failure.is_empty(),
            format!(
                "DLQ jobs without a failure result: {:?}",
                first(&l.dlq_without_failure)
            ),
        );
        fail(
            l.failed_in_dlq_twice > l.duplicate_bound,
            format!(
                "{} failed jobs twice in the DLQ > bound",
                l.failed_in_dlq_twice
            ),
        );
        fail(
            l.unexplained_violations > 0,
            format!(
                "{} order violation(s) not explained by a crash",
                l.unexplained_violations
            ),
        );
        fail(
            !self.leftovers.is_empty(),
            format!("queues not empty at the end: {:?}", self.leftovers),
        );
        for w in &self.worker_processes {
            fail(
                w.failed(),
                format!("worker pid {}: {} (log {})", w.pid, w.fate, w.log),
            );
            if let (Some(warm), Some(end)) = (w.rss_warm_kib, w.rss_end_kib) {
                fail(
                    end > warm + slack_kib,
                    format!(
                        "worker pid {}: RSS {warm} KiB after warm-up, {end} KiB at the end",
                        w.pid
                    ),
                );
            }
        }
        f
    }

    pub(crate) fn print(&self) {
        let l = &self.ledger;
        println!(
            "\njelou-chaos: seed {}, {} s of faults, {} workers, {} jobs/s",
            self.seed, self.duration_s, self.workers, self.rate
        );
        println!("\n{:<28} {:>8}", "injected", "count");
        for (kind, n) in &self.injected {
            println!("{kind:<28} {n:>8}");
        }
        for n in &self.not_injected {
            println!("not injected: {n}");
        }
        let rows: [(&str, String); 14] = [
            ("jobs published", l.published.to_string()),
            (
                "  to succeed/reject/invalid",
                format!(
                    "{}/{}/{}",
                    l.expected_success, l.expected_rejected, l.expected_invalid
                ),
            ),
            ("requests to Jelou", l.requests_to_jelou.to_string()),
            ("results", format!("{} {:?}", l.results, l.results_by_kind)),
            ("lost (no result)", l.missing.len().to_string()),
            (
                "unexpected outcomes",
                l.unexpected_outcome.len().to_string(),
            ),
            (
                "jobs with two results",
                format!("{} (bound {})", l.jobs_with_two_results, l.duplicate_bound),
            ),
            (
                "received twice by Jelou",
                format!(
                    "{} (bound {})",
                    l.messages_received_twice, l.duplicate_bound
                ),
            ),
            (
                "dead letters",
                format!(
                    "{} (missing {}, twice {})",
                    l.dead_letters,
                    l.failed_not_in_dlq.len(),
                    l.failed_in_dlq_twice
                ),
            ),
            (
                "order violations",
                format!(
                    "{} ({} unexplained)",
                    l.order_violations.len(),
                    l.unexplained_violations
                ),
            ),
            ("worker processes", self.worker_processes.len().to_string()),
            (
                "max RSS growth (KiB)",
                self.max_rss_growth().map_or("-".into(), |g| g.to_string()),
            ),
            (
                "left in queues",
                self.leftovers.values().sum::<u32>().to_string(),
            ),
            (
                "drained in (s)",
                self.drained_in_s.map_or("no".into(), |s| format!("{s:.1}")),
            ),
        ];
        println!("\n{:<28} value", "ledger");
        for (k, v) in rows {
            println!("{k:<28} {v}");
        }
        for failure in &self.failures {
            println!("FAIL: {failure}");
        }
        println!("\nverdict: {}", self.verdict);
    }

    fn max_rss_growth(&self) -> Option<i64> {
        self.worker_processes
            .iter()
            .filter_map(|w| Some(w.rss_end_kib? as i64 - w.rss_warm_kib? as i64))
            .max()
    }
}

fn first(v: &[String]) -> &[String] {
    &v[..v.len().min(10)]
}
