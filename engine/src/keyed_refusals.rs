//! Refusals of reservations that carried an idempotency key, held by the SKU's actor
//! so that a retry with the same key and request gets the same answer, and the key
//! with another request 422, as for a reservation.
//!
//! A reservation's key is state: journaled with its order. A refusal changed nothing
//! and is not journaled (journaling each would make the refusals of a sold-out crowd
//! as dear as sales), so it is held here, in memory, for [`KEYED_REFUSAL_KEPT_MS`]
//! and at most [`KEYED_REFUSALS_PER_SKU_MAX`] per SKU, the oldest going first. Held
//! by the actor, it is ordered with the SKU's reservations: a key is either reserved
//! or refused, never both. After a restart a retry is decided afresh.
//!
//! Only refusals that answer the request are held: sold out, sale ended, purchase
//! limit. "Not on sale yet" answers the moment (a retry after the opening should
//! get its chance), and throttling and overload never reach here.

use std::collections::{HashMap, VecDeque};

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

#[derive(Default)]
pub(crate) struct KeyedRefusals {
    by_key: HashMap<IdempotencyKey, (RequestFingerprint, SkuError)>,
    /// Each held key once, oldest first.
    by_age: VecDeque<(Timestamp, IdempotencyKey)>,
}

impl KeyedRefusals {
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
    /// The key must not be held already: [`KeyedRefusals::earlier`] said so.
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
        self.by_age.push_back((now, key));
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
        let mut held = KeyedRefusals::default();
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
    fn only_refusals_that_answer_the_request_are_held() {
        let mut held = KeyedRefusals::default();
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
        let mut held = KeyedRefusals::default();
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
