//! How many partitions this worker should own, pure: the fleet shares them out by
//! each taking at most its share, `ceil(partitions / workers)`.

/// What one worker does with the partitions, given what it holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    /// Hand these back (it owns more than its share), highest-numbered first.
    pub(super) release: Vec<u16>,
    /// Wait for these (standby), in case their owner goes or hands them back.
    pub(super) watch: Vec<u16>,
    /// Stop waiting for these: its share is full.
    pub(super) unwatch: Vec<u16>,
}

/// `ceil(partitions / workers)`, with at least one worker (this one).
pub(super) fn share(partitions: u16, workers: u32) -> usize {
    let workers = workers.max(1) as usize;
    (partitions as usize).div_ceil(workers)
}

/// `owned`: partitions this worker owns (or is handing back); `watched`: those it
/// waits for. A worker under its share waits for every partition it does not own;
/// at its share it waits for none; over it, it hands the surplus back.
pub(super) fn plan(partitions: u16, workers: u32, owned: &[u16], watched: &[u16]) -> Plan {
    let share = share(partitions, workers);
    let mut release: Vec<u16> = Vec::new();
    if owned.len() > share {
        let mut sorted = owned.to_vec();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        release = sorted[..owned.len() - share].to_vec();
    }
    let (watch, unwatch) = if owned.len() < share {
        let watch = (0..partitions)
            .filter(|p| !owned.contains(p) && !watched.contains(p))
            .collect();
        (watch, Vec::new())
    } else {
        (Vec::new(), watched.to_vec())
    };
    Plan {
        release,
        watch,
        unwatch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_round_up_so_every_partition_has_an_owner() {
        assert_eq!(share(16, 1), 16);
        assert_eq!(share(16, 3), 6);
        assert_eq!(share(16, 16), 1);
        assert_eq!(share(16, 40), 1);
        assert_eq!(share(16, 0), 16);
    }

    #[test]
    fn a_lone_worker_watches_everything() {
        let p = plan(4, 1, &[], &[]);
        assert_eq!(p.watch, [0, 1, 2, 3]);
        assert!(p.release.is_empty() && p.unwatch.is_empty());
    }

    #[test]
    fn a_worker_over_its_share_hands_back_the_surplus_and_watches_nothing() {
        let p = plan(4, 2, &[0, 1, 2, 3], &[]);
        assert_eq!(p.release, [3, 2]);
        assert!(p.watch.is_empty());
    }

    #[test]
    fn a_worker_at_its_share_stops_watching() {
        let p = plan(4, 2, &[0, 1], &[2, 3]);
        assert_eq!(p.unwatch, [2, 3]);
        assert!(p.release.is_empty() && p.watch.is_empty());
    }

    #[test]
    fn a_worker_under_its_share_watches_what_it_does_not_hold_yet() {
        let p = plan(4, 2, &[1], &[2]);
        assert_eq!(p.watch, [0, 3]);
        assert!(p.release.is_empty() && p.unwatch.is_empty());
    }
}
