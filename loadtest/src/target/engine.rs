//! `engine`: keydrop-engine in this process, journal fsync'd before every answer.
//! No network, no HTTP: the ceiling the node's edge is measured against.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use keydrop_engine::{
    CardSecret, CardSerial, Engine, EngineConfig, EngineError, IdempotencyKey, KeyRing, OrderId,
    OrderStatus, PaymentRef, RequestFingerprint, Reservation, SkuDef, SkuError, SkuId, UserId,
};
use tokio::sync::Semaphore;

use super::{Answer, OrderRef, ReserveRequest, Stock, Target, TargetInfo};
use crate::audit::{OrderState, SkuCounts, Status, TargetState};

/// Order look-ups in flight at once during the audit.
const AUDIT_LOOKUPS_IN_FLIGHT_MAX: usize = 256;
/// Cards per import call (the engine splits further into journal records).
const IMPORT_CHUNK_CARDS_MAX: usize = 50_000;

pub struct EngineTarget {
    engine: Engine,
    /// SKU ids by index, set by `stock`.
    skus: std::sync::OnceLock<Vec<SkuId>>,
}

impl EngineTarget {
    pub async fn open(dir: &Path) -> Result<EngineTarget> {
        // A fixed master key: the data lives in a temporary folder of this run.
        let keys = KeyRing::new(vec![zeroize::Zeroizing::new([7u8; 32])])?;
        let engine = Engine::open(EngineConfig::new(dir, keys))
            .await
            .context("opening the engine")?;
        Ok(EngineTarget {
            engine,
            skus: std::sync::OnceLock::new(),
        })
    }

    pub fn info() -> TargetInfo {
        TargetInfo {
            name: "engine".into(),
            durability: "fsync before every answer (RocksDB WriteBatch sync=true, group commit)"
                .into(),
            endpoint: "in process".into(),
        }
    }

    pub async fn close(&self) {
        self.engine.shutdown().await;
    }

    fn sku(&self, index: usize) -> Option<&SkuId> {
        self.skus.get().and_then(|skus| skus.get(index))
    }
}

pub fn sku_def(stock: &Stock) -> SkuDef {
    SkuDef {
        name: "keydrop-load drop".into(),
        price_cents: stock.spec.price_cents,
        per_user_limit: 1,
        per_device_limit: None,
        reservation_ttl_ms: stock.spec.reservation_ttl_secs * 1000,
        starts_at: None,
        ends_at: None,
        low_stock_threshold: 0,
    }
}

fn refusal(error: EngineError) -> Answer {
    match error {
        EngineError::Sku(SkuError::SoldOut) => Answer::SoldOut,
        EngineError::Sku(SkuError::PurchaseLimit { .. }) => Answer::PurchaseLimit,
        EngineError::Sku(SkuError::ReservationExpired) => Answer::Expired,
        EngineError::Overloaded => Answer::Overloaded,
        other => Answer::Error(other.to_string()),
    }
}

impl Target for EngineTarget {
    async fn stock(&self, stock: &Stock) -> Result<()> {
        let mut ids = Vec::with_capacity(stock.skus.len());
        for (index, name) in stock.skus.iter().enumerate() {
            let id = SkuId::parse(name.clone())?;
            self.engine.define_sku(id.clone(), sku_def(stock)).await?;
            let mut cards = stock.cards(index).peekable();
            while cards.peek().is_some() {
                let chunk = cards
                    .by_ref()
                    .take(IMPORT_CHUNK_CARDS_MAX)
                    .map(|(serial, secret)| {
                        Ok((CardSerial::parse(serial)?, CardSecret::new(secret)?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                self.engine.import_cards(&id, chunk).await?;
            }
            ids.push(id);
        }
        self.skus
            .set(ids)
            .map_err(|_| anyhow::anyhow!("the engine target was stocked twice"))
    }

    async fn reserve(&self, request: ReserveRequest<'_>) -> Answer {
        let Some(sku) = self.sku(request.sku) else {
            return Answer::Error(format!("SKU index {} not stocked", request.sku));
        };
        let (user, key) = match (
            UserId::parse(request.user),
            IdempotencyKey::parse(request.idempotency_key),
        ) {
            (Ok(user), Ok(key)) => (user, key),
            _ => return Answer::Error("invalid user id or idempotency key".into()),
        };
        // As the node does: the same key with a different request is told apart.
        let fingerprint =
            RequestFingerprint::of(&[sku.as_str().as_bytes(), user.as_str().as_bytes()]);
        let reservation = Reservation {
            user,
            device: None,
            idempotency: Some((key, fingerprint)),
        };
        match self.engine.reserve(sku, reservation).await {
            Ok(view) => Answer::Reserved(view.order_id.to_string()),
            Err(error) => refusal(error),
        }
    }

    async fn pay(&self, order: &OrderRef, amount_cents: u64) -> Answer {
        let (Ok(order_id), Ok(payment_ref)) = (
            order.id.parse::<OrderId>(),
            PaymentRef::parse(format!("pay-{}", order.id)),
        ) else {
            return Answer::Error(format!("invalid order id {}", order.id));
        };
        match self
            .engine
            .confirm_payment(&order_id, payment_ref, amount_cents)
            .await
        {
            Ok(_) => Answer::Paid,
            Err(error) => refusal(error),
        }
    }

    async fn cancel(&self, order: &OrderRef) -> Answer {
        let Ok(order_id) = order.id.parse::<OrderId>() else {
            return Answer::Error(format!("invalid order id {}", order.id));
        };
        match self.engine.cancel(&order_id).await {
            Ok(_) => Answer::Cancelled,
            Err(error) => refusal(error),
        }
    }

    async fn state(&self, orders: &[OrderRef]) -> Result<TargetState> {
        let mut state = TargetState::default();
        for (index, id) in self.skus.get().into_iter().flatten().enumerate() {
            if let Some(view) = self.engine.sku(id) {
                let counts = view.counts;
                state.skus.insert(
                    index,
                    SkuCounts {
                        available: counts.available,
                        reserved: counts.reserved,
                        sold: counts.sold,
                        imported: counts.imported,
                    },
                );
            }
        }
        let in_flight = Arc::new(Semaphore::new(AUDIT_LOOKUPS_IN_FLIGHT_MAX));
        let mut lookups = tokio::task::JoinSet::new();
        for order in orders {
            let permit = Arc::clone(&in_flight).acquire_owned().await?;
            let engine = self.engine.clone();
            let id = order.id.clone();
            lookups.spawn(async move {
                let _permit = permit;
                let found = match id.parse::<OrderId>() {
                    Ok(order_id) => engine.order(&order_id).await,
                    Err(_) => Err(EngineError::Sku(SkuError::OrderNotFound)),
                };
                (id, found)
            });
        }
        while let Some(done) = lookups.join_next().await {
            let (id, found) = done.context("an order look-up panicked")?;
            match found {
                Ok(details) => {
                    let status = match details.view.status {
                        OrderStatus::Reserved => Status::Reserved,
                        OrderStatus::Paid { .. } => Status::Paid,
                        OrderStatus::Expired { .. } => Status::Expired,
                        OrderStatus::Cancelled { .. } => Status::Cancelled,
                    };
                    let serial = details
                        .card
                        .map(|(serial, _secret)| serial.as_str().to_string());
                    state.orders.insert(id, OrderState { status, serial });
                }
                Err(EngineError::Sku(SkuError::OrderNotFound)) => {}
                Err(error) => return Err(error).context("reading an order back"),
            }
        }
        Ok(state)
    }
}
