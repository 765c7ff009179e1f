//! Refused orders that carried an `Idempotency-Key`, so that a retry with the same
//! key and body gets the same refusal back, and the same key with another body 422,
//! as the API promises for every answer to a keyed order.
//!
//! A reservation's key is kept by its SKU's actor, durably, with the order. A
//! refusal (sold out, not on sale, over a purchase limit) changed nothing and is not
//! journaled: journaling each would make the refusals of a sold-out crowd as dear
//! as sales. It is remembered here, in memory, for [`REFUSAL_KEPT`], and at most
//! [`REFUSALS_MAX`] of them; a retry after that, or after a restart, is decided
//! afresh and may get a card that came back to stock. Throttled and overloaded
//! answers (429, 503) are not remembered: their retry is meant to be decided again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use keydrop_engine::{IdempotencyKey, RequestFingerprint, SkuError, SkuId};

/// How long a keyed refusal is answered again to a retry.
pub const REFUSAL_KEPT: Duration = Duration::from_secs(3600);

/// Refusals remembered at most (about 100 bytes each, 20 MB in all): past this, a new refusal is
/// not remembered until older ones expire.
pub const REFUSALS_MAX: usize = 200_000;

/// When full, expired refusals are swept at most this often: a sweep reads every
/// entry, and a crowd of keyed orders past a sold-out SKU must not pay one each.
const SWEEP_WHEN_FULL_EVERY: Duration = Duration::from_secs(1);

/// What an earlier request with the same key was answered.
#[derive(Debug, PartialEq)]
pub enum Earlier {
    /// No refusal remembered for this key.
    None,
    /// The same request was refused with this.
    Refused(SkuError),
    /// The key was used with another request.
    OtherRequest,
}

struct Refused {
    fingerprint: RequestFingerprint,
    error: SkuError,
    at: Instant,
}

#[derive(Default)]
pub struct RefusedKeys {
    /// By a digest of the SKU and the key: a lookup allocates nothing, and an
    /// entry's size does not depend on the key the client chose.
    entries: DashMap<[u8; 16], Refused>,
    last_sweep_when_full: Mutex<Option<Instant>>,
}

fn slot(sku: &SkuId, key: &IdempotencyKey) -> [u8; 16] {
    RequestFingerprint::of(&[sku.as_str().as_bytes(), key.as_str().as_bytes()]).0
}

impl RefusedKeys {
    pub fn earlier(
        &self,
        sku: &SkuId,
        key: &IdempotencyKey,
        fingerprint: &RequestFingerprint,
        now: Instant,
    ) -> Earlier {
        match self.entries.get(&slot(sku, key)) {
            Some(refused) if now.duration_since(refused.at) < REFUSAL_KEPT => {
                if refused.fingerprint == *fingerprint {
                    Earlier::Refused(refused.error.clone())
                } else {
                    Earlier::OtherRequest
                }
            }
            _ => Earlier::None,
        }
    }

    /// A refusal that is the answer to the request, not to the moment: what a retry
    /// with the same key gets again.
    pub fn is_final(error: &SkuError) -> bool {
        matches!(
            error,
            SkuError::SoldOut | SkuError::NotOnSale { .. } | SkuError::PurchaseLimit { .. }
        )
    }

    /// Remembers `error` for the key when it [is final](Self::is_final); false when
    /// it is not, or there is no room.
    pub fn remember(
        &self,
        sku: &SkuId,
        key: &IdempotencyKey,
        fingerprint: RequestFingerprint,
        error: &SkuError,
        now: Instant,
    ) -> bool {
        if !Self::is_final(error) {
            return false;
        }
        if self.entries.len() >= REFUSALS_MAX {
            let mut last = self
                .last_sweep_when_full
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if last.is_some_and(|at| now.duration_since(at) < SWEEP_WHEN_FULL_EVERY) {
                return false;
            }
            *last = Some(now);
            drop(last);
            self.purge(now);
            if self.entries.len() >= REFUSALS_MAX {
                return false;
            }
        }
        self.entries.insert(
            slot(sku, key),
            Refused {
                fingerprint,
                error: error.clone(),
                at: now,
            },
        );
        true
    }

    /// Forgets refusals older than [`REFUSAL_KEPT`].
    pub fn purge(&self, now: Instant) {
        self.entries
            .retain(|_, refused| now.duration_since(refused.at) < REFUSAL_KEPT);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use keydrop_engine::sku::LimitScope;
    use keydrop_engine::SkuStatus;

    use super::*;

    fn ids(sku: &str, key: &str) -> (SkuId, IdempotencyKey) {
        (
            SkuId::parse(sku).unwrap(),
            IdempotencyKey::parse(key).unwrap(),
        )
    }

    #[test]
    fn a_refusal_is_answered_again_to_the_same_request_only() {
        let refusals = RefusedKeys::default();
        let now = Instant::now();
        let (sku, key) = ids("s", "k1");
        let body = RequestFingerprint::of(&[b"alice"]);
        let other = RequestFingerprint::of(&[b"bob"]);
        assert_eq!(refusals.earlier(&sku, &key, &body, now), Earlier::None);
        assert!(refusals.remember(&sku, &key, body, &SkuError::SoldOut, now));
        assert_eq!(
            refusals.earlier(&sku, &key, &body, now + Duration::from_secs(5)),
            Earlier::Refused(SkuError::SoldOut)
        );
        assert_eq!(
            refusals.earlier(&sku, &key, &other, now),
            Earlier::OtherRequest
        );
        // Keys belong to their SKU's orders.
        let (elsewhere, _) = ids("t", "k1");
        assert_eq!(
            refusals.earlier(&elsewhere, &key, &body, now),
            Earlier::None
        );
        // Forgotten after the window, by lookup and by purge.
        let later = now + REFUSAL_KEPT;
        assert_eq!(refusals.earlier(&sku, &key, &body, later), Earlier::None);
        refusals.purge(later);
        assert_eq!(refusals.len(), 0);
    }

    #[test]
    fn only_final_refusals_are_remembered() {
        let refusals = RefusedKeys::default();
        let now = Instant::now();
        let (sku, key) = ids("s", "k");
        let body = RequestFingerprint::of(&[b"alice"]);
        for error in [
            SkuError::NotOnSale {
                status: SkuStatus::Ended,
            },
            SkuError::PurchaseLimit {
                scope: LimitScope::User,
                limit: 1,
            },
        ] {
            assert!(
                refusals.remember(&sku, &key, body, &error, now),
                "{error:?}"
            );
        }
        for error in [SkuError::OrderNotFound, SkuError::IdempotencyKeyReused] {
            assert!(
                !refusals.remember(&sku, &key, body, &error, now),
                "{error:?}"
            );
        }
    }

    #[test]
    fn past_the_bound_new_refusals_wait_for_old_ones_to_expire() {
        let refusals = RefusedKeys::default();
        let now = Instant::now();
        let body = RequestFingerprint::of(&[b"x"]);
        let sku = SkuId::parse("s").unwrap();
        for n in 0..REFUSALS_MAX {
            let key = IdempotencyKey::parse(format!("k{n}")).unwrap();
            assert!(refusals.remember(&sku, &key, body, &SkuError::SoldOut, now));
        }
        let extra = IdempotencyKey::parse("extra").unwrap();
        assert!(!refusals.remember(&sku, &extra, body, &SkuError::SoldOut, now));
        assert_eq!(refusals.len(), REFUSALS_MAX);
        // Just before the entries expire, a sweep finds nothing to drop.
        let ms = Duration::from_millis;
        let remember_at = |at| refusals.remember(&sku, &extra, body, &SkuError::SoldOut, at);
        assert!(!remember_at(now + REFUSAL_KEPT - ms(500)));
        // Once they have expired, the next sweep waits for a second after that one,
        // however many refusals arrive meanwhile,
        assert!(!remember_at(now + REFUSAL_KEPT + ms(100)));
        assert_eq!(refusals.len(), REFUSALS_MAX);
        // and then clears them.
        assert!(remember_at(now + REFUSAL_KEPT + ms(600)));
        assert_eq!(refusals.len(), 1);
    }
}
