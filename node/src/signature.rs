//! Payment callback signatures: `X-Keydrop-Signature: t=<unix seconds>,v1=<hex>`,
//! where the hex is HMAC-SHA256 of `"<t>.<raw body>"` keyed with the payment secret.
//!
//! The timestamp is inside the MAC and must be within [`SIGNATURE_AGE_SECS_MAX`] of
//! our clock, so a captured callback cannot be replayed later. Comparison is
//! constant-time. Several `v1=` entries are accepted (a provider rotating its secret
//! signs with both), and one match suffices.

use hmac::{Hmac, Mac};
use sha2::Sha256;
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
) -> Result<(), SignatureError> {
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
        Ok(())
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
        assert_eq!(verify(SECRET, Some(header.as_bytes()), body, NOW), Ok(()));
        // Within the window either way.
        assert_eq!(
            verify(SECRET, Some(header.as_bytes()), body, NOW + 300),
            Ok(())
        );
        assert_eq!(
            verify(SECRET, Some(header.as_bytes()), body, NOW - 300),
            Ok(())
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
        assert_eq!(verify(SECRET, Some(header.as_bytes()), body, NOW), Ok(()));
    }
}
