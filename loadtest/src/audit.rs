//! The audit after every run: what buyers were told (the history) against what the
//! target holds afterwards (its state). A failed check makes the run exit non-zero.
//!
//! Checks, per SKU and per acknowledged order:
//! - no acknowledged order missing, and each in the status its answers imply;
//! - no card delivered twice (two paid orders with one serial);
//! - the target's `sold` equals the acknowledged payments, its `reserved` the
//!   acknowledged reservations still held (each within the requests whose answer
//!   never came, which may or may not have taken effect);
//! - stock conserved: `available + reserved + sold == imported == stocked`.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

/// Whether the target acknowledged a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ack {
    /// Never sent, or refused.
    #[default]
    No,
    Yes,
    /// Sent, but no answer came (timeouts exhausted the retries): it may have happened.
    Unknown,
}

/// What the buyers were told about one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedOrder {
    pub sku: usize,
    pub user: String,
    pub paid: Ack,
    pub cancelled: Ack,
}

/// Everything the buyers were told during a run.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Acknowledged reservations, by order id.
    pub orders: HashMap<String, AckedOrder>,
    /// Reservation requests per SKU whose answer never came.
    pub reservations_unknown: BTreeMap<usize, u64>,
}

impl History {
    pub fn reserved(&mut self, order_id: String, sku: usize, user: String) -> Result<(), String> {
        let order = AckedOrder {
            sku,
            user,
            paid: Ack::No,
            cancelled: Ack::No,
        };
        match self.orders.insert(order_id.clone(), order) {
            None => Ok(()),
            Some(_) => Err(format!("order id {order_id} acknowledged twice")),
        }
    }

    pub fn reservation_unknown(&mut self, sku: usize) {
        *self.reservations_unknown.entry(sku).or_default() += 1;
    }

    pub fn paid(&mut self, order_id: &str, ack: Ack) {
        if let Some(order) = self.orders.get_mut(order_id) {
            order.paid = ack;
        }
    }

    pub fn cancelled(&mut self, order_id: &str, ack: Ack) {
        if let Some(order) = self.orders.get_mut(order_id) {
            order.cancelled = ack;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Reserved,
    Paid,
    Cancelled,
    Expired,
}

/// One order as the target reports it after the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderState {
    pub status: Status,
    /// The card's serial, when the target reveals it (at least once paid).
    pub serial: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct SkuCounts {
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    /// As the target counts it; targets that do not count imports separately
    /// report `available + reserved + sold`, leaving only the comparison with
    /// what the harness stocked.
    pub imported: u64,
}

/// The target's own state after the run.
#[derive(Debug, Clone, Default)]
pub struct TargetState {
    /// By SKU index.
    pub skus: BTreeMap<usize, SkuCounts>,
    /// By order id; orders the target does not know are absent.
    pub orders: HashMap<String, OrderState>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditReport {
    pub passed: bool,
    pub orders_checked: u64,
    pub paid_cards_checked: u64,
    pub skus_checked: u64,
    /// At most [`FAILURES_LISTED_MAX`] of them; `failures_total` counts all.
    pub failures: Vec<String>,
    pub failures_total: u64,
}

/// Failures listed in a report; the rest are only counted.
pub const FAILURES_LISTED_MAX: usize = 50;

impl AuditReport {
    pub fn fail(&mut self, failure: String) {
        self.failures_total += 1;
        if self.failures.len() < FAILURES_LISTED_MAX {
            self.failures.push(failure);
        }
    }
}

/// Checks the target's state against the history. `stocked[k]` is the number of
/// cards the harness put on SKU `k`.
pub fn audit(history: &History, state: &TargetState, stocked: &[u64]) -> AuditReport {
    let mut report = AuditReport::default();
    // Per SKU: acknowledged payments, payments without an answer, reservations the
    // history says are still held (neither paid nor cancelled, and not expired on
    // the target: a missing order counts as held), and orders whose fate we cannot
    // pin down because a payment or cancellation went unanswered.
    let mut paid_acked = vec![0u64; stocked.len()];
    let mut paid_unknown = vec![0u64; stocked.len()];
    let mut held = vec![0u64; stocked.len()];
    let mut held_unknown = vec![0u64; stocked.len()];
    let mut serials: HashMap<(usize, &str), &str> = HashMap::new();

    let mut order_ids: Vec<&String> = history.orders.keys().collect();
    order_ids.sort();
    for order_id in order_ids {
        let acked = &history.orders[order_id];
        report.orders_checked += 1;
        if acked.sku >= stocked.len() {
            report.fail(format!("order {order_id}: SKU index {} unknown", acked.sku));
            continue;
        }
        match acked.paid {
            Ack::Yes => paid_acked[acked.sku] += 1,
            Ack::Unknown => paid_unknown[acked.sku] += 1,
            Ack::No => {}
        }
        let found = state.orders.get(order_id.as_str());
        match (acked.paid, acked.cancelled) {
            (Ack::No, Ack::No) if found.is_none_or(|o| o.status != Status::Expired) => {
                held[acked.sku] += 1
            }
            (Ack::Unknown, _) | (_, Ack::Unknown) => held_unknown[acked.sku] += 1,
            _ => {}
        }
        let Some(found) = found else {
            report.fail(format!(
                "order {order_id} (SKU {}, {}) was acknowledged but the target does not have it",
                acked.sku, acked.user
            ));
            continue;
        };
        let allowed: &[Status] = match (acked.paid, acked.cancelled) {
            (Ack::Yes, Ack::No) => &[Status::Paid],
            (Ack::Yes, _) => &[],
            (Ack::No, Ack::Yes) => &[Status::Cancelled],
            (Ack::Unknown, Ack::No) => &[Status::Paid, Status::Reserved, Status::Expired],
            (Ack::No, Ack::Unknown) => &[Status::Cancelled, Status::Reserved, Status::Expired],
            (Ack::No, Ack::No) => &[Status::Reserved, Status::Expired],
            (Ack::Unknown, _) => &[
                Status::Paid,
                Status::Cancelled,
                Status::Reserved,
                Status::Expired,
            ],
        };
        if allowed.is_empty() {
            report.fail(format!(
                "order {order_id}: both paid and cancelled were acknowledged"
            ));
        } else if !allowed.contains(&found.status) {
            report.fail(format!(
                "order {order_id}: the target says {:?}, but the buyer was told paid={:?} cancelled={:?}",
                found.status, acked.paid, acked.cancelled
            ));
        }
        if found.status == Status::Paid {
            match &found.serial {
                None => report.fail(format!("order {order_id}: paid but no card delivered")),
                Some(serial) => {
                    report.paid_cards_checked += 1;
                    if let Some(other) = serials.insert((acked.sku, serial.as_str()), order_id) {
                        report.fail(format!(
                            "card {serial} of SKU {} delivered twice: orders {other} and {order_id}",
                            acked.sku
                        ));
                    }
                }
            }
        }
    }

    for (sku, &stocked_cards) in stocked.iter().enumerate() {
        report.skus_checked += 1;
        let Some(counts) = state.skus.get(&sku) else {
            report.fail(format!("SKU {sku}: the target does not report it"));
            continue;
        };
        let unknown = history.reservations_unknown.get(&sku).copied().unwrap_or(0);
        let total = counts.available + counts.reserved + counts.sold;
        if total != counts.imported || counts.imported != stocked_cards {
            report.fail(format!(
                "SKU {sku}: stock not conserved: available {} + reserved {} + sold {} = {total}, imported {}, stocked {stocked_cards}",
                counts.available, counts.reserved, counts.sold, counts.imported
            ));
        }
        let (sold_min, sold_max) = (paid_acked[sku], paid_acked[sku] + paid_unknown[sku]);
        if !(sold_min..=sold_max).contains(&counts.sold) {
            report.fail(format!(
                "SKU {sku}: the target sold {} cards, buyers were told of {sold_min} payments ({} unanswered)",
                counts.sold, paid_unknown[sku]
            ));
        }
        let (reserved_min, reserved_max) = (held[sku], held[sku] + held_unknown[sku] + unknown);
        if !(reserved_min..=reserved_max).contains(&counts.reserved) {
            report.fail(format!(
                "SKU {sku}: the target holds {} reservations, buyers hold {reserved_min} ({} with an unanswered request, {unknown} reservations unanswered)",
                counts.reserved, held_unknown[sku]
            ));
        }
    }
    report.passed = report.failures_total == 0;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two SKUs of 3 cards: o1 paid, o2 cancelled, o3 left reserved, o4 paid on SKU 1.
    fn clean() -> (History, TargetState, Vec<u64>) {
        let mut history = History::default();
        for (id, sku) in [("o1", 0), ("o2", 0), ("o3", 0), ("o4", 1)] {
            history
                .reserved(id.into(), sku, format!("user-{id}"))
                .unwrap();
        }
        history.paid("o1", Ack::Yes);
        history.cancelled("o2", Ack::Yes);
        history.paid("o4", Ack::Yes);
        let mut state = TargetState::default();
        let order = |status, serial: Option<&str>| OrderState {
            status,
            serial: serial.map(str::to_string),
        };
        state
            .orders
            .insert("o1".into(), order(Status::Paid, Some("a")));
        state
            .orders
            .insert("o2".into(), order(Status::Cancelled, None));
        state
            .orders
            .insert("o3".into(), order(Status::Reserved, None));
        state
            .orders
            .insert("o4".into(), order(Status::Paid, Some("a")));
        state.skus.insert(
            0,
            SkuCounts {
                available: 1,
                reserved: 1,
                sold: 1,
                imported: 3,
            },
        );
        state.skus.insert(
            1,
            SkuCounts {
                available: 2,
                reserved: 0,
                sold: 1,
                imported: 3,
            },
        );
        (history, state, vec![3, 3])
    }

    #[test]
    fn a_clean_history_passes() {
        let (history, state, stocked) = clean();
        let report = audit(&history, &state, &stocked);
        assert!(report.passed, "{:?}", report.failures);
        assert_eq!(report.orders_checked, 4);
        // The same serial on two SKUs is two different cards.
        assert_eq!(report.paid_cards_checked, 2);
    }

    #[test]
    fn a_card_sold_twice_fails() {
        let (mut history, mut state, stocked) = clean();
        history.paid("o3", Ack::Yes);
        state.orders.get_mut("o3").unwrap().status = Status::Paid;
        state.orders.get_mut("o3").unwrap().serial = Some("a".into());
        let counts = state.skus.get_mut(&0).unwrap();
        counts.reserved = 0;
        counts.sold = 2;
        let report = audit(&history, &state, &stocked);
        assert!(!report.passed);
        assert!(
            report
                .failures
                .iter()
                .any(|f| f.contains("delivered twice")),
            "{:?}",
            report.failures
        );
    }

    #[test]
    fn a_lost_order_fails() {
        let (history, mut state, stocked) = clean();
        state.orders.remove("o3");
        state.skus.get_mut(&0).unwrap().reserved = 0;
        state.skus.get_mut(&0).unwrap().available = 2;
        let report = audit(&history, &state, &stocked);
        assert!(!report.passed);
        assert!(report
            .failures
            .iter()
            .any(|f| f.contains("does not have it")));
        assert!(report.failures.iter().any(|f| f.contains("reservations")));
    }

    #[test]
    fn a_lost_payment_fails() {
        let (history, mut state, stocked) = clean();
        state.orders.get_mut("o1").unwrap().status = Status::Reserved;
        let counts = state.skus.get_mut(&0).unwrap();
        counts.sold = 0;
        counts.reserved = 2;
        let report = audit(&history, &state, &stocked);
        assert!(!report.passed);
        assert!(report.failures.iter().any(|f| f.contains("sold 0 cards")));
    }

    #[test]
    fn stock_that_does_not_add_up_fails() {
        let (history, mut state, stocked) = clean();
        state.skus.get_mut(&1).unwrap().available = 3; // one card appeared from nowhere
        let report = audit(&history, &state, &stocked);
        assert!(!report.passed);
        assert!(report.failures.iter().any(|f| f.contains("not conserved")));
    }

    #[test]
    fn unanswered_requests_widen_the_bounds_but_do_not_hide_losses() {
        let (mut history, mut state, stocked) = clean();
        // A reservation whose answer never came may be held on the target.
        history.reservation_unknown(0);
        let counts = state.skus.get_mut(&0).unwrap();
        counts.available = 0;
        counts.reserved = 2;
        assert!(audit(&history, &state, &stocked).passed);
        // But not two of them.
        let counts = state.skus.get_mut(&0).unwrap();
        counts.reserved = 3;
        counts.available = 0;
        counts.sold = 0;
        assert!(!audit(&history, &state, &stocked).passed);
    }

    #[test]
    fn an_order_acknowledged_twice_is_refused_at_record_time() {
        let mut history = History::default();
        history.reserved("o1".into(), 0, "u".into()).unwrap();
        assert!(history.reserved("o1".into(), 0, "v".into()).is_err());
    }
}
