//! The faults: which, when (from the seed), and how each is injected.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{
    fleet::Fleet,
    jelou::{ChaosJelou, Trouble},
};

/// What can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    Kill9,
    Sigterm,
    CloseConnection,
    Jelou5xxBurst,
    Jelou429OneBot,
    JelouTimeouts,
    JelouOutage30s,
}

pub(crate) const ALL: [Kind; 7] = [
    Kind::Kill9,
    Kind::Sigterm,
    Kind::CloseConnection,
    Kind::Jelou5xxBurst,
    Kind::Jelou429OneBot,
    Kind::JelouTimeouts,
    Kind::JelouOutage30s,
];

impl Kind {
    /// How long a Jelou trouble lasts; None for a fault of the fleet.
    fn lasts(self) -> Option<Duration> {
        match self {
            Kind::Jelou5xxBurst => Some(Duration::from_secs(5)),
            Kind::Jelou429OneBot => Some(Duration::from_secs(10)),
            Kind::JelouTimeouts => Some(Duration::from_secs(8)),
            Kind::JelouOutage30s => Some(Duration::from_secs(30)),
            _ => None,
        }
    }
}

/// One injected fault.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Event {
    pub(crate) at_s: f64,
    pub(crate) kind: Kind,
    /// The worker (pid) or the bot it hit, or why it was skipped.
    pub(crate) detail: String,
    /// False when it could not be injected (see `detail`).
    pub(crate) injected: bool,
}

/// The seeded schedule: when the next fault comes and which.
pub(crate) struct Schedule {
    rng: fastrand::Rng,
    every: Duration,
    /// The kinds to inject.
    kinds: Vec<Kind>,
    /// Every kind once, in a seeded order, before the random picks.
    first: Vec<Kind>,
    pub(crate) next_at: Instant,
    /// While a Jelou trouble lasts: when it ends.
    pub(crate) trouble_until: Option<Instant>,
    outages: u32,
}

impl Schedule {
    pub(crate) fn new(seed: u64, every: Duration, start: Instant, kinds: Vec<Kind>) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut first = kinds.clone();
        rng.shuffle(&mut first);
        first.reverse();
        let next_at = start + every;
        Self {
            rng,
            every,
            kinds,
            first,
            next_at,
            trouble_until: None,
            outages: 0,
        }
    }

    /// The next fault to inject; moves `next_at` on.
    pub(crate) fn pick(&mut self, elapsed: Duration) -> Option<Kind> {
        let ms = self.every.as_millis() as u64;
        self.next_at += Duration::from_millis(self.rng.u64(ms / 2..=ms * 3 / 2));
        let kind = self
            .first
            .pop()
            .unwrap_or_else(|| self.kinds[self.rng.usize(..self.kinds.len())]);
        // At most one outage per 3 minutes, one Jelou trouble at a time: else a fault
        // of the fleet comes instead (none if --faults has none).
        let outage_too_soon =
            kind == Kind::JelouOutage30s && u64::from(self.outages) * 180 > elapsed.as_secs();
        if outage_too_soon || (kind.lasts().is_some() && self.trouble_until.is_some()) {
            let fleet: Vec<Kind> = self
                .kinds
                .iter()
                .copied()
                .filter(|k| k.lasts().is_none())
                .collect();
            return (!fleet.is_empty()).then(|| fleet[self.rng.usize(..fleet.len())]);
        }
        if kind == Kind::JelouOutage30s {
            self.outages += 1;
        }
        Some(kind)
    }

    pub(crate) fn worker(&mut self, n: usize) -> usize {
        self.rng.usize(..n.max(1))
    }

    pub(crate) fn bot(&mut self) -> String {
        format!("chaos-bot-{}", self.rng.usize(..3))
    }
}

/// Injects `kind` now; the event to record.
pub(crate) async fn inject(
    kind: Kind,
    schedule: &mut Schedule,
    fleet: &mut Fleet,
    jelou: &ChaosJelou,
    at_s: f64,
) -> anyhow::Result<Event> {
    let event = |detail: String, injected| Event {
        at_s,
        kind,
        detail,
        injected,
    };
    let who = schedule.worker(fleet.pids().len());
    match kind {
        Kind::Kill9 => {
            let pid = fleet.kill9(who).await;
            let new = fleet.spawn()?;
            Ok(event(
                format!("pid {pid:?}, replaced by {new}"),
                pid.is_some(),
            ))
        }
        Kind::Sigterm => {
            let pid = fleet.terminate(who);
            let new = fleet.spawn()?;
            Ok(event(
                format!("pid {pid:?}, replaced by {new}"),
                pid.is_some(),
            ))
        }
        Kind::CloseConnection => {
            let Some(pid) = fleet.pids().get(who).copied() else {
                return Ok(event("no worker".into(), false));
            };
            let (detail, ok) = match close_connection(pid).await {
                Ok(n) => (format!("pid {pid}: {n} connection(s) closed"), n > 0),
                Err(e) => (format!("pid {pid}: {e}"), false),
            };
            Ok(event(detail, ok))
        }
        _ => {
            let trouble = match kind {
                Kind::Jelou5xxBurst => Trouble::Burst503,
                Kind::Jelou429OneBot => Trouble::Throttle(schedule.bot()),
                Kind::JelouTimeouts => Trouble::Slow,
                _ => Trouble::Outage,
            };
            let lasts = kind.lasts().unwrap_or_default();
            schedule.trouble_until = Some(Instant::now() + lasts);
            let detail = format!("{trouble:?} for {} s", lasts.as_secs());
            jelou.set(trouble);
            Ok(event(detail, true))
        }
    }
}

/// Closes the broker connections whose client-provided name has `pid <pid>` (the
/// worker names its connection `jelou-worker <host> pid <pid>`); how many.
async fn close_connection(pid: u32) -> anyhow::Result<usize> {
    let out = rabbitmqctl(&[
        "list_connections",
        "--no-table-headers",
        "pid",
        "client_properties",
    ])
    .await?;
    let needle = format!("pid {pid}\"");
    let mut n = 0;
    for line in out.lines().filter(|l| l.contains(&needle)) {
        if let Some(conn) = line.split_whitespace().next() {
            rabbitmqctl(&["close_connection", conn, "chaos"]).await?;
            n += 1;
        }
    }
    Ok(n)
}

async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let owned: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("timeout")
            .arg("30")
            .arg("rabbitmqctl")
            .arg("-q")
            .args(&owned)
            .output()
    })
    .await??;
    anyhow::ensure!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
