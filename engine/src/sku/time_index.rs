//! Orders by a time (when a reservation falls due, when an order ended), earliest
//! first: what expiry and pruning walk from the front.
//!
//! One bucket of ids per millisecond, in the order they were added. Nearly every
//! insert lands in the last bucket (a reservation falls due at now plus the SKU's
//! TTL; an order ends now), and nearly every removal is at the front of the first
//! one (expiry and pruning take the earliest), so both are O(1): no search down the
//! tree for the last bucket, no shifting for the first. A `BTreeSet<(Timestamp,
//! OrderId)>` compared 16-byte ids on its way down to its last leaf and split that
//! leaf every few inserts: about 650 instructions a reservation, a quarter of what
//! the state machine spent on one (`cargo bench --bench sku`, callgrind).
//!
//! A payment takes its order out of the middle of a bucket: a scan of the orders
//! reserved in the same millisecond, tens to hundreds in a drop. An expiry batch ends
//! up to `EXPIRE_BATCH_ORDERS_MAX` orders in one millisecond; they are pruned from the
//! front, in the order they were added.

use std::collections::{BTreeMap, VecDeque};

use crate::clock::Timestamp;
use crate::ids::OrderId;

#[derive(Debug, Clone, Default)]
pub struct TimeIndex {
    /// Never holds an empty bucket.
    buckets: BTreeMap<Timestamp, VecDeque<OrderId>>,
    len: usize,
}

impl TimeIndex {
    /// Adds `id` at `at`, after the ids already there. An id is in the index at most
    /// once: the state machine adds an order when it is reserved (or ends) and takes
    /// it out before it could be added again.
    pub fn insert(&mut self, at: Timestamp, id: OrderId) {
        debug_assert!(
            !self
                .buckets
                .get(&at)
                .is_some_and(|bucket| bucket.contains(&id)),
            "order {id} indexed twice at {at:?}"
        );
        match self.buckets.last_entry() {
            Some(mut last) if *last.key() == at => last.get_mut().push_back(id),
            _ => self.buckets.entry(at).or_default().push_back(id),
        }
        self.len += 1;
    }

    /// Takes `(at, id)` out; false if it was not there.
    pub fn remove(&mut self, at: Timestamp, id: &OrderId) -> bool {
        let Some(bucket) = self.buckets.get_mut(&at) else {
            return false;
        };
        let Some(position) = bucket.iter().position(|held| held == id) else {
            return false;
        };
        bucket.remove(position);
        if bucket.is_empty() {
            self.buckets.remove(&at);
        }
        self.len -= 1;
        true
    }

    /// The earliest time held.
    pub fn first_at(&self) -> Option<Timestamp> {
        self.buckets.first_key_value().map(|(at, _)| *at)
    }

    /// Every `(time, id)`, earliest first, and in the order added within a time.
    pub fn iter(&self) -> impl Iterator<Item = (Timestamp, OrderId)> + '_ {
        self.buckets
            .iter()
            .flat_map(|(at, ids)| ids.iter().map(move |id| (*at, *id)))
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::ids::SkuId;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, usize),
        Remove(u64, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few times and few ids, so that removes find what was inserted, and inserts
        // come at, before and after the last time.
        prop_oneof![
            (0..6u64, 0..12usize).prop_map(|(at, id)| Op::Insert(at, id)),
            (0..6u64, 0..12usize).prop_map(|(at, id)| Op::Remove(at, id)),
        ]
    }

    proptest! {
        /// Against a model that keeps, per time, the ids in the order they came: the
        /// same answer to every remove, the same earliest time and length after every
        /// step, and the same pairs in the same order at the end.
        #[test]
        fn keeps_each_time_in_the_order_added(ops in proptest::collection::vec(op(), 0..200)) {
            let sku = SkuId::parse("time-index").unwrap();
            let ids: Vec<OrderId> = (0..12).map(|_| OrderId::generate(&sku)).collect();
            let mut index = TimeIndex::default();
            let mut model: BTreeMap<u64, Vec<OrderId>> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(at, id) => {
                        // An id is indexed at most once, as in the state machine.
                        if model.values().any(|held| held.contains(&ids[id])) {
                            continue;
                        }
                        index.insert(Timestamp(at), ids[id]);
                        model.entry(at).or_default().push(ids[id]);
                    }
                    Op::Remove(at, id) => {
                        let held = model.get_mut(&at);
                        let expected = held.is_some_and(|held| {
                            let before = held.len();
                            held.retain(|other| *other != ids[id]);
                            held.len() < before
                        });
                        model.retain(|_, held| !held.is_empty());
                        prop_assert_eq!(index.remove(Timestamp(at), &ids[id]), expected);
                    }
                }
                prop_assert_eq!(index.len(), model.values().map(Vec::len).sum::<usize>());
                prop_assert_eq!(index.first_at(), model.keys().next().map(|at| Timestamp(*at)));
                prop_assert!(index.buckets.values().all(|bucket| !bucket.is_empty()));
            }
            let expected = model
                .iter()
                .flat_map(|(at, held)| held.iter().map(move |id| (Timestamp(*at), *id)));
            prop_assert!(index.iter().eq(expected));
        }
    }
}
