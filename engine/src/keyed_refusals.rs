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
//! (`Engine::refuse_keyed_order`). A reservation is looked up before a refusal, by
//! both, so a key that ends up both reserved (a concurrent request with it reached
//! the actor as a card came back) and refused is answered as reserved from then on.
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
    /// What an earlier request with `key` was refused with, if any.
    pub(crate) fn earlier(
        &self,
        key: &IdempotencyKey,
        fingerprint: &RequestFingerprint,
        now: Timestamp,
    ) -> Earlier {
        self.lock().earlier(key, fingerprint, now)
    }

    /// Holds `error` for the key if it answers the request (see the module doc).
    /// The key must not be held already: [`KeyedRefusals::earlier`] said so.
    pub(crate) fn remember(
        &self,
        key: IdempotencyKey,
        fingerprint: RequestFingerprint,
        error: &SkuError,
        now: Timestamp,
    ) {
        self.lock().remember(key, fingerprint, error, now);
    }

    /// Answers a keyed request refused with `refusal` from the state the SKU
    /// published: with the refusal held for the key if there is one, else with
    /// `refusal`, held from now on as the actor would hold it. Says whether the answer
    /// was held before.
    pub(crate) fn refuse(
        &self,
        key: &IdempotencyKey,
        fingerprint: &RequestFingerprint,
        refusal: SkuError,
        now: Timestamp,
    ) -> (SkuError, bool) {
        let mut held = self.lock();
        match held.earlier(key, fingerprint, now) {
            Earlier::Refused(earlier) => (earlier, true),
            Earlier::OtherRequest => (SkuError::IdempotencyKeyReused, true),
            Earlier::None => {
                held.remember(key.clone(), *fingerprint, &refusal, now);
                (refusal, false)
            }
        }
    }

    /// Forgets every refusal: they may rest on state a failed write took with it.
    pub(crate) fn clear(&self) {
        *self.lock() = Held::default();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().by_key.len()
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        // Nothing in `Held` panics half-way through a change; a panic elsewhere while
        // holding the lock leaves a consistent table.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct Held {
    by_key: HashMap<IdempotencyKey, (RequestFingerprint, SkuError)>,
    /// Each held key once, oldest first.
    by_age: VecDeque<(Timestamp, IdempotencyKey)>,
}

impl Held {
    fn earlier(
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

    fn remember(
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
        self.by_age.push_back((now, key));
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
        let held = KeyedRefusals::default();
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
        let held = KeyedRefusals::default();
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
        held.clear();
        assert_eq!(held.len(), 0);
    }

    #[test]
    fn only_refusals_that_answer_the_request_are_held() {
        let held = KeyedRefusals::default();
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
        let held = KeyedRefusals::default();
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
