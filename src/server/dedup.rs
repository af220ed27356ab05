//! Memory of recently accepted event ids, so an event a client resends after losing an
//! acknowledgement is counted once. Bounded: the oldest ids are forgotten first.
//!
//! Written here rather than taken from a crate: it is a hash set with a FIFO of its keys
//! (a dozen lines), and keys are 64-bit hashes of (token id, event id) so the memory per id
//! is fixed (about 24 bytes) whatever the clients send. Two different ids collide with
//! probability about n^2 / 2^65 (1e-8 at a million ids), and then one real event would be
//! dropped as a duplicate.

use std::collections::VecDeque;

use rustc_hash::FxHashSet;

use crate::model::sketch::mix;
use crate::window::text_key;

/// Recently accepted (token id, event id) pairs, at most `cap` of them.
#[derive(Debug, Default)]
pub struct Dedup {
    seen: FxHashSet<u64>,
    order: VecDeque<u64>,
    cap: usize,
}

impl Dedup {
    /// Remember at most `cap` ids (0: none, de-duplication off).
    pub fn new(cap: usize) -> Self {
        Dedup {
            cap,
            ..Default::default()
        }
    }

    /// The key of an event id (as written to the log with the event).
    pub fn key(token: &str, event_id: &str) -> u64 {
        mix(text_key(token) ^ text_key(event_id).rotate_left(29))
    }

    /// True if this event is new (and now remembered); false for a duplicate. Events
    /// without an id are always new.
    pub fn first(&mut self, token: &str, event_id: &str) -> bool {
        if event_id.is_empty() || self.cap == 0 {
            return true;
        }
        self.first_key(Dedup::key(token, event_id))
    }

    /// [`Dedup::first`] of a key.
    pub fn first_key(&mut self, k: u64) -> bool {
        if self.cap == 0 {
            return true;
        }
        if !self.seen.insert(k) {
            return false;
        }
        self.order.push_back(k);
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }

    /// Forget everything: after a write that failed, the events it held must be accepted
    /// when they are resent (a duplicate counted twice is better than an event lost).
    pub fn clear(&mut self) {
        self.seen.clear();
        self.order.clear();
    }

    /// Remember the keys a restart read back from the log, oldest first.
    pub fn restore(&mut self, keys: &[u64]) {
        for &k in keys {
            self.first_key(k);
        }
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Nothing remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_caught_and_memory_is_bounded() {
        let mut d = Dedup::new(3);
        assert!(d.first("t", "a"));
        assert!(!d.first("t", "a"));
        // The same event id on another token is another event.
        assert!(d.first("u", "a"));
        // No id: never a duplicate.
        assert!(d.first("t", "") && d.first("t", ""));
        assert!(d.first("t", "b") && d.first("t", "c"));
        assert_eq!(d.len(), 3);
        // "t/a" was the oldest and is forgotten.
        assert!(d.first("t", "a"));
        d.clear();
        assert!(d.is_empty() && d.first("t", "c"));
        assert!(Dedup::new(0).first("t", "a") && Dedup::new(0).first("t", "a"));
    }
}
