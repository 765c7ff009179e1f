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

#[derive(Default)]
pub(crate) struct Held {
    by_key: HashMap<IdempotencyKey, (RequestFingerprint, SkuError)>,
    /// Each held key once, oldest first.
    by_age: VecDeque<(Timestamp, IdempotencyKey)>,
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
            None => Earlier::None,
            Some((original, error)) if original == fingerprint => Earlier::Refused(error.clone()),
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
            if let Some((_, oldest)) = self.by_age.pop_front() {
                self.by_key.remove(&oldest);
            }
        }
        let previous = self
            .by_key
            .insert(key.clone(), (fingerprint, error.clone()));
        debug_assert!(
            previous.is_none(),
            "a held key is answered, not refused again"
        );
        if previous.is_some() {
            return;
        }
        // The actor reads its clock before it takes the lock, so the edge may have
        // held a key at a later time meanwhile: kept in order, a key is forgotten at
        // most that much late.
        let at = self.by_age.back().map_or(now, |(last, _)| now.max(*last));
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
        match self.earlier(key, fingerprint, now) {
            Earlier::Refused(earlier) => (earlier, true),
            Earlier::OtherRequest => (SkuError::IdempotencyKeyReused, true),
            Earlier::None => {
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
        while let Some((at, _)) = self.by_age.front() {
            if at.as_millis() + KEYED_REFUSAL_KEPT_MS > now.as_millis() {
                break;
            }
            if let Some((_, key)) = self.by_age.pop_front() {
                self.by_key.remove(&key);
            }
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
