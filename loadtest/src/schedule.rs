//! When each buyer arrives, and how latency is counted.
//!
//! Open loop (constant rate or a ramp): buyer `i` is due at a fixed offset from the
//! start, whatever the target does. Its latency runs from that *intended* time, not
//! from when the request finally left, so a target that stalls is charged for every
//! buyer who queued behind the stall (coordinated omission, corrected as wrk2 does).
//! Closed loop: a fixed number of buyers in flight, each sending its next request on
//! an answer; it finds the maximum throughput, and its latency is service time only.

use std::time::Duration;

use anyhow::{ensure, Result};
use serde::Serialize;

/// Arrivals per second an open-loop run may ask for.
pub const RATE_MAX: f64 = 10_000_000.0;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Mode {
    /// `concurrency` buyers in flight at all times.
    Closed { concurrency: usize },
    /// One arrival every `1 / rate` seconds.
    Constant { rate: f64 },
    /// Arrival rate rising linearly from `from` to `to` over `over_secs`, then `to`.
    Ramp { from: f64, to: f64, over_secs: f64 },
}

impl Mode {
    pub fn validate(&self) -> Result<()> {
        match *self {
            Mode::Closed { concurrency } => {
                ensure!(concurrency > 0, "concurrency must be at least 1")
            }
            Mode::Constant { rate } => {
                ensure!(
                    rate > 0.0 && rate <= RATE_MAX,
                    "rate must be in (0, {RATE_MAX}]"
                )
            }
            Mode::Ramp {
                from,
                to,
                over_secs,
            } => {
                ensure!(
                    from >= 0.0 && to > 0.0 && from <= RATE_MAX && to <= RATE_MAX,
                    "ramp rates must be in [0, {RATE_MAX}], the final one above 0"
                );
                ensure!(over_secs > 0.0, "a ramp needs a duration");
            }
        }
        Ok(())
    }

    /// When arrival `index` (from 0) is due, from the start of the run. `None` in
    /// closed loop, where arrivals follow answers.
    pub fn intended_offset(&self, index: u64) -> Option<Duration> {
        let i = index as f64;
        let secs = match *self {
            Mode::Closed { .. } => return None,
            Mode::Constant { rate } => i / rate,
            Mode::Ramp {
                from,
                to,
                over_secs,
            } => {
                // Arrivals by time t during the ramp: n(t) = from·t + k·t²/2, with
                // k = (to − from) / over_secs. Solve n(t) = i for t.
                let during_ramp = (from + to) / 2.0 * over_secs;
                if i >= during_ramp {
                    over_secs + (i - during_ramp) / to
                } else {
                    let k = (to - from) / over_secs;
                    if k.abs() < f64::EPSILON {
                        i / from
                    } else {
                        (-from + (from * from + 2.0 * k * i).sqrt()) / k
                    }
                }
            }
        };
        Some(Duration::from_secs_f64(secs))
    }
}

/// Latency as a buyer sees it: from when the request was due (open loop) or sent
/// (closed loop) to its answer. Never zero, so every answer lands in the histogram.
pub fn latency_us(due: Duration, answered: Duration) -> u64 {
    let micros = answered.saturating_sub(due).as_micros();
    u64::try_from(micros).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::new_histogram;

    fn secs(d: Option<Duration>) -> f64 {
        d.expect("open loop").as_secs_f64()
    }

    #[test]
    fn constant_rate_spaces_arrivals_evenly() {
        let mode = Mode::Constant { rate: 1000.0 };
        assert_eq!(secs(mode.intended_offset(0)), 0.0);
        assert!((secs(mode.intended_offset(1)) - 0.001).abs() < 1e-12);
        assert!((secs(mode.intended_offset(2500)) - 2.5).abs() < 1e-9);
        assert_eq!(Mode::Closed { concurrency: 4 }.intended_offset(7), None);
    }

    #[test]
    fn ramp_arrivals_match_the_integral_of_the_rate() {
        // 0 → 1000/s over 10 s: n(t) = 50 t², so the ramp holds 5000 arrivals,
        // arrival 5000 is due at 10 s and arrival 1250 at 5 s.
        let mode = Mode::Ramp {
            from: 0.0,
            to: 1000.0,
            over_secs: 10.0,
        };
        assert!((secs(mode.intended_offset(5000)) - 10.0).abs() < 1e-9);
        assert!((secs(mode.intended_offset(1250)) - 5.0).abs() < 1e-9);
        // After the ramp, constant at the final rate.
        assert!((secs(mode.intended_offset(6000)) - 11.0).abs() < 1e-9);
        // Offsets never go backwards.
        let offsets: Vec<f64> = (0..7000).map(|i| secs(mode.intended_offset(i))).collect();
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn a_flat_ramp_is_a_constant_rate() {
        let ramp = Mode::Ramp {
            from: 200.0,
            to: 200.0,
            over_secs: 5.0,
        };
        let constant = Mode::Constant { rate: 200.0 };
        for i in [0, 1, 999, 1000, 1001, 4000] {
            let (a, b) = (
                secs(ramp.intended_offset(i)),
                secs(constant.intended_offset(i)),
            );
            assert!((a - b).abs() < 1e-9, "arrival {i}: {a} vs {b}");
        }
    }

    #[test]
    fn latency_counts_from_the_due_time_and_is_never_zero() {
        let due = Duration::from_millis(100);
        assert_eq!(latency_us(due, Duration::from_millis(103)), 3000);
        assert_eq!(latency_us(due, due), 1);
        assert_eq!(latency_us(due, Duration::from_millis(50)), 1);
    }

    /// One connection, 1000 arrivals/s for 10 s, a 1 ms service time, and a
    /// single 1 s stall at t = 5 s. Measured from the send time only one request
    /// looks slow; measured from the due time, the ~1000 buyers who arrived during
    /// the stall waited on average half of it, so p99 is near the stall and p50
    /// barely moves. This is the difference wrk2 exists for.
    #[test]
    fn coordinated_omission_correction_charges_the_stall_to_every_waiting_buyer() {
        let mode = Mode::Constant { rate: 1000.0 };
        let service = Duration::from_micros(900);
        let stall_at = Duration::from_secs(5);
        let stall = Duration::from_secs(1);
        let mut corrected = new_histogram();
        let mut naive = new_histogram();
        let mut free_at = Duration::ZERO;
        let mut stalled = false;
        for i in 0..10_000 {
            let due = mode.intended_offset(i).unwrap();
            let sent = due.max(free_at);
            let mut took = service;
            if !stalled && sent >= stall_at {
                stalled = true;
                took += stall;
            }
            let answered = sent + took;
            free_at = answered;
            corrected.record(latency_us(due, answered)).unwrap();
            naive.record(latency_us(sent, answered)).unwrap();
        }
        assert!(
            naive.value_at_quantile(0.99) < 1000,
            "naive p99 hides the stall"
        );
        assert!(corrected.value_at_quantile(0.99) > 800_000);
        assert!(corrected.value_at_quantile(0.90) > 100_000);
        assert!(corrected.value_at_quantile(0.50) < 1000);
        assert!(corrected.max() >= 1_000_000);
    }

    #[test]
    fn invalid_modes_are_refused() {
        assert!(Mode::Closed { concurrency: 0 }.validate().is_err());
        assert!(Mode::Constant { rate: 0.0 }.validate().is_err());
        assert!(Mode::Constant { rate: f64::NAN }.validate().is_err());
        assert!(Mode::Ramp {
            from: 10.0,
            to: 0.0,
            over_secs: 1.0
        }
        .validate()
        .is_err());
        assert!(Mode::Ramp {
            from: 0.0,
            to: 10.0,
            over_secs: 1.0
        }
        .validate()
        .is_ok());
    }
}
