//! The bound on orders inside the node at once, set by Little's law.
//!
//! An order inside the node (admitted, not yet answered) waits for its SKU's actor
//! and for the journal's fsync. The node lets in as many orders at once as it
//! completes in `target` at its recent best rate, so under any crowd an accepted
//! order spends about `target` or less inside, and the rest get 503 `overloaded`
//! before their body is read: answers that cost a fraction of a reservation and
//! leave the CPU to the accepted orders. A fixed bound cannot do this on every
//! machine: 64 orders in flight is 5 ms of work at 13,000 orders/s, and a cap at
//! 100,000/s.
//!
//! The best rate is the most completions per second seen in one tick, decaying with
//! a half-life of [`PEAK_HALF_LIFE`] while the rate stays lower. A dip (a pause in
//! the crowd, one slow fsync) does not shrink the bound under the crowd that comes
//! back, and a node whose orders take longer than `target` (a slow disk) is not
//! throttled down at once either; an idle node falls back to the floor in seconds.
//! The bound never leaves `[min, max]`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::{ORDERS_IN_FLIGHT, ORDERS_IN_FLIGHT_LIMIT};

/// How often the bound follows the completion rate.
pub const TICK: Duration = Duration::from_millis(100);

/// How fast the remembered best rate fades once the node completes fewer orders.
pub const PEAK_HALF_LIFE: Duration = Duration::from_secs(2);

/// The order slots: a count of orders inside the node and the bound on it.
#[derive(Debug)]
pub struct OrderSlots {
    in_flight: AtomicU32,
    limit: AtomicU32,
    /// Slots given back, ever: the completion rate the bound follows.
    completed: AtomicU64,
    /// Orders refused for want of a slot, ever: for the log line when it starts.
    refused: AtomicU64,
}

/// One order's slot; given back when dropped.
#[derive(Debug)]
pub struct OrderSlot<'a> {
    slots: &'a OrderSlots,
}

impl Drop for OrderSlot<'_> {
    fn drop(&mut self) {
        self.slots.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.slots.completed.fetch_add(1, Ordering::Relaxed);
    }
}

impl OrderSlots {
    pub fn new(limit: u32) -> Self {
        assert!(limit > 0, "an order bound of 0 would refuse every order");
        OrderSlots {
            in_flight: AtomicU32::new(0),
            limit: AtomicU32::new(limit),
            completed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// A slot, or `None` when as many orders as the bound are already inside.
    pub fn try_acquire(&self) -> Option<OrderSlot<'_>> {
        let limit = self.limit.load(Ordering::Relaxed);
        // Take first and give back on failure: two racing orders cannot both pass
        // on the last free slot.
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= limit {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(OrderSlot { slots: self })
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Moves the bound to follow the completion rate every [`TICK`] until `stop`
    /// turns true, publishing both gauges. Logs when orders start being refused
    /// for want of a slot and when that stops (not per refused order).
    pub async fn run(&self, mut bound: Bound, mut stop: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        let mut refused_before = self.refused.load(Ordering::Relaxed);
        let mut refusing = false;
        loop {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                _ = ticks.tick() => {}
            }
            let now = Instant::now();
            let limit = bound.next(self.completed.load(Ordering::Relaxed), now - last);
            last = now;
            self.limit.store(limit, Ordering::Relaxed);
            metrics::gauge!(ORDERS_IN_FLIGHT_LIMIT).set(f64::from(limit));
            metrics::gauge!(ORDERS_IN_FLIGHT).set(f64::from(self.in_flight()));
            let refused = self.refused.load(Ordering::Relaxed);
            let refused_now = refused > refused_before;
            refused_before = refused;
            if refused_now && !refusing {
                tracing::warn!(
                    limit,
                    best_rate_per_sec = bound.best_rate_per_sec() as u64,
                    "every order slot taken; shedding new orders with 503 overloaded"
                );
            } else if !refused_now && refusing {
                tracing::info!(limit, "order slots free again");
            }
            refusing = refused_now;
        }
    }
}

/// The bound's arithmetic, without clocks or atomics: fed the running count of
/// completed orders and the time since the last call, it says the next bound.
#[derive(Debug, Clone)]
pub struct Bound {
    min: u32,
    max: u32,
    /// `None`: the bound stays at `max`.
    target: Option<Duration>,
    best_rate_per_sec: f64,
    completed_before: u64,
}

impl Bound {
    /// `min` is raised to 1 and lowered to `max` if it is above it.
    pub fn new(min: u32, max: u32, target: Option<Duration>) -> Self {
        assert!(max > 0, "an order bound of 0 would refuse every order");
        Bound {
            min: min.clamp(1, max),
            max,
            target,
            best_rate_per_sec: 0.0,
            completed_before: 0,
        }
    }

    /// The bound before any order has completed.
    pub fn initial(&self) -> u32 {
        if self.target.is_some() {
            self.min
        } else {
            self.max
        }
    }

    pub fn best_rate_per_sec(&self) -> f64 {
        self.best_rate_per_sec
    }

    /// The bound for the next tick, given every completion so far and the time
    /// since the previous call.
    pub fn next(&mut self, completed: u64, elapsed: Duration) -> u32 {
        let done = completed.saturating_sub(self.completed_before);
        self.completed_before = completed;
        let Some(target) = self.target else {
            return self.max;
        };
        let secs = elapsed.as_secs_f64();
        if secs > 0.0 {
            let rate = done as f64 / secs;
            let faded = self.best_rate_per_sec * 0.5f64.powf(secs / PEAK_HALF_LIFE.as_secs_f64());
            self.best_rate_per_sec = rate.max(faded);
        }
        // Rounded, not ceiled: 1,300 orders in 0.1 s times 5 ms is 65 give or take the
        // last bit of a float. `as` saturates: a huge rate gives u32::MAX, then `max`.
        let bound = (self.best_rate_per_sec * target.as_secs_f64()).round() as u32;
        bound.clamp(self.min, self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_bound_is_what_the_node_completes_in_the_target_time() {
        let mut bound = Bound::new(8, 10_000, Some(5 * MS));
        assert_eq!(bound.initial(), 8);
        // 1,300 orders in 100 ms: 13,000/s, so 65 of them take 5 ms.
        assert_eq!(bound.next(1_300, 100 * MS), 65);
        // 100,000/s: 500 in 5 ms.
        assert_eq!(bound.next(1_300 + 10_000, 100 * MS), 500);
    }

    #[test]
    fn the_bound_stays_between_its_floor_and_its_ceiling() {
        let mut bound = Bound::new(64, 1_000, Some(5 * MS));
        assert_eq!(bound.next(10, 100 * MS), 64, "100/s is under the floor");
        assert_eq!(
            bound.next(10 + 10_000_000, 100 * MS),
            1_000,
            "100M/s is over the ceiling"
        );
        let mut bound = Bound::new(0, 3, Some(5 * MS));
        assert_eq!(bound.initial(), 1, "a floor of 0 still lets one order in");
        let mut bound_min_over_max = Bound::new(500, 2, Some(5 * MS));
        assert_eq!(bound_min_over_max.initial(), 2);
        assert_eq!(bound.next(0, 100 * MS), 1);
        assert_eq!(bound_min_over_max.next(1_000_000, 100 * MS), 2);
    }

    #[test]
    fn a_dip_fades_the_best_rate_by_its_half_life_instead_of_dropping_it() {
        let mut bound = Bound::new(1, 100_000, Some(10 * MS));
        let mut completed = 2_000;
        assert_eq!(bound.next(completed, 100 * MS), 200, "20,000/s");
        // Nothing completes for one half-life: the best rate is halved, not zero.
        assert_eq!(bound.next(completed, PEAK_HALF_LIFE), 100);
        // A higher rate counts at once.
        completed += 4_000;
        assert_eq!(bound.next(completed, 100 * MS), 400, "40,000/s");
        // Ten idle half-lives later the bound is back at the floor.
        for _ in 0..10 {
            bound.next(completed, PEAK_HALF_LIFE);
        }
        assert_eq!(bound.next(completed, 100 * MS), 1);
    }

    #[test]
    fn without_a_target_the_bound_is_fixed_at_the_ceiling() {
        let mut bound = Bound::new(8, 1_024, None);
        assert_eq!(bound.initial(), 1_024);
        assert_eq!(bound.next(1_000_000, 100 * MS), 1_024);
        assert_eq!(bound.next(1_000_000, 100 * MS), 1_024);
    }

    #[test]
    fn slots_are_refused_past_the_bound_and_come_back_when_dropped() {
        let slots = OrderSlots::new(2);
        let first = slots.try_acquire().expect("a free slot");
        let second = slots.try_acquire().expect("a free slot");
        assert!(slots.try_acquire().is_none(), "both slots taken");
        assert_eq!(slots.in_flight(), 2, "a refused order holds nothing");
        drop(first);
        assert_eq!(slots.in_flight(), 1);
        let third = slots.try_acquire().expect("the slot came back");
        drop((second, third));
        assert_eq!(slots.in_flight(), 0);
        assert_eq!(slots.completed.load(Ordering::Relaxed), 3);
        assert_eq!(slots.refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn racing_orders_never_hold_more_slots_than_the_bound() {
        let slots = std::sync::Arc::new(OrderSlots::new(3));
        // Counted apart from the slots' own count, which a refused order bumps for
        // an instant before giving it back.
        let held = std::sync::Arc::new(AtomicU32::new(0));
        let most_held = std::sync::Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (slots, held, most_held) = (slots.clone(), held.clone(), most_held.clone());
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if let Some(slot) = slots.try_acquire() {
                            let now_held = held.fetch_add(1, Ordering::SeqCst) + 1;
                            most_held.fetch_max(now_held, Ordering::SeqCst);
                            held.fetch_sub(1, Ordering::SeqCst);
                            drop(slot);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(slots.in_flight(), 0);
        let most_held = most_held.load(Ordering::SeqCst);
        assert!(
            (1..=3).contains(&most_held),
            "at most 3 held at once: {most_held}"
        );
    }
}
