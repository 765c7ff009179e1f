//! `keydrop-load engine`: the engine benchmark, in process, with a durable journal.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use keydrop_engine::journal::JournalStats;
use keydrop_engine::{
    CardSecret, CardSerial, Engine, EngineConfig, EngineError, KeyRing, Reservation, SkuDef,
    SkuError, SkuId, UserId,
};
use serde::Serialize;

use crate::stats::{format_us, new_histogram, Percentiles};

#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// SKUs in the spread drop.
    #[arg(long, default_value_t = 10_000)]
    skus: usize,
    /// Cards in each drop (spread over the SKUs, or all on the hot SKU).
    #[arg(long, default_value_t = 1_000_000)]
    cards: u64,
    /// Buyers in flight at once (closed loop: each sends its next request on an answer).
    #[arg(long, default_value_t = 4096)]
    concurrency: usize,
    /// Longest a drop phase may run.
    #[arg(long, default_value_t = 20)]
    max_secs: u64,
    /// How long each open-loop latency phase runs (at half the closed-loop rate).
    #[arg(long, default_value_t = 3)]
    open_loop_secs: u64,
    /// How long the one-fsync-per-request baseline runs.
    #[arg(long, default_value_t = 3)]
    baseline_secs: u64,
    /// Cards and orders for the recovery measurement (0 cards skips it).
    #[arg(long, default_value_t = 1_000_000)]
    recovery_cards: u64,
    #[arg(long, default_value_t = 500_000)]
    recovery_orders: u64,
    /// Where the RocksDB folders go (a temporary folder by default). Put it on the
    /// disk you want measured.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Write the report as JSON to this file (`-` for stdout).
    #[arg(long)]
    json: Option<String>,
}

#[derive(Debug, Serialize)]
struct PhaseReport {
    name: String,
    skus: usize,
    cards: u64,
    reserved: u64,
    sold_out: u64,
    errors: u64,
    seconds: f64,
    reservations_per_sec: f64,
    latency: Percentiles,
    journal: Option<WriterBreakdown>,
}

/// Where the journal writer's time went during a phase.
#[derive(Debug, Serialize)]
struct WriterBreakdown {
    batches: u64,
    requests_per_batch: f64,
    /// Share of the phase the writer spent in RocksDB's synced write (WAL + fsync).
    write_share: f64,
    /// Share spent answering callers after each write.
    completion_share: f64,
    /// Share spent holding small batches for more requests.
    linger_share: f64,
}

impl PhaseReport {
    fn new(
        name: &str,
        skus: usize,
        cards: u64,
        counts: (u64, u64, u64),
        seconds: f64,
        histogram: &Histogram<u64>,
    ) -> Self {
        let (reserved, sold_out, errors) = counts;
        PhaseReport {
            name: name.to_string(),
            skus,
            cards,
            reserved,
            sold_out,
            errors,
            seconds,
            reservations_per_sec: reserved as f64 / seconds,
            latency: Percentiles::of(histogram),
            journal: None,
        }
    }
}

fn writer_breakdown(before: JournalStats, after: JournalStats, seconds: f64) -> WriterBreakdown {
    let batches = after.batches - before.batches;
    WriterBreakdown {
        batches,
        requests_per_batch: (after.requests - before.requests) as f64 / batches.max(1) as f64,
        write_share: (after.write_seconds - before.write_seconds) / seconds,
        completion_share: (after.completion_seconds - before.completion_seconds) / seconds,
        linger_share: (after.linger_seconds - before.linger_seconds) / seconds,
    }
}

#[derive(Debug, Serialize)]
struct RecoveryReport {
    cards: u64,
    orders: u64,
    journal_only_seconds: f64,
    snapshot_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    durability: &'static str,
    phases: Vec<PhaseReport>,
    group_commit_gain: f64,
    recovery: Option<RecoveryReport>,
}

pub fn run(args: EngineArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(run_async(args))
}

async fn open_engine(dir: &std::path::Path, batch_requests_max: Option<usize>) -> Result<Engine> {
    let mut config =
        EngineConfig::new(dir, KeyRing::new(vec![zeroize::Zeroizing::new([7u8; 32])])?);
    if let Some(max) = batch_requests_max {
        config.journal.batch_requests_max = max;
    }
    Ok(Engine::open(config).await?)
}

fn def(name: &str) -> SkuDef {
    SkuDef {
        name: name.to_string(),
        price_cents: 999,
        per_user_limit: 1,
        per_device_limit: None,
        reservation_ttl_ms: 3_600_000,
        starts_at: None,
        ends_at: None,
        low_stock_threshold: 0,
    }
}

/// Defines `skus` SKUs and spreads `cards` over them.
async fn stock(engine: &Engine, prefix: &str, skus: usize, cards: u64) -> Result<Vec<SkuId>> {
    let mut ids = Vec::with_capacity(skus);
    let per_sku = cards / skus as u64;
    let mut extra = cards % skus as u64;
    for s in 0..skus {
        let id = SkuId::parse(format!("{prefix}-{s}"))?;
        engine.define_sku(id.clone(), def(prefix)).await?;
        let count = per_sku + u64::from(extra > 0);
        extra = extra.saturating_sub(1);
        let batch: Vec<(CardSerial, CardSecret)> = (0..count)
            .map(|i| {
                Ok((
                    CardSerial::parse(format!("{s}-{i}"))?,
                    CardSecret::new(format!("secret-{s}-{i}"))?,
                ))
            })
            .collect::<Result<_>>()?;
        engine.import_cards(&id, batch).await?;
        ids.push(id);
    }
    Ok(ids)
}

/// Closed-loop buyers until every card is reserved or `max` passes.
async fn drive(
    engine: &Engine,
    skus: Arc<Vec<SkuId>>,
    cards: u64,
    concurrency: usize,
    max: Duration,
    name: &str,
) -> PhaseReport {
    let next_user = Arc::new(AtomicU64::new(0));
    let reserved = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for task in 0..concurrency {
        let (engine, skus, next_user, reserved, stop) = (
            engine.clone(),
            Arc::clone(&skus),
            Arc::clone(&next_user),
            Arc::clone(&reserved),
            Arc::clone(&stop),
        );
        tasks.push(tokio::spawn(async move {
            let mut histogram = new_histogram();
            let (mut sold_out, mut errors) = (0u64, 0u64);
            let mut pick = task;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < max {
                let n = next_user.fetch_add(1, Ordering::Relaxed);
                pick = pick
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407 + n as usize);
                let sku = &skus[(pick >> 17) % skus.len()];
                let user = UserId::parse(format!("u{n}")).expect("valid user id");
                let sent = Instant::now();
                let result = engine
                    .reserve(
                        sku,
                        Reservation {
                            user,
                            device: None,
                            idempotency: None,
                        },
                    )
                    .await;
                let micros = sent.elapsed().as_micros().max(1) as u64;
                match result {
                    Ok(_) => {
                        histogram.saturating_record(micros);
                        if reserved.fetch_add(1, Ordering::Relaxed) + 1 >= cards {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    Err(EngineError::Sku(SkuError::SoldOut)) => sold_out += 1,
                    Err(_) => errors += 1,
                }
            }
            (histogram, sold_out, errors)
        }));
    }
    let mut histogram: Histogram<u64> = new_histogram();
    let (mut sold_out, mut errors) = (0, 0);
    for task in tasks {
        if let Ok((h, s, e)) = task.await {
            histogram.add(&h).expect("same bounds");
            sold_out += s;
            errors += e;
        }
    }
    let counts = (reserved.load(Ordering::Relaxed), sold_out, errors);
    PhaseReport::new(
        name,
        skus.len(),
        cards,
        counts,
        started.elapsed().as_secs_f64(),
        &histogram,
    )
}

/// Open loop: requests leave at `rate` per second whatever the answers do, and each
/// latency is measured from its intended send time, so a stall shows up in every
/// request it delayed (coordinated omission corrected, as wrk2 does).
async fn drive_open_loop(
    engine: &Engine,
    skus: Arc<Vec<SkuId>>,
    rate: f64,
    duration: Duration,
    name: &str,
) -> PhaseReport {
    let total = (rate * duration.as_secs_f64()) as u64;
    let interval_ns = 1e9 / rate;
    let (results_tx, mut results_rx) =
        tokio::sync::mpsc::unbounded_channel::<(u64, Result<(), bool>)>();
    let collector = tokio::spawn(async move {
        let mut histogram = new_histogram();
        let (mut reserved, mut sold_out, mut errors) = (0u64, 0u64, 0u64);
        while let Some((micros, outcome)) = results_rx.recv().await {
            match outcome {
                Ok(()) => {
                    reserved += 1;
                    histogram.saturating_record(micros.max(1));
                }
                Err(true) => sold_out += 1,
                Err(false) => errors += 1,
            }
        }
        (histogram, reserved, sold_out, errors)
    });
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let due = ((started.elapsed().as_nanos() as f64 / interval_ns) as u64 + 1).min(total);
        while sent < due {
            let intended = started + Duration::from_nanos((sent as f64 * interval_ns) as u64);
            let sku = skus[(sent as usize).wrapping_mul(2654435761) % skus.len()].clone();
            let user = UserId::parse(format!("o{sent}")).expect("valid user id");
            let (engine, results_tx) = (engine.clone(), results_tx.clone());
            tokio::spawn(async move {
                let result = engine
                    .reserve(
                        &sku,
                        Reservation {
                            user,
                            device: None,
                            idempotency: None,
                        },
                    )
                    .await;
                let micros = intended.elapsed().as_micros() as u64;
                let outcome = match result {
                    Ok(_) => Ok(()),
                    Err(EngineError::Sku(SkuError::SoldOut)) => Err(true),
                    Err(_) => Err(false),
                };
                let _ = results_tx.send((micros, outcome));
            });
            sent += 1;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    drop(results_tx);
    let (histogram, reserved, sold_out, errors) = collector.await.expect("collector task");
    let counts = (reserved, sold_out, errors);
    PhaseReport::new(
        name,
        skus.len(),
        total,
        counts,
        started.elapsed().as_secs_f64(),
        &histogram,
    )
}

/// A fresh engine in its own folder, stocked with `cards` on `skus` SKUs.
async fn stocked_engine(
    root: &std::path::Path,
    name: &str,
    skus: usize,
    cards: u64,
    batch: Option<usize>,
) -> Result<(Engine, Vec<SkuId>, PathBuf)> {
    let dir = root.join(name);
    let engine = open_engine(&dir, batch).await?;
    eprintln!("[{name}] stocking {cards} cards on {skus} SKU(s)…");
    let ids = stock(&engine, name, skus, cards).await?;
    Ok((engine, ids, dir))
}

/// Adds the journal breakdown since `before`, stops the engine, removes its folder.
async fn finish_phase(
    engine: Engine,
    dir: PathBuf,
    before: JournalStats,
    mut report: PhaseReport,
) -> PhaseReport {
    report.journal = Some(writer_breakdown(
        before,
        engine.journal_stats(),
        report.seconds,
    ));
    engine.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    print_phase(&report);
    report
}

/// The same drop at half the rate `closed` reached, open loop, on fresh stock.
async fn half_rate_phase(
    args: &EngineArgs,
    root: &std::path::Path,
    closed: &PhaseReport,
) -> Result<PhaseReport> {
    let name = format!("{}-open-loop-half-rate", closed.name);
    let rate = (closed.reservations_per_sec / 2.0).max(1.0);
    let duration = Duration::from_secs(args.open_loop_secs);
    let cards = (rate * duration.as_secs_f64()) as u64 + 1;
    let (engine, ids, dir) = stocked_engine(root, &name, closed.skus, cards, None).await?;
    eprintln!(
        "[{name}] {rate:.0} requests/s for {} s…",
        args.open_loop_secs
    );
    let before = engine.journal_stats();
    let report = drive_open_loop(&engine, Arc::new(ids), rate, duration, &name).await;
    Ok(finish_phase(engine, dir, before, report).await)
}

async fn phase(
    args: &EngineArgs,
    root: &std::path::Path,
    name: &str,
    skus: usize,
    cards: u64,
    batch: Option<usize>,
    max: Duration,
) -> Result<PhaseReport> {
    let (engine, ids, dir) = stocked_engine(root, name, skus, cards, batch).await?;
    eprintln!("[{name}] running…");
    let before = engine.journal_stats();
    let report = drive(&engine, Arc::new(ids), cards, args.concurrency, max, name).await;
    Ok(finish_phase(engine, dir, before, report).await)
}

fn print_phase(p: &PhaseReport) {
    eprintln!(
        "[{}] {} reserved in {:.2} s = {:.0}/s; p50 {} p99 {} p99.9 {} max {}; sold_out {} errors {}",
        p.name,
        p.reserved,
        p.seconds,
        p.reservations_per_sec,
        format_us(p.latency.p50_us),
        format_us(p.latency.p99_us),
        format_us(p.latency.p999_us),
        format_us(p.latency.max_us),
        p.sold_out,
        p.errors
    );
    if let Some(j) = &p.journal {
        eprintln!(
            "[{}] journal: {} batches, {:.0} requests/batch; writer busy {:.0}% in synced writes, {:.0}% answering, {:.0}% lingering",
            p.name,
            j.batches,
            j.requests_per_batch,
            j.write_share * 100.0,
            j.completion_share * 100.0,
            j.linger_share * 100.0
        );
    }
}

async fn recovery(
    root: &std::path::Path,
    cards: u64,
    orders: u64,
    concurrency: usize,
) -> Result<RecoveryReport> {
    let dir = root.join("recovery");
    let skus = 10usize;
    {
        let engine = open_engine(&dir, None).await?;
        eprintln!("[recovery] stocking {cards} cards, reserving {orders}…");
        let ids = stock(&engine, "recovery", skus, cards).await?;
        let report = drive(
            &engine,
            Arc::new(ids),
            orders,
            concurrency,
            Duration::from_secs(120),
            "recovery-load",
        )
        .await;
        anyhow::ensure!(
            report.reserved >= orders,
            "only {} of {orders} orders placed",
            report.reserved
        );
        // Stopped without snapshots: the next open replays the journal, as after a crash.
        engine.halt().await;
    }
    let started = Instant::now();
    let engine = open_engine(&dir, None).await?;
    let journal_only = started.elapsed().as_secs_f64();
    let recovered = engine.recovery_report().clone();
    engine.shutdown().await; // writes snapshots
    let started = Instant::now();
    let engine = open_engine(&dir, None).await?;
    let with_snapshot = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        engine.recovery_report().orders == recovered.orders,
        "snapshot recovery lost orders"
    );
    engine.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "[recovery] {} cards + {} orders: journal replay {:.2} s, from snapshots {:.2} s",
        recovered.cards, recovered.orders, journal_only, with_snapshot
    );
    Ok(RecoveryReport {
        cards: recovered.cards,
        orders: recovered.orders,
        journal_only_seconds: journal_only,
        snapshot_seconds: with_snapshot,
    })
}

async fn run_async(args: EngineArgs) -> Result<()> {
    let temp;
    let root = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir().context("creating a temporary folder")?;
            temp.path().to_path_buf()
        }
    };
    let max = Duration::from_secs(args.max_secs);
    let spread = phase(&args, &root, "spread", args.skus, args.cards, None, max).await?;
    let spread_half = half_rate_phase(&args, &root, &spread).await?;
    let hot = phase(&args, &root, "hot", 1, args.cards, None, max).await?;
    let hot_half = half_rate_phase(&args, &root, &hot).await?;
    let baseline_max = Duration::from_secs(args.baseline_secs);
    let baseline = phase(
        &args,
        &root,
        "hot-fsync-per-request",
        1,
        args.cards,
        Some(1),
        baseline_max,
    )
    .await?;
    let gain = hot.reservations_per_sec / baseline.reservations_per_sec.max(1.0);
    let phases = vec![spread, spread_half, hot, hot_half, baseline];
    let recovery = if args.recovery_cards > 0 {
        Some(
            recovery(
                &root,
                args.recovery_cards,
                args.recovery_orders,
                args.concurrency,
            )
            .await?,
        )
    } else {
        None
    };
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        durability: "fsync (WriteBatch sync=true) before every acknowledgement",
        phases,
        group_commit_gain: gain,
        recovery,
    };
    print_table(&report);
    if let Some(path) = &args.json {
        crate::stats::write_json(path, &report)?;
    }
    Ok(())
}

fn print_table(report: &Report) {
    println!("keydrop-load engine — {}", report.durability);
    println!(
        "{:<34} {:>6} {:>9} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "phase",
        "skus",
        "cards",
        "reserved",
        "per second",
        "p50",
        "p99",
        "p99.9",
        "req/batch",
        "in sync"
    );
    for p in &report.phases {
        let (per_batch, sync_share) = p.journal.as_ref().map_or((0.0, 0.0), |j| {
            (j.requests_per_batch, j.write_share * 100.0)
        });
        println!(
            "{:<34} {:>6} {:>9} {:>10} {:>12.0} {:>9} {:>9} {:>9} {:>9.0} {:>6.0}%",
            p.name,
            p.skus,
            p.cards,
            p.reserved,
            p.reservations_per_sec,
            format_us(p.latency.p50_us),
            format_us(p.latency.p99_us),
            format_us(p.latency.p999_us),
            per_batch,
            sync_share
        );
    }
    println!(
        "group commit vs one fsync per request (hot SKU): {:.1}x",
        report.group_commit_gain
    );
    if let Some(r) = &report.recovery {
        println!(
            "recovery of {} cards + {} orders: {:.2} s replaying the journal, {:.2} s from snapshots",
            r.cards, r.orders, r.journal_only_seconds, r.snapshot_seconds
        );
    }
}
