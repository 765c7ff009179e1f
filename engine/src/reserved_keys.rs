//! The idempotency keys a SKU's orders hold, as the HTTP edge sees them. A keyed
//! order for a sold-out SKU is answered at the edge, without a trip to the actor,
//! unless its key may belong to one of the SKU's orders: that request may be the
//! retry of one that got a card, and only the actor can give it its original 201.
//!
//! Held as counts of seeded 64-bit hashes: a few bytes a key instead of the key
//! itself. Two keys that share a hash only send each other's retries to the actor;
//! none is ever missed, since the count keeps the hash until both keys are gone.
//!
//! The SKU's actor adds a key when it decides the reservation, under the keyed
//! refusals' lock and before the edge can see the SKU sold out by it (stock is
//! published once durable, with release ordering); the completion of the journal
//! write that prunes the order removes it once that is durable. A
//! reload after a failed write rebuilds the whole from the SKU as on disk, and starts
//! a new actor epoch: a removal from an earlier epoch that completes after the
//! rebuild is ignored, since the rebuild already saw that pruning on disk. A key held
//! here that the SKU no longer holds (a failed write, until the reload) costs a trip
//! to the actor, never a wrong answer.

use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::ids::IdempotencyKey;

pub(crate) struct ReservedKeys {
    /// Seeded per process, so that nobody can pick keys that share a hash with
    /// someone else's (which would only cost them trips to the actor anyway).
    hasher: foldhash::quality::RandomState,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    /// The actor epoch of the last rebuild.
    epoch: u64,
    counts: hashbrown::HashMap<u64, u32, foldhash::fast::RandomState>,
}

impl ReservedKeys {
    /// The keys of a SKU as recovered, for its actor's first epoch (0).
    pub(crate) fn new<'a>(keys: impl Iterator<Item = &'a IdempotencyKey>) -> Self {
        let reserved = ReservedKeys {
            hasher: foldhash::quality::RandomState::default(),
            held: Mutex::default(),
        };
        reserved.rebuild(keys, 0);
        reserved
    }

    /// Whether one of the SKU's orders may hold `key`.
    pub(crate) fn may_hold(&self, key: &IdempotencyKey) -> bool {
        let hash = self.hash(key);
        self.lock().counts.contains_key(&hash)
    }

    pub(crate) fn add(&self, key: &IdempotencyKey) {
        let hash = self.hash(key);
        *self.lock().counts.entry(hash).or_insert(0) += 1;
    }

    /// Removes a key whose order's pruning, decided in actor epoch `epoch`, is durable.
    pub(crate) fn remove(&self, key: &IdempotencyKey, epoch: u64) {
        let hash = self.hash(key);
        let mut held = self.lock();
        if epoch < held.epoch {
            return;
        }
        let count = held.counts.get_mut(&hash);
        debug_assert!(count.is_some(), "removing a key that was never added");
        if let Some(count) = count {
            *count -= 1;
            if *count == 0 {
                held.counts.remove(&hash);
            }
        }
    }

    /// Replaces everything with `keys`, those of the SKU as reloaded for actor epoch
    /// `epoch`.
    pub(crate) fn rebuild<'a>(&self, keys: impl Iterator<Item = &'a IdempotencyKey>, epoch: u64) {
        let mut counts = hashbrown::HashMap::default();
        for key in keys {
            *counts.entry(self.hash(key)).or_insert(0) += 1;
        }
        *self.lock() = Held { epoch, counts };
    }

    #[cfg(test)]
    fn distinct_hashes(&self) -> usize {
        self.lock().counts.len()
    }

    fn hash(&self, key: &IdempotencyKey) -> u64 {
        self.hasher.hash_one(key.as_str())
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        // Every change is a single map operation: a panic elsewhere while holding the
        // lock leaves consistent counts.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> IdempotencyKey {
        IdempotencyKey::parse(text).unwrap()
    }

    #[test]
    fn a_key_is_held_until_each_order_holding_it_is_removed() {
        let held = ReservedKeys::new([key("a")].iter());
        assert!(held.may_hold(&key("a")));
        assert!(!held.may_hold(&key("b")));
        // Counted twice: a key used again once its order's pruning was decided, before
        // that pruning was durable (or another key with the same hash).
        held.add(&key("a"));
        held.add(&key("b"));
        held.remove(&key("a"), 0);
        assert!(held.may_hold(&key("a")));
        held.remove(&key("a"), 0);
        assert!(!held.may_hold(&key("a")));
        assert!(held.may_hold(&key("b")));
        assert_eq!(held.distinct_hashes(), 1);
    }

    #[test]
    fn a_rebuild_replaces_what_was_held_and_outdates_earlier_removals() {
        let held = ReservedKeys::new([key("old"), key("both")].iter());
        held.rebuild([key("both"), key("new")].iter(), 1);
        assert!(!held.may_hold(&key("old")));
        assert!(held.may_hold(&key("both")));
        assert!(held.may_hold(&key("new")));
        assert_eq!(held.distinct_hashes(), 2);
        // A pruning of epoch 0 completing after the rebuild was on disk for it.
        held.remove(&key("new"), 0);
        assert!(held.may_hold(&key("new")));
        held.remove(&key("new"), 1);
        assert!(!held.may_hold(&key("new")));
    }
}
