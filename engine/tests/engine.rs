//! The engine end to end on a real RocksDB: durability across restarts, expiry,
//! failed writes, key rotation, moving SKUs, corruption and secrets at rest.

mod common;

use std::time::Duration;

use common::*;
use keydrop_engine::limits::{ACTOR_MAILBOX_DEPTH_MAX, JOURNAL_QUEUE_DEPTH_MAX};
use keydrop_engine::{
    EngineError, IdempotencyKey, OrderStatus, PaymentRef, RequestFingerprint, Reservation,
    SkuError, UserId,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_purchase_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let id = sku("steam-50");
    let order_id;
    {
        let o = open(dir.path(), &clock, &[KEY_A]).await;
        let (view, created) = o.engine.define_sku(id.clone(), def(60)).await.unwrap();
        assert!(created);
        assert_eq!(view.counts.imported, 0);
        let outcome = o.engine.import_cards(&id, cards("C", 0..10)).await.unwrap();
        assert_eq!((outcome.imported, outcome.duplicates), (10, 0));
        let again = o.engine.import_cards(&id, cards("C", 5..12)).await.unwrap();
        assert_eq!((again.imported, again.duplicates), (2, 5));
        let order = o.engine.reserve(&id, buyer("alice")).await.unwrap();
        order_id = order.order_id;
        assert_eq!(order.status, OrderStatus::Reserved);
        assert!(o.engine.order(&order_id).await.unwrap().card.is_none());
        o.engine
            .confirm_payment(&order_id, PaymentRef::parse("pay-1").unwrap(), 5_000)
            .await
            .unwrap();
        let view = o.engine.sku(&id).unwrap();
        assert_eq!(
            (
                view.counts.available,
                view.counts.sold,
                view.counts.imported
            ),
            (11, 1, 12)
        );
        o.engine.shutdown().await;
    }
    let o = open(dir.path(), &clock, &[KEY_A]).await;
    assert_eq!(o.engine.recovery_report().skus, 1);
    let details = o.engine.order(&order_id).await.unwrap();
    let (serial, secret) = details.card.expect("paid order reveals its card");
    assert_eq!(serial.as_str(), "C-000000");
    assert_eq!(secret.expose(), "SECRET-C-000000-XYZZY");
    let view = o.engine.sku(&id).unwrap();
    assert_eq!((view.counts.available, view.counts.sold), (11, 1));
    // The per-user limit still counts the paid order after the restart.
    let refused = o.engine.reserve(&id, buyer("alice")).await.unwrap_err();
    assert!(
        matches!(refused, EngineError::Sku(SkuError::PurchaseLimit { .. })),
        "{refused:?}"
    );
    o.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_clean_shutdown_replays_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let id = sku("no-snapshot");
    let mut orders = Vec::new();
    {
        let o = open(dir.path(), &clock, &[KEY_A]).await;
        o.stocked(&id, cards("N", 0..20)).await;
        for i in 0..15 {
            orders.push(
                o.engine
                    .reserve(&id, buyer(&format!("u{i}")))
                    .await
                    .unwrap()
                    .order_id,
            );
        }
        // Stopped without snapshots: the next open replays the journal.
        o.engine.halt().await;
    }
    let o = open(dir.path(), &clock, &[KEY_A]).await;
    assert!(o.engine.recovery_report().records_replayed >= 17);
    for order_id in &orders {
        assert_eq!(
            o.engine.order(order_id).await.unwrap().view.status,
            OrderStatus::Reserved
        );
    }
    assert_eq!(o.engine.sku(&id).unwrap().counts.reserved, 15);
    o.engine.shutdown().await;
}

/// A due snapshot waits for the SKU to go quiet, and the expiry ticker then has it
/// written; with no ticker to see the quiet, nothing is written before it is overdue
/// and the journal keeps every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_snapshot_is_written_once_the_sku_is_quiet() {
    for ticker_sees_quiet in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let clock = manual_clock();
        let id = sku("quiet");
        let expiry_interval = if ticker_sees_quiet {
            Duration::from_millis(10)
        } else {
            // Its first tick is at once, before anything is due; the next is an
            // hour away.
            Duration::from_secs(3600)
        };
        let configure = |config: &mut keydrop_engine::EngineConfig| {
            config.snapshot_records_min = 20;
            config.expiry_interval = expiry_interval;
        };
        {
            let o = open_configured(dir.path(), &clock, &[KEY_A], configure).await;
            // Two records (definition, import), then a reservation and a payment for
            // each of 20 cards: the 42 records reach the SKU's size (20 cards and
            // 20 orders), so a snapshot is due, and stay under four times it.
            o.stocked(&id, cards("Q", 0..20)).await;
            for i in 0..20 {
                let order = o
                    .engine
                    .reserve(&id, buyer(&format!("q{i}")))
                    .await
                    .unwrap();
                o.engine
                    .confirm_payment(
                        &order.order_id,
                        PaymentRef::parse(format!("pay-{i}")).unwrap(),
                        5_000,
                    )
                    .await
                    .unwrap();
            }
            // Ticks enough for the ticker to see a quiet SKU, and for the snapshot
            // to be written and synced.
            tokio::time::sleep(Duration::from_millis(500)).await;
            o.engine.halt().await;
        }
        let o = open(dir.path(), &clock, &[KEY_A]).await;
        let report = o.engine.recovery_report().clone();
        if ticker_sees_quiet {
            assert_eq!(report.snapshots_loaded, 1, "{report:?}");
            assert_eq!(report.records_replayed, 0, "{report:?}");
        } else {
            assert_eq!(report.snapshots_loaded, 0, "{report:?}");
            assert_eq!(report.records_replayed, 42, "{report:?}");
        }
        let view = o.engine.sku(&id).unwrap();
        assert_eq!((view.counts.sold, view.counts.available), (20, 0));
        o.engine.shutdown().await;
    }
}

/// Reservations of two SKUs that reach the journal in one group commit are stored as
/// one run of records per SKU; after a crash every record of every run is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_committed_together_are_all_replayed_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let ids = [sku("run-a"), sku("run-b")];
    let per_sku = 50;
    let mut orders = Vec::new();
    {
        let o = open(dir.path(), &clock, &[KEY_A]).await;
        for (n, id) in ids.iter().enumerate() {
            o.stocked(id, cards(&format!("R{n}"), 0..60)).await;
        }
        // Held, the disk lets the reservations pile up in the journal's queue; once
        // released they are written together.
        o.fault.hold_writes();
        let release = ReleaseOnDrop(o.fault.clone());
        let mut pending = Vec::new();
        for i in 0..per_sku {
            for id in &ids {
                let mut reservation = Box::pin(o.engine.reserve(id, buyer(&format!("b{i}"))));
                assert!(poll_once(&mut reservation).await.is_none());
                pending.push(reservation);
            }
        }
        assert!(
            eventually(Duration::from_secs(60), || o.engine.journal_queue_depth()
                >= 2 * per_sku)
            .await,
            "queued: {}",
            o.engine.journal_queue_depth()
        );
        drop(release);
        for reservation in pending {
            orders.push(reservation.await.unwrap().order_id);
        }
        // No snapshot: the next open has only the journal.
        o.engine.halt().await;
    }
    let o = open(dir.path(), &clock, &[KEY_A]).await;
    assert!(o.engine.recovery_report().records_replayed >= 2 * (2 + per_sku as u64));
    for order_id in &orders {
        assert_eq!(
            o.engine.order(order_id).await.unwrap().view.status,
            OrderStatus::Reserved
        );
    }
    for id in &ids {
        assert_eq!(o.engine.sku(id).unwrap().counts.reserved, per_sku as u64);
    }
    o.engine.shutdown().await;
}

/// Lets held journal writes go however a test ends, so a failure is reported rather
/// than hung.
struct ReleaseOnDrop(keydrop_engine::journal::FaultInjector);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release_writes();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_expire_within_a_second_also_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let id = sku("expiring");
    let (first, second);
    {
        let o = open(dir.path(), &clock, &[KEY_A]).await;
        o.engine.define_sku(id.clone(), def(30)).await.unwrap();
        o.engine.import_cards(&id, cards("E", 0..2)).await.unwrap();
        first = o.engine.reserve(&id, buyer("a")).await.unwrap().order_id;
        clock.advance_millis(10_000);
        second = o.engine.reserve(&id, buyer("b")).await.unwrap().order_id;
        clock.advance_millis(20_000); // first is due now
        let engine = o.engine.clone();
        let expired = eventually(Duration::from_secs(1), || {
            engine.sku(&id).unwrap().counts.available == 1
        })
        .await;
        assert!(
            expired,
            "first reservation expired within a second of its deadline"
        );
        o.engine.shutdown().await;
    }
    clock.advance_millis(10_000); // second is due while the node is down
    let o = open(dir.path(), &clock, &[KEY_A]).await;
    let engine = o.engine.clone();
    assert!(
        eventually(Duration::from_secs(1), || engine
            .sku(&id)
            .unwrap()
            .counts
            .available
            == 2)
        .await
    );
    assert!(matches!(
        o.engine.order(&first).await.unwrap().view.status,
        OrderStatus::Expired { .. }
    ));
    assert!(matches!(
        o.engine.order(&second).await.unwrap().view.status,
        OrderStatus::Expired { .. }
    ));
    // A payment after expiry is refused, recorded for refund, and the card stays in stock.
    let late = o
        .engine
        .confirm_payment(&second, PaymentRef::parse("late").unwrap(), 5_000)
        .await
        .unwrap_err();
    assert!(matches!(
        late,
        EngineError::Sku(SkuError::ReservationExpired)
    ));
    let refunds = o.engine.refused_payments(None).await.unwrap();
    assert_eq!(refunds.len(), 1);
    assert_eq!(refunds[0].refused_payments[0].payment_ref.as_str(), "late");
    assert_eq!(o.engine.sku(&id).unwrap().counts.available, 2);
    o.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retry_returns_the_original_order() {
    let dir = tempfile::tempdir().unwrap();
    let o = open(dir.path(), &manual_clock(), &[KEY_A]).await;
    let id = sku("idem");
    o.stocked(&id, cards("I", 0..5)).await;
    let request = |fp: u8| Reservation {
        user: UserId::parse("u").unwrap(),
        device: None,
        idempotency: Some((
            IdempotencyKey::parse("key-1").unwrap(),
            RequestFingerprint([fp; 16]),
        )),
    };
    let first = o.engine.reserve(&id, request(1)).await.unwrap();
    let retry = o.engine.reserve(&id, request(1)).await.unwrap();
    assert_eq!(first.order_id, retry.order_id);
    assert!(retry.replayed);
    let reused = o.engine.reserve(&id, request(2)).await.unwrap_err();
    assert!(matches!(
        reused,
        EngineError::Sku(SkuError::IdempotencyKeyReused)
    ));
    assert_eq!(o.engine.sku(&id).unwrap().counts.reserved, 1);
    o.engine.shutdown().await;
}

/// A keyed order the edge would refuse from the published stock is answered without
/// the actor, as the actor would answer it, unless one of the SKU's orders holds its
/// key: from the order's reservation until its pruning is durable, and across a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_orders_of_a_sold_out_sku_are_answered_without_the_actor_unless_an_order_holds_the_key(
) {
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let id = sku("keyed-edge");
    let keyed = |user: &str, key: &str, fp: u8| Reservation {
        user: UserId::parse(user).unwrap(),
        device: None,
        idempotency: Some((
            IdempotencyKey::parse(key).unwrap(),
            RequestFingerprint([fp; 16]),
        )),
    };
    let at_edge = |o: &Opened, key: &str, fp: u8| {
        o.engine.refuse_keyed_order(
            &id,
            &IdempotencyKey::parse(key).unwrap(),
            &RequestFingerprint([fp; 16]),
            SkuError::SoldOut,
        )
    };
    let winner_key = "winner-key";
    {
        let o = open(dir.path(), &clock, &[KEY_A]).await;
        o.stocked(&id, cards("K", 0..1)).await;
        let won = o
            .engine
            .reserve(&id, keyed("winner", winner_key, 1))
            .await
            .unwrap();
        assert_eq!(o.engine.available_hint(&id), Some(0));
        // The winner's retry is the actor's to answer, with its 201.
        assert_eq!(at_edge(&o, winner_key, 1), None);
        let retry = o
            .engine
            .reserve(&id, keyed("winner", winner_key, 1))
            .await
            .unwrap();
        assert!(retry.replayed);
        assert_eq!(retry.order_id, won.order_id);

        // A new key is refused at the edge and held: the same request gets the same
        // answer, another request with the key 422, at the edge and from the actor.
        assert_eq!(at_edge(&o, "late-key", 1), Some(SkuError::SoldOut));
        assert_eq!(at_edge(&o, "late-key", 1), Some(SkuError::SoldOut));
        assert_eq!(
            at_edge(&o, "late-key", 2),
            Some(SkuError::IdempotencyKeyReused)
        );
        // The card comes back: the held refusal still answers the key's retry, and a
        // fresh key gets the card.
        o.engine.cancel(&won.order_id).await.unwrap();
        assert_eq!(o.engine.available_hint(&id), Some(1));
        assert!(matches!(
            o.engine.reserve(&id, keyed("late", "late-key", 1)).await,
            Err(EngineError::Sku(SkuError::SoldOut))
        ));
        assert!(matches!(
            o.engine.reserve(&id, keyed("late", "late-key", 2)).await,
            Err(EngineError::Sku(SkuError::IdempotencyKeyReused))
        ));
        let second = o
            .engine
            .reserve(&id, keyed("second", "second-key", 1))
            .await
            .unwrap();
        assert!(!second.replayed);
        o.engine
            .confirm_payment(&second.order_id, PaymentRef::parse("pay-2").unwrap(), 5_000)
            .await
            .unwrap();
        assert_eq!(o.engine.available_hint(&id), Some(0));
        // The cancelled order still holds its key until it is pruned.
        assert_eq!(at_edge(&o, winner_key, 1), None);
        clock.advance_millis(keydrop_engine::limits::ENDED_ORDERS_KEPT_MS + 1);
        assert!(
            eventually(Duration::from_secs(10), || at_edge(&o, winner_key, 1)
                .is_some())
            .await,
            "the key of the pruned order is still held"
        );
        assert!(matches!(
            o.engine.order(&won.order_id).await,
            Err(EngineError::Sku(SkuError::OrderNotFound))
        ));
        assert_eq!(at_edge(&o, "second-key", 1), None);
        o.engine.shutdown().await;
    }
    // After a restart the keys of the orders are known again; the refusals are not.
    let o = open(dir.path(), &clock, &[KEY_A]).await;
    assert_eq!(o.engine.available_hint(&id), Some(0));
    assert_eq!(at_edge(&o, "second-key", 1), None);
    assert_eq!(at_edge(&o, "late-key", 2), Some(SkuError::SoldOut));
    assert_eq!(
        o.engine.refuse_keyed_order(
            &sku("no-such-sku"),
            &IdempotencyKey::parse("k").unwrap(),
            &RequestFingerprint([1; 16]),
            SkuError::SoldOut,
        ),
        None
    );
    o.engine.shutdown().await;
}

/// The edge and the actor answering the same keys at the same moment never both
/// decide one: a key the actor reserved is never refused at the edge, and a key the
/// edge refused is never reserved by the actor. Each key is sent once to each, the
/// edge's calls sweeping the keys from another thread while the actor works through
/// them, so that some land while the actor is deciding the same key. (The real edge
/// asks only once the SKU is sold out; the lock is the same either way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_and_the_actor_never_both_decide_one_key() {
    const KEYS: usize = 3_000;
    // Every pace once, and more rounds (up to the most) until both sides have won a
    // key: a round in which the edge's sweep never met the actor's tests nothing.
    const ROUNDS_MIN: usize = 6;
    const ROUNDS_MAX: usize = 18;
    let dir = tempfile::tempdir().unwrap();
    let o = open(dir.path(), &manual_clock(), &[KEY_A]).await;
    let key = |i: usize| IdempotencyKey::parse(format!("key-{i}")).unwrap();
    let fingerprint = RequestFingerprint([3; 16]);
    let (mut reserved_in_all, mut refused_in_all) = (0, 0);
    for round in 0..ROUNDS_MAX {
        if round >= ROUNDS_MIN && reserved_in_all > 0 && refused_in_all > 0 {
            break;
        }
        let id = sku(&format!("contended-{round}"));
        o.stocked(&id, cards("C", 0..KEYS as u32)).await;
        let at_actor: Vec<_> = (0..KEYS)
            .map(|i| {
                let (engine, id) = (o.engine.clone(), id.clone());
                tokio::spawn(async move {
                    let request = Reservation {
                        user: UserId::parse(format!("buyer-{i}")).unwrap(),
                        device: None,
                        idempotency: Some((key(i), fingerprint)),
                    };
                    engine.reserve(&id, request).await
                })
            })
            .collect();
        let edge = {
            let (engine, id) = (o.engine.clone(), id.clone());
            // The actor takes a few microseconds a key here; the edge's pace goes from
            // 0.5 to 16 µs a key over six rounds, so that on a faster or slower machine
            // some round still crosses the actor's.
            let pace_nanos = 500u64 << (round % 6);
            std::thread::spawn(move || {
                (0..KEYS)
                    .map(|i| {
                        let jitter = (i % 5) as u64 * pace_nanos / 4;
                        let until =
                            std::time::Instant::now() + Duration::from_nanos(pace_nanos + jitter);
                        while std::time::Instant::now() < until {
                            std::hint::spin_loop();
                        }
                        engine.refuse_keyed_order(&id, &key(i), &fingerprint, SkuError::SoldOut)
                    })
                    .collect::<Vec<_>>()
            })
        };
        let mut at_actor_answers = Vec::with_capacity(KEYS);
        for task in at_actor {
            at_actor_answers.push(task.await.unwrap());
        }
        let at_edge_answers = edge.join().unwrap();
        let (mut reserved, mut refused) = (0, 0);
        for (i, answers) in at_actor_answers.iter().zip(&at_edge_answers).enumerate() {
            match answers {
                (Ok(order), None) => {
                    assert!(!order.replayed, "key {i}");
                    reserved += 1;
                }
                (Err(EngineError::Sku(SkuError::SoldOut)), Some(SkuError::SoldOut)) => refused += 1,
                other => panic!("round {round}: key {i} decided twice: {other:?}"),
            }
        }
        assert_eq!(reserved + refused, KEYS);
        assert_eq!(o.engine.sku(&id).unwrap().counts.reserved, reserved as u64);
        reserved_in_all += reserved;
        refused_in_all += refused;
        eprintln!(
            "round {round}: {reserved} reserved by the actor, {refused} refused at the edge first"
        );
    }
    assert!(
        reserved_in_all > 0 && refused_in_all > 0,
        "the edge and the actor never met on a key: {reserved_in_all} reserved, {refused_in_all} refused"
    );
    o.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_write_is_not_acknowledged_and_memory_matches_disk() {
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let id = sku("faulty");
    let kept;
    {
        let o = open(dir.path(), &clock, &[KEY_A]).await;
        o.stocked(&id, cards("F", 0..5)).await;
        kept = o
            .engine
            .reserve(&id, buyer("keeper"))
            .await
            .unwrap()
            .order_id;
        o.fault.fail_next_writes(1);
        let failed = o.engine.reserve(&id, buyer("unlucky")).await.unwrap_err();
        assert!(
            matches!(failed, EngineError::JournalUnavailable(_)),
            "{failed:?}"
        );
        assert!(failed.is_transient());
        // The published view never showed the failed reservation.
        let view = o.engine.sku(&id).unwrap();
        assert_eq!((view.counts.reserved, view.counts.available), (1, 4));
        // The actor reloads from disk: once it has, the failed reservation is gone
        // from its memory too, and the same buyer is served (until then their
        // phantom order counts against their limit).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let next = loop {
            match o.engine.reserve(&id, buyer("unlucky")).await {
                Err(EngineError::Sku(SkuError::PurchaseLimit { .. }))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => break other.unwrap(),
            }
        };
        assert_eq!(o.engine.sku(&id).unwrap().counts.reserved, 2);
        drop(next);
        o.engine.shutdown().await;
    }
    let o = open(dir.path(), &clock, &[KEY_A]).await;
    let view = o.engine.sku(&id).unwrap();
    assert_eq!((view.counts.reserved, view.counts.available), (2, 3));
    assert!(o.engine.order(&kept).await.is_ok());
    o.engine.shutdown().await;
}

/// A keyed reservation refused while another one held the last card in memory is
/// decided afresh once that card's write failed and the SKU reloaded: the refusal
/// rested on state that never reached the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_refusal_does_not_outlive_the_failed_write_it_rested_on() {
    let dir = tempfile::tempdir().unwrap();
    let o = open(dir.path(), &manual_clock(), &[KEY_A]).await;
    let id = sku("rolled-back");
    o.stocked(&id, cards("R", 0..2)).await;
    let kept = Reservation {
        idempotency: Some((
            IdempotencyKey::parse("kept-key").unwrap(),
            RequestFingerprint([2; 16]),
        )),
        ..buyer("kept")
    };
    o.engine.reserve(&id, kept).await.unwrap();
    let keyed = || Reservation {
        user: UserId::parse("patient").unwrap(),
        device: None,
        idempotency: Some((
            IdempotencyKey::parse("retry-me").unwrap(),
            RequestFingerprint([7; 16]),
        )),
    };
    let doomed = Reservation {
        idempotency: Some((
            IdempotencyKey::parse("doomed-key").unwrap(),
            RequestFingerprint([1; 16]),
        )),
        ..buyer("doomed")
    };
    o.fault.hold_writes();
    let release = ReleaseOnDrop(o.fault.clone());
    let mut first = Box::pin(o.engine.reserve(&id, doomed));
    assert!(poll_once(&mut first).await.is_none());
    assert!(
        eventually(Duration::from_secs(10), || o.engine.journal_queue_depth()
            >= 1)
        .await
    );
    // The last card is taken in memory, so the keyed request is refused at once.
    assert!(matches!(
        o.engine.reserve(&id, keyed()).await,
        Err(EngineError::Sku(SkuError::SoldOut))
    ));
    o.fault.fail_next_writes(1);
    drop(release);
    assert!(matches!(
        first.await,
        Err(EngineError::JournalUnavailable(_))
    ));
    // Once the SKU has reloaded, the card is back and the same keyed request gets it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let order = loop {
        match o.engine.reserve(&id, keyed()).await {
            Err(EngineError::Sku(SkuError::SoldOut)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => break other,
        }
    };
    let order = order.expect("decided afresh after the reload");
    assert!(!order.replayed);
    assert_eq!(o.engine.sku(&id).unwrap().counts.reserved, 2);
    // The keys the edge sends to the actor were rebuilt with the SKU: the failed
    // reservation's is gone, the others are there.
    let at_edge = |key: &str, fp: u8| {
        o.engine.refuse_keyed_order(
            &id,
            &IdempotencyKey::parse(key).unwrap(),
            &RequestFingerprint([fp; 16]),
            SkuError::SoldOut,
        )
    };
    assert_eq!(at_edge("doomed-key", 1), Some(SkuError::SoldOut));
    assert_eq!(at_edge("retry-me", 7), None);
    assert_eq!(at_edge("kept-key", 2), None);
    o.engine.shutdown().await;
}

/// A cancel refused because the order is paid waits for the payment's record: had
/// the buyer been told "already paid" first, a crash before the fsync would have
/// made it false.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_refused_as_paid_waits_for_the_payment_to_be_durable() {
    let dir = tempfile::tempdir().unwrap();
    let o = open(dir.path(), &manual_clock(), &[KEY_A]).await;
    let id = sku("paid-first");
    o.stocked(&id, cards("P", 0..2)).await;
    let order_id = o
        .engine
        .reserve(&id, buyer("payer"))
        .await
        .unwrap()
        .order_id;
    o.fault.hold_writes();
    let release = ReleaseOnDrop(o.fault.clone());
    let mut payment = Box::pin(o.engine.confirm_payment(
        &order_id,
        PaymentRef::parse("pay-1").unwrap(),
        5_000,
    ));
    assert!(poll_once(&mut payment).await.is_none());
    assert!(
        eventually(Duration::from_secs(10), || o.engine.journal_queue_depth()
            >= 1)
        .await
    );
    let mut cancel = Box::pin(o.engine.cancel(&order_id));
    assert!(poll_once(&mut cancel).await.is_none());
    // Let the actor take the cancel while the disk holds the payment's record.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let early = poll_once(&mut cancel).await;
    assert!(
        early.is_none(),
        "answered before the payment was durable: {early:?}"
    );
    // The payment's write fails: the cancel must not say "already paid".
    o.fault.fail_next_writes(1);
    drop(release);
    assert!(payment.await.is_err());
    let refused = cancel.await.unwrap_err();
    assert!(refused.is_transient(), "{refused:?}");
    // Reloaded, the order is reserved again and can be cancelled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let cancelled = loop {
        match o.engine.cancel(&order_id).await {
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => break other,
        }
    };
    assert!(matches!(
        cancelled.unwrap().status,
        OrderStatus::Cancelled { .. }
    ));
    o.engine.shutdown().await;
}

/// A key refused as reused, while the reservation made under it is still on its way
/// to disk, is answered once that reservation is durable: had it failed, the key
/// would not have been used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_refused_as_reused_waits_for_its_reservation_to_be_durable() {
    let dir = tempfile::tempdir().unwrap();
    let o = open(dir.path(), &manual_clock(), &[KEY_A]).await;
    let id = sku("reused");
    o.stocked(&id, cards("K", 0..2)).await;
    let keyed = |fingerprint: u8| Reservation {
        user: UserId::parse("keyed").unwrap(),
        device: None,
        idempotency: Some((
            IdempotencyKey::parse("once").unwrap(),
            RequestFingerprint([fingerprint; 16]),
        )),
    };
    o.fault.hold_writes();
    let release = ReleaseOnDrop(o.fault.clone());
    let mut first = Box::pin(o.engine.reserve(&id, keyed(1)));
    assert!(poll_once(&mut first).await.is_none());
    assert!(
        eventually(Duration::from_secs(10), || o.engine.journal_queue_depth()
            >= 1)
        .await
    );
    let mut reused = Box::pin(o.engine.reserve(&id, keyed(2)));
    assert!(poll_once(&mut reused).await.is_none());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let early = poll_once(&mut reused).await;
    assert!(
        early.is_none(),
        "answered before the reservation was durable: {early:?}"
    );
    drop(release);
    first.await.unwrap();
    assert!(matches!(
        reused.await,
        Err(EngineError::Sku(SkuError::IdempotencyKeyReused))
    ));
    o.engine.shutdown().await;
}

/// A payment whose write failed, on a SKU that then cannot be reloaded either,
/// lives only in memory: its card is not revealed, and the payment is not there
/// after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sku_that_cannot_reload_answers_nothing_from_memory() {
    let gauges = gauges::recorded();
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let id = sku("unreadable");
    let order_id;
    {
        let o = open(dir.path(), &clock, &[KEY_A]).await;
        o.stocked(&id, cards("U", 0..3)).await;
        order_id = o
            .engine
            .reserve(&id, buyer("payer"))
            .await
            .unwrap()
            .order_id;
        o.fault.fail_next_writes(1);
        o.fault.fail_next_loads(1);
        let failed = o
            .engine
            .confirm_payment(&order_id, PaymentRef::parse("pay-x").unwrap(), 5_000)
            .await
            .unwrap_err();
        assert!(
            matches!(failed, EngineError::JournalUnavailable(_)),
            "{failed:?}"
        );
        // The reload fails and the actor refuses everything from then on; the
        // lookup must not reveal the card of the payment that never reached disk.
        let answer = order_after_reload(&o, &order_id).await;
        assert!(
            matches!(answer, Err(EngineError::SkuUnavailable)),
            "{:?}",
            answer.map(|details| details.view.status)
        );
        assert!(matches!(
            o.engine.reserve(&id, buyer("other")).await,
            Err(EngineError::SkuUnavailable)
        ));
        // Refused at debug level from now on: the gauge is what an alert sees.
        assert_eq!(
            gauges
                .lock()
                .unwrap()
                .get("keydrop_sku_unavailable{sku=unreadable}"),
            Some(&1.0)
        );
        // Nor does the edge answer a keyed order for it: the actor refuses it as
        // unavailable.
        assert_eq!(
            o.engine.refuse_keyed_order(
                &id,
                &IdempotencyKey::parse("k").unwrap(),
                &RequestFingerprint([1; 16]),
                SkuError::SoldOut,
            ),
            None
        );
        o.engine.shutdown().await;
    }
    let o = open(dir.path(), &clock, &[KEY_A]).await;
    let details = o.engine.order(&order_id).await.unwrap();
    assert_eq!(details.view.status, OrderStatus::Reserved);
    assert!(details.card.is_none());
    o.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_reseals_every_card() {
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let id = sku("rotating");
    let order_id;
    {
        let o = open(dir.path(), &clock, &[KEY_A]).await;
        o.stocked(&id, cards("R", 0..2500)).await;
        order_id = o.engine.reserve(&id, buyer("u")).await.unwrap().order_id;
        o.engine
            .confirm_payment(&order_id, PaymentRef::parse("p").unwrap(), 5_000)
            .await
            .unwrap();
        o.engine.shutdown().await;
    }
    {
        // New key first, old key kept to open what it sealed.
        let o = open(dir.path(), &clock, &[KEY_B, KEY_A]).await;
        assert_eq!(o.engine.rotate_keys().await.unwrap(), 2500);
        assert_eq!(o.engine.rotate_keys().await.unwrap(), 0);
        o.engine.shutdown().await;
    }
    // The old key can now be dropped.
    let o = open(dir.path(), &clock, &[KEY_B]).await;
    let (_, secret) = o.engine.order(&order_id).await.unwrap().card.unwrap();
    assert_eq!(secret.expose(), "SECRET-R-000000-XYZZY");
    o.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sku_moves_between_engines_with_its_orders() {
    let from = tempfile::tempdir().unwrap();
    let to = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let id = sku("moving");
    let a = open(from.path(), &clock, &[KEY_A]).await;
    a.stocked(&id, cards("M", 0..50)).await;
    let order_id = a.engine.reserve(&id, buyer("u")).await.unwrap().order_id;
    a.engine
        .confirm_payment(&order_id, PaymentRef::parse("p").unwrap(), 5_000)
        .await
        .unwrap();
    let bundle = a.engine.export_sku(&id).await.unwrap();
    assert!(
        !bundle.windows(6).any(|w| w == b"SECRET"),
        "bundle holds sealed secrets only"
    );
    a.engine.shutdown().await;

    let b = open(to.path(), &clock, &[KEY_A]).await;
    let view = b.engine.import_sku(&bundle).await.unwrap();
    assert_eq!((view.counts.imported, view.counts.sold), (50, 1));
    assert!(matches!(
        b.engine.import_sku(&bundle).await,
        Err(EngineError::SkuExists)
    ));
    let mut truncated = bundle.clone();
    truncated.truncate(bundle.len() / 2);
    assert!(matches!(
        b.engine.import_sku(&truncated).await,
        Err(EngineError::InvalidBundle(_))
    ));
    // A sequence number the SKU's next records would wrap past is refused too.
    let (_, snapshot) = keydrop_engine::codec::decode_snapshot(&bundle).unwrap();
    let state = keydrop_engine::sku::Sku::from_snapshot(snapshot).unwrap();
    for seq in [u64::MAX, keydrop_engine::limits::BUNDLE_SEQ_MAX + 1] {
        let wrapping = keydrop_engine::codec::encode_snapshot(seq, state.snapshot_ref());
        assert!(matches!(
            b.engine.import_sku(&wrapping).await,
            Err(EngineError::InvalidBundle(_))
        ));
    }
    // A definition no PUT would take is refused in a bundle too.
    let (seq, mut snapshot) = keydrop_engine::codec::decode_snapshot(&bundle).unwrap();
    snapshot.def.reservation_ttl_ms = u64::MAX;
    let state = keydrop_engine::sku::Sku::from_snapshot(snapshot).unwrap();
    let never_expiring = keydrop_engine::codec::encode_snapshot(seq, state.snapshot_ref());
    assert!(matches!(
        b.engine.import_sku(&never_expiring).await,
        Err(EngineError::InvalidBundle(_))
    ));
    // So is a reservation held for longer than any TTL allows.
    let (seq, mut snapshot) = keydrop_engine::codec::decode_snapshot(&bundle).unwrap();
    let order = &mut snapshot.orders[0];
    order.status = OrderStatus::Reserved;
    order.expires_at = keydrop_engine::Timestamp(
        order.created_at.0 + keydrop_engine::limits::RESERVATION_TTL_MS_MAX + 1,
    );
    let available = snapshot.available.iter().copied().collect();
    let held_for_good = keydrop_engine::codec::encode_snapshot(
        seq,
        keydrop_engine::sku::SkuSnapshotRef {
            id: &snapshot.id,
            def: &snapshot.def,
            cards: &snapshot.cards,
            orders: snapshot.orders.iter().collect(),
            available: &available,
            last_now: snapshot.last_now,
        },
    );
    assert!(matches!(
        b.engine.import_sku(&held_for_good).await,
        Err(EngineError::InvalidBundle(_))
    ));
    let (_, secret) = b.engine.order(&order_id).await.unwrap().card.unwrap();
    assert_eq!(secret.expose(), "SECRET-M-000000-XYZZY");
    b.engine.shutdown().await;
    drop(b);
    // And it survives a restart of the new owner.
    let b = open(to.path(), &clock, &[KEY_A]).await;
    assert_eq!(b.engine.sku(&id).unwrap().counts.sold, 1);
    b.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_journal_record_is_reported_not_obeyed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let id = sku("corrupt");
    {
        let o = open(dir.path(), &clock, &[KEY_A]).await;
        o.stocked(&id, cards("X", 0..3)).await;
        o.engine.reserve(&id, buyer("u")).await.unwrap();
        o.engine.halt().await;
    }
    {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let journal = keydrop_engine::journal::Journal::open(
            &dir.path().join("db"),
            Default::default(),
            tx,
            None,
        )
        .unwrap();
        journal
            .raw_put_journal_record(&id, 3, b"\x01garbage that is not a record")
            .unwrap();
        journal.close();
    }
    let mut config = keydrop_engine::EngineConfig::new(dir.path().join("db"), ring(&[KEY_A]));
    config.clock = std::sync::Arc::new(clock.clone());
    let error = keydrop_engine::Engine::open(config)
        .await
        .err()
        .expect("open refuses corrupt journal");
    let text = error.to_string();
    assert!(
        text.contains("record 3") && text.contains("checksum"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_rocksdb_files() {
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let id = sku("at-rest");
    {
        let o = open(dir.path(), &clock, &[KEY_A]).await;
        o.stocked(&id, cards("Z", 0..200)).await;
        let order_id = o.engine.reserve(&id, buyer("u")).await.unwrap().order_id;
        o.engine
            .confirm_payment(&order_id, PaymentRef::parse("p").unwrap(), 5_000)
            .await
            .unwrap();
        // Reveal once, so any leak on the read path would show too.
        assert!(o.engine.order(&order_id).await.unwrap().card.is_some());
        o.engine.shutdown().await; // snapshot + WAL + (on flush) SST files
    }
    let mut scanned = 0usize;
    let mut serials_seen = false;
    for entry in walk(&dir.path().join("db")) {
        let bytes = std::fs::read(&entry).unwrap();
        scanned += bytes.len();
        serials_seen |= bytes.windows(8).any(|w| w == b"Z-000001");
        assert!(
            !bytes.windows(7).any(|w| w == b"SECRET-"),
            "plaintext secret in {}",
            entry.display()
        );
        assert!(
            !bytes.windows(5).any(|w| w == b"XYZZY"),
            "plaintext secret in {}",
            entry.display()
        );
    }
    assert!(scanned > 0);
    // Serials are stored in clear: proves the scan reads the data it should.
    assert!(serials_seen, "scan did not see the journal's contents");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_things_get_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let o = open(dir.path(), &manual_clock(), &[KEY_A]).await;
    let missing = sku("missing");
    assert!(matches!(
        o.engine.reserve(&missing, buyer("u")).await,
        Err(EngineError::SkuNotFound)
    ));
    let stranger = keydrop_engine::OrderId::generate(&missing);
    assert!(matches!(
        o.engine.order(&stranger).await,
        Err(EngineError::Sku(SkuError::OrderNotFound))
    ));
    assert!(o.engine.sku(&missing).is_none());
    o.engine.shutdown().await;
    assert!(matches!(
        o.engine.reserve(&missing, buyer("u")).await,
        Err(EngineError::ShuttingDown)
    ));
}

/// Polls `future` once; `None` while it waits.
async fn poll_once<F: std::future::Future + Unpin>(future: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut *future).poll(cx) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// Past its mailbox bound a SKU refuses at once, reservations and order lookups
/// alike, and every request that got in is answered.
#[tokio::test(flavor = "current_thread")]
async fn a_full_mailbox_refuses_at_once_and_loses_nothing_that_got_in() {
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let o = open(dir.path(), &clock, &[KEY_A]).await;
    let id = sku("crowded");
    o.stocked(&id, cards("M", 0..100)).await;
    let first = o.engine.reserve(&id, buyer("first")).await.unwrap();

    // On one thread the actor takes nothing from its mailbox until this task waits:
    // each reservation below is in the mailbox after its first poll.
    let extra = 50;
    let mut inside = Vec::new();
    let mut refused = 0;
    for i in 0..ACTOR_MAILBOX_DEPTH_MAX + extra {
        let mut reservation = Box::pin(o.engine.reserve(&id, buyer(&format!("u{i}"))));
        match poll_once(&mut reservation).await {
            None => inside.push(reservation),
            Some(Err(EngineError::Overloaded)) => refused += 1,
            Some(other) => panic!("reservation {i} answered before the actor ran: {other:?}"),
        }
    }
    assert_eq!(inside.len(), ACTOR_MAILBOX_DEPTH_MAX);
    assert_eq!(refused, extra);
    let mut lookup = Box::pin(o.engine.order(&first.order_id));
    assert!(
        matches!(
            poll_once(&mut lookup).await,
            Some(Err(EngineError::Overloaded))
        ),
        "an order lookup waits in the same mailbox"
    );

    let mut reserved = 0;
    let mut sold_out = 0;
    for reservation in inside {
        match reservation.await {
            Ok(_) => reserved += 1,
            Err(EngineError::Sku(SkuError::SoldOut)) => sold_out += 1,
            Err(other) => panic!("a reservation inside the bound failed: {other:?}"),
        }
    }
    assert_eq!((reserved, sold_out), (99, ACTOR_MAILBOX_DEPTH_MAX - 99));
    let view = o.engine.sku(&id).unwrap();
    assert_eq!((view.counts.available, view.counts.reserved), (0, 100));
    // Drained: the mailbox takes requests again.
    assert!(o.engine.order(&first.order_id).await.is_ok());
    assert!(matches!(
        o.engine.reserve(&id, buyer("late")).await,
        Err(EngineError::Sku(SkuError::SoldOut))
    ));
    o.engine.shutdown().await;
}

/// With the disk stalled, reservations pile up in the journal's queue; past its
/// bound a new one is refused at once instead of queueing behind the SKU's mailbox,
/// and every reservation that got in is answered once the disk is back.
#[tokio::test(flavor = "current_thread")]
async fn a_full_journal_queue_refuses_at_once_and_loses_nothing_that_got_in() {
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let o = open(dir.path(), &clock, &[KEY_A]).await;
    // More than the journal takes across five mailboxes, each within its own bound.
    let (skus, per_sku) = (5, 14_000);
    assert!(skus * per_sku > JOURNAL_QUEUE_DEPTH_MAX && per_sku < ACTOR_MAILBOX_DEPTH_MAX);
    let ids: Vec<_> = (0..skus).map(|n| sku(&format!("stalled-{n}"))).collect();
    for (n, id) in ids.iter().enumerate() {
        o.stocked(id, cards(&format!("J{n}"), 0..per_sku as u32))
            .await;
    }

    o.fault.hold_writes();
    let release = ReleaseOnDrop(o.fault.clone());
    let mut inside = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        for i in 0..per_sku {
            let mut reservation = Box::pin(o.engine.reserve(id, buyer(&format!("b{n}-{i}"))));
            assert!(poll_once(&mut reservation).await.is_none());
            inside.push(reservation);
        }
    }
    assert!(
        eventually(Duration::from_secs(60), || o.engine.journal_queue_depth()
            >= JOURNAL_QUEUE_DEPTH_MAX)
        .await,
        "the journal queue filled: {}",
        o.engine.journal_queue_depth()
    );
    // The actors go on taking their mailboxes meanwhile, refusing what they take.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut late = Box::pin(o.engine.reserve(&ids[0], buyer("late")));
    assert!(
        matches!(
            poll_once(&mut late).await,
            Some(Err(EngineError::Overloaded))
        ),
        "refused on the spot, not queued behind the SKU's mailbox"
    );

    drop(release);
    let (mut reserved, mut overloaded) = (0, 0);
    for reservation in inside {
        match reservation.await {
            Ok(_) => reserved += 1,
            Err(EngineError::Overloaded) => overloaded += 1,
            Err(other) => panic!("{other:?}"),
        }
    }
    // How many of those still in a mailbox when the queue filled were refused, and
    // how many got in once the disk was back, is up to the scheduler.
    assert_eq!(reserved + overloaded, skus * per_sku);
    assert!(overloaded > 0, "{reserved} reserved");
    let held: u64 = ids
        .iter()
        .map(|id| o.engine.sku(id).unwrap().counts.reserved)
        .sum();
    assert_eq!(
        held, reserved as u64,
        "every reservation answered is held, and only those"
    );
    o.engine.shutdown().await;
}

/// A provider's retry of a refused callback, arriving while the first refusal's
/// record is still on its way to disk, is answered only once that record is
/// durable: the refund a final answer stands for cannot be lost to a crash.
#[tokio::test(flavor = "current_thread")]
async fn a_repeated_refused_payment_is_answered_once_its_record_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let o = open(dir.path(), &clock, &[KEY_A]).await;
    let id = sku("retried");
    o.stocked(&id, cards("P", 0..2)).await;
    let order_id = o.engine.reserve(&id, buyer("gone")).await.unwrap().order_id;
    o.engine.cancel(&order_id).await.unwrap();

    o.fault.hold_writes();
    let pay = || {
        o.engine
            .confirm_payment(&order_id, PaymentRef::parse("late").unwrap(), 5_000)
    };
    let mut first = Box::pin(pay());
    let mut retry = Box::pin(pay());
    assert!(poll_once(&mut first).await.is_none());
    assert!(poll_once(&mut retry).await.is_none());
    // Let the actor take both while the disk holds the first one's record.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let early = poll_once(&mut retry).await;
    o.fault.release_writes();
    assert!(
        early.is_none(),
        "answered before the refusal was durable: {early:?}"
    );
    for answer in [first.await, retry.await] {
        assert!(
            matches!(answer, Err(EngineError::Sku(SkuError::ReservationExpired))),
            "{answer:?}"
        );
    }
    let listed = o.engine.refused_payments(None).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].refused_payments.len(),
        1,
        "the retry records nothing new"
    );
    o.engine.shutdown().await;
}

/// The published view (what `GET /v1/skus/{sku}` and sold-out shedding read) shows
/// a change only once it is durable, like every other answer.
#[tokio::test(flavor = "current_thread")]
async fn the_published_view_shows_only_durable_changes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let o = open(dir.path(), &clock, &[KEY_A]).await;
    let id = sku("shown");
    o.stocked(&id, cards("V", 0..2)).await;

    o.fault.hold_writes();
    let mut reservation = Box::pin(o.engine.reserve(&id, buyer("early")));
    assert!(poll_once(&mut reservation).await.is_none());
    let mut renamed = def(60);
    renamed.name = "renamed".into();
    let mut rename = Box::pin(o.engine.define_sku(id.clone(), renamed));
    assert!(poll_once(&mut rename).await.is_none());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = o.engine.sku(&id).unwrap();
    let available_hint = o.engine.available_hint(&id);
    o.fault.release_writes();
    assert_eq!((before.counts.available, before.counts.reserved), (2, 0));
    assert_eq!(available_hint, Some(2));
    assert_eq!(before.def.name, "Steam wallet 50");

    reservation.await.unwrap();
    rename.await.unwrap();
    let after = o.engine.sku(&id).unwrap();
    assert_eq!((after.counts.available, after.counts.reserved), (1, 1));
    assert_eq!(after.def.name, "renamed");
    o.engine.shutdown().await;
}

/// Whether the engine knows the order.
async fn known(engine: &keydrop_engine::Engine, order: keydrop_engine::OrderId) -> bool {
    match engine.order(&order).await {
        Ok(_) => true,
        Err(EngineError::Sku(SkuError::OrderNotFound)) => false,
        Err(other) => panic!("{other:?}"),
    }
}

/// Orders that ended more than `ENDED_ORDERS_KEPT_MS` ago are forgotten, on disk
/// too, and their idempotency keys with them; paid orders, and an ended one holding
/// a refused payment (money to refund), are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_orders_are_forgotten_after_their_retention() {
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let id = sku("churn");
    let o = open(dir.path(), &clock, &[KEY_A]).await;
    o.stocked(&id, cards("C", 0..5)).await;
    let paid = o
        .engine
        .reserve(&id, buyer("payer"))
        .await
        .unwrap()
        .order_id;
    o.engine
        .confirm_payment(&paid, PaymentRef::parse("p-1").unwrap(), 5_000)
        .await
        .unwrap();
    let key = IdempotencyKey::parse("k-1").unwrap();
    let fingerprint = RequestFingerprint::of(&[b"quitter"]);
    let keyed = |name: &str| Reservation {
        idempotency: Some((key.clone(), fingerprint)),
        ..buyer(name)
    };
    let cancelled = o
        .engine
        .reserve(&id, keyed("quitter"))
        .await
        .unwrap()
        .order_id;
    o.engine.cancel(&cancelled).await.unwrap();
    let refunded = o.engine.reserve(&id, buyer("late")).await.unwrap().order_id;
    o.engine.cancel(&refunded).await.unwrap();
    let late = o
        .engine
        .confirm_payment(&refunded, PaymentRef::parse("p-late").unwrap(), 5_000)
        .await;
    assert!(matches!(
        late,
        Err(EngineError::Sku(SkuError::ReservationExpired))
    ));
    let expired = o
        .engine
        .reserve(&id, buyer("sleeper"))
        .await
        .unwrap()
        .order_id;
    clock.advance_millis(61_000);
    let engine = o.engine.clone();
    assert!(
        eventually(Duration::from_secs(5), || engine
            .sku(&id)
            .unwrap()
            .counts
            .reserved
            == 0)
        .await
    );

    let found = |order| known(&o.engine, order);
    // Just short of the retention for the first to end (at T0): all kept.
    clock.advance_millis(keydrop_engine::limits::ENDED_ORDERS_KEPT_MS - 61_000 - 2_000);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for order in [paid, cancelled, refunded, expired] {
        assert!(found(order).await);
    }
    // Past it for the last to end too (expired at T0 + 61 s): the ended ones go, but
    // for the one with money to refund.
    clock.advance_millis(65_000);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while (found(cancelled).await || found(expired).await) && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!found(cancelled).await && !found(expired).await);
    assert!(found(paid).await && found(refunded).await);
    assert_eq!(o.engine.refused_payments(None).await.unwrap().len(), 1);
    let view = o.engine.sku(&id).unwrap();
    assert_eq!((view.counts.available, view.counts.sold), (4, 1));
    // The key went with its order: the same request is a new reservation now.
    let again = o.engine.reserve(&id, keyed("quitter")).await.unwrap();
    assert!(!again.replayed);
    assert_ne!(again.order_id, cancelled);
    // Stopped without a snapshot: the restart replays the pruning from the journal.
    o.engine.halt().await;

    let o = open(dir.path(), &clock, &[KEY_A]).await;
    let found = |order| known(&o.engine, order);
    assert!(!found(cancelled).await && !found(expired).await);
    assert!(found(paid).await && found(refunded).await && found(again.order_id).await);
    o.engine.shutdown().await;
}

/// The gauges the engine sets, by name and labels (`name{label=value,...}`), for the
/// tests that check one: a recorder for this test binary, installed on first use.
mod gauges {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use metrics::{
        Counter, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };

    pub type Values = Arc<Mutex<HashMap<String, f64>>>;

    struct Series {
        key: String,
        values: Values,
    }

    impl GaugeFn for Series {
        fn increment(&self, value: f64) {
            *self
                .values
                .lock()
                .unwrap()
                .entry(self.key.clone())
                .or_default() += value;
        }

        fn decrement(&self, value: f64) {
            *self
                .values
                .lock()
                .unwrap()
                .entry(self.key.clone())
                .or_default() -= value;
        }

        fn set(&self, value: f64) {
            self.values.lock().unwrap().insert(self.key.clone(), value);
        }
    }

    struct GaugesOnly(Values);

    impl Recorder for GaugesOnly {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }

        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            let labels: Vec<String> = key
                .labels()
                .map(|label| format!("{}={}", label.key(), label.value()))
                .collect();
            Gauge::from_arc(Arc::new(Series {
                key: format!("{}{{{}}}", key.name(), labels.join(",")),
                values: Arc::clone(&self.0),
            }))
        }

        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    pub fn recorded() -> Values {
        static VALUES: OnceLock<Values> = OnceLock::new();
        Arc::clone(VALUES.get_or_init(|| {
            let values = Values::default();
            metrics::set_global_recorder(GaugesOnly(Arc::clone(&values)))
                .expect("the only recorder of this test binary");
            values
        }))
    }
}
