//! The ledger: what was published, what Jelou received, what the result exchange and
//! the dead-letter queue got; and the checks on it.

use std::{
    collections::{BTreeMap, HashMap},
    time::Instant,
};

use serde::Serialize;

use crate::{
    collect::Outcome,
    faults::{Event, Kind},
    jelou::{Answer, Sent},
    load::{Expect, Published},
};

/// Everything the ledger is built from.
pub(crate) struct Inputs<'a> {
    pub(crate) t0: Instant,
    pub(crate) published: &'a [Published],
    pub(crate) sent: &'a [Sent],
    pub(crate) results: &'a [Outcome],
    pub(crate) dead: &'a HashMap<String, u32>,
    pub(crate) events: &'a [Event],
    pub(crate) prefetch: u16,
}

/// A later message of a conversation sent before an earlier one's last send.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Violation {
    pub(crate) earlier: String,
    pub(crate) later: String,
    pub(crate) earlier_published_s: f64,
    pub(crate) earlier_last_send_s: f64,
    pub(crate) later_first_send_s: f64,
    /// The crash (kill -9 or closed broker connection) that explains it, if any.
    pub(crate) crash: Option<String>,
    /// Every fault injected in that window (what to look at for an unexplained one).
    pub(crate) faults_meanwhile: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct Ledger {
    pub(crate) published: usize,
    pub(crate) expected_success: usize,
    pub(crate) expected_rejected: usize,
    pub(crate) expected_invalid: usize,
    pub(crate) requests_to_jelou: usize,
    pub(crate) results: usize,
    pub(crate) results_by_kind: BTreeMap<String, usize>,
    pub(crate) missing: Vec<String>,
    pub(crate) unexpected_outcome: Vec<String>,
    pub(crate) results_for_unknown_jobs: usize,
    /// Requests whose text names no published job (the ledger would not see them).
    pub(crate) requests_for_unknown_jobs: usize,
    pub(crate) jobs_with_two_results: usize,
    pub(crate) messages_received_twice: usize,
    /// Crashes (kill -9, closed connections) × prefetch: the most jobs in flight at them.
    pub(crate) duplicate_bound: usize,
    pub(crate) dead_letters: usize,
    pub(crate) failed_not_in_dlq: Vec<String>,
    pub(crate) failed_in_dlq_twice: usize,
    pub(crate) dlq_without_failure: Vec<String>,
    pub(crate) order_violations: Vec<Violation>,
    pub(crate) unexplained_violations: usize,
}

/// The crash moments: kill -9 and closed broker connections, in seconds since t0.
pub(crate) fn crash_moments(events: &[Event]) -> Vec<(f64, String)> {
    events
        .iter()
        .filter(|e| e.injected && matches!(e.kind, Kind::Kill9 | Kind::CloseConnection))
        .map(|e| {
            (
                e.at_s,
                format!("{:?} at {:.1} s ({})", e.kind, e.at_s, e.detail),
            )
        })
        .collect()
}

pub(crate) fn build(i: &Inputs) -> Ledger {
    let mut l = Ledger {
        published: i.published.len(),
        requests_to_jelou: i.sent.len(),
        results: i.results.len(),
        dead_letters: i.dead.values().map(|n| *n as usize).sum(),
        duplicate_bound: crash_moments(i.events).len() * usize::from(i.prefetch),
        ..Default::default()
    };
    for p in i.published {
        match p.expect {
            Expect::Success => l.expected_success += 1,
            Expect::Rejected => l.expected_rejected += 1,
            Expect::Invalid => l.expected_invalid += 1,
        }
    }
    outcomes(i, &mut l);
    dead_letters(i, &mut l);
    received_twice(i, &mut l);
    crate::order::check(i, &mut l);
    l
}

fn outcomes(i: &Inputs, l: &mut Ledger) {
    let mut by_job: HashMap<&str, Vec<&str>> = HashMap::new();
    for o in i.results {
        *l.results_by_kind.entry(o.kind.clone()).or_default() += 1;
        by_job
            .entry(o.job.as_str())
            .or_default()
            .push(o.kind.as_str());
    }
    let expected: HashMap<&str, Expect> = i
        .published
        .iter()
        .map(|p| (p.job.as_str(), p.expect))
        .collect();
    l.results_for_unknown_jobs = by_job.keys().filter(|j| !expected.contains_key(*j)).count();
    for p in i.published {
        let Some(kinds) = by_job.get(p.job.as_str()) else {
            l.missing.push(p.job.clone());
            continue;
        };
        if kinds.len() > 1 {
            l.jobs_with_two_results += 1;
        }
        let want = match p.expect {
            Expect::Success => "success",
            Expect::Rejected => "rejected",
            Expect::Invalid => "invalid_job",
        };
        if kinds.iter().any(|k| *k != want) {
            l.unexpected_outcome
                .push(format!("{}: {kinds:?}, expected {want}", p.job));
        }
    }
}

fn dead_letters(i: &Inputs, l: &mut Ledger) {
    let mut failed: HashMap<&str, ()> = HashMap::new();
    for o in i.results.iter().filter(|o| o.kind != "success") {
        failed.insert(o.job.as_str(), ());
    }
    for job in failed.keys() {
        match i.dead.get(*job) {
            None => l.failed_not_in_dlq.push(job.to_string()),
            Some(n) if *n > 1 => l.failed_in_dlq_twice += 1,
            Some(_) => {}
        }
    }
    for job in i.dead.keys() {
        if !failed.contains_key(job.as_str()) {
            l.dlq_without_failure.push(job.clone());
        }
    }
}

/// Messages Jelou took (accepted, or answered with its verdict) more than once.
fn received_twice(i: &Inputs, l: &mut Ledger) {
    let mut taken: HashMap<&str, u32> = HashMap::new();
    for s in i.sent.iter().filter(|s| s.answer != Answer::Failed) {
        *taken.entry(s.job.as_str()).or_default() += 1;
    }
    l.messages_received_twice = taken.values().filter(|n| **n > 1).count();
    let known: std::collections::HashSet<&str> =
        i.published.iter().map(|p| p.job.as_str()).collect();
    l.requests_for_unknown_jobs = i
        .sent
        .iter()
        .filter(|s| !known.contains(s.job.as_str()))
        .count();
}
