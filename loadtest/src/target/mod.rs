//! What the driver needs from a system under test. One module per target:
//! `engine` (in process), `http` (keydrop's API v1, also spoken by the Redis-backed
//! service of `redis_http`), `redis` (the Lua design, direct) and `postgres`.

pub mod engine;
pub mod http;
pub mod postgres;
pub mod redis;
pub mod redis_http;

use std::future::Future;

use anyhow::Result;

use crate::audit::TargetState;
use crate::model::DropSpec;

/// The answer to one request, as the driver classifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A reservation, with its order id.
    Reserved(String),
    Paid,
    Cancelled,
    SoldOut,
    PurchaseLimit,
    RateLimited,
    /// Refused as overloaded (503): transient, the client retries after a pause.
    Overloaded,
    /// The reservation was gone by the time payment or cancellation arrived.
    Expired,
    Error(String),
}

/// The SKUs of a drop as a target names them.
#[derive(Debug, Clone)]
pub struct Stock {
    pub spec: DropSpec,
    /// SKU names, by index.
    pub skus: Vec<String>,
}

impl Stock {
    pub fn new(spec: DropSpec, run: &str) -> Stock {
        let skus = (0..spec.skus).map(|i| spec.sku_name(run, i)).collect();
        Stock { spec, skus }
    }

    /// Cards stocked per SKU, by index.
    pub fn stocked(&self) -> Vec<u64> {
        (0..self.spec.skus).map(|i| self.spec.cards_on(i)).collect()
    }

    /// The cards of SKU `index` as (serial, secret) pairs, `batch` at a time.
    pub fn cards(&self, index: usize) -> impl Iterator<Item = (String, String)> + '_ {
        (0..self.spec.cards_on(index)).map(move |card| {
            (
                DropSpec::serial(index, card),
                format!("secret-{index}-{card}-{:016x}", self.spec.seed ^ card),
            )
        })
    }
}

/// An order the driver holds.
#[derive(Debug, Clone)]
pub struct OrderRef {
    pub sku: usize,
    pub id: String,
}

pub struct ReserveRequest<'a> {
    pub sku: usize,
    pub user: &'a str,
    pub idempotency_key: &'a str,
}

/// A system under test. Each call is one request; the driver adds timeouts,
/// retries and timing around it.
pub trait Target: Send + Sync + 'static {
    /// Defines the drop's SKUs and imports their cards.
    fn stock(&self, stock: &Stock) -> impl Future<Output = Result<()>> + Send;
    fn reserve(&self, request: ReserveRequest<'_>) -> impl Future<Output = Answer> + Send;
    fn pay(&self, order: &OrderRef, amount_cents: u64) -> impl Future<Output = Answer> + Send;
    fn cancel(&self, order: &OrderRef) -> impl Future<Output = Answer> + Send;
    /// The target's own view of the drop's SKUs and of `orders`, for the audit.
    fn state(&self, orders: &[OrderRef]) -> impl Future<Output = Result<TargetState>> + Send;
    /// Where the target's time went, when it can say (e.g. journal fsync figures
    /// from keydrop's /metrics), as `name → value` lines for the report.
    fn breakdown(&self) -> impl Future<Output = Vec<(String, String)>> + Send {
        async { Vec::new() }
    }
}

/// Describes a target for the report: what it is and how durable its answers are.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetInfo {
    pub name: String,
    pub durability: String,
    /// Where it ran: `in process`, a URL, a server version.
    pub endpoint: String,
}
