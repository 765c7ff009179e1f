//! Refusals of reservations that carried an idempotency key, held so that a retry
//! with the same key and request gets the same answer, and the key with another
//! request 422, as for a reservation.
//!
//! A reservation's key is state: journaled with its order. A refusal changed nothing
//! and is not journaled (journaling each would make the refusals of a sold-out crowd
//! as dear as sales), so it is held here, in memory, for [`KEYED_REFUSAL_KEPT_MS`]
//! and at most [`KEYED_REFUSALS_PER_SKU_MAX`] per SKU, the oldest going first. After
//! a restart a retry is decided afresh.
//!
//! Two writers share one SKU's table: its actor, for the refusals it decides, and the
//! HTTP edge, for the keyed orders of a sold-out SKU it answers without the actor
//! (`Engine::refuse_keyed_order`). Each decides a key under the table's lock
//! ([`KeyedRefusals::lock`]), so a key is reserved or refused, never both.
//!
//! Only refusals that answer the request are held: sold out, sale ended, purchase
//! limit. "Not on sale yet" answers the moment (a retry after the opening should
//! get its chance), and throttling and overload never reach here.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::clock::Timestamp;
use crate::ids::{IdempotencyKey, RequestFingerprint};
use crate::limits::{KEYED_REFUSALS_PER_SKU_MAX, KEYED_REFUSAL_KEPT_MS};
use crate::sku::{SkuError, SkuStatus};

/// What an earlier request with the same key was answered.
#[derive(Debug, PartialEq)]
pub(crate) enum Earlier {
    None,
    /// The same request was refused with this.
    Refused(SkuError),
    /// The key was refused for another request.
    OtherRequest,
}

impl Earlier {
    /// The answer it gives the request again, if any.
    pub(crate) fn answer(self) -> Option<SkuError> {
        match self {
            Earlier::None => None,
            Earlier::Refused(error) => Some(error),
            Earlier::OtherRequest => Some(SkuError::IdempotencyKeyReused),
        }
    }
}

/// One SKU's held refusals, shared by its actor and the edge.
#[derive(Default)]
pub(crate) struct KeyedRefusals {
    held: Mutex<Held>,
}

impl KeyedRefusals {
    /// The table, held while a keyed request is decided: by the actor from its
    /// lookup here through its decision (and the reservation's key added to
    /// `reserved_keys`), by the edge from its look at `reserved_keys` through its
    /// answer. So the two never both decide one key: whichever comes second finds
    /// what the first did.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Held> {
        // Nothing in `Held` panics half-way through a change; a panic elsewhere while
        // holding the lock leaves a consistent table.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets every refusal: they may rest on state a failed write took with it.
    pub(crate) fn clear(&self) {
        // Freed once the lock is released: up to 50,000 keys.
        let forgotten = std::mem::take(&mut *self.lock());
        drop(forgotten);
    }
}

/// Expired refusals dropped by one call at most: a crowd refused within a second
/// expires within a second an hour later, and whoever holds the lock then (the actor,
/// an edge worker) should not drop 50,000 keys in one go. An expired refusal not yet
/// dropped is never answered: its time is checked on every lookup.
const EXPIRED_DROPPED_PER_CALL_MAX: usize = 256;

#[derive(Default)]
pub(crate) struct Held {
    /// The refusal held for each key, and when it was held.
    by_key: HashMap<IdempotencyKey, (RequestFingerprint, SkuError, Timestamp)>,
    /// The keys in the order they were held, oldest first. A key held again once its
    /// refusal expired (before this entry was dropped) appears twice; the older entry
    /// is told apart by its time.
    by_age: VecDeque<(Timestamp, IdempotencyKey)>,
}

fn still_held(at: Timestamp, now: Timestamp) -> bool {
    at.as_millis() + KEYED_REFUSAL_KEPT_MS > now.as_millis()
}

impl Held {
    /// What an earlier request with `key` was refused with, if any.
    pub(crate) fn earlier(
        &mut self,
        key: &IdempotencyKey,
        fingerprint: &RequestFingerprint,
        now: Timestamp,
    ) -> Earlier {
        self.forget_expired(now);
        match self.by_key.get(key) {
            Some((_, _, at)) if !still_held(*at, now) => Earlier::None,
            None => Earlier::None,
            Some((original, error, _)) if original == fingerprint => {
                Earlier::Refused(error.clone())
            }
            Some(_) => Earlier::OtherRequest,
        }
    }

    /// Holds `error` for the key if it answers the request (see the module doc).
    /// The key must not be held already: [`Held::earlier`] said so, under the same
    /// lock.
    pub(crate) fn remember(
        &mut self,
        key: IdempotencyKey,
        fingerprint: RequestFingerprint,
        error: &SkuError,
        now: Timestamp,
    ) {
        let answers_the_request = matches!(
            error,
            SkuError::SoldOut
                | SkuError::PurchaseLimit { .. }
                | SkuError::NotOnSale {
                    status: SkuStatus::Ended
                }
        );
        if !answers_the_request {
            return;
        }
        self.forget_expired(now);
        if self.by_age.len() >= KEYED_REFUSALS_PER_SKU_MAX {
            if let Some((at, oldest)) = self.by_age.pop_front() {
                self.drop_entry(at, &oldest);
            }
        }
        // The actor reads its clock before it takes the lock, so the edge may have
        // held a key at a later time meanwhile: kept in order, a key is forgotten at
        // most that much late.
        let at = self.by_age.back().map_or(now, |(last, _)| now.max(*last));
        let previous = self
            .by_key
            .insert(key.clone(), (fingerprint, error.clone(), at));
        debug_assert!(
            previous.is_none_or(|(_, _, held_at)| !still_held(held_at, now)),
            "a held key is answered, not refused again"
        );
        self.by_age.push_back((at, key));
    }

    /// Answers a keyed request refused with `refusal` from the state the SKU
    /// published: with the refusal held for the key if there is one, else with
    /// `refusal`, held from now on as the actor would hold it. Says whether the answer
    /// was held before.
    pub(crate) fn refuse(
        &mut self,
        key: &IdempotencyKey,
        fingerprint: &RequestFingerprint,
        refusal: SkuError,
        now: Timestamp,
    ) -> (SkuError, bool) {
        match self.earlier(key, fingerprint, now).answer() {
            Some(earlier) => (earlier, true),
            None => {
                self.remember(key.clone(), *fingerprint, &refusal, now);
                (refusal, false)
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    fn forget_expired(&mut self, now: Timestamp) {
        for _ in 0..EXPIRED_DROPPED_PER_CALL_MAX {
            match self.by_age.front() {
                Some((at, _)) if !still_held(*at, now) => {}
                _ => break,
            }
            if let Some((at, key)) = self.by_age.pop_front() {
                self.drop_entry(at, &key);
            }
        }
    }

    /// Drops the refusal of `key` held at `at`, unless the key was held again since.
    fn drop_entry(&mut self, at: Timestamp, key: &IdempotencyKey) {
        if self
            .by_key
            .get(key)
            .is_some_and(|(_, _, held_at)| *held_at == at)
        {
            self.by_key.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sku::LimitScope;

    fn key(text: &str) -> IdempotencyKey {
        IdempotencyKey::parse(text).unwrap()
    }

    #[test]
    fn a_refusal_is_answered_again_to_the_same_request_for_its_time() {
        let table = KeyedRefusals::default();
        let mut held = table.lock();
        let (alice, bob) = (
            RequestFingerprint::of(&[b"alice"]),
            RequestFingerprint::of(&[b"bob"]),
        );
        let t0 = Timestamp(1_000_000);
        assert_eq!(held.earlier(&key("k"), &alice, t0), Earlier::None);
        held.remember(key("k"), alice, &SkuError::SoldOut, t0);
        let later = Timestamp(t0.0 + KEYED_REFUSAL_KEPT_MS - 1);
        assert_eq!(
            held.earlier(&key("k"), &alice, later),
            Earlier::Refused(SkuError::SoldOut)
        );
        assert_eq!(held.earlier(&key("k"), &bob, later), Earlier::OtherRequest);
        let expired = Timestamp(t0.0 + KEYED_REFUSAL_KEPT_MS);
        assert_eq!(held.earlier(&key("k"), &alice, expired), Earlier::None);
        assert_eq!(held.len(), 0);
    }

    #[test]
    fn a_refusal_made_without_the_actor_is_held_and_answers_like_one_made_by_it() {
        let table = KeyedRefusals::default();
        let mut held = table.lock();
        let (alice, bob) = (
            RequestFingerprint::of(&[b"alice"]),
            RequestFingerprint::of(&[b"bob"]),
        );
        let now = Timestamp(1_000);
        let limit = SkuError::PurchaseLimit {
            scope: LimitScope::User,
            limit: 1,
        };
        // Held by the actor: given back, not the edge's refusal.
        held.remember(key("limited"), alice, &limit, now);
        assert_eq!(
            held.refuse(&key("limited"), &alice, SkuError::SoldOut, now),
            (limit.clone(), true)
        );
        assert_eq!(
            held.refuse(&key("limited"), &bob, SkuError::SoldOut, now),
            (SkuError::IdempotencyKeyReused, true)
        );
        // New: refused, and held for the actor and the edge alike.
        assert_eq!(
            held.refuse(&key("new"), &alice, SkuError::SoldOut, now),
            (SkuError::SoldOut, false)
        );
        assert_eq!(
            held.earlier(&key("new"), &alice, now),
            Earlier::Refused(SkuError::SoldOut)
        );
        assert_eq!(
            held.refuse(&key("new"), &bob, SkuError::SoldOut, now),
            (SkuError::IdempotencyKeyReused, true)
        );
        // "Not on sale yet" answers the moment and is not held.
        let scheduled = SkuError::NotOnSale {
            status: SkuStatus::Scheduled,
        };
        assert_eq!(
            held.refuse(&key("early"), &alice, scheduled.clone(), now),
            (scheduled, false)
        );
        assert_eq!(held.earlier(&key("early"), &alice, now), Earlier::None);
        drop(held);
        table.clear();
        assert_eq!(table.lock().len(), 0);
    }

    /// The actor reads its clock before it takes the lock; a key held by the edge
    /// meanwhile, at a later time, must not keep the actor's from being forgotten.
    #[test]
    fn a_key_held_at_an_earlier_time_than_the_last_is_forgotten_in_turn() {
        let table = KeyedRefusals::default();
        let mut held = table.lock();
        let fingerprint = RequestFingerprint::of(&[b"x"]);
        held.remember(
            key("edge"),
            fingerprint,
            &SkuError::SoldOut,
            Timestamp(1_000),
        );
        held.remember(
            key("actor"),
            fingerprint,
            &SkuError::SoldOut,
            Timestamp(999),
        );
        let both_gone = Timestamp(1_000 + KEYED_REFUSAL_KEPT_MS);
        assert_eq!(
            held.earlier(&key("actor"), &fingerprint, both_gone),
            Earlier::None
        );
        assert_eq!(held.len(), 0);
    }

    /// A crowd's refusals expire together; no lookup drops more than a bounded
    /// number of them, none of them is answered once expired, and a key held again
    /// meanwhile is not dropped with its expired entry.
    #[test]
    fn expired_refusals_are_dropped_a_bounded_number_at_a_time_and_never_answered() {
        let table = KeyedRefusals::default();
        let mut held = table.lock();
        let fingerprint = RequestFingerprint::of(&[b"x"]);
        let crowd = 3 * EXPIRED_DROPPED_PER_CALL_MAX;
        for n in 0..crowd {
            held.remember(
                key(&format!("k{n}")),
                fingerprint,
                &SkuError::SoldOut,
                Timestamp(7),
            );
        }
        let expired = Timestamp(7 + KEYED_REFUSAL_KEPT_MS);
        let last = key(&format!("k{}", crowd - 1));
        assert_eq!(held.earlier(&last, &fingerprint, expired), Earlier::None);
        assert_eq!(held.len(), crowd - EXPIRED_DROPPED_PER_CALL_MAX);
        // Held again before its expired entry is dropped: the new refusal stays.
        held.remember(last.clone(), fingerprint, &SkuError::SoldOut, expired);
        for _ in 0..3 {
            held.earlier(&key("other"), &fingerprint, expired);
        }
        assert_eq!(held.len(), 1);
        assert_eq!(
            held.earlier(&last, &fingerprint, expired),
            Earlier::Refused(SkuError::SoldOut)
        );
    }

    #[test]
    fn only_refusals_that_answer_the_request_are_held() {
        let table = KeyedRefusals::default();
        let mut held = table.lock();
        let fingerprint = RequestFingerprint::of(&[b"x"]);
        let now = Timestamp(5);
        let limit = SkuError::PurchaseLimit {
            scope: LimitScope::User,
            limit: 1,
        };
        let ended = SkuError::NotOnSale {
            status: SkuStatus::Ended,
        };
        let scheduled = SkuError::NotOnSale {
            status: SkuStatus::Scheduled,
        };
        for (name, error, held_after) in [
            ("limit", limit, true),
            ("ended", ended, true),
            ("scheduled", scheduled, false),
            ("reused", SkuError::IdempotencyKeyReused, false),
        ] {
            held.remember(key(name), fingerprint, &error, now);
            assert_eq!(
                held.earlier(&key(name), &fingerprint, now) != Earlier::None,
                held_after,
                "{name}"
            );
        }
    }

    #[test]
    fn past_the_bound_the_oldest_go_first() {
        let table = KeyedRefusals::default();
        let mut held = table.lock();
        let fingerprint = RequestFingerprint::of(&[b"x"]);
        for n in 0..KEYED_REFUSALS_PER_SKU_MAX + 2 {
            held.remember(
                key(&format!("k{n}")),
                fingerprint,
                &SkuError::SoldOut,
                Timestamp(n as u64),
            );
        }
        assert_eq!(held.len(), KEYED_REFUSALS_PER_SKU_MAX);
        let now = Timestamp(KEYED_REFUSALS_PER_SKU_MAX as u64 + 2);
        assert_eq!(held.earlier(&key("k0"), &fingerprint, now), Earlier::None);
        assert_eq!(held.earlier(&key("k1"), &fingerprint, now), Earlier::None);
        assert_eq!(
            held.earlier(&key("k2"), &fingerprint, now),
            Earlier::Refused(SkuError::SoldOut)
        );
    }
}
