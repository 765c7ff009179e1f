//! keydrop's engine: sells each card to exactly one paying buyer, and remembers it.
//!
//! Layout, from the inside out:
//! - [`sku`]: the pure state machine of one SKU. No I/O, no clock, no `async`.
//! - [`vault`]: AES-256-GCM sealing of card secrets, with key rotation.
//! - [`codec`]: every byte written to disk is encoded and checked here, and only here.
//! - [`journal`]: RocksDB, the group-commit writer and recovery; the only module that
//!   touches RocksDB.
//! - `actor`: one ractor actor per SKU, serialising its commands in memory; with it,
//!   what it shares with the edge: `keyed_refusals`, the refusals answered again to
//!   retries with the same key, and `reserved_keys`, the keys its orders hold.
//! - [`Engine`]: the handle callers hold; routes calls to actors, runs expiry.
//!
//! Invariants: a card is in at most one live order; `available + reserved + sold ==
//! imported` for every SKU at all times; no caller is answered before the change it
//! is told about is on disk (fsync'd).

mod actor;
pub mod clock;
pub mod codec;
mod engine;
mod error;
pub mod ids;
pub mod journal;
mod keyed_refusals;
pub mod limits;
mod reserved_keys;
pub mod sku;
pub mod vault;

pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use engine::{Engine, EngineConfig, OrderDetails, Reservation};
pub use error::EngineError;
pub use ids::{
    CardSerial, DeviceId, IdempotencyKey, OrderId, PaymentRef, RequestFingerprint, SkuId, UserId,
};
pub use sku::{
    ImportOutcome, OrderStatus, OrderView, RefusedPayment, SkuDef, SkuError, SkuStatus, SkuView,
    StockCounts,
};
pub use vault::{CardSecret, KeyRing, VaultError};
