//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keydrop_engine::journal::FaultInjector;
use keydrop_engine::{
    CardSecret, CardSerial, Clock, Engine, EngineConfig, EngineError, KeyRing, ManualClock,
    OrderDetails, OrderId, Reservation, SkuDef, SkuId, Timestamp, UserId,
};

pub const T0: u64 = 1_800_000_000_000;
pub const KEY_A: [u8; 32] = [0x11; 32];
pub const KEY_B: [u8; 32] = [0x22; 32];

pub fn ring(keys: &[[u8; 32]]) -> KeyRing {
    KeyRing::new(keys.iter().map(|k| zeroize::Zeroizing::new(*k)).collect()).unwrap()
}

pub fn sku(id: &str) -> SkuId {
    SkuId::parse(id).unwrap()
}

pub fn def(ttl_secs: u64) -> SkuDef {
    SkuDef {
        name: "Steam wallet 50".into(),
        price_cents: 5_000,
        per_user_limit: 1,
        per_device_limit: None,
        reservation_ttl_ms: ttl_secs * 1000,
        starts_at: None,
        ends_at: None,
        low_stock_threshold: 0,
    }
}

pub fn cards(prefix: &str, range: std::ops::Range<u32>) -> Vec<(CardSerial, CardSecret)> {
    range
        .map(|i| {
            (
                CardSerial::parse(format!("{prefix}-{i:06}")).unwrap(),
                CardSecret::new(format!("SECRET-{prefix}-{i:06}-XYZZY")).unwrap(),
            )
        })
        .collect()
}

/// A reservation by user `name`, with no device and no idempotency key.
pub fn buyer(name: &str) -> Reservation {
    Reservation {
        user: UserId::parse(name).unwrap(),
        device: None,
        idempotency: None,
    }
}

pub struct Opened {
    pub engine: Engine,
    pub clock: ManualClock,
    pub fault: FaultInjector,
}

impl Opened {
    /// Defines `id` with 60 s reservations and imports `cards` into it.
    pub async fn stocked(&self, id: &SkuId, cards: Vec<(CardSerial, CardSecret)>) {
        self.engine.define_sku(id.clone(), def(60)).await.unwrap();
        self.engine.import_cards(id, cards).await.unwrap();
    }
}

pub async fn open(dir: &Path, clock: &ManualClock, keys: &[[u8; 32]]) -> Opened {
    open_configured(dir, clock, keys, |_| {}).await
}

/// [`open`], with `configure` applied to the configuration last.
pub async fn open_configured(
    dir: &Path,
    clock: &ManualClock,
    keys: &[[u8; 32]],
    configure: impl FnOnce(&mut EngineConfig),
) -> Opened {
    let fault = FaultInjector::default();
    let mut config = EngineConfig::new(dir.join("db"), ring(keys));
    config.clock = Arc::new(clock.clone()) as Arc<dyn Clock>;
    config.expiry_interval = Duration::from_millis(20);
    config.prune_interval = Duration::from_millis(20);
    config.journal.fault_injector = Some(fault.clone());
    configure(&mut config);
    let engine = Engine::open(config).await.expect("engine opens");
    Opened {
        engine,
        clock: clock.clone(),
        fault,
    }
}

pub fn manual_clock() -> ManualClock {
    ManualClock::new(Timestamp(T0))
}

/// The answer to a lookup of `order_id` once the actor's reload after a failed write
/// is over: while it reloads the lookup is refused as fenced (`JournalUnavailable`),
/// for at most 5 s.
pub async fn order_after_reload(
    o: &Opened,
    order_id: &OrderId,
) -> Result<OrderDetails, EngineError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let answer = o.engine.order(order_id).await;
        if !matches!(answer, Err(EngineError::JournalUnavailable(_)))
            || tokio::time::Instant::now() > deadline
        {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `check` until it holds, for at most `limit`.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}
