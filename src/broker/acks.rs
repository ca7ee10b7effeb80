//! Acknowledgements, coalesced: one `basic.ack` with `multiple` for a run of finished
//! deliveries instead of one per job.
//!
//! Acking is the last step of every job, and at thousands of jobs a second one frame
//! per job is a large share of both the worker's and the broker's work (on a quorum
//! queue every ack is a Raft command). Jobs do not ack themselves: they hand their
//! delivery tag to the channel's [`Acks`] task, which drains whatever has piled up,
//! and acks the longest run of finished tags above the last acked one with a single
//! `multiple` ack. A finished tag beyond a gap (a job still running) is held for at
//! most `HOLD` (2 ms) in case the gap fills, then acked alone, so no finished job waits
//! long on a slow one. (Measured in the benchmark's `latency` scenario: holding 2 ms
//! beat acking at once, because the broker then has far fewer acks to process.)
//!
//! What keeps this safe: a `multiple` ack covers *every* unacked delivery up to its
//! tag, so it must never reach past a delivery that is not finished (still running,
//! or left for the broker to redeliver). [`Ledger`] tracks exactly that, and is pure
//! and unit-tested. Nothing is acked before the job's result is confirmed: a job
//! reports its tag only when it would have acked it itself.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use futures_util::future::join_all;
use lapin::{Channel, options::BasicAckOptions};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// One `basic.ack` to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub tag: u64,
    pub multiple: bool,
}

/// Which delivery tags of one channel are settled, and which acks settle the ones
/// that finished. Delivery tags on a channel count up from 1 without gaps.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Every tag up to here is settled.
    floor: u64,
    /// Tags above `floor` already settled (acked alone, or nacked by the job), as
    /// inclusive runs: start → end.
    settled: BTreeMap<u64, u64>,
    /// Finished tags beyond a gap (a job still running), not acked yet: held back a
    /// moment in case the gap fills and one `multiple` ack can cover them all.
    held: BTreeSet<u64>,
}

impl Ledger {
    /// `finished`: tags whose jobs are done and want their ack; `elsewhere`: tags the
    /// jobs settled themselves (a nack). Returns the acks to send: one `multiple` ack
    /// for the finished tags that now extend the settled prefix; with `release`, also
    /// a single ack for each finished tag still beyond a gap (else they stay held).
    /// Tags never reported (jobs still running, or abandoned to the broker) are never
    /// covered.
    pub fn plan(&mut self, finished: &[u64], elsewhere: &[u64], release: bool) -> Vec<Ack> {
        for &tag in elsewhere {
            self.held.remove(&tag);
            self.mark(tag);
        }
        for &tag in finished {
            if !self.is_settled(tag) {
                self.held.insert(tag);
            }
        }
        let mut acks = Vec::new();
        let mut prefix_end = None;
        loop {
            if let Some(end) = self.settled.remove(&(self.floor + 1)) {
                self.floor = end;
            } else if self.held.first() == Some(&(self.floor + 1)) {
                self.held.pop_first();
                self.floor += 1;
                prefix_end = Some(self.floor);
            } else {
                break;
            }
        }
        if let Some(tag) = prefix_end {
            acks.push(Ack {
                tag,
                multiple: true,
            });
        }
        if release {
            for tag in std::mem::take(&mut self.held) {
                self.mark(tag);
                acks.push(Ack {
                    tag,
                    multiple: false,
                });
            }
        }
        acks
    }

    /// True while finished tags are held back.
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    fn is_settled(&self, tag: u64) -> bool {
        tag <= self.floor
            || self
                .settled
                .range(..=tag)
                .next_back()
                .is_some_and(|(_, &end)| tag <= end)
    }

    /// Records `tag` as settled.
    fn mark(&mut self, tag: u64) {
        if self.is_settled(tag) {
            return;
        }
        // Join the run that ends right before `tag` and the one that starts right after.
        let end = self.settled.remove(&(tag + 1)).unwrap_or(tag);
        match self.settled.range_mut(..tag).next_back() {
            Some((_, before_end)) if *before_end + 1 == tag => *before_end = end,
            _ => {
                self.settled.insert(tag, end);
            }
        }
    }
}

enum Message {
    Finished(u64),
    Elsewhere(u64),
    Flush(oneshot::Sender<()>),
}

/// The handle jobs use to ack their deliveries on one channel; cheap to clone.
#[derive(Clone)]
pub struct Acks {
    tx: mpsc::UnboundedSender<Message>,
}

impl Acks {
    /// Starts the task that acks on `channel`. An ack that fails cancels `lost`: the
    /// channel is broken, and the deliveries it holds are the broker's again.
    pub fn start(channel: Channel, lost: CancellationToken) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(channel, rx, lost));
        Self { tx }
    }

    /// The job behind `tag` is finished (its outcome is confirmed on the broker): ack it.
    pub fn ack(&self, tag: u64) {
        let _ = self.tx.send(Message::Finished(tag));
    }

    /// The job behind `tag` settled its delivery itself (nack).
    pub fn settled_elsewhere(&self, tag: u64) {
        let _ = self.tx.send(Message::Elsewhere(tag));
    }

    /// Returns once every ack asked for before this call is written to the socket (or
    /// has failed): call it after the jobs have finished, before closing the connection.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

enum Woke {
    Messages,
    Timer,
    Closed,
}

impl Woke {
    fn from_received(n: usize) -> Self {
        if n == 0 { Woke::Closed } else { Woke::Messages }
    }
}

/// How long a finished tag beyond a gap may wait for the gap to fill before it is
/// acked alone. Short next to any job's own time, long enough for the jobs around it
/// to finish (they started within a millisecond or so of each other).
const HOLD: Duration = Duration::from_millis(2);

async fn run(channel: Channel, mut rx: mpsc::UnboundedReceiver<Message>, lost: CancellationToken) {
    let mut ledger = Ledger::default();
    let mut batch = Vec::with_capacity(256);
    let mut finished = Vec::with_capacity(256);
    let mut elsewhere = Vec::new();
    let mut flushes = Vec::new();
    let mut held_since: Option<tokio::time::Instant> = None;
    let mut failed = false;
    let mut open = true;
    while open || ledger.holding() {
        let woke = match held_since {
            Some(since) if open => tokio::select! {
                n = rx.recv_many(&mut batch, 4096) => Woke::from_received(n),
                _ = tokio::time::sleep_until(since + HOLD) => Woke::Timer,
            },
            _ if open => Woke::from_received(rx.recv_many(&mut batch, 4096).await),
            _ => Woke::Closed,
        };
        match woke {
            Woke::Messages => {
                // Let the jobs that are ready to run finish first: their tags join
                // this round.
                tokio::task::yield_now().await;
                while let Ok(message) = rx.try_recv() {
                    batch.push(message);
                }
            }
            Woke::Timer => {}
            // Every sender is gone (the session is over): release what is held.
            Woke::Closed => open = false,
        }
        for message in batch.drain(..) {
            match message {
                Message::Finished(tag) => finished.push(tag),
                Message::Elsewhere(tag) => elsewhere.push(tag),
                Message::Flush(done) => flushes.push(done),
            }
        }
        let release =
            !open || !flushes.is_empty() || held_since.is_some_and(|since| since.elapsed() >= HOLD);
        let acks = ledger.plan(&finished, &elsewhere, release);
        finished.clear();
        elsewhere.clear();
        // The hold is timed from when the oldest held tag was first held.
        held_since = if ledger.holding() {
            held_since.or_else(|| Some(tokio::time::Instant::now()))
        } else {
            None
        };
        if !failed && !acks.is_empty() {
            // Polled in order: each pushes its frame when first polled.
            let sent = join_all(acks.iter().map(|a| {
                channel.basic_ack(
                    a.tag,
                    BasicAckOptions {
                        multiple: a.multiple,
                    },
                )
            }))
            .await;
            if let Some(Err(e)) = sent.into_iter().find(Result::is_err) {
                failed = true;
                tracing::warn!(error = %e, "could not ack finished jobs: the broker will redeliver them (those finished here are completed from memory, not sent again)");
                lost.cancel();
            }
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(tag: u64) -> Ack {
        Ack {
            tag,
            multiple: false,
        }
    }

    fn up_to(tag: u64) -> Ack {
        Ack {
            tag,
            multiple: true,
        }
    }

    #[test]
    fn a_run_from_the_floor_is_one_multiple_ack() {
        let mut l = Ledger::default();
        assert_eq!(l.plan(&[3, 1, 2], &[], false), vec![up_to(3)]);
        assert_eq!(l.floor, 3);
        assert_eq!(l.plan(&[4], &[], false), vec![up_to(4)]);
        assert!(!l.holding());
    }

    #[test]
    fn a_running_job_is_never_covered_and_what_is_behind_it_waits_for_it() {
        let mut l = Ledger::default();
        // 3 is still running: 4 and 5 are held back.
        assert_eq!(l.plan(&[1, 2, 4, 5], &[], false), vec![up_to(2)]);
        assert!(l.holding());
        // 3 finishes: one ack covers 3, 4 and 5.
        assert_eq!(l.plan(&[3], &[], false), vec![up_to(5)]);
        assert!(!l.holding());
        assert_eq!(l.floor, 5);
    }

    #[test]
    fn released_tags_are_acked_alone_and_the_floor_later_jumps_them() {
        let mut l = Ledger::default();
        assert_eq!(
            l.plan(&[1, 2, 4, 5], &[], true),
            vec![up_to(2), ack(4), ack(5)]
        );
        assert!(!l.holding());
        assert_eq!(l.floor, 2);
        // 3 finishes: acked alone (4 and 5 are no longer outstanding), floor to 5.
        assert_eq!(l.plan(&[3], &[], false), vec![up_to(3)]);
        assert_eq!(l.floor, 5);
        assert_eq!(l.plan(&[7, 6], &[], false), vec![up_to(7)]);
    }

    #[test]
    fn an_abandoned_tag_is_a_permanent_gap() {
        let mut l = Ledger::default();
        // 2 was left for the broker (never reported): nothing may cover it.
        assert_eq!(l.plan(&[1, 3], &[], true), vec![up_to(1), ack(3)]);
        assert_eq!(l.plan(&[4, 5], &[], true), vec![ack(4), ack(5)]);
        assert_eq!(l.floor, 1);
        // The acked tags beyond the gap are kept as one run, not one entry each.
        assert_eq!(l.settled.len(), 1);
    }

    #[test]
    fn tags_settled_by_the_job_are_passed_over_not_acked() {
        let mut l = Ledger::default();
        // 2 was nacked by its job: the multiple ack may pass it (it is no longer
        // outstanding) but it is not acked.
        assert_eq!(l.plan(&[1, 3], &[2], false), vec![up_to(3)]);
        assert_eq!(l.floor, 3);
        // A nack reported alone only moves the floor.
        assert_eq!(l.plan(&[], &[4], false), vec![]);
        assert_eq!(l.floor, 4);
    }

    #[test]
    fn duplicate_reports_are_acked_once() {
        let mut l = Ledger::default();
        assert_eq!(l.plan(&[1, 1], &[], false), vec![up_to(1)]);
        assert_eq!(l.plan(&[1, 3, 3], &[], true), vec![ack(3)]);
        assert_eq!(l.plan(&[3], &[], true), vec![]);
    }

    #[test]
    fn runs_merge_when_a_gap_fills() {
        let mut l = Ledger::default();
        l.plan(&[2, 3, 5, 6], &[], true);
        assert_eq!(l.settled.len(), 2);
        l.plan(&[4], &[], true);
        assert_eq!(l.settled.len(), 1);
        assert_eq!(l.plan(&[1], &[], false), vec![up_to(1)]);
        assert_eq!(l.floor, 6);
        assert!(l.settled.is_empty());
    }
}
