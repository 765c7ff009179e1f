//! State machine tests: a table of scenarios, then random command sequences against a
//! small reference model (proptest), with snapshots, journal replay and a wall clock
//! that steps back thrown in.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::codec;
use crate::ids::{PaymentRef, RequestFingerprint};
use crate::vault::{CardSecret, KeyRing};

const T0: u64 = 1_700_000_000_000;
const TTL_MS: u64 = 60_000;

fn sku_id() -> SkuId {
    SkuId::parse("gift-100").unwrap()
}

fn def() -> SkuDef {
    SkuDef {
        name: "Gift card 100".into(),
        price_cents: 10_000,
        per_user_limit: 2,
        per_device_limit: Some(3),
        reservation_ttl_ms: TTL_MS,
        starts_at: Some(Timestamp(T0)),
        ends_at: Some(Timestamp(T0 + 10_000_000)),
        low_stock_threshold: 0,
    }
}

fn sealed(serial: &CardSerial) -> SealedSecret {
    let ring = KeyRing::new(vec![zeroize::Zeroizing::new([1u8; 32])]).unwrap();
    ring.seal(
        &sku_id(),
        serial,
        &CardSecret::new(format!("secret-{serial}")).unwrap(),
    )
}

fn cards(serials: &[&str]) -> Command {
    Command::ImportCards(
        serials
            .iter()
            .map(|s| {
                let serial = CardSerial::parse(*s).unwrap();
                NewCard {
                    sealed: sealed(&serial),
                    serial,
                }
            })
            .collect(),
    )
}

fn reserve(user: &str, device: Option<&str>, key: Option<(&str, u8)>) -> (OrderId, Command) {
    let order_id = OrderId::generate(&sku_id());
    let command = Command::Reserve(ReserveRequest {
        order_id,
        user: UserId::parse(user).unwrap(),
        device: device.map(|d| DeviceId::parse(d).unwrap()),
        idempotency: key.map(|(k, fp)| {
            (
                IdempotencyKey::parse(k).unwrap(),
                RequestFingerprint([fp; 16]),
            )
        }),
    });
    (order_id, command)
}

fn pay(order_id: OrderId, reference: &str, amount_cents: u64) -> Command {
    Command::ConfirmPayment {
        order_id,
        payment_ref: PaymentRef::parse(reference).unwrap(),
        amount_cents,
    }
}

fn new_sku() -> Sku {
    Sku::create(sku_id(), def(), Timestamp(T0 - 1000))
        .unwrap()
        .0
}

#[test]
fn scenario_reserve_pay_reveal() {
    let mut sku = new_sku();
    let now = Timestamp(T0);
    assert_eq!(
        sku.handle(cards(&["A", "B"]), now)
            .reply
            .unwrap_matches_imported(),
        (2, 0)
    );
    let (id, cmd) = reserve("alice", None, None);
    let decision = sku.handle(cmd, now);
    assert_eq!(decision.events.len(), 1);
    assert!(matches!(decision.reply, Ok(Reply::Reserved(_))));
    assert_eq!(sku.reveal(&id), Err(SkuError::NotPaid));
    assert!(matches!(
        sku.handle(pay(id, "p1", 10_000), now).reply,
        Ok(Reply::Paid(_))
    ));
    assert_eq!(sku.reveal(&id).unwrap().serial.as_str(), "A");
    // Same payment again: idempotent, nothing journaled.
    let again = sku.handle(pay(id, "p1", 10_000), now);
    assert!(again.events.is_empty());
    assert!(matches!(again.reply, Ok(Reply::Paid(_))));
    // Another payment on a paid order is refused and recorded for refund.
    let second = sku.handle(pay(id, "p2", 10_000), now);
    assert_eq!(second.reply.unwrap_err(), SkuError::AlreadyPaid);
    assert_eq!(second.events.len(), 1);
    assert_eq!(sku.orders_with_refused_payments().len(), 1);
    assert_eq!(
        sku.counts(),
        StockCounts {
            available: 1,
            reserved: 0,
            sold: 1,
            imported: 2
        }
    );
}

trait ImportedExt {
    fn unwrap_matches_imported(self) -> (u64, u64);
}
impl ImportedExt for Result<Reply, SkuError> {
    fn unwrap_matches_imported(self) -> (u64, u64) {
        match self {
            Ok(Reply::Imported(outcome)) => (outcome.imported, outcome.duplicates),
            other => panic!("expected an import, got {other:?}"),
        }
    }
}

#[test]
fn scenario_duplicates_are_counted_not_added() {
    let mut sku = new_sku();
    let now = Timestamp(T0);
    assert_eq!(
        sku.handle(cards(&["A", "A", "B"]), now)
            .reply
            .unwrap_matches_imported(),
        (2, 1)
    );
    let decision = sku.handle(cards(&["A", "B"]), now);
    assert!(decision.events.is_empty());
    assert_eq!(decision.reply.unwrap_matches_imported(), (0, 2));
    assert_eq!(sku.counts().imported, 2);
}

#[test]
fn scenario_sale_window_and_sold_out() {
    let mut sku = new_sku();
    sku.handle(cards(&["A"]), Timestamp(T0 - 500));
    let (_, early) = reserve("u", None, None);
    assert_eq!(
        sku.handle(early, Timestamp(T0 - 1)).reply.unwrap_err(),
        SkuError::NotOnSale {
            status: SkuStatus::Scheduled
        }
    );
    let (_, first) = reserve("u", None, None);
    assert!(sku.handle(first, Timestamp(T0)).reply.is_ok());
    let (_, second) = reserve("v", None, None);
    assert_eq!(
        sku.handle(second, Timestamp(T0)).reply.unwrap_err(),
        SkuError::SoldOut
    );
    let (_, late) = reserve("w", None, None);
    assert_eq!(
        sku.handle(late, Timestamp(T0 + 10_000_000))
            .reply
            .unwrap_err(),
        SkuError::NotOnSale {
            status: SkuStatus::Ended
        }
    );
}

#[test]
fn scenario_limits_count_live_orders_only() {
    let mut sku = new_sku();
    let now = Timestamp(T0);
    sku.handle(cards(&["A", "B", "C", "D", "E"]), now);
    let (a, cmd) = reserve("u", Some("d"), None);
    assert!(sku.handle(cmd, now).reply.is_ok());
    let (_, cmd) = reserve("u", Some("d"), None);
    assert!(sku.handle(cmd, now).reply.is_ok());
    let (_, cmd) = reserve("u", Some("d"), None);
    assert!(matches!(
        sku.handle(cmd, now).reply,
        Err(SkuError::PurchaseLimit {
            scope: LimitScope::User,
            limit: 2
        })
    ));
    // A third user id on the same device: the device limit (3) still has room once.
    let (_, cmd) = reserve("x", Some("d"), None);
    assert!(sku.handle(cmd, now).reply.is_ok());
    let (_, cmd) = reserve("y", Some("d"), None);
    assert!(matches!(
        sku.handle(cmd, now).reply,
        Err(SkuError::PurchaseLimit {
            scope: LimitScope::Device,
            limit: 3
        })
    ));
    // Cancelling frees both the user's and the device's slot.
    assert!(matches!(
        sku.handle(Command::Cancel { order_id: a }, now).reply,
        Ok(Reply::Cancelled(_))
    ));
    let (_, cmd) = reserve("u", Some("d"), None);
    assert!(sku.handle(cmd, now).reply.is_ok());
    sku.check_invariants().unwrap();
}

#[test]
fn scenario_idempotency() {
    let mut sku = new_sku();
    let now = Timestamp(T0);
    sku.handle(cards(&["A", "B"]), now);
    let (id, cmd) = reserve("u", None, Some(("k1", 1)));
    assert!(sku.handle(cmd, now).reply.is_ok());
    let (_, retry) = reserve("u", None, Some(("k1", 1)));
    let decision = sku.handle(retry, now);
    assert!(decision.events.is_empty());
    match decision.reply {
        Ok(Reply::Reserved(view)) => {
            assert_eq!(view.order_id, id);
            assert!(view.replayed);
        }
        other => panic!("{other:?}"),
    }
    let (_, changed) = reserve("u", None, Some(("k1", 2)));
    assert_eq!(
        sku.handle(changed, now).reply.unwrap_err(),
        SkuError::IdempotencyKeyReused
    );
    assert_eq!(sku.counts().reserved, 1);
}

#[test]
fn scenario_expiry_returns_card_and_late_payment_is_recorded() {
    let mut sku = new_sku();
    sku.handle(cards(&["A"]), Timestamp(T0));
    let (id, cmd) = reserve("u", None, None);
    sku.handle(cmd, Timestamp(T0));
    assert_eq!(sku.next_expiry(), Some(Timestamp(T0 + TTL_MS)));
    let early = sku.handle(Command::ExpireDue, Timestamp(T0 + TTL_MS - 1));
    assert!(early.events.is_empty());
    let due = sku.handle(Command::ExpireDue, Timestamp(T0 + TTL_MS));
    assert_eq!(due.events.len(), 1);
    assert_eq!(sku.counts().available, 1);
    let late = sku.handle(pay(id, "p", 10_000), Timestamp(T0 + TTL_MS + 5));
    assert_eq!(late.reply.unwrap_err(), SkuError::ReservationExpired);
    let refused = &sku.order(&id).unwrap().refused_payments;
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].reason, RefusalReason::Expired);
    // The same late callback again is not recorded twice.
    assert!(sku
        .handle(pay(id, "p", 10_000), Timestamp(T0 + TTL_MS + 6))
        .events
        .is_empty());
}

/// An order keeps a bounded list of refused payments. Past it a payment is still
/// refused, and the decision names it so the money is not lost from sight.
#[test]
fn refused_payments_past_the_bound_are_refused_and_handed_back_unrecorded() {
    let mut sku = new_sku();
    sku.handle(cards(&["A"]), Timestamp(T0));
    let (id, cmd) = reserve("u", None, None);
    sku.handle(cmd, Timestamp(T0));
    sku.handle(Command::ExpireDue, Timestamp(T0 + TTL_MS));
    let at = Timestamp(T0 + TTL_MS + 1);
    for n in 0..REFUSED_PAYMENTS_PER_ORDER_MAX {
        let late = sku.handle(pay(id, &format!("p{n}"), 10_000), at);
        assert_eq!(late.events.len(), 1, "payment {n} is recorded");
        assert!(late.unrecorded_refusal.is_none());
    }
    let over = sku.handle(pay(id, "one-too-many", 10_001), at);
    assert_eq!(over.reply.unwrap_err(), SkuError::ReservationExpired);
    assert!(over.events.is_empty());
    let (order_id, refused) = over.unrecorded_refusal.expect("handed back");
    assert_eq!(order_id, id);
    assert_eq!(refused.payment_ref.as_str(), "one-too-many");
    assert_eq!(refused.amount_cents, 10_001);
    assert_eq!(refused.reason, RefusalReason::Expired);
    assert_eq!(
        sku.order(&id).unwrap().refused_payments.len(),
        REFUSED_PAYMENTS_PER_ORDER_MAX
    );
    // A recorded one, called back again, gets its answer and is not handed back.
    let again = sku.handle(pay(id, "p0", 10_000), at);
    assert_eq!(again.reply.unwrap_err(), SkuError::ReservationExpired);
    assert!(again.unrecorded_refusal.is_none());
}

/// More orders due in one millisecond than one expiry pass takes, and then more ended
/// in one millisecond than one prune pass takes: each pass takes its batch from the
/// front, the next one the rest, and every card and index stays consistent.
#[test]
fn scenario_crowds_due_and_ended_in_one_millisecond_take_several_passes() {
    use crate::limits::{ENDED_ORDERS_KEPT_MS, EXPIRE_BATCH_ORDERS_MAX, PRUNE_BATCH_ORDERS_MAX};
    let extra = 10;
    let orders = EXPIRE_BATCH_ORDERS_MAX + extra;
    let mut sku = new_sku();
    let serials: Vec<String> = (0..orders).map(|n| format!("card-{n}")).collect();
    let serials: Vec<&str> = serials.iter().map(String::as_str).collect();
    sku.handle(cards(&serials), Timestamp(T0));
    let mut ids = Vec::with_capacity(orders);
    for n in 0..orders {
        let (id, cmd) = reserve(&format!("buyer-{n}"), None, None);
        assert!(matches!(
            sku.handle(cmd, Timestamp(T0)).reply,
            Ok(Reply::Reserved(_))
        ));
        ids.push(id);
    }
    // One of them paid: taken out of the middle of its millisecond.
    assert!(matches!(
        sku.handle(pay(ids[orders / 2], "p", 10_000), Timestamp(T0 + 1))
            .reply,
        Ok(Reply::Paid(_))
    ));
    let due = Timestamp(T0 + TTL_MS);
    let first = sku.handle(Command::ExpireDue, due);
    assert!(
        matches!(first.reply, Ok(Reply::Expired { count }) if count == EXPIRE_BATCH_ORDERS_MAX)
    );
    sku.check_invariants().unwrap();
    let second = sku.handle(Command::ExpireDue, due);
    assert!(matches!(second.reply, Ok(Reply::Expired { count }) if count == extra - 1));
    assert_eq!(sku.next_expiry(), None);
    assert_eq!(sku.counts().available, orders as u64 - 1);
    sku.check_invariants().unwrap();
    let prune_at = Timestamp(T0 + TTL_MS + ENDED_ORDERS_KEPT_MS);
    let mut pruned = 0;
    for _ in 0..3 {
        let decision = sku.handle(
            Command::PruneEnded {
                kept_for_ms: ENDED_ORDERS_KEPT_MS,
            },
            prune_at,
        );
        match decision.reply {
            Ok(Reply::Pruned { count }) => {
                assert!(count <= PRUNE_BATCH_ORDERS_MAX);
                pruned += count;
            }
            other => panic!("prune answered {other:?}"),
        }
        sku.check_invariants().unwrap();
    }
    assert_eq!(pruned, orders - 1);
    assert!(sku.order(&ids[0]).is_none());
    assert!(
        sku.order(&ids[orders / 2]).is_some(),
        "the paid order stays"
    );
}

#[test]
fn scenario_payment_at_deadline_expires_in_the_same_write() {
    let mut sku = new_sku();
    sku.handle(cards(&["A"]), Timestamp(T0));
    let (id, cmd) = reserve("u", None, None);
    sku.handle(cmd, Timestamp(T0));
    let decision = sku.handle(pay(id, "p", 10_000), Timestamp(T0 + TTL_MS));
    assert_eq!(decision.reply.unwrap_err(), SkuError::ReservationExpired);
    assert!(matches!(decision.events[0], Event::Expired { .. }));
    assert!(matches!(decision.events[1], Event::PaymentRefused { .. }));
    assert_eq!(sku.counts().available, 1);
}

#[test]
fn scenario_wrong_amount_is_refused_and_order_stays_payable() {
    let mut sku = new_sku();
    let now = Timestamp(T0);
    sku.handle(cards(&["A"]), now);
    let (id, cmd) = reserve("u", None, None);
    sku.handle(cmd, now);
    let wrong = sku.handle(pay(id, "p1", 9_999), now);
    assert_eq!(
        wrong.reply.unwrap_err(),
        SkuError::AmountMismatch {
            expected_cents: 10_000
        }
    );
    assert!(matches!(
        sku.handle(pay(id, "p2", 10_000), now).reply,
        Ok(Reply::Paid(_))
    ));
}

#[test]
fn stock_imported_in_batches_sizes_the_order_maps_for_all_of_it() {
    // A drop must not rehash its order maps mid-sale: imports arrive in batches,
    // and the maps are sized for the whole stock, not for the last batch.
    let mut sku = new_sku();
    let now = Timestamp(T0);
    for batch in 0..10 {
        let serials: Vec<String> = (0..100).map(|i| format!("S{batch}-{i}")).collect();
        let serials: Vec<&str> = serials.iter().map(String::as_str).collect();
        sku.handle(cards(&serials), now).reply.unwrap();
    }
    let (orders, buyers) = sku.order_room();
    assert!(orders >= 1_000, "orders map holds {orders}, stock is 1000");
    assert!(buyers >= 1_000, "buyers map holds {buyers}, stock is 1000");
}

#[test]
fn clock_going_backwards_is_clamped() {
    let mut sku = new_sku();
    sku.handle(cards(&["A"]), Timestamp(T0 + 100));
    let (_, cmd) = reserve("u", None, None);
    // An earlier `now` than already seen is treated as the latest one.
    match sku.handle(cmd, Timestamp(T0 - 5000)).reply {
        Ok(Reply::Reserved(view)) => assert_eq!(view.created_at, Timestamp(T0 + 100)),
        other => panic!("{other:?}"),
    }
    // Up to the held step, however far back within it.
    assert_eq!(
        sku.time_at(Timestamp(T0 + 100 - CLOCK_STEP_BACK_HELD_MS)),
        Timestamp(T0 + 100)
    );
}

/// A clock that ran an hour ahead and was corrected: what was decided meanwhile
/// keeps its times, but the SKU follows the corrected clock at once, so later
/// reservations fall due by it, not an hour late. Replay takes the same steps.
#[test]
fn a_clock_corrected_far_back_is_followed_and_replay_follows_it_too() {
    const HOUR_MS: u64 = 60 * 60 * 1000;
    let (mut sku, first) = Sku::create(sku_id(), def(), Timestamp(T0)).unwrap();
    let mut log = vec![first];
    let mut run = |sku: &mut Sku, command: Command, at: u64| {
        let decision = sku.handle(command, Timestamp(at));
        log.extend(decision.events.iter().cloned());
        decision.reply
    };
    run(&mut sku, cards(&["A", "B", "C"]), T0).unwrap();
    let (ahead, cmd) = reserve("early", None, None);
    run(&mut sku, cmd, T0 + HOUR_MS).unwrap();
    assert_eq!(sku.last_now(), Timestamp(T0 + HOUR_MS));
    // Restarted from a snapshot taken while the clock was ahead, the SKU knows the
    // time it had reached, and follows the corrected clock from there the same way.
    let (_, snapshot) =
        codec::decode_snapshot(&codec::encode_snapshot(1, sku.snapshot_ref())).unwrap();
    let mut restored = Sku::from_snapshot(snapshot).unwrap();
    assert_eq!(
        restored.time_at(Timestamp(T0 + HOUR_MS - 1_000)),
        Timestamp(T0 + HOUR_MS)
    );
    assert_eq!(
        restored.time_at(Timestamp(T0 + 60_000)),
        Timestamp(T0 + 60_000)
    );
    let (_, cmd) = reserve("after-restart", None, None);
    match restored.handle(cmd, Timestamp(T0 + 60_000)).reply.unwrap() {
        Reply::Reserved(view) => assert_eq!(view.expires_at, Timestamp(T0 + 60_000 + TTL_MS)),
        other => panic!("{other:?}"),
    }
    // Corrected: the next reservation falls due a TTL from the corrected time.
    let back = T0 + 60_000;
    assert_eq!(sku.time_at(Timestamp(back)), Timestamp(back));
    let (id, cmd) = reserve("u", None, None);
    match run(&mut sku, cmd, back).unwrap() {
        Reply::Reserved(view) => {
            assert_eq!(view.created_at, Timestamp(back));
            assert_eq!(view.expires_at, Timestamp(back + TTL_MS));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sku.last_now(), Timestamp(back));
    assert_eq!(sku.next_expiry(), Some(Timestamp(back + TTL_MS)));
    // From the corrected time on, small steps back are held again.
    assert_eq!(sku.time_at(Timestamp(back - 1_000)), Timestamp(back));
    let expired = sku.handle(Command::ExpireDue, Timestamp(back + TTL_MS));
    assert_eq!(expired.events.len(), 1);
    log.extend(expired.events);
    assert_eq!(
        sku.order(&id).unwrap().status,
        OrderStatus::Expired {
            at: Timestamp(back + TTL_MS)
        }
    );
    // The one made while the clock was ahead keeps the time it was made at.
    assert_eq!(sku.order(&ahead).unwrap().status, OrderStatus::Reserved);
    assert_eq!(sku.next_expiry(), Some(Timestamp(T0 + HOUR_MS + TTL_MS)));
    let mut replayed = Sku::from_first_event(sku_id(), &log[0]).unwrap();
    for event in &log[1..] {
        replayed.apply_checked(event).unwrap();
    }
    assert_eq!(replayed.last_now(), sku.last_now());
    assert_eq!(
        codec::encode_snapshot(0, replayed.snapshot_ref()),
        codec::encode_snapshot(0, sku.snapshot_ref())
    );
}

#[test]
fn invalid_definitions_are_refused() {
    let mut bad = def();
    bad.per_user_limit = 0;
    assert!(matches!(
        Sku::create(sku_id(), bad, Timestamp(0)),
        Err(SkuError::InvalidDefinition(_))
    ));
    let mut bad = def();
    bad.ends_at = bad.starts_at;
    assert!(bad.validate().is_err());
    let mut bad = def();
    bad.reservation_ttl_ms = 10;
    assert!(bad.validate().is_err());
    let mut bad = def();
    bad.name = " ".into();
    assert!(bad.validate().is_err());
}

#[test]
fn apply_checked_refuses_events_that_do_not_fit() {
    let mut sku = new_sku();
    let stranger = OrderId::generate(&sku_id());
    assert!(sku
        .apply_checked(&Event::Paid {
            order_id: stranger,
            payment_ref: PaymentRef::parse("p").unwrap(),
            amount_cents: 1,
            at: Timestamp(T0)
        })
        .is_err());
    assert!(sku
        .apply_checked(&Event::Reserved {
            order_id: stranger,
            card: 99,
            user: UserId::parse("u").unwrap(),
            device: None,
            idempotency: None,
            price_cents: 1,
            expires_at: Timestamp(T0),
            at: Timestamp(T0),
        })
        .is_err());
    sku.check_invariants().unwrap();
}

// ---- model-based property test ----

#[derive(Debug, Clone)]
enum Op {
    Import(Vec<u8>),
    Reserve {
        user: u8,
        device: Option<u8>,
        key: Option<u8>,
        fingerprint: u8,
    },
    Pay {
        order: usize,
        reference: u8,
        exact: bool,
    },
    Cancel {
        order: usize,
    },
    PayUnknown,
    Advance(u64),
    /// The wall clock set back by this much: held by the SKU up to
    /// `CLOCK_STEP_BACK_HELD_MS`, followed past it.
    StepBack(u64),
    ExpireDue,
    /// Prune orders ended at least this long ago.
    Prune(u64),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => prop::collection::vec(0u8..24, 1..6).prop_map(Op::Import),
        6 => (0u8..5, prop::option::of(0u8..3), prop::option::of(0u8..4), 0u8..2)
            .prop_map(|(user, device, key, fingerprint)| Op::Reserve { user, device, key, fingerprint }),
        3 => (0usize..64, 0u8..3, prop::bool::weighted(0.85)).prop_map(|(order, reference, exact)| Op::Pay { order, reference, exact }),
        1 => (0usize..64).prop_map(|order| Op::Cancel { order }),
        1 => Just(Op::PayUnknown),
        2 => prop_oneof![Just(1u64), Just(TTL_MS / 2), Just(TTL_MS), Just(3 * TTL_MS)].prop_map(Op::Advance),
        1 => prop_oneof![
            Just(1u64),
            Just(TTL_MS),
            Just(CLOCK_STEP_BACK_HELD_MS),
            Just(CLOCK_STEP_BACK_HELD_MS + 1),
            Just(CLOCK_STEP_BACK_HELD_MS + 2 * TTL_MS),
        ].prop_map(Op::StepBack),
        1 => Just(Op::ExpireDue),
        1 => prop_oneof![Just(0u64), Just(TTL_MS), Just(3 * TTL_MS)].prop_map(Op::Prune),
        1 => Just(Op::Restart),
    ]
}

#[derive(Debug, Clone, PartialEq)]
enum MStatus {
    Reserved,
    Paid(u8),
    Expired,
    Cancelled,
}

#[derive(Debug, Clone)]
struct MOrder {
    id: OrderId,
    user: u8,
    device: Option<u8>,
    expires_at: u64,
    status: MStatus,
    refused: Vec<(u8, SkuError)>,
    ended_at: Option<u64>,
    /// Pruned: the machine no longer knows it.
    gone: bool,
}

/// The reference model: counters and a list of orders, nothing clever.
#[derive(Default)]
struct Model {
    serials: std::collections::HashSet<u8>,
    available: u64,
    orders: Vec<MOrder>,
    keys: HashMap<u8, (u8, usize)>,
    /// The wall clock the machine is handed.
    wall: u64,
    /// The latest time the SKU has recorded (an event's time).
    last: u64,
    /// The SKU's time for the operation under way.
    now: u64,
}

impl Model {
    /// The clock rule, stated plainly: a step back of up to
    /// `CLOCK_STEP_BACK_HELD_MS` is held at the latest time seen; a longer one is
    /// a corrected clock, followed.
    fn sku_time(&self) -> u64 {
        if self.last - self.wall.min(self.last) > CLOCK_STEP_BACK_HELD_MS {
            self.wall
        } else {
            self.wall.max(self.last)
        }
    }

    fn live(&self, pred: impl Fn(&MOrder) -> bool) -> u32 {
        self.orders
            .iter()
            .filter(|o| matches!(o.status, MStatus::Reserved | MStatus::Paid(_)) && pred(o))
            .count() as u32
    }

    fn counts(&self) -> StockCounts {
        let reserved = self
            .orders
            .iter()
            .filter(|o| o.status == MStatus::Reserved)
            .count() as u64;
        let sold = self
            .orders
            .iter()
            .filter(|o| matches!(o.status, MStatus::Paid(_)))
            .count() as u64;
        StockCounts {
            available: self.available,
            reserved,
            sold,
            imported: self.serials.len() as u64,
        }
    }

    fn release(&mut self, index: usize, status: MStatus) {
        assert_eq!(self.orders[index].status, MStatus::Reserved);
        self.orders[index].status = status;
        self.orders[index].ended_at = Some(self.now);
        self.available += 1;
    }
}

fn run_ops(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let def = def();
    let (mut sku, first) = Sku::create(sku_id(), def.clone(), Timestamp(T0)).unwrap();
    let mut log: Vec<Event> = vec![first];
    let mut model = Model {
        wall: T0,
        last: T0,
        now: T0,
        ..Model::default()
    };
    for op in ops {
        model.now = model.sku_time();
        let now = Timestamp(model.wall);
        let logged = log.len();
        match op {
            Op::Import(serials) => {
                let names: Vec<String> = serials.iter().map(|s| format!("S{s}")).collect();
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                let decision = sku.handle(cards(&refs), now);
                let mut fresh = 0;
                for s in &serials {
                    if model.serials.insert(*s) {
                        fresh += 1;
                    }
                }
                model.available += fresh;
                prop_assert_eq!(
                    decision.reply.clone().unwrap_matches_imported(),
                    (fresh, serials.len() as u64 - fresh)
                );
                log.extend(decision.events);
            }
            Op::Reserve {
                user,
                device,
                key,
                fingerprint,
            } => {
                let key_text = key.map(|k| format!("key-{k}"));
                let (id, cmd) = reserve(
                    &format!("user-{user}"),
                    device.map(|d| format!("dev-{d}")).as_deref(),
                    key_text.as_deref().map(|k| (k, fingerprint)),
                );
                let decision = sku.handle(cmd, now);
                let expected: Result<Option<usize>, SkuError> =
                    if let Some((fp, index)) = key.and_then(|k| model.keys.get(&k)) {
                        if *fp == fingerprint {
                            Ok(Some(*index))
                        } else {
                            Err(SkuError::IdempotencyKeyReused)
                        }
                    } else if Some(Timestamp(model.now)) < def.starts_at {
                        Err(SkuError::NotOnSale {
                            status: SkuStatus::Scheduled,
                        })
                    } else if def.ends_at.is_some_and(|ends| Timestamp(model.now) >= ends) {
                        Err(SkuError::NotOnSale {
                            status: SkuStatus::Ended,
                        })
                    } else if model.available == 0 {
                        Err(SkuError::SoldOut)
                    } else if model.live(|o| o.user == user) >= def.per_user_limit {
                        Err(SkuError::PurchaseLimit {
                            scope: LimitScope::User,
                            limit: def.per_user_limit,
                        })
                    } else if device.is_some()
                        && model.live(|o| o.device == device) >= def.per_device_limit.unwrap()
                    {
                        Err(SkuError::PurchaseLimit {
                            scope: LimitScope::Device,
                            limit: def.per_device_limit.unwrap(),
                        })
                    } else {
                        Ok(None)
                    };
                match (expected, decision.reply.clone()) {
                    (Ok(Some(index)), Ok(Reply::Reserved(view))) => {
                        prop_assert_eq!(view.order_id, model.orders[index].id);
                        prop_assert!(view.replayed);
                        prop_assert!(decision.events.is_empty());
                    }
                    (Ok(None), Ok(Reply::Reserved(view))) => {
                        prop_assert_eq!(view.order_id, id);
                        model.available -= 1;
                        if let Some(k) = key {
                            model.keys.insert(k, (fingerprint, model.orders.len()));
                        }
                        model.orders.push(MOrder {
                            id,
                            user,
                            device,
                            expires_at: model.now + TTL_MS,
                            status: MStatus::Reserved,
                            refused: vec![],
                            ended_at: None,
                            gone: false,
                        });
                    }
                    (Err(want), Err(got)) => prop_assert_eq!(want, got),
                    (want, got) => {
                        prop_assert!(false, "reserve: model {:?}, machine {:?}", want, got)
                    }
                }
                log.extend(decision.events);
            }
            Op::Pay {
                order,
                reference,
                exact,
            } => {
                if model.orders.is_empty() {
                    continue;
                }
                let index = order % model.orders.len();
                let amount = if exact {
                    def.price_cents
                } else {
                    def.price_cents + 1
                };
                let decision = sku.handle(
                    pay(model.orders[index].id, &format!("pay-{reference}"), amount),
                    now,
                );
                let o = model.orders[index].clone();
                let expected: Result<(), SkuError> = if o.gone {
                    Err(SkuError::OrderNotFound)
                } else if let Some((_, e)) = o.refused.iter().find(|(r, _)| *r == reference) {
                    Err(e.clone())
                } else {
                    let refusal = match o.status {
                        MStatus::Paid(r) if r == reference => None,
                        MStatus::Paid(_) => Some(SkuError::AlreadyPaid),
                        MStatus::Expired | MStatus::Cancelled => Some(SkuError::ReservationExpired),
                        MStatus::Reserved if model.now >= o.expires_at => {
                            model.release(index, MStatus::Expired);
                            Some(SkuError::ReservationExpired)
                        }
                        MStatus::Reserved if !exact => Some(SkuError::AmountMismatch {
                            expected_cents: def.price_cents,
                        }),
                        MStatus::Reserved => {
                            model.orders[index].status = MStatus::Paid(reference);
                            None
                        }
                    };
                    match refusal {
                        Some(e) => {
                            model.orders[index].refused.push((reference, e.clone()));
                            Err(e)
                        }
                        None => Ok(()),
                    }
                };
                match (expected, decision.reply.clone()) {
                    (Ok(()), Ok(Reply::Paid(view))) => {
                        prop_assert_eq!(view.status.as_str(), "paid")
                    }
                    (Err(want), Err(got)) => prop_assert_eq!(want, got),
                    (want, got) => prop_assert!(false, "pay: model {:?}, machine {:?}", want, got),
                }
                log.extend(decision.events);
            }
            Op::Cancel { order } => {
                if model.orders.is_empty() {
                    continue;
                }
                let index = order % model.orders.len();
                let decision = sku.handle(
                    Command::Cancel {
                        order_id: model.orders[index].id,
                    },
                    now,
                );
                let expected = match model.orders[index].status {
                    _ if model.orders[index].gone => Err(SkuError::OrderNotFound),
                    MStatus::Cancelled => Ok(()),
                    MStatus::Paid(_) => Err(SkuError::AlreadyPaid),
                    MStatus::Expired => Err(SkuError::ReservationExpired),
                    MStatus::Reserved if model.now >= model.orders[index].expires_at => {
                        model.release(index, MStatus::Expired);
                        Err(SkuError::ReservationExpired)
                    }
                    MStatus::Reserved => {
                        model.release(index, MStatus::Cancelled);
                        Ok(())
                    }
                };
                match (expected, decision.reply.clone()) {
                    (Ok(()), Ok(Reply::Cancelled(_))) => {}
                    (Err(want), Err(got)) => prop_assert_eq!(want, got),
                    (want, got) => {
                        prop_assert!(false, "cancel: model {:?}, machine {:?}", want, got)
                    }
                }
                log.extend(decision.events);
            }
            Op::PayUnknown => {
                let decision = sku.handle(pay(OrderId::generate(&sku_id()), "x", 1), now);
                prop_assert_eq!(decision.reply.unwrap_err(), SkuError::OrderNotFound);
                prop_assert!(decision.events.is_empty());
            }
            Op::Advance(ms) => model.wall += ms,
            Op::StepBack(ms) => model.wall -= ms,
            Op::ExpireDue => {
                let decision = sku.handle(Command::ExpireDue, now);
                let mut expected = 0;
                for index in 0..model.orders.len() {
                    if model.orders[index].status == MStatus::Reserved
                        && model.orders[index].expires_at <= model.now
                    {
                        model.release(index, MStatus::Expired);
                        expected += 1;
                    }
                }
                match decision.reply {
                    Ok(Reply::Expired { count }) => prop_assert_eq!(count, expected),
                    other => prop_assert!(false, "expire answered {:?}", other),
                }
                log.extend(decision.events);
            }
            Op::Prune(kept_for) => {
                let decision = sku.handle(
                    Command::PruneEnded {
                        kept_for_ms: kept_for,
                    },
                    now,
                );
                let mut expected = 0;
                let mut forgotten = Vec::new();
                for index in 0..model.orders.len() {
                    let o = &model.orders[index];
                    if !o.gone
                        && o.refused.is_empty()
                        && o.ended_at.is_some_and(|at| at + kept_for <= model.now)
                    {
                        model.orders[index].gone = true;
                        model.keys.retain(|key, (_, i)| {
                            if *i == index {
                                forgotten.push(format!("key-{key}"));
                            }
                            *i != index
                        });
                        expected += 1;
                    }
                }
                match decision.reply {
                    Ok(Reply::Pruned { count }) => prop_assert_eq!(count, expected),
                    other => prop_assert!(false, "prune answered {:?}", other),
                }
                let mut told: Vec<String> = decision
                    .forgotten_keys
                    .iter()
                    .map(|key| key.as_str().to_owned())
                    .collect();
                told.sort();
                forgotten.sort();
                prop_assert_eq!(told, forgotten);
                log.extend(decision.events);
                for o in &model.orders {
                    prop_assert_eq!(sku.order(&o.id).is_none(), o.gone);
                }
            }
            Op::Restart => {
                // Through the real codec, as recovery does: snapshot, and full replay.
                let bytes = codec::encode_snapshot(7, sku.snapshot_ref());
                let (seq, snapshot) = codec::decode_snapshot(&bytes).unwrap();
                prop_assert_eq!(seq, 7);
                let from_snapshot = Sku::from_snapshot(snapshot).map_err(TestCaseError::fail)?;
                let mut replayed = Sku::from_first_event(sku_id(), &log[0]).unwrap();
                for event in &log[1..] {
                    let decoded =
                        codec::decode_events(&codec::encode_events(std::slice::from_ref(event)))
                            .unwrap();
                    replayed
                        .apply_checked(&decoded[0])
                        .map_err(TestCaseError::fail)?;
                }
                prop_assert_eq!(
                    codec::encode_snapshot(0, replayed.snapshot_ref()),
                    codec::encode_snapshot(0, sku.snapshot_ref())
                );
                prop_assert_eq!(
                    codec::encode_snapshot(0, from_snapshot.snapshot_ref()),
                    codec::encode_snapshot(0, sku.snapshot_ref())
                );
                sku = from_snapshot;
            }
        }
        // Every event carries the SKU's time and records it; a command refused
        // without an event leaves the SKU's time where it was.
        if log.len() > logged {
            model.last = model.now;
        }
        prop_assert_eq!(sku.last_now(), Timestamp(model.last));
        prop_assert_eq!(sku.counts(), model.counts());
        // The keys the edge's index is built from.
        let mut known: Vec<&str> = sku.idempotency_keys().map(|key| key.as_str()).collect();
        known.sort_unstable();
        let mut expected: Vec<String> = model.keys.keys().map(|key| format!("key-{key}")).collect();
        expected.sort_unstable();
        prop_assert_eq!(known, expected);
        sku.check_invariants().map_err(TestCaseError::fail)?;
    }
    Ok(())
}

fn proptest_config() -> ProptestConfig {
    // Failing cases are shrunk, printed and kept in proptest-regressions/ to replay.
    let cases = std::env::var("KEYDROP_PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(proptest_config())]
    #[test]
    fn machine_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        run_ops(ops)?;
    }
}
