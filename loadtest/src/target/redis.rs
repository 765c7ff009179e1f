//! `redis-direct`: the flash-sale design users pick instead of keydrop. One Lua
//! script per operation runs atomically in Redis: reserve checks the one-per-user
//! set, pops a card from the SKU's list and writes the order; pay and cancel move
//! the order on (cancel pushes the card back). Requests are pipelined over a few
//! multiplexed connections. There is no HTTP service in front: an upper bound.
//!
//! Keys carry the SKU as a hash tag (`kd:{sku}:cards`), as a Redis Cluster
//! deployment would need, and order ids embed their SKU (`<sku>.<hex>`) so pay and
//! cancel can name every key they touch. This baseline has no expiry sweeper: runs
//! use a reservation lifetime longer than the run, so none would be due.

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use redis::aio::MultiplexedConnection;
use redis::Script;

use super::{Answer, OrderRef, ReserveRequest, Stock, Target, TargetInfo};
use crate::audit::{OrderState, SkuCounts, Status, TargetState};

/// Multiplexed connections shared by all buyers; each pipelines its requests.
const CONNECTIONS: usize = 4;
/// Cards per RPUSH while stocking, and orders per pipeline while auditing.
const CHUNK_MAX: usize = 10_000;

const RESERVE: &str = r"
local existing = redis.call('HGET', KEYS[3], ARGV[2])
if existing then return {1, existing} end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return {3, ''} end
local card = redis.call('LPOP', KEYS[1])
if not card then return {2, ''} end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[5], 'user', ARGV[1], 'card', card, 'status', 'reserved', 'price', ARGV[4])
redis.call('INCR', KEYS[4])
return {0, ARGV[3]}
";

const PAY: &str = r"
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 2 end
if status == 'paid' then
  if redis.call('HGET', KEYS[1], 'payment_ref') == ARGV[1] then return 0 end
  return 4
end
if status ~= 'reserved' then return 1 end
if redis.call('HGET', KEYS[1], 'price') ~= ARGV[2] then return 3 end
redis.call('HSET', KEYS[1], 'status', 'paid', 'payment_ref', ARGV[1])
redis.call('DECR', KEYS[2])
redis.call('INCR', KEYS[3])
return 0
";

const CANCEL: &str = r"
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 2 end
if status == 'cancelled' then return 0 end
if status ~= 'reserved' then return 1 end
redis.call('HSET', KEYS[1], 'status', 'cancelled')
redis.call('RPUSH', KEYS[2], redis.call('HGET', KEYS[1], 'card'))
redis.call('SREM', KEYS[3], redis.call('HGET', KEYS[1], 'user'))
redis.call('DECR', KEYS[4])
return 0
";

fn key(sku: &str, what: &str) -> String {
    format!("kd:{{{sku}}}:{what}")
}

fn order_key(order_id: &str) -> Option<String> {
    let (sku, _) = order_id.rsplit_once('.')?;
    Some(format!("kd:{{{sku}}}:order:{order_id}"))
}

/// A fresh order id for SKU `sku`: the SKU, a dot, 128 random bits in hex.
pub fn new_order_id(sku: &str) -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{sku}.{}", hex::encode(bytes))
}

/// The Lua design, usable directly (`redis-direct`) or behind the HTTP service.
pub struct RedisStore {
    connections: Vec<MultiplexedConnection>,
    next: AtomicUsize,
    reserve: Script,
    pay: Script,
    cancel: Script,
    pub durability: String,
    pub endpoint: String,
}

impl RedisStore {
    pub async fn connect(url: &str) -> Result<RedisStore> {
        crate::target::http::loopback_url(&url.replacen("redis://", "http://", 1))
            .context("the Redis URL must be redis://<loopback>:<port>")?;
        let client = redis::Client::open(url).with_context(|| format!("parsing {url}"))?;
        let mut connections = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            connections.push(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .with_context(|| format!("connecting to {url}"))?,
            );
        }
        let mut conn = connections[0].clone();
        let appendonly: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendonly")
            .query_async(&mut conn)
            .await?;
        let appendfsync: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendfsync")
            .query_async(&mut conn)
            .await?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await?;
        let version = info
            .lines()
            .find_map(|line| line.strip_prefix("redis_version:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        let durability = describe_durability(
            appendonly.get(1).map(String::as_str),
            appendfsync.get(1).map(String::as_str),
        );
        Ok(RedisStore {
            connections,
            next: AtomicUsize::new(0),
            reserve: Script::new(RESERVE),
            pay: Script::new(PAY),
            cancel: Script::new(CANCEL),
            durability,
            endpoint: format!("{url} (Redis {version})"),
        })
    }

    /// `appendfsync` as configured, for labels: `everysec`, `always`, `no`, `off`.
    pub fn fsync_policy(&self) -> &str {
        if self.durability.contains("always") {
            "always"
        } else if self.durability.contains("everysec") {
            "everysec"
        } else if self.durability.contains("no AOF") {
            "off"
        } else {
            "no"
        }
    }

    fn conn(&self) -> MultiplexedConnection {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        self.connections[i].clone()
    }

    pub async fn stock(&self, stock: &Stock) -> Result<()> {
        for (index, sku) in stock.skus.iter().enumerate() {
            let mut cards = stock.cards(index).peekable();
            while cards.peek().is_some() {
                let chunk: Vec<(String, String)> = cards.by_ref().take(CHUNK_MAX).collect();
                self.import(sku, &chunk).await?;
            }
        }
        Ok(())
    }

    /// Adds cards to a SKU's list (secrets in a hash beside it), in one transaction.
    pub async fn import(&self, sku: &str, cards: &[(String, String)]) -> Result<u64> {
        if cards.is_empty() {
            return Ok(0);
        }
        let serials: Vec<&str> = cards.iter().map(|(s, _)| s.as_str()).collect();
        let _: () = redis::pipe()
            .atomic()
            .rpush(key(sku, "cards"), &serials)
            .ignore()
            .hset_multiple(key(sku, "secrets"), cards)
            .ignore()
            .incr(key(sku, "imported"), cards.len())
            .ignore()
            .query_async(&mut self.conn())
            .await
            .context("importing cards into Redis")?;
        Ok(cards.len() as u64)
    }

    pub async fn reserve(
        &self,
        sku: &str,
        user: &str,
        idempotency_key: &str,
        price: u64,
    ) -> Answer {
        let order_id = new_order_id(sku);
        let Some(order) = order_key(&order_id) else {
            return Answer::Error("order id without a SKU".into());
        };
        let result: redis::RedisResult<(i64, String)> = self
            .reserve
            .key(key(sku, "cards"))
            .key(key(sku, "buyers"))
            .key(key(sku, "idem"))
            .key(key(sku, "reserved"))
            .key(order)
            .arg(user)
            .arg(idempotency_key)
            .arg(&order_id)
            .arg(price)
            .invoke_async(&mut self.conn())
            .await;
        match result {
            Ok((0 | 1, order_id)) => Answer::Reserved(order_id),
            Ok((2, _)) => Answer::SoldOut,
            Ok((3, _)) => Answer::PurchaseLimit,
            Ok((code, _)) => Answer::Error(format!("reserve script answered {code}")),
            Err(error) => Answer::Error(format!("redis: {error}")),
        }
    }

    pub async fn pay(&self, order_id: &str, payment_ref: &str, amount_cents: u64) -> Answer {
        let (Some(order), Some((sku, _))) = (order_key(order_id), order_id.rsplit_once('.')) else {
            return Answer::Error(format!("malformed order id {order_id}"));
        };
        let result: redis::RedisResult<i64> = self
            .pay
            .key(order)
            .key(key(sku, "reserved"))
            .key(key(sku, "sold"))
            .arg(payment_ref)
            .arg(amount_cents)
            .invoke_async(&mut self.conn())
            .await;
        match result {
            Ok(0) => Answer::Paid,
            Ok(1) => Answer::Expired,
            Ok(code) => Answer::Error(format!("pay script answered {code}")),
            Err(error) => Answer::Error(format!("redis: {error}")),
        }
    }

    pub async fn cancel(&self, order_id: &str) -> Answer {
        let (Some(order), Some((sku, _))) = (order_key(order_id), order_id.rsplit_once('.')) else {
            return Answer::Error(format!("malformed order id {order_id}"));
        };
        let result: redis::RedisResult<i64> = self
            .cancel
            .key(order)
            .key(key(sku, "cards"))
            .key(key(sku, "buyers"))
            .key(key(sku, "reserved"))
            .invoke_async(&mut self.conn())
            .await;
        match result {
            Ok(0) => Answer::Cancelled,
            Ok(1) => Answer::Expired,
            Ok(code) => Answer::Error(format!("cancel script answered {code}")),
            Err(error) => Answer::Error(format!("redis: {error}")),
        }
    }

    /// Counters of one SKU: (available, reserved, sold, imported).
    pub async fn counts(&self, sku: &str) -> Result<SkuCounts> {
        let (available, reserved, sold, imported): (u64, Option<i64>, Option<i64>, Option<u64>) =
            redis::pipe()
                .llen(key(sku, "cards"))
                .get(key(sku, "reserved"))
                .get(key(sku, "sold"))
                .get(key(sku, "imported"))
                .query_async(&mut self.conn())
                .await?;
        let non_negative = |v: Option<i64>| u64::try_from(v.unwrap_or(0)).unwrap_or(u64::MAX);
        Ok(SkuCounts {
            available,
            reserved: non_negative(reserved),
            sold: non_negative(sold),
            imported: imported.unwrap_or(0),
        })
    }

    /// Status and card of each order; `None` for orders Redis does not have.
    pub async fn orders(&self, ids: &[&str]) -> Result<Vec<Option<OrderState>>> {
        let mut found = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK_MAX) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.hget(order_key(id).unwrap_or_default(), &["status", "card"]);
            }
            let rows: Vec<(Option<String>, Option<String>)> =
                pipe.query_async(&mut self.conn()).await?;
            for (status, card) in rows {
                let status = match status.as_deref() {
                    None => None,
                    Some("reserved") => Some(Status::Reserved),
                    Some("paid") => Some(Status::Paid),
                    Some("cancelled") => Some(Status::Cancelled),
                    Some(other) => anyhow::bail!("unknown order status {other} in Redis"),
                };
                found.push(status.map(|status| OrderState {
                    status,
                    // Delivered only once paid, as keydrop does.
                    serial: card.filter(|_| status == Status::Paid),
                }));
            }
        }
        Ok(found)
    }
}

pub fn describe_durability(appendonly: Option<&str>, appendfsync: Option<&str>) -> String {
    match (appendonly, appendfsync) {
        (Some("yes"), Some("always")) => {
            "Redis AOF appendfsync always: fsync before every answer".into()
        }
        (Some("yes"), Some("everysec")) => {
            "Redis AOF appendfsync everysec: fsync once a second; a crash loses up to ~1 s of acknowledged orders".into()
        }
        (Some("yes"), Some(other)) => {
            format!("Redis AOF appendfsync {other}: the OS decides when to fsync")
        }
        _ => "Redis without AOF (no append-only file): acknowledged orders are lost on restart".into(),
    }
}

/// `redis-direct`: the store, driven without any service in front.
pub struct RedisDirect {
    pub store: RedisStore,
    skus: std::sync::OnceLock<Vec<String>>,
    price_cents: std::sync::OnceLock<u64>,
}

impl RedisDirect {
    pub fn new(store: RedisStore) -> RedisDirect {
        RedisDirect {
            store,
            skus: std::sync::OnceLock::new(),
            price_cents: std::sync::OnceLock::new(),
        }
    }

    pub fn info(&self) -> TargetInfo {
        TargetInfo {
            name: format!("redis-direct[{}]", self.store.fsync_policy()),
            durability: self.store.durability.clone(),
            endpoint: format!(
                "{}, Lua scripts over {CONNECTIONS} pipelined connections",
                self.store.endpoint
            ),
        }
    }
}

impl Target for RedisDirect {
    async fn stock(&self, stock: &Stock) -> Result<()> {
        self.store.stock(stock).await?;
        let _ = self.price_cents.set(stock.spec.price_cents);
        self.skus
            .set(stock.skus.clone())
            .map_err(|_| anyhow::anyhow!("the redis target was stocked twice"))
    }

    async fn reserve(&self, request: ReserveRequest<'_>) -> Answer {
        let Some(sku) = self.skus.get().and_then(|skus| skus.get(request.sku)) else {
            return Answer::Error(format!("SKU index {} not stocked", request.sku));
        };
        let price = self.price_cents.get().copied().unwrap_or(0);
        self.store
            .reserve(sku, request.user, request.idempotency_key, price)
            .await
    }

    async fn pay(&self, order: &OrderRef, amount_cents: u64) -> Answer {
        self.store
            .pay(&order.id, &format!("pay-{}", order.id), amount_cents)
            .await
    }

    async fn cancel(&self, order: &OrderRef) -> Answer {
        self.store.cancel(&order.id).await
    }

    async fn state(&self, orders: &[OrderRef]) -> Result<TargetState> {
        state_of(
            &self.store,
            self.skus.get().map(Vec::as_slice).unwrap_or(&[]),
            orders,
        )
        .await
    }
}

pub async fn state_of(
    store: &RedisStore,
    skus: &[String],
    orders: &[OrderRef],
) -> Result<TargetState> {
    let mut state = TargetState::default();
    for (index, sku) in skus.iter().enumerate() {
        state.skus.insert(index, store.counts(sku).await?);
    }
    let ids: Vec<&str> = orders.iter().map(|o| o.id.as_str()).collect();
    for (id, found) in ids.iter().zip(store.orders(&ids).await?) {
        if let Some(order) = found {
            state.orders.insert(id.to_string(), order);
        }
    }
    Ok(state)
}
