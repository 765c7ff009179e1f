//! Payment callback signatures: `X-Keydrop-Signature: t=<unix seconds>,v1=<hex>`,
//! where the hex is HMAC-SHA256 of `"<t>.<raw body>"` keyed with the payment secret.
//!
//! The timestamp is inside the MAC and must be within [`SIGNATURE_AGE_SECS_MAX`] of
//! our clock, so a captured callback cannot be replayed later. Comparison is
//! constant-time. Several `v1=` entries are accepted (a provider rotating its secret
//! signs with both), and one match suffices.

use dashmap::DashMap;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// How far a callback's `t` may be from our clock, either way. Wide enough for clock
/// skew and provider retries in flight, narrow enough to make replay useless.
pub const SIGNATURE_AGE_SECS_MAX: i64 = 300;

/// Longest header we look at; a real one is under 100 bytes.
const HEADER_BYTES_MAX: usize = 1024;

/// Why a signature was refused. Callers answer all of them with one vague 401; the
/// reason is for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no signature header")]
    Missing,
    #[error("signature header is malformed")]
    Malformed,
    #[error("signature timestamp is too far from our clock")]
    Stale,
    #[error("signature does not match")]
    Mismatch,
    #[error("signed callback replayed against another order")]
    Replayed,
    #[error("signed before this process started; the provider's retry carries a new signature")]
    SignedBeforeStart,
}

/// The system clock in unix seconds (0 before 1970): the clock a node's engine reads,
/// against which a callback's `t` is checked.
pub fn unix_now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Signed callbacks remembered at most: past this, the oldest are dropped early.
const REMEMBERED_CALLBACKS_MAX: usize = 1_000_000;

/// The signature covers the body, not the order id in the URL, so on its own a
/// captured callback could be replayed against another order within the
/// [`SIGNATURE_AGE_SECS_MAX`] window. The guard remembers which order each signed
/// callback was accepted for, for as long as its timestamp stays valid: the same
/// callback again (a provider retry) passes, the same callback for another order
/// does not. That memory dies with the process, so a callback signed before the
/// process started is refused: an earlier process may have accepted it for another
/// order. Providers sign each retry anew, so a callback caught by a restart is
/// retried, not lost.
pub struct ReplayGuard {
    seen: DashMap<[u8; 32], ([u8; 16], i64)>,
    /// Unix seconds of this process's start.
    since: i64,
}

impl ReplayGuard {
    pub fn starting_at(now_unix_secs: i64) -> Self {
        ReplayGuard {
            seen: DashMap::new(),
            since: now_unix_secs,
        }
    }

    pub fn check(&self, t: i64, body: &[u8], order: &[u8; 16]) -> Result<(), SignatureError> {
        if t < self.since {
            return Err(SignatureError::SignedBeforeStart);
        }
        let key: [u8; 32] = Sha256::new()
            .chain_update(t.to_be_bytes())
            .chain_update(body)
            .finalize()
            .into();
        if self.seen.len() >= REMEMBERED_CALLBACKS_MAX {
            self.forget_older_than(t - SIGNATURE_AGE_SECS_MAX);
        }
        let entry = self.seen.entry(key).or_insert((*order, t));
        if entry.0 == *order {
            Ok(())
        } else {
            Err(SignatureError::Replayed)
        }
    }

    /// Forgets callbacks whose timestamps can no longer pass [`verify`].
    pub fn purge(&self, now_unix_secs: i64) {
        self.forget_older_than(now_unix_secs - 2 * SIGNATURE_AGE_SECS_MAX);
    }

    fn forget_older_than(&self, t_min: i64) {
        self.seen.retain(|_, (_, t)| *t >= t_min);
    }
}

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], t: i64, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header value a provider sends for `body` at `t`.
#[cfg(test)]
pub fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
    let tag = mac(secret, t, body).finalize().into_bytes();
    format!("t={t},v1={}", hex::encode(tag))
}

pub fn verify(
    secret: &[u8],
    header: Option<&[u8]>,
    body: &[u8],
    now_unix_secs: i64,
) -> Result<i64, SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    if header.len() > HEADER_BYTES_MAX {
        return Err(SignatureError::Malformed);
    }
    let header = std::str::from_utf8(header).map_err(|_| SignatureError::Malformed)?;
    let mut t: Option<i64> = None;
    let mut tags: Vec<[u8; 32]> = Vec::new();
    for part in header.split(',') {
        let (key, value) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match key.trim() {
            "t" => {
                let parsed = value
                    .trim()
                    .parse()
                    .map_err(|_| SignatureError::Malformed)?;
                if t.replace(parsed).is_some() {
                    return Err(SignatureError::Malformed);
                }
            }
            "v1" => {
                let mut tag = [0u8; 32];
                hex::decode_to_slice(value.trim(), &mut tag)
                    .map_err(|_| SignatureError::Malformed)?;
                tags.push(tag);
            }
            // Other schemes (a future v2) are ignored, as providers expect.
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if tags.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if now_unix_secs.abs_diff(t) > SIGNATURE_AGE_SECS_MAX as u64 {
        return Err(SignatureError::Stale);
    }
    let expected = mac(secret, t, body).finalize().into_bytes();
    // Every tag is compared, matched or not, so timing does not reveal which one did.
    let matched = tags.iter().fold(subtle::Choice::from(0), |any, tag| {
        any | tag.ct_eq(&expected)
    });
    if bool::from(matched) {
        Ok(t)
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec-test-secret";
    const NOW: i64 = 1_900_000_000;

    #[test]
    fn signed_body_verifies() {
        let body = br#"{"payment_ref":"p1","amount_cents":500}"#;
        let header = sign(SECRET, NOW, body);
        assert_eq!(verify(SECRET, Some(header.as_bytes()), body, NOW), Ok(NOW));
        // Within the window either way.
        assert_eq!(
            verify(SECRET, Some(header.as_bytes()), body, NOW + 300),
            Ok(NOW)
        );
        assert_eq!(
            verify(SECRET, Some(header.as_bytes()), body, NOW - 300),
            Ok(NOW)
        );
    }

    #[test]
    fn refusals() {
        let body = b"{}";
        let header = sign(SECRET, NOW, body);
        let check = |h: &str, body: &[u8], now| verify(SECRET, Some(h.as_bytes()), body, now);
        assert_eq!(
            verify(SECRET, None, body, NOW),
            Err(SignatureError::Missing)
        );
        assert_eq!(check(&header, body, NOW + 301), Err(SignatureError::Stale));
        assert_eq!(check(&header, body, NOW - 301), Err(SignatureError::Stale));
        assert_eq!(check(&header, b"{ }", NOW), Err(SignatureError::Mismatch));
        let other = sign(b"another-secret", NOW, body);
        assert_eq!(check(&other, body, NOW), Err(SignatureError::Mismatch));
        // The timestamp is covered by the MAC: moving it breaks the signature.
        let moved = header.replace(&format!("t={NOW}"), &format!("t={}", NOW + 1));
        assert_eq!(check(&moved, body, NOW), Err(SignatureError::Mismatch));
        for bad in [
            "",
            "t=1",
            "v1=00",
            "t=x,v1=00",
            "t=1,v1=zz",
            "t=1,t=1,v1=00",
            "garbage",
        ] {
            assert_eq!(
                check(bad, body, NOW),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
        assert_eq!(
            verify(SECRET, Some(&[0xff, 0xfe]), body, NOW),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn any_of_several_tags_matches() {
        let body = b"{}";
        let good = sign(SECRET, NOW, body);
        let good_tag = good.split("v1=").nth(1).unwrap();
        let header = format!("t={NOW},v1={},v1={good_tag}", "00".repeat(32));
        assert_eq!(verify(SECRET, Some(header.as_bytes()), body, NOW), Ok(NOW));
    }

    #[test]
    fn replay_guard_lets_retries_through_and_stops_other_orders() {
        let guard = ReplayGuard::starting_at(90);
        let body = br#"{"payment_ref":"p","amount_cents":5}"#;
        // Signed before the process started: an earlier one may have taken it.
        assert_eq!(
            guard.check(89, body, &[1; 16]),
            Err(SignatureError::SignedBeforeStart)
        );
        assert_eq!(guard.check(90, body, &[1; 16]), Ok(()));
        assert_eq!(guard.check(100, body, &[1; 16]), Ok(()));
        assert_eq!(guard.check(100, body, &[1; 16]), Ok(()));
        assert_eq!(
            guard.check(100, body, &[2; 16]),
            Err(SignatureError::Replayed)
        );
        assert_eq!(guard.check(101, body, &[2; 16]), Ok(()));
        guard.purge(101 + 2 * SIGNATURE_AGE_SECS_MAX + 1);
        assert!(guard.seen.is_empty());
    }
}
