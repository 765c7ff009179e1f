//! Scheduling lag: how late a timer fires on the async workers. It is the wait in
//! front of every handler that no counter sees: when more requests are ready than
//! the workers can run, each waits in the run queue and in its socket before its
//! handler starts, and the order-slot bound (which counts orders already inside a
//! handler) cannot tell. A probe task asks to wake every [`PROBE_INTERVAL`] and
//! records how late it woke; while that lag is over the configured limit, a share of
//! order requests in proportion to it is shed with 503 `overloaded` (all of them from
//! twice the limit, see `admission::lag_shed_share`), so the queue drains on cheap
//! answers instead of growing until clients time out and retry.
//!
//! A late sample counts at once; a prompt one only halves the recorded lag, so a
//! single lucky wake-up in the middle of a backlog does not reopen the gate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::RUNTIME_LAG;

/// How often the probe wakes; also the finest lag it resolves.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Debug, Default)]
pub struct LagMonitor {
    lag_micros: AtomicU64,
}

impl LagMonitor {
    /// The recorded lag (see the module doc for how samples combine).
    pub fn current(&self) -> Duration {
        Duration::from_micros(self.lag_micros.load(Ordering::Relaxed))
    }

    /// Folds in one sample: how late the probe woke. Only the probe writes (readers
    /// just load), so a load and a store need no read-modify-write.
    pub fn record(&self, late: Duration) {
        let sample = u64::try_from(late.as_micros()).unwrap_or(u64::MAX);
        let previous = self.lag_micros.load(Ordering::Relaxed);
        let lag = sample.max(previous / 2);
        self.lag_micros.store(lag, Ordering::Relaxed);
        metrics::gauge!(RUNTIME_LAG).set(lag as f64 / 1e6);
    }

    /// Probes until `stop` turns true. Runs on the workers it measures. Logs when
    /// the lag goes past `shed_after`, and when it is back under half of it (not per
    /// shed request).
    pub async fn run(&self, shed_after: Option<Duration>, mut stop: watch::Receiver<bool>) {
        let mut shedding = false;
        loop {
            let due = Instant::now() + PROBE_INTERVAL;
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                _ = tokio::time::sleep_until(due) => {
                    self.record(Instant::now().saturating_duration_since(due));
                }
            }
            let Some(limit) = shed_after else { continue };
            let lag = self.current();
            if !shedding && lag > limit {
                shedding = true;
                tracing::warn!(
                    lag_ms = lag.as_millis() as u64,
                    limit_ms = limit.as_millis() as u64,
                    "workers are behind; shedding new orders with 503 overloaded"
                );
            } else if shedding && lag <= limit / 2 {
                // Back under half the limit, not just under it: lag hovering at the
                // limit would otherwise log both lines every few probes.
                shedding = false;
                tracing::info!(
                    lag_ms = lag.as_millis() as u64,
                    "workers caught up; taking orders again"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_late_sample_counts_at_once_and_prompt_ones_decay_it() {
        let monitor = LagMonitor::default();
        monitor.record(Duration::from_millis(80));
        assert_eq!(monitor.current(), Duration::from_millis(80));
        monitor.record(Duration::ZERO);
        assert_eq!(monitor.current(), Duration::from_millis(40));
        monitor.record(Duration::from_millis(60));
        assert_eq!(monitor.current(), Duration::from_millis(60));
        for _ in 0..20 {
            monitor.record(Duration::ZERO);
        }
        assert_eq!(monitor.current(), Duration::ZERO);
    }

    #[test]
    fn a_blocked_worker_shows_as_lag() {
        // One worker, blocked for 200 ms by a task that never yields: the probe
        // wakes at least that late. Only a lower bound is checked.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let monitor = Arc::new(LagMonitor::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        runtime.block_on(async {
            let probe = tokio::spawn({
                let monitor = Arc::clone(&monitor);
                async move { monitor.run(None, stop_rx).await }
            });
            // Let the probe arm its first timer, then hog the only worker.
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(200));
            // Let the probe take its late wake-up (its timer expired long ago, so it
            // comes first), then stop it before prompt samples decay the figure.
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(1)).await;
                if monitor.current() > Duration::ZERO {
                    break;
                }
            }
            stop_tx.send(true).unwrap();
            probe.await.unwrap();
        });
        assert!(
            monitor.current() >= Duration::from_millis(150),
            "lag after a 200 ms block: {:?}",
            monitor.current()
        );
    }
}
