//! The per-user lanes of one partition, pure: which held job may start now, which
//! must go back to the broker to wait, and when to look again.
//!
//! Every job of a partition is held here from the moment it is delivered, keyed by
//! its user (botId, userId) and ordered by its sequence number (stamped by the
//! router, increasing in the order jobs left the jobs queue). A user's lane starts its
//! lowest-numbered job when nothing of that user is out (running, or travelling to the
//! wait queue and back), so a user's jobs are sent one at a time, in order. Lanes of
//! different users never wait on each other.
//!
//! Time is passed in (ms since the Unix epoch), so every rule is tested without a clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A user: (botId, userId).
pub(crate) type UserKey = (String, String);

/// A job held in a lane.
#[derive(Debug)]
pub(crate) struct Held<T> {
    pub(crate) item: T,
    pub(crate) seq: u64,
    /// No attempt before this (its retry state, or a pause it waits out).
    pub(crate) not_before_ms: Option<i64>,
    pub(crate) deadline_ms: Option<i64>,
    /// Delivered from the wait queue (holds no slot of the partition queue).
    pub(crate) from_wait: bool,
    /// Why it waits, as its header says (`retry`, `bot_pause`, ...).
    pub(crate) reason: Option<&'static str>,
}

/// What to do with a job that must go back to the broker to wait.
#[derive(Debug)]
pub(crate) struct Move<T> {
    pub(crate) item: T,
    /// When it may be attempted, if that changed (its user's pacing).
    pub(crate) not_before_ms: Option<i64>,
    pub(crate) reason: Option<&'static str>,
}

/// How a started job left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Left {
    /// Finished, or abandoned to the broker: the lane goes on.
    Done,
    /// A copy went to the wait queue: the lane waits for it.
    Moved,
}

#[derive(Debug)]
struct Lane<T> {
    /// The job of this user that runs now.
    running: Option<u64>,
    /// Jobs sent to the wait queue whose copies have not come back yet.
    in_transit: BTreeSet<u64>,
    /// Held jobs, by (seq, arrival) so that a duplicate seq keeps both.
    held: BTreeMap<(u64, u64), Held<T>>,
}

impl<T> Default for Lane<T> {
    fn default() -> Self {
        Self {
            running: None,
            in_transit: BTreeSet::new(),
            held: BTreeMap::new(),
        }
    }
}

impl<T> Lane<T> {
    fn is_empty(&self) -> bool {
        self.running.is_none() && self.in_transit.is_empty() && self.held.is_empty()
    }

    /// The lowest held job, if nothing of the user before it is out.
    fn head_key(&self) -> Option<(u64, u64)> {
        let (&key, _) = self.held.iter().next()?;
        let out_before =
            self.running.is_some() || self.in_transit.first().is_some_and(|s| *s <= key.0);
        (!out_before).then_some(key)
    }
}

/// The lanes of one partition.
#[derive(Debug)]
pub(crate) struct Lanes<T> {
    lanes: HashMap<UserKey, Lane<T>>,
    /// `order.user_min_interval_ms`.
    user_gap_ms: i64,
    /// `order.wait_bound_ms`: a job may start this much before it is due (it sleeps
    /// the rest); a job due later than this goes back to the broker.
    bound_ms: i64,
    /// When each paced user's last job started.
    last_start: HashMap<UserKey, i64>,
    arrivals: u64,
}

impl<T> Lanes<T> {
    pub(crate) fn new(user_gap_ms: u64, bound_ms: u64) -> Self {
        Self {
            lanes: HashMap::new(),
            user_gap_ms: user_gap_ms as i64,
            bound_ms: bound_ms as i64,
            last_start: HashMap::new(),
            arrivals: 0,
        }
    }

    /// Holds a delivered job. The copy of a job sent to the wait queue ends its
    /// transit here.
    pub(crate) fn push(&mut self, user: UserKey, held: Held<T>) {
        let lane = self.lanes.entry(user).or_default();
        lane.in_transit.remove(&held.seq);
        self.arrivals += 1;
        lane.held.insert((held.seq, self.arrivals), held);
    }

    /// A started job left (see [`Left`]).
    pub(crate) fn left(&mut self, user: &UserKey, seq: u64, how: Left, copy_here: bool) {
        let Some(lane) = self.lanes.get_mut(user) else {
            return;
        };
        if lane.running == Some(seq) {
            lane.running = None;
        }
        if how == Left::Moved && !copy_here {
            lane.in_transit.insert(seq);
        }
        if lane.is_empty() {
            self.lanes.remove(user);
        }
    }

    /// True when a held job of `user` has sequence `seq` (a copy that raced ahead of
    /// its original's end).
    pub(crate) fn holds(&self, user: &UserKey, seq: u64) -> bool {
        self.lanes
            .get(user)
            .is_some_and(|l| l.held.keys().any(|(s, _)| *s == seq))
    }

    /// When the head of `lane` may start: its retry time (less the bound, which the
    /// job sleeps itself) and its user's pacing.
    fn due(&self, user: &UserKey, held: &Held<T>) -> i64 {
        let retry = held.not_before_ms.map_or(i64::MIN, |t| t - self.bound_ms);
        let paced = match self.last_start.get(user) {
            Some(last) if self.user_gap_ms > 0 => last + self.user_gap_ms,
            _ => i64::MIN,
        };
        retry.max(paced)
    }

    /// The jobs to start now: each lane's head when due, and any held job whose
    /// deadline has passed (it fails `expired` without being sent, so it may leave
    /// out of turn).
    pub(crate) fn take_ready(&mut self, now_ms: i64) -> Vec<(UserKey, Held<T>)> {
        let mut ready = Vec::new();
        let users: Vec<UserKey> = self.lanes.keys().cloned().collect();
        for user in users {
            let expired: Vec<(u64, u64)> = self.lanes[&user]
                .held
                .iter()
                .filter(|(_, h)| h.deadline_ms.is_some_and(|d| d <= now_ms))
                .map(|(k, _)| *k)
                .collect();
            let lane = self.lanes.get_mut(&user).expect("listed");
            for key in expired {
                let held = lane.held.remove(&key).expect("listed");
                ready.push((user.clone(), held));
            }
            let Some(key) = self.lanes[&user].head_key() else {
                continue;
            };
            if self.due(&user, &self.lanes[&user].held[&key]) > now_ms {
                continue;
            }
            let lane = self.lanes.get_mut(&user).expect("listed");
            let held = lane.held.remove(&key).expect("head");
            lane.running = Some(held.seq);
            if self.user_gap_ms > 0 {
                self.last_start.insert(user.clone(), now_ms);
            }
            ready.push((user, held));
        }
        self.lanes.retain(|_, l| !l.is_empty());
        let gap = self.user_gap_ms;
        if self.last_start.len() > 1024 + 2 * self.lanes.len() {
            self.last_start.retain(|_, t| now_ms - *t < gap);
        }
        ready
    }

    /// The jobs that would hold a slot of the partition queue for longer than the
    /// bound: when a lane's head is due later than that, the head (if it came from
    /// the partition queue) and every job behind it that came from the partition
    /// queue go to the wait queue, in order; the lane then waits for their copies.
    pub(crate) fn take_moves(&mut self, now_ms: i64) -> Vec<Move<T>> {
        let horizon = now_ms + self.bound_ms;
        let mut moves = Vec::new();
        let users: Vec<UserKey> = self.lanes.keys().cloned().collect();
        for user in users {
            let lane = &self.lanes[&user];
            let Some(head_key) = lane.head_key() else {
                continue;
            };
            let head = &lane.held[&head_key];
            let due = self.due(&user, head);
            if due <= horizon {
                continue;
            }
            // Pacing, not a retry time, is what holds the head back.
            let paced = head.not_before_ms.is_none_or(|t| t - self.bound_ms < due);
            let keys: Vec<(u64, u64)> = lane
                .held
                .iter()
                .filter(|(_, h)| !h.from_wait)
                .map(|(k, _)| *k)
                .collect();
            let lane = self.lanes.get_mut(&user).expect("listed");
            for key in keys {
                let held = lane.held.remove(&key).expect("listed");
                lane.in_transit.insert(held.seq);
                let pace_it = key == head_key && paced;
                moves.push(Move {
                    not_before_ms: pace_it.then_some(due),
                    reason: if pace_it {
                        Some("user_pace")
                    } else {
                        held.reason
                    },
                    item: held.item,
                });
            }
        }
        moves
    }

    /// When to look again: the earliest due head or deadline still ahead.
    pub(crate) fn next_wake(&self, now_ms: i64) -> Option<i64> {
        let mut wake: Option<i64> = None;
        let mut consider = |t: i64| {
            if t > now_ms {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
        };
        for (user, lane) in &self.lanes {
            if let Some(key) = lane.head_key() {
                consider(self.due(user, &lane.held[&key]));
            }
            for held in lane.held.values() {
                if let Some(d) = held.deadline_ms {
                    consider(d);
                }
            }
        }
        wake
    }

    /// Held jobs that wait now, by reason: behind an earlier job of their user
    /// (`user_order`), or a head not due yet (its header's reason, `user_pace`, or
    /// `retry`).
    pub(crate) fn waiting_by_reason(&self, now_ms: i64) -> HashMap<&'static str, i64> {
        let mut counts = HashMap::new();
        for (user, lane) in &self.lanes {
            let head = lane.head_key();
            for (key, held) in &lane.held {
                let reason = if Some(*key) != head {
                    "user_order"
                } else if self.due(user, held) <= now_ms {
                    continue;
                } else if held
                    .not_before_ms
                    .is_some_and(|t| t - self.bound_ms > now_ms)
                {
                    held.reason.unwrap_or("retry")
                } else {
                    "user_pace"
                };
                *counts.entry(reason).or_default() += 1;
            }
        }
        counts
    }

    /// Every held job, lowest sequence first (to hand them back in order at release).
    pub(crate) fn drain_held(&mut self) -> Vec<Held<T>> {
        let mut all: Vec<Held<T>> = self
            .lanes
            .drain()
            .flat_map(|(_, lane)| lane.held.into_values())
            .collect();
        all.sort_by_key(|h| h.seq);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(u: &str) -> UserKey {
        ("bot".into(), u.into())
    }

    fn job(seq: u64) -> Held<u64> {
        Held {
            item: seq,
            seq,
            not_before_ms: None,
            deadline_ms: None,
            from_wait: false,
            reason: None,
        }
    }

    fn waiting(seq: u64, not_before_ms: i64) -> Held<u64> {
        Held {
            not_before_ms: Some(not_before_ms),
            from_wait: true,
            reason: Some("retry"),
            ..job(seq)
        }
    }

    /// The items started now, sorted (lanes of different users have no order).
    fn start(l: &mut Lanes<u64>, now: i64) -> Vec<u64> {
        let mut v: Vec<u64> = l.take_ready(now).into_iter().map(|(_, h)| h.item).collect();
        v.sort();
        v
    }

    #[test]
    fn one_job_per_user_at_a_time_in_sequence_order() {
        let mut l = Lanes::new(0, 1000);
        l.push(user("a"), job(3));
        l.push(user("a"), job(1));
        l.push(user("b"), job(2));
        assert_eq!(start(&mut l, 0), [1, 2]);
        assert_eq!(
            start(&mut l, 0),
            [] as [u64; 0],
            "a's job 3 waits for job 1"
        );

        l.left(&user("a"), 1, Left::Done, false);
        assert_eq!(start(&mut l, 0), [3]);
    }

    #[test]
    fn a_job_sent_to_wait_holds_its_user_until_its_copy_is_back_and_due() {
        let mut l = Lanes::new(0, 1000);
        l.push(user("a"), job(1));
        l.push(user("a"), job(2));
        l.push(user("b"), job(5));
        assert_eq!(start(&mut l, 0), [1, 5]);
        // Job 1 failed and went to the wait queue for a retry at t = 30 s.
        l.left(&user("a"), 1, Left::Moved, false);
        assert_eq!(
            start(&mut l, 0),
            [] as [u64; 0],
            "job 2 waits for job 1's copy"
        );
        l.push(user("a"), waiting(1, 30_000));
        assert_eq!(start(&mut l, 0), [] as [u64; 0]);
        // Job 2 would hold a slot of the partition queue for 29 s: it goes to wait too.
        let moves = l.take_moves(0);
        assert_eq!(moves.iter().map(|m| m.item).collect::<Vec<_>>(), [2]);
        assert_eq!(moves[0].not_before_ms, None);
        l.push(
            user("a"),
            Held {
                from_wait: true,
                ..job(2)
            },
        );
        // Job 1 starts within the bound of its time, and job 2 only after it.
        assert_eq!(l.next_wake(0), Some(29_000));
        assert_eq!(start(&mut l, 29_000), [1]);
        l.left(&user("a"), 1, Left::Done, false);
        assert_eq!(start(&mut l, 29_001), [2]);
    }

    #[test]
    fn a_copy_that_arrives_before_its_original_left_is_not_waited_for_twice() {
        let mut l = Lanes::new(0, 1000);
        l.push(user("a"), job(1));
        assert_eq!(start(&mut l, 0), [1]);
        l.push(user("a"), waiting(1, 0));
        assert!(l.holds(&user("a"), 1));
        l.left(&user("a"), 1, Left::Moved, true);
        assert_eq!(start(&mut l, 0), [1]);
    }

    #[test]
    fn a_held_job_fails_at_its_deadline_even_behind_another() {
        let mut l = Lanes::new(0, 1000);
        l.push(user("a"), job(1));
        l.push(
            user("a"),
            Held {
                deadline_ms: Some(5_000),
                ..job(2)
            },
        );
        assert_eq!(start(&mut l, 0), [1]);
        assert_eq!(l.next_wake(0), Some(5_000));
        assert_eq!(start(&mut l, 4_999), [] as [u64; 0]);
        assert_eq!(
            start(&mut l, 5_000),
            [2],
            "expired: it leaves out of turn, unsent"
        );
    }

    #[test]
    fn user_pacing_spaces_starts_and_sends_a_far_head_to_wait() {
        let mut l = Lanes::new(6_000, 1000);
        l.push(user("a"), job(1));
        l.push(user("a"), job(2));
        assert_eq!(start(&mut l, 0), [1]);
        l.left(&user("a"), 1, Left::Done, false);
        assert_eq!(start(&mut l, 100), [] as [u64; 0]);
        let moves = l.take_moves(100);
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].not_before_ms, Some(6_000));
        assert_eq!(moves[0].reason, Some("user_pace"));
        l.push(
            user("a"),
            Held {
                not_before_ms: Some(6_000),
                from_wait: true,
                reason: Some("user_pace"),
                ..job(2)
            },
        );
        assert_eq!(l.waiting_by_reason(100).get("user_pace"), Some(&1));
        assert_eq!(start(&mut l, 5_999), [] as [u64; 0]);
        assert_eq!(start(&mut l, 6_000), [2]);
    }

    #[test]
    fn a_head_due_within_the_bound_stays_and_the_gauge_says_why_others_wait() {
        let mut l = Lanes::new(0, 1000);
        l.push(
            user("a"),
            Held {
                not_before_ms: Some(1_500),
                reason: Some("bot_pause"),
                ..job(1)
            },
        );
        l.push(user("a"), job(2));
        assert!(l.take_moves(600).is_empty(), "due at 500: within the bound");
        let counts = l.waiting_by_reason(0);
        assert_eq!(counts.get("bot_pause"), Some(&1));
        assert_eq!(counts.get("user_order"), Some(&1));
        assert_eq!(start(&mut l, 500), [1]);
    }

    #[test]
    fn held_jobs_drain_lowest_sequence_first() {
        let mut l = Lanes::new(0, 1000);
        l.push(user("b"), job(4));
        l.push(user("a"), job(3));
        l.push(user("a"), job(1));
        let seqs: Vec<u64> = l.drain_held().into_iter().map(|h| h.seq).collect();
        assert_eq!(seqs, [1, 3, 4]);
    }
}
