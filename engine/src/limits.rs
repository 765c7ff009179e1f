//! Every bound the engine enforces, in one place. Each is a `*_MAX` with the reason
//! it has the value it has.

/// SKU ids appear in URLs, RocksDB keys and metric labels.
pub const SKU_ID_BYTES_MAX: usize = 64;
/// Shop account ids; the HTTP contract allows up to 128 bytes.
pub const USER_ID_BYTES_MAX: usize = 128;
pub const DEVICE_ID_BYTES_MAX: usize = 128;
pub const SERIAL_BYTES_MAX: usize = 128;
/// Card secrets (codes, licence keys); longer payloads belong in a file store.
pub const SECRET_BYTES_MAX: usize = 1024;
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;
pub const PAYMENT_REF_BYTES_MAX: usize = 128;
pub const SKU_NAME_BYTES_MAX: usize = 200;

/// Cards one SKU can hold; card indexes are `u32`.
pub const CARDS_PER_SKU_MAX: usize = 50_000_000;
const _: () = assert!(CARDS_PER_SKU_MAX <= u32::MAX as usize);

/// Cards in one import command; bigger files are split by the caller so that one
/// journal record stays well under RocksDB's comfortable value size.
pub const IMPORT_BATCH_CARDS_MAX: usize = 10_000;

/// Orders expired by one `ExpireDue`; the rest follow on the next pass so that one
/// actor turn stays short.
pub const EXPIRE_BATCH_ORDERS_MAX: usize = 4096;

/// Orders forgotten by one `PruneEnded`; the rest follow on the next pass.
pub const PRUNE_BATCH_ORDERS_MAX: usize = 4096;

/// How long an order that expired or was cancelled is kept before it is forgotten
/// (unless it holds a refused payment): long enough for a payment provider's
/// retries of a late callback (days), for the buyer's page to show "expired", and
/// for a retry with the same Idempotency-Key to get its original answer. Without
/// it, reservations that are never paid would grow a SKU's memory for good.
pub const ENDED_ORDERS_KEPT_MS: u64 = 3 * 24 * 60 * 60 * 1000;

/// How long a refusal of a keyed reservation is answered again to its retries
/// (`keyed_refusals.rs`).
pub const KEYED_REFUSAL_KEPT_MS: u64 = 60 * 60 * 1000;

/// Keyed refusals held per SKU, about 200 bytes each: past this the oldest go.
pub const KEYED_REFUSALS_PER_SKU_MAX: usize = 50_000;

/// Refused payments kept on one order; past this a payment is still refused but not
/// recorded, so the order stops growing: the decision hands it back, and the actor
/// counts it (`keydrop_refused_payments_unrecorded_total`) and logs it for refund.
pub const REFUSED_PAYMENTS_PER_ORDER_MAX: usize = 64;

/// How far the wall clock may step back behind a SKU's latest time and still be
/// held at that time. NTP's small corrections are absorbed, so a SKU's time never
/// runs backwards; a clock that had run far ahead and was then corrected is followed
/// again at once, instead of every reservation made after the correction falling due
/// (and the sale window being judged) at the wrong time until real time catches up.
pub const CLOCK_STEP_BACK_HELD_MS: u64 = 5 * 60 * 1000;

/// Reservation lifetimes: long enough to pay, short enough to not starve a drop.
pub const RESERVATION_TTL_MS_MIN: u64 = 1_000;
pub const RESERVATION_TTL_MS_MAX: u64 = 24 * 60 * 60 * 1000;

/// Requests one journal `WriteBatch` may carry (one fsync for all of them).
pub const JOURNAL_BATCH_REQUESTS_MAX: usize = 4096;
const _: () = assert!(JOURNAL_BATCH_REQUESTS_MAX <= u16::MAX as usize);

/// Journal requests waiting for the writer across all SKUs; past this, commands
/// are refused as overloaded before they touch any state.
pub const JOURNAL_QUEUE_DEPTH_MAX: usize = 65_536;
const _: () = assert!(JOURNAL_QUEUE_DEPTH_MAX >= JOURNAL_BATCH_REQUESTS_MAX);

/// Commands waiting in one SKU actor's mailbox; past this, refused as overloaded.
pub const ACTOR_MAILBOX_DEPTH_MAX: usize = 16_384;

/// Journal records of one SKU after its last snapshot before a new one is due
/// (`EngineConfig::snapshot_records_min`).
pub const EVENTS_BETWEEN_SNAPSHOTS_MIN: u64 = 20_000;

/// A due snapshot waits for a quiet moment until the records since the last one
/// reach this many times the threshold. A snapshot is the whole SKU (22 MB for
/// 100,000 cards and their orders), encoded by the actor and written in one batch:
/// taken in the middle of a drop, its write alone held every buyer of the batches
/// behind it for 147 ms. Waiting costs replay at recovery, which is bounded by this.
pub const SNAPSHOT_DEFER_FACTOR_MAX: u64 = 4;

/// The node is quiet, for a waiting snapshot, while its SKUs journal at most this
/// many records a second together (measured over one expiry tick).
pub const QUIET_RECORDS_PER_SEC_MAX: u64 = 100;

/// A snapshot record, one RocksDB value: RocksDB refuses values of 4 GiB and over,
/// and its C API drops that error, so the writer refuses a larger snapshot itself
/// (the SKU keeps its journal records instead).
pub const SNAPSHOT_RECORD_BYTES_MAX: usize = 3 << 30;

/// Sequence numbers a SKU bundle may carry: far enough below `u64::MAX` that the
/// SKU's later records can never wrap past it.
pub const BUNDLE_SEQ_MAX: u64 = 1 << 62;
