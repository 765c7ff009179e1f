//! The card vault: AES-256-GCM sealing of card secrets.
//!
//! Secrets are sealed before they reach the SKU actor and opened only for a paid
//! order, so plaintext never enters the state machine, the journal, a snapshot or a
//! log line. [`CardSecret`] has a redacting `Debug` and is zeroised on drop.
//!
//! Sealed layout: `version (1) | key id (4, BE) | nonce (12) | ciphertext + tag (16)`.
//! The associated data binds a ciphertext to its SKU and serial, so a ciphertext
//! copied onto another card fails to open instead of revealing the wrong secret.
//!
//! Nonces: 96 bits from the OS CSPRNG for every seal. Random nonces are safe under
//! one key up to about 2^32 seals (NIST SP 800-38D, §8.3: collision chance below
//! 2^-32); a SKU holds at most 5·10^7 cards and keys rotate, so one key seals far
//! fewer than that. A counter would need its own durable state and breaks when two
//! processes share a key; random does not.

use std::fmt;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

use crate::ids::{CardSerial, SkuId};
use crate::limits::SECRET_BYTES_MAX;

const SEALED_VERSION: u8 = 1;
const KEY_ID_LEN: usize = 4;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;
const AAD_DOMAIN: &[u8] = b"keydrop-card-v1\0";

#[derive(Debug, Error)]
pub enum VaultError {
    #[error("master key must be 32 bytes given as 64 hex digits or base64")]
    BadKeyMaterial,
    #[error("the key ring is empty")]
    NoKeys,
    #[error("two master keys share key id {0:08x}")]
    DuplicateKeyId(u32),
    #[error("sealed secret uses key {0:08x}, which is not in the key ring")]
    UnknownKey(u32),
    #[error("sealed secret failed authentication (wrong key, or bound to another card)")]
    Authentication,
    #[error("sealed secret is malformed")]
    Malformed,
    #[error("card secret must be 1 to {SECRET_BYTES_MAX} bytes")]
    SecretLength,
    #[error("reading key file {path}: {source}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A card's plaintext secret. Never logged: `Debug` prints a placeholder, and the
/// bytes are wiped when it is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct CardSecret(Zeroizing<String>);

impl CardSecret {
    pub fn new(secret: impl Into<String>) -> Result<Self, VaultError> {
        let secret = secret.into();
        if secret.is_empty() || secret.len() > SECRET_BYTES_MAX {
            let mut secret = secret;
            secret.zeroize();
            return Err(VaultError::SecretLength);
        }
        Ok(CardSecret(Zeroizing::new(secret)))
    }

    /// The plaintext, for the one place that hands it to a paying buyer.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CardSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CardSecret(<redacted>)")
    }
}

/// A sealed card secret as stored in the journal: opaque without the key ring.
/// Decoded through [`SealedSecret::from_bytes`] like any other, so a record or a
/// SKU bundle cannot bring in one too short to name its key and nonce.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<u8>")]
pub struct SealedSecret(Vec<u8>);

impl TryFrom<Vec<u8>> for SealedSecret {
    type Error = VaultError;

    fn try_from(bytes: Vec<u8>) -> Result<Self, VaultError> {
        SealedSecret::from_bytes(bytes)
    }
}

impl SealedSecret {
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, VaultError> {
        if bytes.len() < HEADER_LEN + TAG_LEN || bytes[0] != SEALED_VERSION {
            return Err(VaultError::Malformed);
        }
        Ok(SealedSecret(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn key_id(&self) -> u32 {
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&self.0[1..1 + KEY_ID_LEN]);
        u32::from_be_bytes(id)
    }

    fn nonce(&self) -> &[u8] {
        &self.0[1 + KEY_ID_LEN..HEADER_LEN]
    }
}

impl fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SealedSecret(key {:08x}, {} bytes)",
            self.key_id(),
            self.0.len()
        )
    }
}

struct MasterKey {
    id: u32,
    cipher: Aes256Gcm,
}

/// The master keys: the first seals, all of them open. Rotation puts a new key
/// first, re-seals every card in the background, and then the old key can go.
pub struct KeyRing {
    keys: Vec<MasterKey>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<String> = self.keys.iter().map(|k| format!("{:08x}", k.id)).collect();
        write!(f, "KeyRing(keys: [{}])", ids.join(", "))
    }
}

/// Parses 32 bytes of key material written as 64 hex digits or base64.
pub fn parse_key_material(text: &str) -> Result<Zeroizing<[u8; 32]>, VaultError> {
    let text = text.trim();
    let mut key = Zeroizing::new([0u8; 32]);
    if text.len() == 64 && hex::decode_to_slice(text, key.as_mut()).is_ok() {
        return Ok(key);
    }
    let decoded = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| VaultError::BadKeyMaterial)?,
    );
    if decoded.len() != 32 {
        return Err(VaultError::BadKeyMaterial);
    }
    key.copy_from_slice(&decoded);
    Ok(key)
}

/// A fresh random key, hex encoded, for the documented development default.
pub fn generate_key_hex() -> Zeroizing<String> {
    let mut key = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(key.as_mut());
    Zeroizing::new(hex::encode(key.as_ref()))
}

impl KeyRing {
    /// Builds a ring from raw keys; the first one seals new secrets.
    pub fn new(keys: Vec<Zeroizing<[u8; 32]>>) -> Result<Self, VaultError> {
        if keys.is_empty() {
            return Err(VaultError::NoKeys);
        }
        let mut ring: Vec<MasterKey> = Vec::with_capacity(keys.len());
        for key in keys {
            // The id is derived, not chosen, so two different keys cannot be given
            // the same id by mistake; a clash of the 32-bit digest is refused.
            let digest = Sha256::new()
                .chain_update(b"keydrop-key-id\0")
                .chain_update(key.as_ref())
                .finalize();
            let id = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
            if ring.iter().any(|k| k.id == id) {
                return Err(VaultError::DuplicateKeyId(id));
            }
            let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key.as_ref()));
            ring.push(MasterKey { id, cipher });
        }
        Ok(KeyRing { keys: ring })
    }

    /// Parses key text: one key per non-empty line (`#` starts a comment), newest
    /// first. A single line is the common case.
    pub fn from_text(text: &str) -> Result<Self, VaultError> {
        let keys = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(parse_key_material)
            .collect::<Result<Vec<_>, _>>()?;
        KeyRing::new(keys)
    }

    pub fn from_file(path: &Path) -> Result<Self, VaultError> {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
            VaultError::KeyFile {
                path: path.display().to_string(),
                source,
            }
        })?);
        KeyRing::from_text(&text)
    }

    /// The id of the key that seals new secrets.
    pub fn current_key_id(&self) -> u32 {
        self.keys[0].id
    }

    pub fn key_ids(&self) -> Vec<u32> {
        self.keys.iter().map(|k| k.id).collect()
    }

    fn aad(sku: &SkuId, serial: &CardSerial) -> Vec<u8> {
        let mut aad =
            Vec::with_capacity(AAD_DOMAIN.len() + 4 + sku.as_str().len() + serial.as_str().len());
        aad.extend_from_slice(AAD_DOMAIN);
        aad.extend_from_slice(&(sku.as_str().len() as u16).to_be_bytes());
        aad.extend_from_slice(sku.as_str().as_bytes());
        aad.extend_from_slice(serial.as_str().as_bytes());
        aad
    }

    /// Seals a secret for one card with the current key.
    pub fn seal(&self, sku: &SkuId, serial: &CardSerial, secret: &CardSecret) -> SealedSecret {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = Self::aad(sku, serial);
        let ciphertext = key
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.expose().as_bytes(),
                    aad: &aad,
                },
            )
            .expect("AES-GCM encryption cannot fail for inputs under 64 GiB");
        let mut out = Vec::with_capacity(HEADER_LEN + ciphertext.len());
        out.push(SEALED_VERSION);
        out.extend_from_slice(&key.id.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        SealedSecret(out)
    }

    /// Opens a sealed secret; fails if it was sealed for another SKU or serial.
    pub fn open(
        &self,
        sku: &SkuId,
        serial: &CardSerial,
        sealed: &SealedSecret,
    ) -> Result<CardSecret, VaultError> {
        let key_id = sealed.key_id();
        let key = self
            .keys
            .iter()
            .find(|k| k.id == key_id)
            .ok_or(VaultError::UnknownKey(key_id))?;
        let aad = Self::aad(sku, serial);
        let plaintext = Zeroizing::new(
            key.cipher
                .decrypt(
                    Nonce::from_slice(sealed.nonce()),
                    Payload {
                        msg: &sealed.as_bytes()[HEADER_LEN..],
                        aad: &aad,
                    },
                )
                .map_err(|_| VaultError::Authentication)?,
        );
        let text = std::str::from_utf8(&plaintext).map_err(|_| VaultError::Malformed)?;
        CardSecret::new(text.to_owned())
    }

    /// Whether this sealed secret should be re-sealed under the current key.
    pub fn needs_reseal(&self, sealed: &SealedSecret) -> bool {
        sealed.key_id() != self.current_key_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(seed: u8) -> KeyRing {
        KeyRing::new(vec![Zeroizing::new([seed; 32])]).unwrap()
    }

    fn ids() -> (SkuId, CardSerial) {
        (
            SkuId::parse("sku").unwrap(),
            CardSerial::parse("S-1").unwrap(),
        )
    }

    #[test]
    fn seal_open_round_trip() {
        let ring = ring(7);
        let (sku, serial) = ids();
        let secret = CardSecret::new("ABCD-EFGH-1234").unwrap();
        let sealed = ring.seal(&sku, &serial, &secret);
        assert_eq!(sealed.key_id(), ring.current_key_id());
        assert_eq!(ring.open(&sku, &serial, &sealed).unwrap(), secret);
        let bytes = sealed.as_bytes();
        assert!(!bytes.windows(14).any(|w| w == b"ABCD-EFGH-1234"));
    }

    #[test]
    fn ciphertext_is_bound_to_sku_and_serial() {
        let ring = ring(7);
        let (sku, serial) = ids();
        let sealed = ring.seal(&sku, &serial, &CardSecret::new("x").unwrap());
        let other_serial = CardSerial::parse("S-2").unwrap();
        let other_sku = SkuId::parse("sku2").unwrap();
        assert!(matches!(
            ring.open(&sku, &other_serial, &sealed),
            Err(VaultError::Authentication)
        ));
        assert!(matches!(
            ring.open(&other_sku, &serial, &sealed),
            Err(VaultError::Authentication)
        ));
    }

    #[test]
    fn wrong_or_missing_key_is_refused() {
        let (sku, serial) = ids();
        let sealed = ring(1).seal(&sku, &serial, &CardSecret::new("x").unwrap());
        assert!(matches!(
            ring(2).open(&sku, &serial, &sealed),
            Err(VaultError::UnknownKey(_))
        ));
    }

    #[test]
    fn rotation_keeps_old_keys_readable() {
        let (sku, serial) = ids();
        let old = ring(1);
        let sealed_old = old.seal(&sku, &serial, &CardSecret::new("secret").unwrap());
        let rotated = KeyRing::new(vec![Zeroizing::new([2; 32]), Zeroizing::new([1; 32])]).unwrap();
        assert!(rotated.needs_reseal(&sealed_old));
        let secret = rotated.open(&sku, &serial, &sealed_old).unwrap();
        let resealed = rotated.seal(&sku, &serial, &secret);
        assert!(!rotated.needs_reseal(&resealed));
        assert_eq!(
            ring(2).open(&sku, &serial, &resealed).unwrap().expose(),
            "secret"
        );
    }

    #[test]
    fn nonces_are_unique_across_many_seals() {
        let ring = ring(3);
        let (sku, serial) = ids();
        let secret = CardSecret::new("x").unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50_000 {
            let sealed = ring.seal(&sku, &serial, &secret);
            assert!(seen.insert(sealed.nonce().to_vec()), "nonce repeated");
        }
    }

    #[test]
    fn key_material_formats() {
        let hex_key = "00".repeat(32);
        assert!(parse_key_material(&hex_key).is_ok());
        let b64 = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        assert_eq!(*parse_key_material(&b64).unwrap(), [9u8; 32]);
        assert!(parse_key_material("short").is_err());
        assert!(KeyRing::from_text("# nothing\n").is_err());
        assert!(KeyRing::from_text(&format!("{hex_key}\n{hex_key}\n")).is_err());
    }

    #[test]
    fn debug_never_shows_secrets() {
        let secret = CardSecret::new("TOPSECRET").unwrap();
        assert!(!format!("{secret:?}").contains("TOPSECRET"));
        assert!(CardSecret::new("").is_err());
        assert!(SealedSecret::from_bytes(vec![1, 2, 3]).is_err());
    }
}
