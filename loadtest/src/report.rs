//! What a drop run prints and writes: one [`TargetReport`] per target, the table,
//! the ratios between targets, and the JSON report.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::audit::AuditReport;
use crate::driver::RunOutcome;
use crate::model::DropSpec;
use crate::schedule::Mode;
use crate::stats::{format_us, Op, Outcome, Percentiles};
use crate::target::TargetInfo;

#[derive(Debug, Clone, Serialize)]
pub struct SecondReport {
    pub second: usize,
    pub answers: u64,
    pub reserved: u64,
    pub errors: u64,
    pub reserve_p50_us: u64,
    pub reserve_p99_us: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub target: TargetInfo,
    pub seconds: f64,
    pub buyers_dispatched: u64,
    /// Answers of every kind (reserve, pay, cancel) per second.
    pub answers_per_sec: f64,
    /// Reservation requests answered per second, whatever the answer.
    pub reserve_requests_per_sec: f64,
    pub reservations_per_sec: f64,
    /// Seconds from the first arrival to the last reservation answered: how long
    /// the stock took to go (cancelled cards come back and go again).
    pub selling_secs: f64,
    /// Reservations per second over `selling_secs`: the rate at which the stock
    /// was sold while there was some, sold-out answers left aside.
    pub reservations_per_sec_while_selling: f64,
    /// By outcome name: reserved, sold_out, purchase_limit, rate_limited, errors…
    pub counts: BTreeMap<String, u64>,
    pub errors: u64,
    pub retries: u64,
    /// Latency by `<op>.<outcome>`, plus `reserve.all`.
    pub latency: BTreeMap<String, Percentiles>,
    pub timeline: Vec<SecondReport>,
    pub error_samples: Vec<String>,
    pub abandoned_sessions: u64,
    /// Where the target's time went, when it reports it.
    pub breakdown: Vec<(String, String)>,
    pub audit: AuditReport,
}

impl TargetReport {
    pub fn new(
        target: TargetInfo,
        run: &RunOutcome,
        audit: AuditReport,
        breakdown: Vec<(String, String)>,
    ) -> TargetReport {
        let recorder = &run.recorder;
        let seconds = run.elapsed.as_secs_f64().max(1e-9);
        let mut counts = BTreeMap::new();
        for outcome in Outcome::ALL {
            counts.insert(outcome.as_str().to_string(), recorder.count(outcome));
        }
        let errors = Outcome::ALL
            .iter()
            .filter(|o| o.is_error())
            .map(|o| recorder.count(*o))
            .sum();
        let mut latency = BTreeMap::new();
        for ((op, outcome), histogram) in &recorder.by_outcome {
            let op = match op {
                Op::Reserve => "reserve",
                Op::Pay => "pay",
                Op::Cancel => "cancel",
            };
            latency.insert(
                format!("{op}.{}", outcome.as_str()),
                Percentiles::of(histogram),
            );
        }
        let reserve_all = recorder.reserve_latency();
        latency.insert("reserve.all".into(), Percentiles::of(&reserve_all));
        let timeline = recorder
            .timeline
            .iter()
            .enumerate()
            .map(|(second, s)| SecondReport {
                second,
                answers: s.answers,
                reserved: s.reserved,
                errors: s.errors,
                reserve_p50_us: s.reserve_latency.value_at_quantile(0.5),
                reserve_p99_us: s.reserve_latency.value_at_quantile(0.99),
            })
            .collect();
        TargetReport {
            target,
            seconds,
            buyers_dispatched: run.buyers_dispatched,
            answers_per_sec: recorder.answers() as f64 / seconds,
            reserve_requests_per_sec: reserve_all.len() as f64 / seconds,
            reservations_per_sec: recorder.count(Outcome::Reserved) as f64 / seconds,
            selling_secs: recorder.last_reserved_at_secs,
            reservations_per_sec_while_selling: recorder.count(Outcome::Reserved) as f64
                / recorder.last_reserved_at_secs.max(1e-3),
            counts,
            errors,
            retries: recorder.retries,
            latency,
            timeline,
            error_samples: run.error_samples.clone(),
            abandoned_sessions: run.abandoned_sessions,
            breakdown,
            audit,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub target: String,
    pub versus: String,
    /// Reservation requests answered per second, this target over the other.
    pub throughput: f64,
    /// p99 of all reservation requests, this target over the other (< 1 is better).
    pub p99: Option<f64>,
    /// Reservations per second while stock lasted, this target over the other.
    pub selling: Option<f64>,
}

/// A throughput measured outside the harness (nginx serving a static file to wrk).
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub name: String,
    pub requests_per_sec: f64,
    pub command: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DropReport {
    pub command: String,
    pub started_at: String,
    pub host: String,
    pub cores: usize,
    pub generator: String,
    /// /proc/loadavg before and after the run: other work on the machine shows here.
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub drop: DropSpec,
    pub mode: Mode,
    pub targets: Vec<TargetReport>,
    pub ceiling: Option<Ceiling>,
    /// wrk runs made outside the harness against keydrop and the baselines.
    pub wrk: Vec<Ceiling>,
    /// `keydrop-load orders` runs (a fixed rate, latency from due time) made outside
    /// the drop, by name.
    pub open_loop: Vec<(String, crate::open_orders::OrdersReport)>,
    pub ratios: Vec<Ratio>,
    pub passed: bool,
}

impl DropReport {
    /// Every target against each `redis-*` and `postgres-*` baseline, and against
    /// the ceiling.
    pub fn compute_ratios(&mut self) {
        let mut ratios = Vec::new();
        let p99 = |t: &TargetReport| t.latency.get("reserve.all").map(|p| p.p99_us);
        for target in self.targets.iter().filter(|t| !is_baseline(&t.target.name)) {
            for base in self.targets.iter().filter(|t| is_baseline(&t.target.name)) {
                ratios.push(Ratio {
                    target: target.target.name.clone(),
                    versus: base.target.name.clone(),
                    throughput: target.reserve_requests_per_sec
                        / base.reserve_requests_per_sec.max(1e-9),
                    p99: match (p99(target), p99(base)) {
                        (Some(a), Some(b)) if b > 0 => Some(a as f64 / b as f64),
                        _ => None,
                    },
                    selling: Some(
                        target.reservations_per_sec_while_selling
                            / base.reservations_per_sec_while_selling.max(1e-9),
                    ),
                });
            }
        }
        for run in self.wrk.iter().filter(|r| !is_baseline(&r.name)) {
            for base in self.wrk.iter().filter(|r| is_baseline(&r.name)) {
                ratios.push(Ratio {
                    target: run.name.clone(),
                    versus: base.name.clone(),
                    throughput: run.requests_per_sec / base.requests_per_sec.max(1e-9),
                    p99: None,
                    selling: None,
                });
            }
        }
        if let Some(ceiling) = &self.ceiling {
            for run in &self.wrk {
                ratios.push(Ratio {
                    target: run.name.clone(),
                    versus: ceiling.name.clone(),
                    throughput: run.requests_per_sec / ceiling.requests_per_sec.max(1e-9),
                    p99: None,
                    selling: None,
                });
            }
            for target in &self.targets {
                ratios.push(Ratio {
                    target: target.target.name.clone(),
                    versus: ceiling.name.clone(),
                    throughput: target.reserve_requests_per_sec
                        / ceiling.requests_per_sec.max(1e-9),
                    p99: None,
                    selling: None,
                });
            }
        }
        self.ratios = ratios;
    }
}

fn is_baseline(name: &str) -> bool {
    name.starts_with("redis") || name.starts_with("postgres")
}

pub fn print_table(report: &DropReport) {
    let spec = &report.drop;
    println!(
        "load average before: {}; after: {}",
        report.loadavg_before, report.loadavg_after
    );
    println!(
        "drop: {} cards on {} SKU(s) ({:?}), {} buyers, {:.0}% of winners pay; mode {:?}",
        spec.cards,
        spec.skus,
        spec.skew,
        spec.buyers,
        spec.pay_fraction * 100.0,
        report.mode
    );
    println!(
        "\n{:<24} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>6}",
        "target",
        "req/s",
        "reserved/s",
        "selling/s",
        "reserved",
        "sold_out",
        "limit",
        "rate_lim",
        "paid",
        "cancel",
        "errors",
        "audit"
    );
    for t in &report.targets {
        let c = |name: &str| t.counts.get(name).copied().unwrap_or(0);
        println!(
            "{:<24} {:>9.0} {:>10.0} {:>9.0} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>6}",
            t.target.name,
            t.reserve_requests_per_sec,
            t.reservations_per_sec,
            t.reservations_per_sec_while_selling,
            c("reserved"),
            c("sold_out"),
            c("purchase_limit"),
            c("rate_limited"),
            c("paid"),
            c("cancelled"),
            t.errors,
            if t.audit.passed { "ok" } else { "FAILED" }
        );
    }
    println!(
        "\n{:<24} {:<22} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "target", "latency of", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    for t in &report.targets {
        for (name, p) in &t.latency {
            println!(
                "{:<24} {:<22} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
                t.target.name,
                name,
                p.count,
                format_us(p.p50_us),
                format_us(p.p90_us),
                format_us(p.p99_us),
                format_us(p.p999_us),
                format_us(p.max_us)
            );
        }
    }
    println!("\ndurability:");
    for t in &report.targets {
        println!(
            "  {:<22} {} ({})",
            t.target.name, t.target.durability, t.target.endpoint
        );
    }
    if let Some(ceiling) = &report.ceiling {
        println!(
            "  {:<22} static file, no durability: {:.0} req/s ({})",
            ceiling.name, ceiling.requests_per_sec, ceiling.command
        );
    }
    for run in &report.wrk {
        println!(
            "  {:<22} wrk: {:.0} req/s ({})",
            run.name, run.requests_per_sec, run.command
        );
    }
    for (name, run) in &report.open_loop {
        let latency = &run.created_latency;
        println!(
            "  {:<22} orders at {:.0}/s: {} of {} created, 201 latency from due time p50 {} p99 {} p99.9 {} max {}; generator lag p99 {} ({})",
            name,
            run.offered_per_sec,
            run.created,
            run.sent,
            format_us(latency.p50_us),
            format_us(latency.p99_us),
            format_us(latency.p999_us),
            format_us(latency.max_us),
            format_us(run.send_lag.p99_us),
            run.command
        );
    }
    if !report.ratios.is_empty() {
        println!(
            "\nratios: req/s = reservation requests answered per second; selling/s = \
             reservations per second while stock lasted; p99 of reservation requests \
             (lower is better)"
        );
        println!(
            "{:<24} {:<24} {:>10} {:>10} {:>10}",
            "target", "versus", "req/s", "selling/s", "p99"
        );
        let times = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}x"));
        for r in &report.ratios {
            println!(
                "{:<24} {:<24} {:>9.2}x {:>10} {:>10}",
                r.target,
                r.versus,
                r.throughput,
                times(r.selling),
                times(r.p99)
            );
        }
    }
    for t in report.targets.iter().filter(|t| !t.breakdown.is_empty()) {
        println!("\n{} breakdown ({:.1} s run):", t.target.name, t.seconds);
        for (name, value) in &t.breakdown {
            println!("  {name:<36} {value}");
        }
    }
    for t in &report.targets {
        if !t.error_samples.is_empty() {
            println!(
                "\n{} errors (samples): {}",
                t.target.name,
                t.error_samples.join("; ")
            );
        }
        if !t.audit.passed {
            println!(
                "\nAUDIT FAILED for {} ({} failures):",
                t.target.name, t.audit.failures_total
            );
            for failure in &t.audit.failures {
                println!("  - {failure}");
            }
        } else {
            println!(
                "audit {}: {} orders, {} paid cards, {} SKUs checked: ok",
                t.target.name,
                t.audit.orders_checked,
                t.audit.paid_cards_checked,
                t.audit.skus_checked
            );
        }
    }
}
