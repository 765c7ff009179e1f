//! The SKU state machine alone: what one order costs its actor, with no journal, no
//! runtime and no clock but the one passed in.
//!
//!   cargo bench -p keydrop-engine --bench sku
//!
//! A drop's shape: a crowd of new buyers, `ORDERS_PER_MS` of them each millisecond
//! (about what one node reserves over HTTP), each reserving one card from a stocked
//! SKU; then, in the second benchmark, each paying for it. Criterion reports the time
//! per batch and the orders per second; to compare two builds, run the first with
//! `-- --save-baseline before` and the second with `-- --baseline before`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use keydrop_engine::ids::{CardSerial, PaymentRef, SkuId, UserId};
use keydrop_engine::limits::IMPORT_BATCH_CARDS_MAX;
use keydrop_engine::sku::{Command, NewCard, Reply, ReserveRequest, Sku, SkuDef};
use keydrop_engine::{CardSecret, KeyRing, OrderId, Timestamp};

/// Orders in one measured batch, and cards in stock for them.
const ORDERS: usize = 20_000;
const ORDERS_PER_MS: usize = 30;
const PRICE_CENTS: u64 = 1_000;
const OPENS_AT_MS: u64 = 1_700_000_000_000;

fn sku_id() -> SkuId {
    SkuId::parse("bench-sku").expect("a valid SKU id")
}

/// A SKU on sale with `ORDERS` cards, one per buyer.
fn stocked_sku() -> Sku {
    let def = SkuDef {
        name: "bench".into(),
        price_cents: PRICE_CENTS,
        per_user_limit: 1,
        per_device_limit: None,
        reservation_ttl_ms: 15 * 60 * 1000,
        starts_at: None,
        ends_at: None,
        low_stock_threshold: 0,
    };
    let opens = Timestamp::from_millis(OPENS_AT_MS);
    let (mut sku, _) = Sku::create(sku_id(), def, opens).expect("a valid SKU");
    let ring = KeyRing::new(vec![zeroize::Zeroizing::new([7u8; 32])]).expect("a key ring");
    let cards: Vec<NewCard> = (0..ORDERS)
        .map(|n| {
            let serial = CardSerial::parse(format!("card-{n}")).expect("a valid serial");
            let secret = CardSecret::new(format!("secret-{n}")).expect("a valid secret");
            NewCard {
                sealed: ring.seal(&sku_id(), &serial, &secret),
                serial,
            }
        })
        .collect();
    for batch in cards.chunks(IMPORT_BATCH_CARDS_MAX) {
        let decision = sku.handle(Command::ImportCards(batch.to_vec()), opens);
        assert!(
            decision.reply.is_ok(),
            "import refused: {:?}",
            decision.reply
        );
    }
    sku
}

/// One reservation per new buyer, and the time each arrives.
fn reservations() -> Vec<(Timestamp, OrderId, Command)> {
    (0..ORDERS)
        .map(|n| {
            let order_id = OrderId::generate(&sku_id());
            let command = Command::Reserve(ReserveRequest {
                order_id,
                user: UserId::parse(format!("buyer-{n}")).expect("a valid user id"),
                device: None,
                idempotency: None,
            });
            (arrival(n), order_id, command)
        })
        .collect()
}

fn arrival(n: usize) -> Timestamp {
    Timestamp::from_millis(OPENS_AT_MS + 1 + (n / ORDERS_PER_MS) as u64)
}

fn reserve_all(sku: &mut Sku, orders: Vec<(Timestamp, OrderId, Command)>) -> Vec<OrderId> {
    orders
        .into_iter()
        .map(|(at, order_id, command)| {
            let decision = sku.handle(command, at);
            assert!(
                matches!(decision.reply, Ok(Reply::Reserved(_))),
                "reservation refused: {:?}",
                decision.reply
            );
            black_box(decision);
            order_id
        })
        .collect()
}

fn drop_orders(c: &mut Criterion) {
    let stocked = stocked_sku();
    let payment_refs: Vec<PaymentRef> = (0..ORDERS)
        .map(|n| PaymentRef::parse(format!("pay-{n}")).expect("a valid payment ref"))
        .collect();
    let mut group = c.benchmark_group("sku");
    group.throughput(Throughput::Elements(ORDERS as u64));
    group.bench_function("reserve", |b| {
        b.iter_batched(
            || (stocked.clone(), reservations()),
            |(mut sku, orders)| {
                reserve_all(&mut sku, orders);
                sku
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("reserve_then_pay", |b| {
        b.iter_batched(
            || (stocked.clone(), reservations(), payment_refs.clone()),
            |(mut sku, orders, refs)| {
                let order_ids = reserve_all(&mut sku, orders);
                for (n, (order_id, payment_ref)) in order_ids.into_iter().zip(refs).enumerate() {
                    let command = Command::ConfirmPayment {
                        order_id,
                        payment_ref,
                        amount_cents: PRICE_CENTS,
                    };
                    let decision = sku.handle(command, arrival(ORDERS + n));
                    assert!(
                        matches!(decision.reply, Ok(Reply::Paid(_))),
                        "payment refused: {:?}",
                        decision.reply
                    );
                    black_box(decision);
                }
                sku
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, drop_orders);
criterion_main!(benches);
