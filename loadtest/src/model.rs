//! The traffic model of a drop: which SKUs hold the cards, which SKU each buyer
//! wants, and what each winner does next (pay, cancel, or walk away).
//!
//! Everything here is pure and seeded: the same [`DropSpec`] gives the same buyers
//! on every target, so the targets of one invocation face the same crowd.

use anyhow::{ensure, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// SKUs one drop may spread over; each is defined and stocked before the run.
pub const SKUS_MAX: usize = 100_000;
/// Buyers one run may generate; bounds memory of the history the audit reads.
pub const BUYERS_MAX: u64 = 50_000_000;

/// How demand spreads over the SKUs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Skew {
    /// Every card on one SKU, every buyer after it.
    Hot,
    /// Cards spread evenly over the SKUs; buyers pick the SKU of rank `r` (from 1)
    /// with probability proportional to `1 / r^exponent`.
    Zipf { exponent: f64 },
}

/// What a buyer does once a card is reserved for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Intent {
    Pay,
    Cancel,
    /// Leave the reservation to expire.
    Abandon,
}

#[derive(Debug, Clone, Serialize)]
pub struct DropSpec {
    pub cards: u64,
    pub skus: usize,
    pub skew: Skew,
    pub buyers: u64,
    /// Share of winners who pay.
    pub pay_fraction: f64,
    /// Share of the other winners who cancel; the rest abandon their reservation.
    pub cancel_fraction: f64,
    pub price_cents: u64,
    /// Reservation lifetime on the target. Long by default so that the audit sees
    /// abandoned reservations still held, as a buyer who has not paid yet would.
    pub reservation_ttl_secs: u64,
    pub seed: u64,
}

impl DropSpec {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.cards > 0, "a drop needs at least one card");
        ensure!(
            (1..=SKUS_MAX).contains(&self.skus),
            "skus must be 1 to {SKUS_MAX}"
        );
        ensure!(
            self.skus as u64 <= self.cards,
            "more SKUs ({}) than cards ({})",
            self.skus,
            self.cards
        );
        ensure!(
            (1..=BUYERS_MAX).contains(&self.buyers),
            "buyers must be 1 to {BUYERS_MAX}"
        );
        ensure!(
            (0.0..=1.0).contains(&self.pay_fraction) && (0.0..=1.0).contains(&self.cancel_fraction),
            "fractions must be between 0 and 1"
        );
        if let Skew::Zipf { exponent } = self.skew {
            ensure!(
                exponent.is_finite() && exponent >= 0.0,
                "the Zipf exponent must be finite and not negative"
            );
        }
        if self.skew == Skew::Hot {
            ensure!(self.skus == 1, "a hot drop has exactly one SKU");
        }
        Ok(())
    }

    /// Cards stocked on SKU `index`: an even split, the remainder on the first SKUs.
    pub fn cards_on(&self, index: usize) -> u64 {
        assert!(index < self.skus, "SKU index {index} out of {}", self.skus);
        let per_sku = self.cards / self.skus as u64;
        let extra = self.cards % self.skus as u64;
        per_sku + u64::from((index as u64) < extra)
    }

    pub fn sku_name(&self, prefix: &str, index: usize) -> String {
        format!("{prefix}-{index}")
    }

    pub fn serial(index: usize, card: u64) -> String {
        format!("s{index}-{card}")
    }
}

/// One buyer of the crowd.
#[derive(Debug, Clone, PartialEq)]
pub struct Buyer {
    pub index: u64,
    pub sku: usize,
    pub intent: Intent,
}

impl Buyer {
    pub fn user_id(&self) -> String {
        format!("u{}", self.index)
    }

    /// Same key on every retry of this buyer's reservation; unique per run, so two
    /// runs against one long-lived target never collide.
    pub fn idempotency_key(&self, run: &str) -> String {
        format!("{run}-{}", self.index)
    }
}

/// Draws the buyers of a drop. Buyer `i` depends only on the spec and `i`, so
/// concurrent tasks can draw any buyer without coordinating.
#[derive(Debug, Clone)]
pub struct Crowd {
    spec: DropSpec,
    /// Cumulative SKU weights, normalised so the last is 1.0 (empty for `Hot`).
    cumulative: Vec<f64>,
}

impl Crowd {
    pub fn new(spec: DropSpec) -> Result<Crowd> {
        spec.validate()?;
        let cumulative = match spec.skew {
            Skew::Hot => Vec::new(),
            Skew::Zipf { exponent } => {
                let mut total = 0.0;
                let mut cumulative: Vec<f64> = (1..=spec.skus)
                    .map(|rank| {
                        total += 1.0 / (rank as f64).powf(exponent);
                        total
                    })
                    .collect();
                for weight in &mut cumulative {
                    *weight /= total;
                }
                cumulative
            }
        };
        Ok(Crowd { spec, cumulative })
    }

    pub fn spec(&self) -> &DropSpec {
        &self.spec
    }

    pub fn buyer(&self, index: u64) -> Buyer {
        assert!(index < self.spec.buyers, "buyer {index} beyond the crowd");
        // One generator per buyer, keyed by the seed and the index (SplitMix-style mix).
        let mut rng = StdRng::seed_from_u64(mix(self.spec.seed, index));
        let sku = if self.cumulative.is_empty() {
            0
        } else {
            let draw: f64 = rng.gen();
            self.cumulative
                .partition_point(|&weight| weight < draw)
                .min(self.spec.skus - 1)
        };
        let intent = if rng.gen::<f64>() < self.spec.pay_fraction {
            Intent::Pay
        } else if rng.gen::<f64>() < self.spec.cancel_fraction {
            Intent::Cancel
        } else {
            Intent::Abandon
        };
        Buyer { index, sku, intent }
    }
}

fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(skus: usize, skew: Skew) -> DropSpec {
        DropSpec {
            cards: 1000,
            skus,
            skew,
            buyers: 20_000,
            pay_fraction: 0.9,
            cancel_fraction: 0.5,
            price_cents: 999,
            reservation_ttl_secs: 600,
            seed: 42,
        }
    }

    #[test]
    fn cards_are_split_evenly_and_add_up() {
        let spec = spec(7, Skew::Zipf { exponent: 1.0 });
        let total: u64 = (0..7).map(|i| spec.cards_on(i)).sum();
        assert_eq!(total, 1000);
        assert_eq!(spec.cards_on(0), 143);
        assert_eq!(spec.cards_on(6), 142);
    }

    #[test]
    fn a_hot_drop_sends_everyone_to_one_sku() {
        let crowd = Crowd::new(spec(1, Skew::Hot)).unwrap();
        assert!((0..1000).all(|i| crowd.buyer(i).sku == 0));
    }

    #[test]
    fn zipf_favours_low_ranks_in_the_right_proportion() {
        let crowd = Crowd::new(spec(10, Skew::Zipf { exponent: 1.0 })).unwrap();
        let mut hits = [0u64; 10];
        for i in 0..20_000 {
            hits[crowd.buyer(i).sku] += 1;
        }
        // H(10) = 2.929: rank 1 gets 34.1 %, rank 2 17.1 %, rank 10 3.4 %.
        let share = |rank: usize| hits[rank] as f64 / 20_000.0;
        assert!((share(0) - 0.341).abs() < 0.015, "rank 1: {}", share(0));
        assert!((share(1) - 0.171).abs() < 0.015, "rank 2: {}", share(1));
        assert!((share(9) - 0.034).abs() < 0.008, "rank 10: {}", share(9));
        assert!(hits.windows(2).all(|w| w[0] + 150 >= w[1]), "{hits:?}");
    }

    #[test]
    fn zipf_with_exponent_zero_is_uniform() {
        let crowd = Crowd::new(spec(4, Skew::Zipf { exponent: 0.0 })).unwrap();
        let mut hits = [0u64; 4];
        for i in 0..20_000 {
            hits[crowd.buyer(i).sku] += 1;
        }
        assert!(hits.iter().all(|&h| (4500..5500).contains(&h)), "{hits:?}");
    }

    #[test]
    fn intents_follow_the_fractions() {
        let crowd = Crowd::new(spec(1, Skew::Hot)).unwrap();
        let (mut pay, mut cancel, mut abandon) = (0, 0, 0);
        for i in 0..20_000 {
            match crowd.buyer(i).intent {
                Intent::Pay => pay += 1,
                Intent::Cancel => cancel += 1,
                Intent::Abandon => abandon += 1,
            }
        }
        assert!((17_700..18_300).contains(&pay), "pay {pay}");
        assert!((850..1150).contains(&cancel), "cancel {cancel}");
        assert!((850..1150).contains(&abandon), "abandon {abandon}");
    }

    #[test]
    fn buyers_are_reproducible_from_the_seed_alone() {
        let a = Crowd::new(spec(10, Skew::Zipf { exponent: 1.2 })).unwrap();
        let b = Crowd::new(spec(10, Skew::Zipf { exponent: 1.2 })).unwrap();
        assert!((0..500).all(|i| a.buyer(i) == b.buyer(i)));
        let mut other = spec(10, Skew::Zipf { exponent: 1.2 });
        other.seed = 43;
        let c = Crowd::new(other).unwrap();
        assert!((0..500).any(|i| a.buyer(i) != c.buyer(i)));
    }

    #[test]
    fn ids_are_distinct_per_buyer_and_per_run() {
        let crowd = Crowd::new(spec(1, Skew::Hot)).unwrap();
        let (a, b) = (crowd.buyer(1), crowd.buyer(2));
        assert_ne!(a.user_id(), b.user_id());
        assert_ne!(a.idempotency_key("r1"), a.idempotency_key("r2"));
    }

    #[test]
    fn invalid_specs_are_refused() {
        let mut bad = spec(2, Skew::Hot);
        assert!(Crowd::new(bad.clone()).is_err(), "hot drop with two SKUs");
        bad = spec(2000, Skew::Zipf { exponent: 1.0 });
        assert!(Crowd::new(bad).is_err(), "more SKUs than cards");
        let mut bad = spec(1, Skew::Hot);
        bad.pay_fraction = 1.5;
        assert!(Crowd::new(bad).is_err());
    }
}
