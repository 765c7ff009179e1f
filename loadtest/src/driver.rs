//! Runs a crowd against one target: dispatches buyers on the schedule, plays each
//! buyer's session (reserve, with retries under the same Idempotency-Key; then pay,
//! cancel or walk away), and collects latencies and the history for the audit.
//!
//! Buyers send what they learn to one collector task over a channel, so no lock
//! sits on the request path and the history is assembled in one place.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::{mpsc, Semaphore};

use crate::audit::{Ack, History};
use crate::model::{Crowd, Intent};
use crate::schedule::{latency_us, Mode};
use crate::stats::{Op, Outcome, Recorder};
use crate::target::{Answer, OrderRef, ReserveRequest, Target};

/// Buyers in flight at once in open loop; past it the dispatcher waits, and the wait
/// is charged to the buyers' latency (their due time does not move).
pub const IN_FLIGHT_MAX: usize = 65_536;
/// Pause before retrying a request refused as overloaded.
const OVERLOADED_BACKOFF: Duration = Duration::from_millis(50);
/// Error messages kept for the report (the rest are only counted).
const ERROR_SAMPLES_MAX: usize = 10;

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub mode: Mode,
    /// No buyer is dispatched after this; the run then drains.
    pub duration_max: Duration,
    pub request_timeout: Duration,
    /// Extra attempts after a timeout or an overload refusal, with the same key.
    pub retries_max: u32,
    pub in_flight_max: usize,
    /// Unique per run: prefixes SKU names and idempotency keys.
    pub run_id: String,
    pub progress: bool,
}

/// What a run produced.
pub struct RunOutcome {
    pub recorder: Recorder,
    pub history: History,
    /// From the first dispatch to the last answer.
    pub elapsed: Duration,
    pub buyers_dispatched: u64,
    /// Sessions still running when the drain deadline passed (their requests count
    /// as unanswered in the history).
    pub abandoned_sessions: u64,
    pub error_samples: Vec<String>,
    /// Contradictions in what buyers were told (one order id acknowledged to two
    /// buyers): audit failures on their own.
    pub history_errors: Vec<String>,
}

enum Report {
    Answer {
        op: Op,
        outcome: Outcome,
        at_secs: f64,
        latency_us: u64,
        retries: u32,
        error: Option<String>,
    },
    Reserved {
        order_id: String,
        sku: usize,
        user: String,
    },
    ReservationUnknown {
        sku: usize,
    },
    Paid {
        order_id: String,
        ack: Ack,
    },
    Cancelled {
        order_id: String,
        ack: Ack,
    },
}

struct Session<T> {
    target: Arc<T>,
    crowd: Arc<Crowd>,
    config: Arc<RunConfig>,
    start: Instant,
    reports: mpsc::UnboundedSender<Report>,
}

impl<T> Clone for Session<T> {
    fn clone(&self) -> Self {
        Session {
            target: Arc::clone(&self.target),
            crowd: Arc::clone(&self.crowd),
            config: Arc::clone(&self.config),
            start: self.start,
            reports: self.reports.clone(),
        }
    }
}

fn classify(answer: &Answer) -> Outcome {
    match answer {
        Answer::Reserved(_) => Outcome::Reserved,
        Answer::Paid => Outcome::Paid,
        Answer::Cancelled => Outcome::Cancelled,
        Answer::SoldOut => Outcome::SoldOut,
        Answer::PurchaseLimit => Outcome::PurchaseLimit,
        Answer::RateLimited => Outcome::RateLimited,
        Answer::Overloaded => Outcome::Overloaded,
        Answer::Expired => Outcome::Expired,
        Answer::Error(_) => Outcome::Error,
    }
}

impl<T: Target> Session<T> {
    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Sends one request, retrying timeouts and overload refusals. `None` when no
    /// answer ever came.
    async fn attempt<F, Fut>(&self, mut send: F) -> (Option<Answer>, u32)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Answer>,
    {
        let mut retries = 0;
        loop {
            match tokio::time::timeout(self.config.request_timeout, send()).await {
                Err(_elapsed) if retries < self.config.retries_max => retries += 1,
                Err(_elapsed) => return (None, retries),
                Ok(Answer::Overloaded) if retries < self.config.retries_max => {
                    retries += 1;
                    tokio::time::sleep(OVERLOADED_BACKOFF).await;
                }
                Ok(answer) => return (Some(answer), retries),
            }
        }
    }

    fn answer(&self, op: Op, answer: &Option<Answer>, due: Duration, retries: u32) {
        let answered = self.elapsed();
        let outcome = answer.as_ref().map_or(Outcome::Timeout, classify);
        let error = match answer {
            Some(Answer::Error(message)) => Some(message.clone()),
            _ => None,
        };
        let _ = self.reports.send(Report::Answer {
            op,
            outcome,
            at_secs: answered.as_secs_f64(),
            latency_us: latency_us(due, answered),
            retries,
            error,
        });
    }

    /// One buyer, from arrival to their last request. `due` is when the buyer
    /// arrived (open loop: the schedule's time, however late we are).
    async fn run(self, index: u64, due: Duration) {
        let buyer = self.crowd.buyer(index);
        let user = buyer.user_id();
        let key = buyer.idempotency_key(&self.config.run_id);
        let (answer, retries) = self
            .attempt(|| {
                self.target.reserve(ReserveRequest {
                    sku: buyer.sku,
                    user: &user,
                    idempotency_key: &key,
                })
            })
            .await;
        self.answer(Op::Reserve, &answer, due, retries);
        let order = match answer {
            Some(Answer::Reserved(order_id)) => OrderRef {
                sku: buyer.sku,
                id: order_id,
            },
            // No answer, or a failed exchange (a reset connection, a 5xx): the
            // request may have reached the target and reserved a card all the same,
            // as a payment or cancellation in the same state counts as unknown.
            None | Some(Answer::Error(_)) => {
                let _ = self
                    .reports
                    .send(Report::ReservationUnknown { sku: buyer.sku });
                return;
            }
            Some(_) => return,
        };
        let _ = self.reports.send(Report::Reserved {
            order_id: order.id.clone(),
            sku: order.sku,
            user,
        });
        let price = self.crowd.spec().price_cents;
        match buyer.intent {
            Intent::Abandon => {}
            Intent::Pay => {
                let due = self.elapsed();
                let (answer, retries) = self.attempt(|| self.target.pay(&order, price)).await;
                self.answer(Op::Pay, &answer, due, retries);
                let ack = ack_of(&answer, &Answer::Paid);
                let _ = self.reports.send(Report::Paid {
                    order_id: order.id,
                    ack,
                });
            }
            Intent::Cancel => {
                let due = self.elapsed();
                let (answer, retries) = self.attempt(|| self.target.cancel(&order)).await;
                self.answer(Op::Cancel, &answer, due, retries);
                let ack = ack_of(&answer, &Answer::Cancelled);
                let _ = self.reports.send(Report::Cancelled {
                    order_id: order.id,
                    ack,
                });
            }
        }
    }
}

fn ack_of(answer: &Option<Answer>, success: &Answer) -> Ack {
    match answer {
        None => Ack::Unknown,
        Some(answer) if answer == success => Ack::Yes,
        // An error may have been raised after the change was made (a 5xx from a
        // proxy, a dropped connection): only a definite refusal counts as No.
        Some(Answer::Error(_)) => Ack::Unknown,
        Some(_) => Ack::No,
    }
}

struct Collected {
    recorder: Recorder,
    history: History,
    error_samples: Vec<String>,
    history_errors: Vec<String>,
}

async fn collect(
    mut reports: mpsc::UnboundedReceiver<Report>,
    progress: ProgressBar,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Collected {
    let mut collected = Collected {
        recorder: Recorder::default(),
        history: History::default(),
        error_samples: Vec::new(),
        history_errors: Vec::new(),
    };
    let handle = |report: Report, collected: &mut Collected| match report {
        Report::Answer {
            op,
            outcome,
            at_secs,
            latency_us,
            retries,
            error,
        } => {
            collected.recorder.record(op, outcome, at_secs, latency_us);
            collected.recorder.retries += u64::from(retries);
            if let Some(error) = error {
                if collected.error_samples.len() < ERROR_SAMPLES_MAX
                    && !collected.error_samples.contains(&error)
                {
                    collected.error_samples.push(error);
                }
            }
            if op == Op::Reserve {
                progress.inc(1);
            }
        }
        Report::Reserved {
            order_id,
            sku,
            user,
        } => {
            if let Err(error) = collected.history.reserved(order_id, sku, user) {
                collected.history_errors.push(error);
            }
        }
        Report::ReservationUnknown { sku } => collected.history.reservation_unknown(sku),
        Report::Paid { order_id, ack } => collected.history.paid(&order_id, ack),
        Report::Cancelled { order_id, ack } => collected.history.cancelled(&order_id, ack),
    };
    loop {
        tokio::select! {
            report = reports.recv() => match report {
                Some(report) => handle(report, &mut collected),
                None => break,
            },
            _ = &mut stop => {
                while let Ok(report) = reports.try_recv() {
                    handle(report, &mut collected);
                }
                break;
            }
        }
    }
    collected
}

fn progress_bar(config: &RunConfig, buyers: u64, label: &str) -> ProgressBar {
    if !config.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(buyers), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>18} [{elapsed_precise}] {wide_bar} {pos}/{len} buyers ({per_sec})",
        )
        .expect("valid progress template"),
    );
    bar.set_prefix(label.to_string());
    bar
}

/// Runs the crowd of `crowd` against `target` as `config` says.
pub async fn run<T: Target>(
    target: Arc<T>,
    crowd: Arc<Crowd>,
    config: RunConfig,
    label: &str,
) -> RunOutcome {
    let buyers = crowd.spec().buyers;
    let history_skus = crowd.spec().skus;
    let config = Arc::new(config);
    let (reports_tx, reports_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let progress = progress_bar(&config, buyers, label);
    let collector = tokio::spawn(collect(reports_rx, progress.clone(), stop_rx));
    let start = Instant::now();
    let session = Session {
        target,
        crowd,
        config: Arc::clone(&config),
        start,
        reports: reports_tx,
    };
    let slots = match config.mode {
        Mode::Closed { concurrency } => concurrency,
        _ => config.in_flight_max.clamp(1, IN_FLIGHT_MAX),
    };
    let in_flight = Arc::new(Semaphore::new(slots));
    let dispatched = Arc::new(AtomicU64::new(0));
    match config.mode {
        Mode::Closed { concurrency } => {
            for _ in 0..concurrency {
                let (session, dispatched) = (session.clone(), Arc::clone(&dispatched));
                let permit = Arc::clone(&in_flight)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                tokio::spawn(async move {
                    let _permit = permit;
                    loop {
                        if session.elapsed() >= session.config.duration_max {
                            break;
                        }
                        let index = dispatched.fetch_add(1, Ordering::Relaxed);
                        if index >= buyers {
                            dispatched.fetch_sub(1, Ordering::Relaxed);
                            break;
                        }
                        let due = session.elapsed();
                        session.clone().run(index, due).await;
                    }
                });
            }
        }
        mode => {
            for index in 0..buyers {
                let due = mode
                    .intended_offset(index)
                    .expect("open-loop modes schedule every arrival");
                if due >= config.duration_max {
                    break;
                }
                if due > start.elapsed() {
                    tokio::time::sleep_until((start + due).into()).await;
                }
                let permit = Arc::clone(&in_flight)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                if start.elapsed() >= config.duration_max {
                    break;
                }
                dispatched.fetch_add(1, Ordering::Relaxed);
                let session = session.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    session.run(index, due).await;
                });
            }
        }
    }
    drop(session);
    // Every session ends within its attempts' timeouts; allow that, then stop
    // waiting for the stragglers and count them.
    let attempts = config.retries_max + 1;
    let drain = (config.request_timeout + OVERLOADED_BACKOFF) * attempts * 3
        + (config.duration_max.saturating_sub(start.elapsed()));
    let all = u32::try_from(slots).expect("slots fit in u32");
    let abandoned_sessions = match tokio::time::timeout(drain, in_flight.acquire_many(all)).await {
        Ok(_) => 0,
        Err(_) => (slots - in_flight.available_permits()) as u64,
    };
    let elapsed = start.elapsed();
    let _ = stop_tx.send(());
    let collected = collector.await.expect("the collector does not panic");
    progress.finish_and_clear();
    let mut history = collected.history;
    if abandoned_sessions > 0 {
        // Their reservations may have landed without the buyer hearing of it.
        for sku in 0..history_skus {
            *history.reservations_unknown.entry(sku).or_default() += abandoned_sessions;
        }
    }
    RunOutcome {
        recorder: collected.recorder,
        history,
        elapsed,
        buyers_dispatched: dispatched.load(Ordering::Relaxed),
        abandoned_sessions,
        error_samples: collected.error_samples,
        history_errors: collected.history_errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::TargetState;
    use crate::model::{DropSpec, Skew};
    use crate::target::Stock;

    /// Answers every reservation "sold out" after `service`, one at a time.
    struct Slow {
        service: Duration,
        one_at_a_time: tokio::sync::Mutex<()>,
    }

    impl Target for Slow {
        async fn stock(&self, _: &Stock) -> anyhow::Result<()> {
            Ok(())
        }
        async fn reserve(&self, _: ReserveRequest<'_>) -> Answer {
            let _turn = self.one_at_a_time.lock().await;
            tokio::time::sleep(self.service).await;
            Answer::SoldOut
        }
        async fn pay(&self, _: &OrderRef, _: u64) -> Answer {
            Answer::Error("unused".into())
        }
        async fn cancel(&self, _: &OrderRef) -> Answer {
            Answer::Error("unused".into())
        }
        async fn state(&self, _: &[OrderRef]) -> anyhow::Result<TargetState> {
            Ok(TargetState::default())
        }
    }

    fn crowd(buyers: u64) -> Arc<Crowd> {
        Arc::new(
            Crowd::new(DropSpec {
                cards: 1,
                skus: 1,
                skew: Skew::Hot,
                buyers,
                pay_fraction: 1.0,
                cancel_fraction: 0.0,
                price_cents: 1,
                reservation_ttl_secs: 60,
                seed: 1,
            })
            .unwrap(),
        )
    }

    fn config(mode: Mode) -> RunConfig {
        RunConfig {
            mode,
            duration_max: Duration::from_secs(5),
            request_timeout: Duration::from_secs(2),
            retries_max: 0,
            in_flight_max: 64,
            run_id: "t".into(),
            progress: false,
        }
    }

    /// 20 buyers due every 5 ms against a target that serves one per 20 ms: the
    /// last is answered near 400 ms but was due at 95 ms. Counted from the due
    /// time (as the driver does in open loop) its latency is ~300 ms, though no
    /// single request took more than ~20 ms to serve once it was taken up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_latency_includes_the_queue_behind_a_slow_target() {
        let target = Arc::new(Slow {
            service: Duration::from_millis(20),
            one_at_a_time: tokio::sync::Mutex::new(()),
        });
        let run = run(
            target,
            crowd(20),
            config(Mode::Constant { rate: 200.0 }),
            "slow",
        )
        .await;
        let latency = run.recorder.reserve_latency();
        assert_eq!(latency.len(), 20);
        assert_eq!(run.buyers_dispatched, 20);
        assert!(latency.max() >= 250_000, "max {} µs", latency.max());
        assert!(latency.min() >= 19_000, "min {} µs", latency.min());
    }

    /// Closed loop with one buyer in flight: each latency is one service time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_latency_is_the_service_time() {
        let target = Arc::new(Slow {
            service: Duration::from_millis(20),
            one_at_a_time: tokio::sync::Mutex::new(()),
        });
        let run = run(
            target,
            crowd(10),
            config(Mode::Closed { concurrency: 1 }),
            "slow",
        )
        .await;
        let latency = run.recorder.reserve_latency();
        assert_eq!(latency.len(), 10);
        assert!(latency.max() < 100_000, "max {} µs", latency.max());
        assert_eq!(run.recorder.count(Outcome::SoldOut), 10);
    }

    /// A target that never answers: each attempt times out, is retried with the
    /// same key, and the buyer ends "timeout" with the reservation unknown.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timeouts_are_retried_then_recorded_as_unknown() {
        let target = Arc::new(Slow {
            service: Duration::from_secs(60),
            one_at_a_time: tokio::sync::Mutex::new(()),
        });
        let mut config = config(Mode::Closed { concurrency: 2 });
        config.request_timeout = Duration::from_millis(50);
        config.retries_max = 2;
        let run = run(target, crowd(2), config, "stuck").await;
        assert_eq!(run.recorder.count(Outcome::Timeout), 2);
        assert_eq!(run.recorder.retries, 4);
        assert_eq!(run.history.reservations_unknown.get(&0), Some(&2));
    }
}
