//! Identifiers, each parsed once at the edge so that everything inside the engine can
//! rely on its shape.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::limits::{
    DEVICE_ID_BYTES_MAX, IDEMPOTENCY_KEY_BYTES_MAX, PAYMENT_REF_BYTES_MAX, SERIAL_BYTES_MAX,
    SKU_ID_BYTES_MAX, USER_ID_BYTES_MAX,
};

/// Number of routing slots SKUs hash into. An order id carries its SKU's slot so that
/// any node can find the owner of an order without a global index.
pub const ROUTING_SLOTS: u32 = 1024;
const ROUTING_SLOT_BITS: u32 = ROUTING_SLOTS.trailing_zeros();
const _: () = assert!(ROUTING_SLOTS.is_power_of_two());

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdError {
    #[error("{what} must be 1 to {max} bytes long")]
    Length { what: &'static str, max: usize },
    #[error("{what} may only contain {allowed}")]
    Charset {
        what: &'static str,
        allowed: &'static str,
    },
    #[error("order id must be 32 lowercase hex digits")]
    OrderIdFormat,
}

fn check_len(what: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    if value.is_empty() || value.len() > max {
        return Err(IdError::Length { what, max });
    }
    Ok(())
}

fn check_no_control(what: &'static str, value: &str) -> Result<(), IdError> {
    if value.chars().any(char::is_control) {
        return Err(IdError::Charset {
            what,
            allowed: "printable characters",
        });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr, $check:expr) => {
        $(#[$doc])*
        ///
        /// Shared text: an id is copied into the order, its buyer's count and the
        /// answer, and a clone is a reference count rather than an allocation.
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Arc<str>);

        // From the decoder's own bytes when it lends them (postcard does): one
        // allocation for the shared text, as a `String` took before.
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Text;
                impl serde::de::Visitor<'_> for Text {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "a {}", $what)
                    }
                    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<$name, E> {
                        $name::parse(value).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(Text)
            }
        }

        // As a string, like `into = "String"` would, without cloning it first.
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl $name {
            pub fn parse(value: impl AsRef<str>) -> Result<Self, IdError> {
                let value = value.as_ref();
                check_len($what, value, $max)?;
                let check: fn(&str) -> Result<(), IdError> = $check;
                check(value)?;
                Ok($name(Arc::from(value)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                $name::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.to_string()
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(value: &str) -> Result<Self, IdError> {
                $name::parse(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

string_id!(
    /// A SKU id: 1–64 of `[A-Za-z0-9_-]`, so it is safe in URLs, keys and metric labels.
    SkuId,
    "sku id",
    SKU_ID_BYTES_MAX,
    |value| {
        if value.bytes().all(SkuId::allows_byte) {
            Ok(())
        } else {
            Err(IdError::Charset {
                what: "sku id",
                allowed: "A-Z, a-z, 0-9, '_' and '-'",
            })
        }
    }
);
string_id!(
    /// The buyer's account id, as the shop knows it.
    UserId,
    "user id",
    USER_ID_BYTES_MAX,
    |value| check_no_control("user id", value)
);
string_id!(
    /// A device fingerprint; scalper scripts rotate user ids, not devices.
    DeviceId,
    "device id",
    DEVICE_ID_BYTES_MAX,
    |value| check_no_control("device id", value)
);
string_id!(
    /// A card's serial, unique within its SKU. Serials are not secret.
    CardSerial,
    "card serial",
    SERIAL_BYTES_MAX,
    |value| check_no_control("card serial", value)
);
string_id!(
    /// A client-chosen key that makes a reservation request safe to retry.
    IdempotencyKey,
    "idempotency key",
    IDEMPOTENCY_KEY_BYTES_MAX,
    |value| check_no_control("idempotency key", value)
);
string_id!(
    /// The payment provider's reference for one captured payment.
    PaymentRef,
    "payment reference",
    PAYMENT_REF_BYTES_MAX,
    |value| check_no_control("payment reference", value)
);

impl SkuId {
    /// Whether `byte` may appear in a SKU id (`[A-Za-z0-9_-]`): such an id needs no
    /// escaping in a URL path, a JSON string or a metric label.
    pub fn allows_byte(byte: u8) -> bool {
        byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-'
    }

    /// A fixed hash of the id (the first four bytes of its SHA-256), stable across
    /// versions and machines because order ids and cluster routing depend on it.
    pub fn route_hash(&self) -> u32 {
        let digest = Sha256::digest(self.0.as_bytes());
        u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
    }

    /// The routing slot, in `0..ROUTING_SLOTS`.
    pub fn slot(&self) -> u32 {
        self.route_hash() >> (32 - ROUTING_SLOT_BITS)
    }
}

/// A digest of a reservation request, so that a reused idempotency key with a
/// different request is told apart from an honest retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestFingerprint(pub [u8; 16]);

impl RequestFingerprint {
    /// Fingerprint of arbitrary request parts; each part is length-prefixed so that
    /// ("ab", "c") and ("a", "bc") differ.
    pub fn of(parts: &[&[u8]]) -> Self {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        let digest = hasher.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        RequestFingerprint(out)
    }
}

/// An order id: the SKU's 32-bit route hash followed by 96 bits from a CSPRNG.
///
/// The random part makes ids unguessable (an order id is the buyer's capability to
/// see the card); the route hash lets any node find the owning SKU, and its top bits
/// are the SKU's routing slot.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OrderId([u8; 16]);

impl OrderId {
    pub const RANDOM_BITS: u32 = 96;

    pub fn generate(sku: &SkuId) -> Self {
        Self::generate_with_route_hash(sku.route_hash())
    }

    /// [`OrderId::generate`] for a SKU whose route hash is already known: the hash
    /// is a SHA-256, which the hot path need not redo for every order.
    pub fn generate_with_route_hash(route_hash: u32) -> Self {
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&route_hash.to_be_bytes());
        // ThreadRng is ChaCha12 reseeded from the OS: a CSPRNG, without a syscall per id.
        rand::thread_rng().fill_bytes(&mut bytes[4..]);
        OrderId(bytes)
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        OrderId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub fn route_hash(&self) -> u32 {
        u32::from_be_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }

    /// The id as clients see it, 32 lowercase hex digits, written into `out`: what
    /// `Display` prints, without a formatter for a caller building a response.
    pub fn write_hex<'a>(&self, out: &'a mut [u8; 32]) -> &'a str {
        hex::encode_to_slice(self.0, out).expect("32 hex digits for 16 bytes");
        std::str::from_utf8(out).expect("hex digits are ASCII")
    }

    pub fn slot(&self) -> u32 {
        self.route_hash() >> (32 - ROUTING_SLOT_BITS)
    }

    pub fn belongs_to(&self, sku: &SkuId) -> bool {
        self.route_hash() == sku.route_hash()
    }
}

impl FromStr for OrderId {
    type Err = IdError;
    fn from_str(value: &str) -> Result<Self, IdError> {
        if value.len() != 32
            || !value
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(IdError::OrderIdFormat);
        }
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(value, &mut bytes).map_err(|_| IdError::OrderIdFormat)?;
        Ok(OrderId(bytes))
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.write_hex(&mut [0u8; 32]))
    }
}

impl fmt::Debug for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OrderId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sku_id_charset_and_length() {
        assert!(SkuId::parse("game-card_100").is_ok());
        assert!(SkuId::parse("a".repeat(64)).is_ok());
        assert!(matches!(
            SkuId::parse("a".repeat(65)),
            Err(IdError::Length { .. })
        ));
        assert!(matches!(SkuId::parse(""), Err(IdError::Length { .. })));
        assert!(matches!(SkuId::parse("a b"), Err(IdError::Charset { .. })));
        assert!(matches!(SkuId::parse("ä"), Err(IdError::Charset { .. })));
    }

    #[test]
    fn order_id_round_trips_and_carries_slot() {
        let sku = SkuId::parse("steam-50").unwrap();
        let id = OrderId::generate(&sku);
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<OrderId>().unwrap(), id);
        assert!(id.belongs_to(&sku));
        assert_eq!(id.slot(), sku.slot());
        assert!(sku.slot() < ROUTING_SLOTS);
        assert!("ABCDEF00000000000000000000000000"
            .parse::<OrderId>()
            .is_err());
        assert!("abc".parse::<OrderId>().is_err());
    }

    #[test]
    fn route_hash_is_fixed() {
        // Order ids on disk and cluster routing depend on this value never changing.
        let sku = SkuId::parse("sku-1").unwrap();
        let digest = Sha256::digest(b"sku-1");
        assert_eq!(sku.route_hash().to_be_bytes(), digest[..4]);
    }

    #[test]
    fn order_ids_do_not_repeat() {
        let sku = SkuId::parse("x").unwrap();
        let ids: std::collections::HashSet<OrderId> =
            (0..10_000).map(|_| OrderId::generate(&sku)).collect();
        assert_eq!(ids.len(), 10_000);
    }

    #[test]
    fn fingerprint_separates_parts() {
        assert_ne!(
            RequestFingerprint::of(&[b"ab", b"c"]),
            RequestFingerprint::of(&[b"a", b"bc"])
        );
    }
}
