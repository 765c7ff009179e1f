//! Prometheus metrics: installs the recorder once per process, describes every
//! metric the node and the engine record (so each has HELP text and real histogram
//! buckets), and renders the text format for `GET /metrics`.
//!
//! Per-SKU stock gauges are not pushed on every order: they are refreshed from the
//! engine's published counters when scraped (and by a ticker, so the low-stock log
//! line appears without a scraper).

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, OnceLock};

use anyhow::{Context, Result};
use dashmap::DashMap;
use keydrop_engine::sku::RefusalReason;
use keydrop_engine::{Engine, SkuId};
use metrics::{describe_counter, describe_gauge, describe_histogram, Counter, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::admission::{Admission, Overload, Scope};

pub const HTTP_REQUESTS: &str = "keydrop_http_requests_total";
pub const HTTP_DURATION: &str = "keydrop_http_request_duration_seconds";
pub const HTTP_CONNECTIONS_OPEN: &str = "keydrop_http_connections_open";
pub const HTTP_ACCEPT_ERRORS: &str = "keydrop_http_accept_errors_total";
pub const HTTP_CONNECTIONS_CLOSED_IDLE: &str = "keydrop_http_connections_closed_idle_total";
pub const ORDERS: &str = "keydrop_orders_total";
pub const ORDERS_SHED: &str = "keydrop_orders_shed_total";
pub const ORDERS_OVERLOAD_SHED: &str = "keydrop_orders_overload_shed_total";
pub const ORDERS_IN_FLIGHT: &str = "keydrop_orders_in_flight";
pub const ORDERS_IN_FLIGHT_LIMIT: &str = "keydrop_orders_in_flight_limit";
pub const ORDER_BOUND_OPENED: &str = "keydrop_order_bound_opened_total";
pub const ORDER_FLOOR_RAISED: &str = "keydrop_order_bound_floor_raised_total";
pub const RUNTIME_LAG: &str = "keydrop_runtime_lag_seconds";
pub const RUNTIME_WORKERS: &str = "keydrop_runtime_workers";
pub const ADMISSION_REJECTED: &str = "keydrop_admission_rejected_total";
pub const ADMISSION_BUCKETS: &str = "keydrop_admission_buckets";
pub const PAYMENTS: &str = "keydrop_payments_total";
pub const LATE_PAYMENTS: &str = "keydrop_late_payments_total";
pub const REFUSED_PAYMENTS_RECORDED: &str = "keydrop_refused_payments_recorded_total";
pub const REFUSED_PAYMENTS_UNRECORDED: &str = "keydrop_refused_payments_unrecorded_total";
pub const CARDS_IMPORTED: &str = "keydrop_cards_imported_total";
pub const SKU_CARDS: &str = "keydrop_sku_cards";
pub const SKU_LOW_STOCK: &str = "keydrop_sku_low_stock";
pub const READY: &str = "keydrop_ready";
pub const KEY_ROTATION_RUNNING: &str = "keydrop_key_rotation_running";

/// Request latency: a reservation answers after an fsync (a few hundred µs to a
/// few ms), so the fine buckets sit there; the coarse ones catch stalls.
const HTTP_DURATION_BUCKETS: &[f64] = &[
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const FSYNC_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
/// Time a small batch is held for more requests: 50 µs steps up to the default
/// 200 µs linger, then coarser for a configured longer one.
const LINGER_BUCKETS: &[f64] = &[0.00005, 0.0001, 0.00015, 0.0002, 0.0005, 0.001, 0.005];
/// From tens of µs (a worker with spare time) to the rounds of a saturated run queue.
const ANSWER_WAIT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];
/// Requests per journal batch, up to the engine's `JOURNAL_BATCH_REQUESTS_MAX` (4096).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// Order requests by outcome.
pub static ORDER_OUTCOMES: LazyLock<LabelledCounter> =
    LazyLock::new(|| LabelledCounter::new(ORDERS, "outcome"));
/// Orders shed with 503 before any work, by reason.
pub static OVERLOAD_SHED: LazyLock<LabelledCounter> =
    LazyLock::new(|| LabelledCounter::new(ORDERS_OVERLOAD_SHED, "reason"));
/// Token-bucket refusals, by scope.
pub static ADMISSION_REFUSALS: LazyLock<LabelledCounter> =
    LazyLock::new(|| LabelledCounter::new(ADMISSION_REJECTED, "scope"));

/// A counter with one label whose values are `&'static str`, keeping each series'
/// handle after its first use. The `counter!` macro builds, hashes and looks up its
/// key on every call; on the order path, and on the shed paths that must stay cheap
/// under overload, that is most of the cost of counting.
pub struct LabelledCounter {
    name: &'static str,
    label: &'static str,
    /// Keyed by the value's address: the same text at two addresses only costs a
    /// second entry for the same series, and hashing a pointer is cheaper than
    /// hashing the text.
    series: DashMap<usize, Counter>,
}

impl LabelledCounter {
    pub fn new(name: &'static str, label: &'static str) -> Self {
        LabelledCounter {
            name,
            label,
            series: DashMap::new(),
        }
    }

    pub fn increment(&self, value: &'static str, by: u64) {
        let address = value.as_ptr() as usize;
        if let Some(counter) = self.series.get(&address) {
            counter.increment(by);
            return;
        }
        self.series
            .entry(address)
            .or_insert_with(|| metrics::counter!(self.name, self.label => value))
            .increment(by);
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder (first call) and returns its handle.
pub fn install() -> Result<PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(HTTP_DURATION.to_owned()),
            HTTP_DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("keydrop_journal_fsync_seconds".to_owned()),
            FSYNC_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("keydrop_journal_batch_requests".to_owned()),
            BATCH_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("keydrop_journal_linger_seconds".to_owned()),
            LINGER_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("keydrop_journal_answer_wait_seconds".to_owned()),
            ANSWER_WAIT_BUCKETS,
        )?
        .install_recorder()
        .context("installing the Prometheus recorder")?;
    describe();
    // Counters exist from the start at 0, so that rate() and increase() see a
    // series before the first event rather than nothing.
    for counter in [
        ORDERS_SHED,
        LATE_PAYMENTS,
        REFUSED_PAYMENTS_UNRECORDED,
        CARDS_IMPORTED,
        "keydrop_journal_write_failures_total",
        "keydrop_reservations_expired_total",
        "keydrop_orders_pruned_total",
        "keydrop_idempotent_refusals_replayed_total",
        "keydrop_cards_revealed_total",
        "keydrop_clock_steps_back_followed_total",
        "keydrop_cards_resealed_total",
        ORDER_BOUND_OPENED,
        ORDER_FLOOR_RAISED,
        HTTP_ACCEPT_ERRORS,
        HTTP_CONNECTIONS_CLOSED_IDLE,
    ] {
        metrics::counter!(counter).increment(0);
    }
    for reason in [
        RefusalReason::Expired,
        RefusalReason::Cancelled,
        RefusalReason::AmountMismatch,
        RefusalReason::AlreadyPaid,
    ] {
        metrics::counter!(REFUSED_PAYMENTS_RECORDED, "reason" => reason.as_str()).increment(0);
    }
    for scope in [Scope::User, Scope::Ip, Scope::Device] {
        ADMISSION_REFUSALS.increment(scope.as_str(), 0);
    }
    for reason in [Overload::Lag, Overload::InFlight] {
        OVERLOAD_SHED.increment(reason.as_str(), 0);
    }
    metrics::gauge!(RUNTIME_LAG).set(0.0);
    metrics::gauge!(KEY_ROTATION_RUNNING).set(0.0);
    metrics::gauge!(HTTP_CONNECTIONS_OPEN).increment(0.0);
    Ok(HANDLE.get_or_init(|| handle).clone())
}

fn describe() {
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by route template and status code (route unmatched: no route matched; route malformed_head: a request head that is not HTTP/1.1, answered before routing)."
    );
    describe_gauge!(
        HTTP_CONNECTIONS_OPEN,
        "HTTP connections open: accepted and not yet closed."
    );
    describe_counter!(
        HTTP_ACCEPT_ERRORS,
        "Times accepting a connection failed for a reason not about that connection (such as running out of file descriptors); the node retries a second later."
    );
    describe_counter!(
        HTTP_CONNECTIONS_CLOSED_IDLE,
        "Connections closed for starting no request for connection_idle_timeout_secs while not inside one (idle keep-alive, or a request head that never completed)."
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "Time from request to response head, by route template."
    );
    describe_counter!(
        ORDERS,
        "Order requests by outcome: reserved, replayed, or the error code answered."
    );
    describe_counter!(
        ORDERS_SHED,
        "Orders of a SKU with no stock answered at the edge, without a trip to the SKU actor: sold_out, not_on_sale outside its window, and for a keyed order what its key was refused before, or 422 for the key with another request."
    );
    describe_counter!(
        ORDERS_OVERLOAD_SHED,
        "Orders answered 503 overloaded at the edge, by reason: lag (the workers are behind) or in_flight (every order slot is taken)."
    );
    describe_gauge!(
        ORDERS_IN_FLIGHT,
        "Orders inside the node (admitted, not yet answered), sampled every 100 ms."
    );
    describe_gauge!(
        ORDERS_IN_FLIGHT_LIMIT,
        "The bound on orders inside the node, moved every 100 ms by the mean time orders spent inside against orders_in_flight_target_ms."
    );
    describe_counter!(
        ORDER_FLOOR_RAISED,
        "Times the order bound's floor was doubled because cutting the bound to it had not shortened the wait (a flood)."
    );
    describe_counter!(
        ORDER_BOUND_OPENED,
        "Times the order bound, cut to its floor without shortening the wait, was opened for a second (orders_in_flight_open_after_ms)."
    );
    describe_gauge!(
        RUNTIME_LAG,
        Unit::Seconds,
        "How late the async workers run a timer: the wait in front of every handler."
    );
    describe_gauge!(
        RUNTIME_WORKERS,
        "Async worker threads serving HTTP and running the SKU actors (the workers setting)."
    );
    describe_counter!(
        ADMISSION_REJECTED,
        "Requests refused by a token bucket (429), by scope: user, ip or device."
    );
    describe_gauge!(
        ADMISSION_BUCKETS,
        "Live token buckets by scope; idle ones are evicted."
    );
    describe_counter!(
        PAYMENTS,
        "Payment callbacks by outcome: bad_signature (missing, stale or wrong), replayed (validly signed, but for another order or before this process started), invalid_body (validly signed, unreadable), then the engine's answer to the rest."
    );
    describe_counter!(
        LATE_PAYMENTS,
        "Late payments recorded for refund: callbacks refused because the reservation had expired or was cancelled, once per payment_ref (a provider's retries are not counted again)."
    );
    describe_counter!(
        REFUSED_PAYMENTS_RECORDED,
        "Payments refused and recorded on their order for refund, once per payment_ref, by reason: expired or cancelled (the late payments), amount_mismatch, already_paid (a second payment of a paid order)."
    );
    describe_counter!(
        REFUSED_PAYMENTS_UNRECORDED,
        "Payment callbacks refused on an order that already holds the 64 refused payments it keeps, so not recorded on it (each logged at error level with its payment_ref and amount; retries counted again): refund them from the provider's records."
    );
    describe_counter!(CARDS_IMPORTED, "Cards imported through the admin API.");
    describe_gauge!(
        SKU_CARDS,
        "Cards of a SKU by state: available, reserved or sold."
    );
    describe_gauge!(
        KEY_ROTATION_RUNNING,
        "1 from the start of a master key rotation (an older key listed) until every card is re-sealed under the newest key; it stays 1 if the rotation stopped on an error."
    );
    describe_counter!(
        "keydrop_cards_resealed_total",
        "Cards re-sealed under the newest master key by a key rotation."
    );
    describe_gauge!(
        "keydrop_sku_unavailable",
        "1 for a SKU whose actor could not reload it from disk after a failed write: all its commands are refused 503 until the node restarts."
    );
    describe_gauge!(
        SKU_LOW_STOCK,
        "1 when a SKU's available stock is at or below its low_stock_threshold (> 0)."
    );
    describe_counter!(
        "keydrop_idempotent_refusals_replayed_total",
        "Refusals answered again to a retry with the same Idempotency-Key (held for an hour, at most 50,000 per SKU, by the SKU's actor or, for a sold-out SKU, the edge), or 422 for the key with another request."
    );
    describe_gauge!(
        READY,
        "1 once the engine has recovered and the node serves."
    );
    // The engine's own metrics.
    describe_histogram!(
        "keydrop_journal_fsync_seconds",
        Unit::Seconds,
        "Duration of one synced journal WriteBatch."
    );
    describe_histogram!(
        "keydrop_journal_linger_seconds",
        Unit::Seconds,
        "Time the journal held a small batch for requests still arriving, before its fsync (only batches that waited)."
    );
    describe_histogram!(
        "keydrop_journal_answer_wait_seconds",
        Unit::Seconds,
        "Time from a journal batch being written to its callers' answers starting to run: the wait for a turn on the async workers."
    );
    describe_histogram!(
        "keydrop_journal_batch_requests",
        Unit::Count,
        "Requests carried by one journal WriteBatch (group commit)."
    );
    describe_gauge!(
        "keydrop_journal_queue_depth",
        "Journal writes waiting for the writer thread."
    );
    describe_counter!(
        "keydrop_journal_write_failures_total",
        "Journal batches that failed to write; their requests were refused."
    );
    describe_counter!(
        "keydrop_engine_overloaded_total",
        "Commands refused because a bounded queue was full, by queue: mailbox or journal."
    );
    describe_counter!(
        "keydrop_reservations_expired_total",
        "Reservations that expired unpaid; their cards went back to stock."
    );
    describe_counter!(
        "keydrop_orders_pruned_total",
        "Orders forgotten three days after they expired or were cancelled (ones holding a refused payment are kept), so unpaid reservations do not grow memory for good."
    );
    describe_counter!(
        "keydrop_cards_revealed_total",
        "Card secrets opened for paid orders."
    );
    describe_counter!(
        "keydrop_clock_steps_back_followed_total",
        "Commands at which a SKU followed the wall clock back by more than 5 minutes (a clock that had run ahead, corrected); smaller steps back are held."
    );
    describe_counter!(
        "keydrop_snapshots_total",
        "SKU snapshots written, by trigger: quiet (due, written once the node's journal went quiet), overdue (written busy, having waited as long as it may) or requested (shutdown)."
    );
}

/// Per-SKU gauges and the low-stock state, which logs when it flips.
#[derive(Default)]
pub struct SkuGauges {
    /// Last low-stock state per SKU. A std `Mutex`: held for a few map operations
    /// with no `.await` inside, so it never blocks a worker for long.
    low: Mutex<HashMap<SkuId, bool>>,
}

impl SkuGauges {
    pub fn refresh(&self, engine: &Engine) {
        let views = engine.skus();
        let mut low_by_sku = self
            .low
            .lock()
            .expect("no panic while holding the low-stock lock");
        for view in views {
            let sku = view.sku.as_str().to_owned();
            let counts = view.counts;
            for (state, value) in [
                ("available", counts.available),
                ("reserved", counts.reserved),
                ("sold", counts.sold),
            ] {
                metrics::gauge!(SKU_CARDS, "sku" => sku.clone(), "state" => state)
                    .set(value as f64);
            }
            let threshold = view.def.low_stock_threshold;
            let low = threshold > 0 && counts.available <= threshold;
            metrics::gauge!(SKU_LOW_STOCK, "sku" => sku).set(if low { 1.0 } else { 0.0 });
            let was_low = low_by_sku.insert(view.sku.clone(), low).unwrap_or(false);
            if low && !was_low {
                tracing::warn!(sku = %view.sku, available = counts.available, threshold, "low stock");
            } else if !low && was_low {
                tracing::info!(sku = %view.sku, available = counts.available, threshold, "stock no longer low");
            }
        }
    }
}

/// The text exposition for `GET /metrics`.
pub fn render(
    handle: &PrometheusHandle,
    engine: Option<&Engine>,
    gauges: &SkuGauges,
    admission: &Admission,
) -> String {
    if let Some(engine) = engine {
        gauges.refresh(engine);
    }
    for (scope, count) in admission.bucket_counts() {
        metrics::gauge!(ADMISSION_BUCKETS, "scope" => scope.as_str()).set(count as f64);
    }
    metrics::gauge!(READY).set(if engine.is_some() { 1.0 } else { 0.0 });
    handle.render()
}
