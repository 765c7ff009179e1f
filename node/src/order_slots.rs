//! The bound on orders inside the node at once, moved by how long they take there.
//!
//! An order inside the node (admitted, not yet answered) waits for its SKU's actor
//! and for the journal's fsync. Every [`TICK`] the bound looks at the mean time the
//! orders that finished in that tick spent inside:
//!
//! - over `target`: the node takes in more than it finishes, and the excess waits.
//!   The bound is cut in proportion (times `target / mean`, between halved and 5%
//!   off), so within a few ticks of a crowd arriving only as many orders are inside
//!   as finish in about `target`, and the rest get 503 `overloaded` before their
//!   body is read: answers that cost a fraction of a reservation and leave the CPU
//!   to the accepted orders;
//! - at or under `target`: the bound grows back, 10% a tick while it turns orders
//!   away, 2% while it does not, so it is back at `max` for the next burst a few
//!   seconds after a crowd has passed;
//! - no order finished: nothing to go by, and the bound stays.
//!
//! **Raising the floor in a flood.** In a crowd the node cannot answer in time even
//! by refusing (refusals cost it most of what a sale does: the HTTP exchange), the
//! orders inside wait for the run queue, about one round of the busy connections,
//! not for each other. Cutting the bound does not shorten that wait, and at its
//! floor the node sells about `floor / wait` cards a second, a few hundred, while it
//! refuses nearly every buyer. So after [`RAISE_FLOOR_AFTER`] ticks at the floor with
//! the mean wait still at 80% or more of the one that started the cuts, the floor is
//! doubled, up to [`FLOOR_RAISED_MAX`] times its setting; the first tick under
//! `target` puts it back. At twice what the node sustains the bound rarely sits at
//! its floor, and there the raise was not seen to move the p99 (README, overload).
//!
//! **Opening in a flood** (`orders_in_flight_open_after_ms`, off by default; when set,
//! it replaces raising the floor). With the setting, a bound that has sat at its
//! floor for that long with the mean wait
//! still at 80% or more of the one that started the cuts is opened to `max` for
//! [`OPEN_TICKS`], and the node sells at full speed while buyers queue. Off by
//! default: nothing the node sees tells such a flood from a crowd of twice what it
//! sustains once it has fallen behind that crowd, and there opening keeps it seconds
//! behind its buyers where refusing would have caught up (README, overload).
//!
//! It starts at `max` and never leaves `[floor, max]`. A fixed bound cannot do this on
//! every machine: 64 orders inside is 5 ms of work at 13,000 orders/s, and a cap at
//! 100,000/s; while a burst of 512 buyers on an idle node is gone in a few ms and
//! should not be refused.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::metrics::{
    ORDERS_IN_FLIGHT, ORDERS_IN_FLIGHT_LIMIT, ORDER_BOUND_OPENED, ORDER_FLOOR_RAISED,
};

/// How often the bound moves.
pub const TICK: Duration = Duration::from_millis(100);

/// Ticks the bound stays at its ceiling once opened in a flood.
pub const OPEN_TICKS: u32 = 10;
/// Ticks with no refusal before "order slots free again" is logged: a second.
const QUIET_TICKS_BEFORE_FREE_LOG: u32 = 10;

/// At the floor, a mean wait still at this share of the one that started the cuts
/// means the cuts did not shorten it.
const CUTS_IN_VAIN: f64 = 0.8;

/// Ticks of cuts in vain at the floor after which the floor is doubled.
const RAISE_FLOOR_AFTER: u32 = 5;

/// The floor is raised to at most this many times its setting.
const FLOOR_RAISED_MAX: f64 = 8.0;

/// The order slots: a count of orders inside the node and the bound on it.
#[derive(Debug)]
pub struct OrderSlots {
    in_flight: AtomicU32,
    limit: AtomicU32,
    /// Slots given back, ever.
    completed: AtomicU64,
    /// Microseconds those slots were held, summed.
    held_micros: AtomicU64,
    /// Orders refused for want of a slot, ever.
    refused: AtomicU64,
}

/// One order's slot; given back when dropped.
#[derive(Debug)]
pub struct OrderSlot<'a> {
    slots: &'a OrderSlots,
    taken: Instant,
}

impl Drop for OrderSlot<'_> {
    fn drop(&mut self) {
        let held = u64::try_from(self.taken.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.slots.held_micros.fetch_add(held, Ordering::Relaxed);
        self.slots.completed.fetch_add(1, Ordering::Relaxed);
        self.slots.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What happened to the slots over one tick.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tick {
    pub completed: u64,
    pub held: Duration,
    pub refused: u64,
}

impl OrderSlots {
    pub fn new(limit: u32) -> Self {
        assert!(limit > 0, "an order bound of 0 would refuse every order");
        OrderSlots {
            in_flight: AtomicU32::new(0),
            limit: AtomicU32::new(limit),
            completed: AtomicU64::new(0),
            held_micros: AtomicU64::new(0),
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
        Some(OrderSlot {
            slots: self,
            taken: Instant::now(),
        })
    }

    /// Whether a slot is free now, counting a refusal when none is: the check made
    /// before an order's body is read (its slot is taken after).
    pub fn has_room(&self) -> bool {
        let room = self.in_flight.load(Ordering::Relaxed) < self.limit.load(Ordering::Relaxed);
        if !room {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        room
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Running totals: (completed, held µs, refused).
    fn totals(&self) -> (u64, u64, u64) {
        (
            self.completed.load(Ordering::Relaxed),
            self.held_micros.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }

    /// Moves the bound every [`TICK`] until `stop` turns true, publishing both
    /// gauges. Logs when orders start being refused for want of a slot and when
    /// that stops (not per refused order).
    pub async fn run(&self, mut bound: Bound, mut stop: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut before = self.totals();
        let mut refusing = false;
        let mut ticks_without_refusal = 0u32;
        loop {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                _ = ticks.tick() => {}
            }
            let now = self.totals();
            let tick = Tick {
                completed: now.0 - before.0,
                held: Duration::from_micros(now.1 - before.1),
                refused: now.2 - before.2,
            };
            before = now;
            let mean_inside_us = tick.mean().map_or(0, |d| d.as_micros() as u64);
            let (opened, floor) = (bound.opened(), bound.floor());
            let limit = bound.next(tick);
            if bound.floor() > floor {
                metrics::counter!(ORDER_FLOOR_RAISED).increment(1);
                tracing::warn!(
                    floor = bound.floor(),
                    mean_inside_us,
                    "order bound at its floor without shortening the wait; floor raised"
                );
            } else if bound.floor() < floor {
                tracing::info!(
                    floor = bound.floor(),
                    "order bound's floor back to its setting"
                );
            }
            if bound.opened() > opened {
                metrics::counter!(ORDER_BOUND_OPENED).increment(1);
                tracing::warn!(
                    limit,
                    mean_inside_us,
                    "order bound at its floor without shortening the wait; open for a second"
                );
            }
            self.limit.store(limit, Ordering::Relaxed);
            metrics::gauge!(ORDERS_IN_FLIGHT_LIMIT).set(f64::from(limit));
            metrics::gauge!(ORDERS_IN_FLIGHT).set(f64::from(self.in_flight()));
            tracing::debug!(
                limit,
                completed = tick.completed,
                refused = tick.refused,
                mean_inside_us,
                "order bound moved"
            );
            // "Free again" only after a second with no refusal: a bound at the edge
            // of a crowd would otherwise log both lines every other tick.
            if tick.refused > 0 {
                if !refusing {
                    tracing::warn!(
                        limit,
                        refused = tick.refused,
                        mean_inside_us,
                        "every order slot taken; shedding new orders with 503 overloaded"
                    );
                }
                refusing = true;
                ticks_without_refusal = 0;
            } else if refusing {
                ticks_without_refusal += 1;
                if ticks_without_refusal >= QUIET_TICKS_BEFORE_FREE_LOG {
                    tracing::info!(limit, "order slots free again, for a second now");
                    refusing = false;
                }
            }
        }
    }
}

impl Tick {
    /// The mean time an order finished in this tick spent inside.
    pub fn mean(&self) -> Option<Duration> {
        (self.completed > 0).then(|| self.held / u32::try_from(self.completed).unwrap_or(u32::MAX))
    }
}

/// The bound's arithmetic, without clocks or atomics: fed what one tick saw, it
/// says the next bound (see the module doc).
#[derive(Debug, Clone)]
pub struct Bound {
    /// The floor as set.
    floor_set: f64,
    /// The floor now: raised in a flood (see the module doc).
    floor: f64,
    max: f64,
    /// `None`: the bound stays at `max`.
    target: Option<Duration>,
    limit: f64,
    /// Ticks of cuts in vain at the floor before the bound opens; `None`: never.
    open_after: Option<u32>,
    /// The mean wait of the tick that started the current run of cuts.
    cuts_from: Option<Duration>,
    /// Consecutive ticks at the floor with the wait not shortened.
    vain_ticks: u32,
    /// Ticks left at `max` after opening.
    open_ticks: u32,
    /// Times the bound was opened, ever.
    opened: u64,
}

impl Bound {
    /// `min` is raised to 1 and lowered to `max` if it is above it. `open_after`:
    /// ticks of cuts in vain at the floor before the bound opens (`None`: never; 0
    /// counts as 1).
    pub fn new(min: u32, max: u32, target: Option<Duration>, open_after: Option<u32>) -> Self {
        assert!(max > 0, "an order bound of 0 would refuse every order");
        let floor = f64::from(min.clamp(1, max));
        Bound {
            floor_set: floor,
            floor,
            max: f64::from(max),
            target,
            limit: f64::from(max),
            open_after: open_after.map(|ticks| ticks.max(1)),
            cuts_from: None,
            vain_ticks: 0,
            open_ticks: 0,
            opened: 0,
        }
    }

    /// Times the bound was opened in a flood.
    pub fn opened(&self) -> u64 {
        self.opened
    }

    /// The floor now: the setting, or up to [`FLOOR_RAISED_MAX`] times it in a flood.
    pub fn floor(&self) -> u32 {
        self.floor.round() as u32
    }

    pub fn current(&self) -> u32 {
        // Within [1, u32::MAX] by construction; rounding keeps growth by whole orders.
        self.limit.round() as u32
    }

    /// The bound for the next tick.
    pub fn next(&mut self, tick: Tick) -> u32 {
        let (Some(target), Some(mean)) = (self.target, tick.mean()) else {
            return self.current();
        };
        if self.open_ticks > 0 {
            self.open_ticks -= 1;
            return self.current();
        }
        let factor = if mean > target {
            let cuts_from = *self.cuts_from.get_or_insert(mean);
            let in_vain = self.limit <= self.floor
                && mean.as_secs_f64() >= CUTS_IN_VAIN * cuts_from.as_secs_f64();
            self.vain_ticks = if in_vain { self.vain_ticks + 1 } else { 0 };
            if self.open_after.is_none() && self.vain_ticks >= RAISE_FLOOR_AFTER {
                self.floor = (self.floor * 2.0)
                    .min(self.floor_set * FLOOR_RAISED_MAX)
                    .min(self.max);
                self.cuts_from = None;
                self.vain_ticks = 0;
                self.limit = self.limit.max(self.floor);
                return self.current();
            }
            if self
                .open_after
                .is_some_and(|after| self.vain_ticks >= after)
            {
                self.cuts_from = None;
                self.vain_ticks = 0;
                self.open_ticks = OPEN_TICKS;
                self.opened += 1;
                self.limit = self.max;
                return self.current();
            }
            (target.as_secs_f64() / mean.as_secs_f64()).clamp(0.5, 0.95)
        } else {
            self.cuts_from = None;
            self.vain_ticks = 0;
            self.floor = self.floor_set;
            if tick.refused > 0 {
                1.1
            } else {
                1.02
            }
        };
        // The +1 lets a bound of 1 or 2 grow at all.
        let grown = if factor > 1.0 {
            self.limit * factor + 1.0
        } else {
            self.limit * factor
        };
        self.limit = grown.clamp(self.floor, self.max);
        self.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn tick(completed: u64, mean: Duration, refused: u64) -> Tick {
        Tick {
            completed,
            held: mean * completed as u32,
            refused,
        }
    }

    #[test]
    fn the_bound_starts_at_its_ceiling_and_is_cut_in_proportion_to_the_overshoot() {
        let mut bound = Bound::new(8, 1_000, Some(5 * MS), None);
        assert_eq!(bound.current(), 1_000, "a burst on an idle node gets in");
        assert_eq!(
            bound.next(tick(300, 10 * MS, 0)),
            500,
            "twice the target: halved"
        );
        assert_eq!(
            bound.next(tick(300, 50 * MS, 0)),
            250,
            "ten times: still halved"
        );
        assert_eq!(
            bound.next(tick(300, 5_100 * MS / 1_000, 0)),
            238,
            "just over: 5% off"
        );
        assert_eq!(bound.next(tick(300, 6 * MS, 0)), 198, "6 ms: times 5/6");
    }

    #[test]
    fn the_bound_grows_back_faster_while_it_turns_orders_away() {
        let mut bound = Bound::new(8, 1_000, Some(5 * MS), None);
        for _ in 0..10 {
            bound.next(tick(100, 20 * MS, 50));
        }
        assert_eq!(bound.current(), 8, "held at the floor");
        assert_eq!(
            bound.next(tick(100, 2 * MS, 50)),
            10,
            "refusing: 8 × 1.1 + 1"
        );
        assert_eq!(
            bound.next(tick(100, 2 * MS, 0)),
            11,
            "not refusing: 9.8 × 1.02 + 1"
        );
        let mut ticks = 0;
        while bound.current() < 1_000 {
            bound.next(tick(100, 2 * MS, 1));
            ticks += 1;
        }
        assert!(ticks < 60, "{ticks} ticks from 11 to the ceiling");
        assert_eq!(
            bound.next(tick(100, 2 * MS, 1)),
            1_000,
            "never past the ceiling"
        );
    }

    /// A bound that opens after `VAIN` ticks of cuts in vain, cut from 1,024 to its
    /// floor of 32 by five ticks at 60 ms.
    const VAIN: u32 = 10;
    fn cut_to_the_floor() -> Bound {
        let mut bound = Bound::new(32, 1_024, Some(5 * MS), Some(VAIN));
        for expected in [512, 256, 128, 64, 32] {
            assert_eq!(bound.next(tick(100, 60 * MS, 500)), expected);
        }
        bound
    }

    /// Feeds `at_floor` to a bound at its floor of 32: it holds there for VAIN - 1
    /// ticks and opens to 1,024 on the VAIN-th.
    fn assert_opens_on_the_last_vain_tick(bound: &mut Bound, at_floor: Tick) {
        for _ in 1..VAIN {
            assert_eq!(bound.next(at_floor), 32);
        }
        assert_eq!(bound.next(at_floor), 1_024, "opened");
    }

    #[test]
    fn cuts_that_do_not_shorten_the_wait_open_the_bound_for_a_while() {
        let mut bound = cut_to_the_floor();
        // At the floor the orders inside still wait 55 of the 60 ms that started the
        // cuts; a node that can catch up by refusing gets VAIN ticks to show it.
        assert_opens_on_the_last_vain_tick(&mut bound, tick(30, 55 * MS, 3_000));
        assert_eq!(bound.opened(), 1);
        for _ in 0..OPEN_TICKS {
            assert_eq!(bound.next(tick(1_000, 40 * MS, 0)), 1_024, "held open");
        }
        assert_eq!(
            bound.next(tick(1_000, 40 * MS, 0)),
            512,
            "then cut again, from a new start"
        );
    }

    #[test]
    fn cuts_that_shorten_the_wait_keep_the_bound_down() {
        let mut bound = cut_to_the_floor();
        for _ in 0..3 * VAIN {
            assert_eq!(
                bound.next(tick(300, 20 * MS, 2_000)),
                32,
                "20 ms against the 60 that started the cuts: the cuts work"
            );
        }
        assert_eq!(bound.opened(), 0);
    }

    #[test]
    fn one_tick_that_shortens_the_wait_restarts_the_count() {
        let mut bound = cut_to_the_floor();
        for _ in 1..VAIN {
            bound.next(tick(30, 55 * MS, 3_000));
        }
        assert_eq!(
            bound.next(tick(30, 30 * MS, 3_000)),
            32,
            "30 ms: these cuts work"
        );
        assert_opens_on_the_last_vain_tick(&mut bound, tick(30, 55 * MS, 3_000));
    }

    #[test]
    fn a_tick_under_target_starts_a_new_run_of_cuts() {
        let mut bound = cut_to_the_floor();
        bound.next(tick(100, 4 * MS, 500));
        // The new run starts from 12 ms: 11 ms at the floor is cuts in vain, though
        // far below the 60 ms of the run before.
        assert_eq!(bound.next(tick(100, 12 * MS, 500)), 32);
        assert_opens_on_the_last_vain_tick(&mut bound, tick(100, 11 * MS, 500));
    }

    #[test]
    fn by_default_a_flood_raises_the_floor_and_never_opens_the_bound() {
        let mut bound = Bound::new(32, 1_024, Some(5 * MS), None);
        for _ in 0..100 {
            bound.next(tick(30, 60 * MS, 3_000));
        }
        assert_eq!(
            (bound.current(), bound.floor(), bound.opened()),
            (256, 256, 0),
            "the floor stops at eight times its setting"
        );
    }

    #[test]
    fn cuts_in_vain_double_the_floor_and_a_tick_under_target_resets_it() {
        let mut bound = Bound::new(32, 1_024, Some(5 * MS), None);
        for expected in [512, 256, 128, 64, 32] {
            assert_eq!(bound.next(tick(100, 60 * MS, 500)), expected);
        }
        let vain = tick(30, 55 * MS, 3_000);
        for _ in 1..RAISE_FLOOR_AFTER {
            assert_eq!(bound.next(vain), 32);
        }
        assert_eq!(bound.next(vain), 64, "raised on the fifth tick in vain");
        assert_eq!(bound.floor(), 64);
        // A new run of cuts starts from the tick after the raise.
        for _ in 1..RAISE_FLOOR_AFTER {
            assert_eq!(bound.next(vain), 64);
        }
        assert_eq!(bound.next(vain), 128);
        assert_eq!(
            bound.next(tick(300, 2 * MS, 100)),
            142,
            "under target: the floor is back at 32 and the bound grows by 10% + 1"
        );
        assert_eq!(bound.floor(), 32);
        assert_eq!(
            bound.next(tick(100, 60 * MS, 500)),
            71,
            "cut below the raised floor again"
        );
    }

    #[test]
    fn cuts_that_shorten_the_wait_leave_the_floor() {
        let mut bound = Bound::new(32, 1_024, Some(5 * MS), None);
        for _ in 0..5 {
            bound.next(tick(100, 60 * MS, 500));
        }
        for _ in 0..50 {
            assert_eq!(bound.next(tick(300, 20 * MS, 2_000)), 32);
        }
        assert_eq!(bound.floor(), 32);
    }

    #[test]
    fn a_tick_in_which_nothing_finished_leaves_the_bound() {
        let mut bound = Bound::new(8, 1_000, Some(5 * MS), None);
        bound.next(tick(10, 10 * MS, 0));
        assert_eq!(bound.next(Tick::default()), 500);
        assert_eq!(
            bound.next(Tick {
                refused: 40,
                ..Tick::default()
            }),
            500
        );
    }

    #[test]
    fn without_a_target_the_bound_is_fixed_at_the_ceiling() {
        let mut bound = Bound::new(8, 1_024, None, None);
        assert_eq!(bound.current(), 1_024);
        assert_eq!(bound.next(tick(1_000, 100 * MS, 10)), 1_024);
    }

    #[test]
    fn the_floor_is_at_least_one_and_at_most_the_ceiling() {
        let mut bound = Bound::new(0, 3, Some(5 * MS), None);
        for _ in 0..4 {
            bound.next(tick(5, 100 * MS, 0));
        }
        assert_eq!(bound.current(), 1, "a floor of 0 still lets one order in");
        assert_eq!(bound.next(tick(5, MS, 3)), 2, "and grows from 1");
        let mut bound = Bound::new(500, 2, Some(5 * MS), None);
        assert_eq!(bound.next(tick(5, 100 * MS, 0)), 2);
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
        std::thread::sleep(2 * MS);
        drop((second, third));
        assert_eq!(slots.in_flight(), 0);
        let (completed, held_micros, refused) = slots.totals();
        assert_eq!((completed, refused), (3, 1));
        assert!(
            held_micros >= 4_000,
            "two slots held 2 ms each: {held_micros} µs"
        );
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
