//! What a keydrop node's own `/metrics` say about a run: read before and after it,
//! the difference tells a slow second's cause apart. A stall with an fsync of
//! 50 ms or more was the disk; one whose journal answers waited 10 ms or more for a
//! worker, or whose orders the lag gate shed, was the node's CPU.
//!
//! Only what the harness reads is parsed: samples of one series at a time from the
//! Prometheus text format, by name and `le` / `reason` label.

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

/// The journal's write-and-fsync latency histogram.
const FSYNC: &str = "keydrop_journal_fsync_seconds";
/// From a batch written to its answers running on a worker.
const ANSWER_WAIT: &str = "keydrop_journal_answer_wait_seconds";
/// Orders refused 503 by the overload gate, by reason.
const SHED: &str = "keydrop_orders_overload_shed_total";

/// The samples of `series` (exactly that name, any labels): the label block as
/// written (`{…}`, or empty) and the value.
pub fn samples<'a>(text: &'a str, series: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines().filter_map(move |line| {
        let rest = line.strip_prefix(series)?;
        let (labels, value) = if rest.starts_with('{') {
            let end = rest.find('}')?;
            (&rest[..=end], &rest[end + 1..])
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            return None;
        };
        // Rust's float parser reads Prometheus's `+Inf`, `-Inf` and `NaN` as well.
        let value = value.split_whitespace().next()?.parse().ok()?;
        Some((labels, value))
    })
}

/// The value of label `key` in a label block such as `{route="x",le="0.5"}`.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("{key}=\"");
    let start = labels.find(&pattern)? + pattern.len();
    let end = labels[start..].find('"')?;
    Some(&labels[start..start + end])
}

/// A histogram's cumulative buckets as (upper bound in seconds, count), sorted.
fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let series = format!("{name}_bucket");
    let mut found: Vec<(f64, f64)> = Vec::new();
    for (labels, count) in samples(text, &series) {
        let Some(bound) = label(labels, "le").and_then(|bound| bound.parse::<f64>().ok()) else {
            continue;
        };
        match found.iter_mut().find(|(known, _)| *known == bound) {
            Some((_, total)) => *total += count,
            None => found.push((bound, count)),
        }
    }
    found.sort_by(|a, b| a.0.total_cmp(&b.0));
    found
}

/// One histogram over the run: how many observations, how many above 10 and
/// 50 ms, and the bucket the slowest fell in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistogramWindow {
    pub count: u64,
    /// `None` when the histogram has no bucket at that bound.
    pub over_10ms: Option<u64>,
    pub over_50ms: Option<u64>,
    /// Upper bound (seconds) of the lowest bucket holding every observation: the
    /// slowest took at most this. `None` with no observation, or past the last bound.
    pub slowest_at_most_secs: Option<f64>,
}

impl HistogramWindow {
    fn between(before: &str, after: &str, name: &str) -> HistogramWindow {
        let earlier = buckets(before, name);
        let delta: Vec<(f64, u64)> = buckets(after, name)
            .into_iter()
            .map(|(bound, count)| {
                let was = earlier
                    .iter()
                    .find(|(known, _)| *known == bound)
                    .map_or(0.0, |(_, count)| *count);
                (bound, (count - was).max(0.0) as u64)
            })
            .collect();
        let count = delta.last().map_or(0, |(_, count)| *count);
        let over = |seconds: f64| {
            delta
                .iter()
                .find(|(bound, _)| (*bound - seconds).abs() < 1e-9)
                .map(|(_, within)| count.saturating_sub(*within))
        };
        let slowest_at_most_secs = (count > 0)
            .then(|| {
                delta
                    .iter()
                    .find(|(_, within)| *within == count)
                    .map(|(bound, _)| *bound)
            })
            .flatten()
            .filter(|bound| bound.is_finite());
        HistogramWindow {
            count,
            over_10ms: over(0.010),
            over_50ms: over(0.050),
            slowest_at_most_secs,
        }
    }
}

/// What the node's journal and overload gate did between two scrapes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeWindow {
    pub fsyncs: HistogramWindow,
    pub answer_waits: HistogramWindow,
    /// Orders refused by the overload gate, by reason (`lag`, `in_flight`).
    pub shed: Vec<(String, u64)>,
}

impl NodeWindow {
    pub fn between(before: &str, after: &str) -> NodeWindow {
        let was = |reason: &str| {
            samples(before, SHED)
                .filter(|(labels, _)| label(labels, "reason") == Some(reason))
                .map(|(_, value)| value)
                .sum::<f64>()
        };
        let shed = samples(after, SHED)
            .filter_map(|(labels, value)| {
                let reason = label(labels, "reason")?;
                let delta = (value - was(reason)).max(0.0) as u64;
                (delta > 0).then(|| (reason.to_owned(), delta))
            })
            .collect();
        NodeWindow {
            fsyncs: HistogramWindow::between(before, after, FSYNC),
            answer_waits: HistogramWindow::between(before, after, ANSWER_WAIT),
            shed,
        }
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        let over = |n: Option<u64>| n.map_or("?".to_owned(), |n| n.to_string());
        let at_most = |window: &HistogramWindow| match window.slowest_at_most_secs {
            Some(secs) => format!("slowest ≤ {} ms", secs * 1000.0),
            None if window.count == 0 => "none".to_owned(),
            None => "slowest past the last bucket".to_owned(),
        };
        let shed = if self.shed.is_empty() {
            "none".to_owned()
        } else {
            self.shed
                .iter()
                .map(|(reason, count)| format!("{reason} {count}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "{} fsyncs, {} over 10 ms, {} over 50 ms, {}; journal answers waiting for a worker over 10 ms: {} ({}); orders shed: {}",
            self.fsyncs.count,
            over(self.fsyncs.over_10ms),
            over(self.fsyncs.over_50ms),
            at_most(&self.fsyncs),
            over(self.answer_waits.over_10ms),
            at_most(&self.answer_waits),
            shed,
        )
    }
}

/// The node's `/metrics` text.
pub async fn scrape(client: &reqwest::Client, base: &str) -> Result<String> {
    let url = format!("{}/metrics", base.trim_end_matches('/'));
    let response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("reading {url}"))?;
    ensure!(
        response.status().is_success(),
        "{url} answered {}",
        response.status()
    );
    response
        .text()
        .await
        .with_context(|| format!("reading {url}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "\
# TYPE keydrop_journal_fsync_seconds histogram
keydrop_journal_fsync_seconds_bucket{le=\"0.005\"} 90
keydrop_journal_fsync_seconds_bucket{le=\"0.01\"} 99
keydrop_journal_fsync_seconds_bucket{le=\"0.05\"} 100
keydrop_journal_fsync_seconds_bucket{le=\"0.1\"} 100
keydrop_journal_fsync_seconds_bucket{le=\"+Inf\"} 100
keydrop_journal_fsync_seconds_sum 0.5
keydrop_journal_fsync_seconds_count 100
keydrop_orders_overload_shed_total{reason=\"lag\"} 7
";

    const AFTER: &str = "\
# TYPE keydrop_journal_fsync_seconds histogram
keydrop_journal_fsync_seconds_bucket{le=\"0.005\"} 1090
keydrop_journal_fsync_seconds_bucket{le=\"0.01\"} 1101
keydrop_journal_fsync_seconds_bucket{le=\"0.05\"} 1103
keydrop_journal_fsync_seconds_bucket{le=\"0.1\"} 1104
keydrop_journal_fsync_seconds_bucket{le=\"+Inf\"} 1104
keydrop_journal_fsync_seconds_sum 1.5
keydrop_journal_fsync_seconds_count 1104
keydrop_journal_answer_wait_seconds_bucket{le=\"0.01\"} 40
keydrop_journal_answer_wait_seconds_bucket{le=\"0.025\"} 40
keydrop_journal_answer_wait_seconds_bucket{le=\"+Inf\"} 40
keydrop_orders_overload_shed_total{reason=\"lag\"} 27
keydrop_orders_overload_shed_total{reason=\"in_flight\"} 3
keydrop_orders_overload_shed_total_extra{reason=\"lag\"} 1000
";

    #[test]
    fn samples_match_the_whole_series_name() {
        let found: Vec<_> = samples(AFTER, "keydrop_orders_overload_shed_total").collect();
        assert_eq!(
            found,
            vec![("{reason=\"lag\"}", 27.0), ("{reason=\"in_flight\"}", 3.0)]
        );
        let plain: Vec<_> = samples(AFTER, "keydrop_journal_fsync_seconds_count").collect();
        assert_eq!(plain, vec![("", 1104.0)]);
        assert_eq!(label("{route=\"a\",le=\"0.5\"}", "le"), Some("0.5"));
        assert_eq!(label("{route=\"a\"}", "le"), None);
    }

    #[test]
    fn the_window_counts_only_what_happened_between_the_scrapes() {
        let window = NodeWindow::between(BEFORE, AFTER);
        assert_eq!(
            window.fsyncs,
            HistogramWindow {
                count: 1004,
                // Of the 1,004: 4 over 5 ms, 2 over 10 ms, 1 over 50 ms.
                over_10ms: Some(2),
                over_50ms: Some(1),
                slowest_at_most_secs: Some(0.1),
            }
        );
        assert_eq!(
            window.answer_waits.count, 40,
            "absent before counts from zero"
        );
        assert_eq!(window.answer_waits.over_10ms, Some(0));
        assert_eq!(window.answer_waits.over_50ms, None, "no bucket at 50 ms");
        assert_eq!(window.answer_waits.slowest_at_most_secs, Some(0.01));
        assert_eq!(
            window.shed,
            vec![("lag".to_owned(), 20), ("in_flight".to_owned(), 3)]
        );
        let summary = window.summary();
        assert!(
            summary.starts_with("1004 fsyncs, 2 over 10 ms, 1 over 50 ms, slowest ≤ 100 ms"),
            "{summary}"
        );
        assert!(
            summary.ends_with("orders shed: lag 20, in_flight 3"),
            "{summary}"
        );
    }

    #[test]
    fn nothing_observed_is_said_so() {
        let window = NodeWindow::between(AFTER, AFTER);
        assert_eq!(window.fsyncs.count, 0);
        assert_eq!(window.fsyncs.over_10ms, Some(0));
        assert_eq!(window.fsyncs.slowest_at_most_secs, None);
        assert!(window.shed.is_empty());
        assert!(window.summary().contains("orders shed: none"));
        let past_the_end = NodeWindow::between(
            "",
            "keydrop_journal_fsync_seconds_bucket{le=\"0.1\"} 0\nkeydrop_journal_fsync_seconds_bucket{le=\"+Inf\"} 2\n",
        );
        assert_eq!(past_the_end.fsyncs.count, 2);
        assert_eq!(past_the_end.fsyncs.slowest_at_most_secs, None);
        assert!(past_the_end
            .summary()
            .contains("slowest past the last bucket"));
    }
}
