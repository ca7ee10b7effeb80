//! The daemon (`jelou-worker run`): a supervisor that keeps one broker session alive
//! ([`session`]), and the draining of jobs at shutdown.
//!
//! lapin's own connection recovery is left off on purpose: a recovered channel would
//! carry on with deliveries whose acks are no longer valid. Instead, when anything
//! in a session fails (connection, channel, heartbeat), the session ends; the
//! supervisor reconnects with backoff (to the next cluster node, if several are
//! configured), re-checks the topology, and consumes again. Jobs in flight on the
//! dead session are never acked on the new one: the broker redelivers them.

mod session;

use std::{sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::Settings,
    pipeline::{Shared, Stops},
    server,
};
use session::SessionEnd;

/// Runs the worker until `shutdown` is cancelled, then drains (contract section 7).
/// Returns an error only for what retrying cannot fix (a topology mismatch, a
/// missing queue, bad TLS files, an unusable listen address).
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let shared = Arc::new(Shared::new(settings)?);
    let stop_background = CancellationToken::new();
    let server = server::serve(
        shared.settings.server.listen,
        shared.metrics.clone(),
        shared.ready.clone(),
        stop_background.clone(),
    )
    .await?;
    tokio::spawn(shared.gate.clone().run_prober(
        shared.jelou.clone(),
        shared.settings.jelou.clone(),
        stop_background.clone(),
    ));
    let stops = Stops {
        shutdown: shutdown.clone(),
        hard: CancellationToken::new(),
    };
    let tracker = TaskTracker::new();
    let result = supervise(&shared, &tracker, &stops).await;
    // Whatever ended the loop, jobs still running get the grace period.
    tracker.close();
    drain(&tracker, &stops, shared.settings.shutdown.grace_period_ms).await;
    stop_background.cancel();
    let _ = server.await;
    result
}

/// Reconnects after every lost session, with backoff, until shutdown.
async fn supervise(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    stops: &Stops,
) -> anyhow::Result<()> {
    let new_backoff = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(30))
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut backoff = new_backoff();
    let mut place = session::Place::default();
    loop {
        if stops.shutdown.is_cancelled() {
            return Ok(());
        }
        let ended = session::session(shared, tracker, stops, &mut place).await;
        shared.set_ready(false);
        let wait = match ended {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Ok(SessionEnd::Lost(reason)) => {
                backoff = new_backoff();
                let wait = backoff.next().unwrap_or(Duration::from_secs(1));
                tracing::warn!(
                    reason,
                    retry_in_ms = wait.as_millis() as u64,
                    "lost the broker; reconnecting"
                );
                wait
            }
            Err(e) if e.is_fatal() => return Err(e.into()),
            Err(e) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker unavailable; retrying");
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stops.shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Waits for the jobs in flight, at most the grace period; then tells the rest to
/// stop at once and gives them a moment to do so.
async fn drain(tracker: &TaskTracker, stops: &Stops, grace_ms: u64) {
    if tokio::time::timeout(Duration::from_millis(grace_ms), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = tracker.len(),
            "grace period over: handing the remaining jobs back to the queue"
        );
        stops.hard.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    }
}

/// This machine's name, for connection names and consumer tags (so operators can
/// tell workers apart in the management UI).
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
