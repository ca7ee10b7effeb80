//! Outcomes of jobs whose completion was cut short (the result or the ack did not
//! reach the broker before the connection dropped), kept for the job's redelivery to
//! this worker: it is then finished from what is known, never sent to Jelou again.

use std::{
    collections::{HashMap, VecDeque},
    hash::{Hash, Hasher},
    sync::Mutex,
};

use crate::outcome::JobOutcome;

/// What of a job's completion already reached the broker.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Progress {
    pub(crate) result_published: bool,
    pub(crate) dead_lettered: bool,
}

/// A job whose outcome is known but whose completion may not have finished.
#[derive(Debug, Clone)]
pub(crate) struct Finished {
    pub(crate) outcome: JobOutcome,
    pub(crate) attempts: u32,
    pub(crate) progress: Progress,
}

/// The key a job is remembered by: its jobId and its body, so that two producers'
/// jobs with the same jobId but different content are never confused.
pub(crate) fn cache_key(job_id: &str, body: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    job_id.hash(&mut h);
    body.hash(&mut h);
    h.finish()
}

/// Bounded: the oldest entries go first.
pub(crate) struct FinishedCache {
    inner: Mutex<(HashMap<u64, Finished>, VecDeque<u64>)>,
    capacity: usize,
}

impl FinishedCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
            capacity,
        }
    }

    pub(crate) fn put(&self, key: u64, value: Finished) {
        let mut guard = self.inner.lock().expect("not poisoned");
        let (map, order) = &mut *guard;
        if map.insert(key, value).is_none() {
            order.push_back(key);
        }
        while map.len() > self.capacity {
            match order.pop_front() {
                Some(old) => {
                    map.remove(&old);
                }
                None => break,
            }
        }
    }

    pub(crate) fn take(&self, key: u64) -> Option<Finished> {
        let mut guard = self.inner.lock().expect("not poisoned");
        let (map, order) = &mut *guard;
        let v = map.remove(&key)?;
        order.retain(|k| *k != key);
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_cache_is_bounded_and_takes_once() {
        let c = FinishedCache::new(2);
        let f = || Finished {
            outcome: JobOutcome::Success {
                message_id: "m".into(),
            },
            attempts: 1,
            progress: Progress::default(),
        };
        c.put(1, f());
        c.put(2, f());
        c.put(3, f());
        assert!(c.take(1).is_none());
        assert!(c.take(2).is_some());
        assert!(c.take(2).is_none());
        assert!(c.take(3).is_some());
    }

    #[test]
    fn the_key_tells_apart_same_id_different_body() {
        assert_eq!(cache_key("a", b"x"), cache_key("a", b"x"));
        assert_ne!(cache_key("a", b"x"), cache_key("a", b"y"));
        assert_ne!(cache_key("a", b"x"), cache_key("b", b"x"));
    }
}
