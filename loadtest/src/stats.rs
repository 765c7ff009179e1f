//! Latency recording, the printed tables and the JSON reports.

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies in microseconds, 1 µs to 60 s at three significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Percentiles {
    pub fn of(histogram: &Histogram<u64>) -> Self {
        Percentiles {
            count: histogram.len(),
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
        }
    }
}

pub fn format_us(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else if us >= 1000 {
        format!("{:.2} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

/// Latencies recorded per second of a run, for the charts: two significant digits
/// are enough for a plotted line and keep a minute of seconds small.
pub fn new_timeline_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds")
}

/// Seconds of timeline one run may record; later answers land in the last second.
pub const TIMELINE_SECONDS_MAX: usize = 3600;

/// The request a latency belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Reserve,
    Pay,
    Cancel,
}

/// How a request ended, as the driver counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Reserved,
    SoldOut,
    PurchaseLimit,
    RateLimited,
    /// Still refused as overloaded after the last retry.
    Overloaded,
    Paid,
    Cancelled,
    Expired,
    /// No answer within the timeout, on every attempt.
    Timeout,
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Reserved,
        Outcome::SoldOut,
        Outcome::PurchaseLimit,
        Outcome::RateLimited,
        Outcome::Overloaded,
        Outcome::Paid,
        Outcome::Cancelled,
        Outcome::Expired,
        Outcome::Timeout,
        Outcome::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Reserved => "reserved",
            Outcome::SoldOut => "sold_out",
            Outcome::PurchaseLimit => "purchase_limit",
            Outcome::RateLimited => "rate_limited",
            Outcome::Overloaded => "overloaded",
            Outcome::Paid => "paid",
            Outcome::Cancelled => "cancelled",
            Outcome::Expired => "expired",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
        }
    }

    /// Counted under "errors" in the table: the target failed to give an answer.
    pub fn is_error(self) -> bool {
        matches!(
            self,
            Outcome::Overloaded | Outcome::Timeout | Outcome::Error
        )
    }
}

/// One second of a run: answers by outcome, and the latency of reservation requests.
#[derive(Debug, Clone)]
pub struct Second {
    pub answers: u64,
    pub reserved: u64,
    pub errors: u64,
    pub reserve_latency: Histogram<u64>,
}

impl Second {
    fn new() -> Second {
        Second {
            answers: 0,
            reserved: 0,
            errors: 0,
            reserve_latency: new_timeline_histogram(),
        }
    }
}

/// Every latency of a run, per request kind and outcome, and second by second.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    pub by_outcome: std::collections::BTreeMap<(Op, Outcome), Histogram<u64>>,
    pub timeline: Vec<Second>,
    /// Attempts beyond the first (timeouts and overload refusals retried).
    pub retries: u64,
    /// When the last reservation was answered, in seconds into the run: the
    /// window in which the stock was being sold.
    pub last_reserved_at_secs: f64,
}

impl Recorder {
    /// Records one answer `latency_us` long, given `at_secs` seconds into the run.
    pub fn record(&mut self, op: Op, outcome: Outcome, at_secs: f64, latency_us: u64) {
        self.by_outcome
            .entry((op, outcome))
            .or_insert_with(new_histogram)
            .saturating_record(latency_us);
        let second = (at_secs.max(0.0) as usize).min(TIMELINE_SECONDS_MAX - 1);
        while self.timeline.len() <= second {
            self.timeline.push(Second::new());
        }
        let slot = &mut self.timeline[second];
        slot.answers += 1;
        if outcome == Outcome::Reserved {
            slot.reserved += 1;
            self.last_reserved_at_secs = self.last_reserved_at_secs.max(at_secs);
        }
        if outcome.is_error() {
            slot.errors += 1;
        }
        if op == Op::Reserve {
            slot.reserve_latency.saturating_record(latency_us);
        }
    }

    pub fn count(&self, outcome: Outcome) -> u64 {
        self.by_outcome
            .iter()
            .filter(|((_, o), _)| *o == outcome)
            .map(|(_, h)| h.len())
            .sum()
    }

    pub fn answers(&self) -> u64 {
        self.by_outcome.values().map(Histogram::len).sum()
    }

    /// Every reservation request, whatever its outcome.
    pub fn reserve_latency(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for ((op, _), histogram) in &self.by_outcome {
            if *op == Op::Reserve {
                all.add(histogram).expect("same bounds");
            }
        }
        all
    }
}

/// Writes a report as pretty JSON to `path`, or to stdout when `path` is `-`.
pub fn write_json(path: &str, report: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    if path == "-" {
        println!("{text}");
    } else {
        std::fs::write(path, text).with_context(|| format!("writing {path}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_counts_per_outcome_and_per_second() {
        let mut recorder = Recorder::default();
        recorder.record(Op::Reserve, Outcome::Reserved, 0.2, 1500);
        recorder.record(Op::Reserve, Outcome::SoldOut, 1.7, 300);
        recorder.record(Op::Pay, Outcome::Paid, 1.9, 2000);
        recorder.record(Op::Reserve, Outcome::Timeout, 1.95, 2_000_000);
        assert_eq!(recorder.count(Outcome::Reserved), 1);
        assert_eq!(recorder.answers(), 4);
        assert_eq!(recorder.timeline.len(), 2);
        assert_eq!(recorder.timeline[1].answers, 3);
        assert_eq!(recorder.timeline[1].errors, 1);
        assert_eq!(recorder.timeline[1].reserve_latency.len(), 2);
        assert_eq!(recorder.reserve_latency().len(), 3);
        // Late answers are clamped into the last second kept, never dropped.
        recorder.record(Op::Reserve, Outcome::Reserved, 1e9, 1);
        assert_eq!(recorder.timeline.len(), TIMELINE_SECONDS_MAX);
    }

    #[test]
    fn formats_pick_a_readable_unit() {
        assert_eq!(format_us(850), "850 µs");
        assert_eq!(format_us(1234), "1.23 ms");
        assert_eq!(format_us(25_000), "25.0 ms");
    }
}
