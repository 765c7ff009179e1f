//! `keydrop-load drop`: the same drop against each chosen target in turn, each
//! audited, then one table, one JSON report and charts for all of them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use crate::audit::{self, AuditReport};
use crate::driver::{self, RunConfig};
use crate::model::{Crowd, DropSpec, Skew};
use crate::report::{self, Ceiling, DropReport, TargetReport};
use crate::schedule::Mode;
use crate::servers::RedisServer;
use crate::target::engine::EngineTarget;
use crate::target::http::{find_keydrop, HttpTarget, KeydropNode};
use crate::target::postgres::PostgresDirect;
use crate::target::redis::{RedisDirect, RedisStore};
use crate::target::redis_http::RedisHttpService;
use crate::target::{OrderRef, Stock, Target, TargetInfo};

/// Worker threads of the `redis-http` target's service: as many as a `keydrop serve`
/// started by `http` gets by default on the 2-core machines the drop is run on.
const REDIS_HTTP_THREADS: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetKind {
    /// keydrop-engine in this process.
    Engine,
    /// keydrop's HTTP API: --http-url, or a `keydrop serve` started here.
    Http,
    /// Redis Lua scripts, pipelined, no service in front.
    RedisDirect,
    /// The same Lua scripts behind a minimal axum service.
    RedisHttp,
    /// SELECT … FOR UPDATE SKIP LOCKED on a cards table.
    PostgresDirect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeKind {
    /// Closed loop: --concurrency buyers in flight; finds the maximum throughput.
    Closed,
    /// Open loop at --rate arrivals per second (latency from the intended time).
    Constant,
    /// Open loop from --ramp-from to --rate over --ramp-secs, then --rate.
    Ramp,
}

#[derive(Args, Debug, Clone)]
pub struct DropArgs {
    /// Targets to run, in order (repeat the flag, or separate with commas).
    #[arg(
        long = "target",
        value_enum,
        value_delimiter = ',',
        default_value = "engine"
    )]
    pub targets: Vec<TargetKind>,
    /// Cards in the drop.
    #[arg(long, default_value_t = 10_000)]
    pub cards: u64,
    /// SKUs holding them: 1 is a hot single SKU; more spreads demand by Zipf.
    #[arg(long, default_value_t = 1)]
    pub skus: usize,
    /// Zipf exponent of demand over SKUs (0 = uniform).
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Buyers in the crowd (default: 10 × the cards).
    #[arg(long)]
    pub buyers: Option<u64>,
    /// Share of winners who pay.
    #[arg(long, default_value_t = 0.9)]
    pub pay_fraction: f64,
    /// Share of the non-paying winners who cancel; the rest let the reservation expire.
    #[arg(long, default_value_t = 0.5)]
    pub cancel_fraction: f64,
    /// Reservation lifetime on the targets that expire reservations.
    #[arg(long, default_value_t = 600)]
    pub ttl_secs: u64,
    #[arg(long, default_value_t = 999)]
    pub price_cents: u64,
    /// Seed of the crowd (default: KEYDROP_SEED, else random; always printed).
    #[arg(long, env = "KEYDROP_SEED")]
    pub seed: Option<u64>,
    #[arg(long, value_enum, default_value = "closed")]
    pub mode: ModeKind,
    /// Closed loop: buyers in flight.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Open loop: arrivals per second (the final rate of a ramp).
    #[arg(long, default_value_t = 5_000.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 0.0)]
    pub ramp_from: f64,
    #[arg(long, default_value_t = 10.0)]
    pub ramp_secs: f64,
    /// Open loop: buyers in flight at most; past it arrivals wait (and it shows).
    #[arg(long, default_value_t = 16_384)]
    pub in_flight_max: usize,
    /// Longest a target's run may dispatch buyers.
    #[arg(long, default_value_t = 30)]
    pub max_secs: u64,
    /// A request with no answer after this is retried (same Idempotency-Key).
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
    /// A running keydrop node (loopback only); without it, one is started here.
    #[arg(long)]
    pub http_url: Option<String>,
    #[arg(long, env = "KEYDROP_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    #[arg(long, env = "KEYDROP_PAYMENT_SECRET", hide_env_values = true)]
    pub payment_secret: Option<String>,
    /// The keydrop binary to start (default: next to this one).
    #[arg(long)]
    pub keydrop_bin: Option<PathBuf>,
    /// Redis servers (loopback); the redis targets run once per URL. Without one, a
    /// redis-server is started here per --redis-appendfsync.
    #[arg(long)]
    pub redis_url: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "everysec")]
    pub redis_appendfsync: Vec<String>,
    /// PostgreSQL (loopback), e.g. `host=127.0.0.1 port=5432 user=postgres`.
    /// The schema `keydrop_load` in it is dropped and recreated.
    #[arg(long)]
    pub postgres_url: Option<String>,
    #[arg(long, default_value_t = 16)]
    pub postgres_connections: usize,
    /// Where the engine target keeps its RocksDB folder (default: a temporary one).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Write the JSON report here (`-` for stdout).
    #[arg(long)]
    pub json: Option<String>,
    /// Write charts as `<STEM>-throughput.svg` and `<STEM>-latency.svg`.
    #[arg(long)]
    pub charts: Option<PathBuf>,
    /// A ceiling measured outside (nginx static file under wrk), in requests/s.
    #[arg(long)]
    pub ceiling_rps: Option<f64>,
    #[arg(long, default_value = "nginx static file, wrk -t2 -c64")]
    pub ceiling_name: String,
    #[arg(long, default_value = "")]
    pub ceiling_command: String,
    /// A wrk run made outside, as `name|requests per second|command`; listed
    /// with its ratio to the ceiling (repeatable).
    #[arg(long)]
    pub wrk_result: Vec<String>,
    /// A `keydrop-load orders --json` report, as `name|path`; listed with the wrk
    /// runs (repeatable).
    #[arg(long)]
    pub open_loop_result: Vec<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl DropArgs {
    pub fn spec(&self, seed: u64) -> DropSpec {
        DropSpec {
            cards: self.cards,
            skus: self.skus,
            skew: if self.skus == 1 {
                Skew::Hot
            } else {
                Skew::Zipf {
                    exponent: self.zipf,
                }
            },
            buyers: self.buyers.unwrap_or(self.cards.saturating_mul(10)),
            pay_fraction: self.pay_fraction,
            cancel_fraction: self.cancel_fraction,
            price_cents: self.price_cents,
            reservation_ttl_secs: self.ttl_secs,
            seed,
        }
    }

    pub fn load_mode(&self) -> Mode {
        match self.mode {
            ModeKind::Closed => Mode::Closed {
                concurrency: self.concurrency,
            },
            ModeKind::Constant => Mode::Constant { rate: self.rate },
            ModeKind::Ramp => Mode::Ramp {
                from: self.ramp_from,
                to: self.rate,
                over_secs: self.ramp_secs,
            },
        }
    }

    fn run_config(&self, run_id: String) -> RunConfig {
        RunConfig {
            mode: self.load_mode(),
            duration_max: Duration::from_secs(self.max_secs),
            request_timeout: Duration::from_millis(self.timeout_ms),
            retries_max: self.retries,
            in_flight_max: self.in_flight_max,
            run_id,
            progress: !self.quiet,
        }
    }
}

/// Stocks the target, runs the crowd, reads the target's state back and audits it.
pub async fn run_target<T: Target>(
    target: Arc<T>,
    info: TargetInfo,
    crowd: Arc<Crowd>,
    config: RunConfig,
) -> Result<TargetReport> {
    let stock = Stock::new(crowd.spec().clone(), &config.run_id);
    eprintln!(
        "[{}] stocking {} cards on {} SKU(s)…",
        info.name,
        crowd.spec().cards,
        crowd.spec().skus
    );
    target
        .stock(&stock)
        .await
        .with_context(|| format!("stocking {}", info.name))?;
    eprintln!("[{}] {} buyers arriving…", info.name, crowd.spec().buyers);
    let outcome = driver::run(Arc::clone(&target), crowd, config, &info.name).await;
    let orders: Vec<OrderRef> = outcome
        .history
        .orders
        .iter()
        .map(|(id, order)| OrderRef {
            sku: order.sku,
            id: id.clone(),
        })
        .collect();
    eprintln!("[{}] auditing {} orders…", info.name, orders.len());
    let audit = match target.state(&orders).await {
        Ok(state) => {
            let mut audit = audit::audit(&outcome.history, &state, &stock.stocked());
            for contradiction in &outcome.history_errors {
                audit.fail(contradiction.clone());
            }
            audit.passed = audit.failures_total == 0;
            audit
        }
        Err(error) => {
            let mut audit = AuditReport::default();
            audit.fail(format!("could not read the target's state: {error:#}"));
            audit
        }
    };
    let breakdown = target.breakdown().await;
    Ok(TargetReport::new(info, &outcome, audit, breakdown))
}

fn random_seed() -> u64 {
    use rand::RngCore;
    rand::thread_rng().next_u64()
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Runs every target of `args` and returns the report (audits included).
pub async fn run_drop(args: &DropArgs) -> Result<DropReport> {
    let loadavg_before = loadavg();
    let seed = args.seed.unwrap_or_else(random_seed);
    let spec = args.spec(seed);
    let crowd = Arc::new(Crowd::new(spec.clone())?);
    let mode = args.load_mode();
    mode.validate()?;
    anyhow::ensure!(args.max_secs > 0, "--max-secs must be at least 1");
    eprintln!("seed {seed} (replay with --seed {seed} or KEYDROP_SEED={seed})");
    let run_base = format!("kd{}", random_hex(4));
    let mut reports = Vec::new();

    // Redis servers: the given ones, else one started here per fsync policy.
    let wants_redis = args
        .targets
        .iter()
        .any(|t| matches!(t, TargetKind::RedisDirect | TargetKind::RedisHttp));
    let mut started_redis: Vec<RedisServer> = Vec::new();
    let mut redis_urls = args.redis_url.clone();
    if wants_redis && redis_urls.is_empty() {
        for policy in &args.redis_appendfsync {
            let policy = policy.clone();
            let server = tokio::task::spawn_blocking(move || RedisServer::start(&policy)).await??;
            eprintln!(
                "started redis-server pid {} on {} (appendfsync {})",
                server.pid(),
                server.url(),
                server.appendfsync
            );
            redis_urls.push(server.url());
            started_redis.push(server);
        }
    }

    for (i, kind) in args.targets.iter().enumerate() {
        let run_id = |j: usize| format!("{run_base}-{i}-{j}");
        match kind {
            TargetKind::Engine => {
                let temp;
                let dir = match &args.data_dir {
                    Some(dir) => dir.join(run_id(0)),
                    None => {
                        temp = tempfile::tempdir().context("creating a temporary folder")?;
                        temp.path().join("engine")
                    }
                };
                let target = Arc::new(EngineTarget::open(&dir).await?);
                let report = run_target(
                    Arc::clone(&target),
                    EngineTarget::info(),
                    Arc::clone(&crowd),
                    args.run_config(run_id(0)),
                )
                .await;
                target.close().await;
                reports.push(report?);
            }
            TargetKind::Http => {
                let mut node = None;
                let (url, token, secret) = match &args.http_url {
                    Some(url) => (
                        url.clone(),
                        args.admin_token
                            .clone()
                            .context("--http-url needs --admin-token (or KEYDROP_ADMIN_TOKEN)")?,
                        args.payment_secret.clone().context(
                            "--http-url needs --payment-secret (or KEYDROP_PAYMENT_SECRET)",
                        )?,
                    ),
                    None => {
                        let bin = find_keydrop(args.keydrop_bin.as_deref())?;
                        let started = KeydropNode::start(&bin, &[]).await?;
                        eprintln!(
                            "started {} pid {:?} on {}",
                            bin.display(),
                            started.pid(),
                            started.url
                        );
                        let triple = (
                            started.url.clone(),
                            started.admin_token.clone(),
                            started.payment_secret.clone(),
                        );
                        node = Some(started);
                        triple
                    }
                };
                let target = Arc::new(HttpTarget::new(&url, &token, &secret)?);
                let info = TargetInfo {
                    name: "http".into(),
                    durability: "keydrop: fsync before every answer (group commit)".into(),
                    endpoint: match &node {
                        Some(_) => format!("keydrop serve started here, {}", target.base()),
                        None => target.base().to_string(),
                    },
                };
                let report =
                    run_target(target, info, Arc::clone(&crowd), args.run_config(run_id(0))).await;
                if let Some(mut node) = node {
                    if let Err(error) = node.stop().await {
                        eprintln!("warning: {error:#} (log: {})", node.log.display());
                    }
                }
                reports.push(report?);
            }
            TargetKind::RedisDirect => {
                for (j, url) in redis_urls.iter().enumerate() {
                    let target = Arc::new(RedisDirect::new(RedisStore::connect(url).await?));
                    let info = target.info();
                    reports.push(
                        run_target(target, info, Arc::clone(&crowd), args.run_config(run_id(j)))
                            .await?,
                    );
                }
            }
            TargetKind::RedisHttp => {
                for (j, url) in redis_urls.iter().enumerate() {
                    let (token, secret) = (random_hex(16), random_hex(16));
                    let service = {
                        let (url, token, secret) = (url.clone(), token.clone(), secret.clone());
                        tokio::task::spawn_blocking(move || {
                            RedisHttpService::start(&url, &token, &secret, REDIS_HTTP_THREADS)
                        })
                        .await??
                    };
                    let target = Arc::new(HttpTarget::new(&service.url(), &token, &secret)?);
                    let info = TargetInfo {
                        name: format!("redis-http[{}]", service.fsync_policy),
                        durability: service.durability.clone(),
                        endpoint: format!("{}, {}", service.url(), service.endpoint),
                    };
                    let report =
                        run_target(target, info, Arc::clone(&crowd), args.run_config(run_id(j)))
                            .await;
                    // Stopping joins the service's thread: keep it off the async workers.
                    tokio::task::spawn_blocking(move || drop(service)).await?;
                    reports.push(report?);
                }
            }
            TargetKind::PostgresDirect => {
                let Some(url) = &args.postgres_url else {
                    bail!("postgres-direct needs --postgres-url (scripts/bench starts one)");
                };
                let target =
                    Arc::new(PostgresDirect::connect(url, args.postgres_connections).await?);
                let info = target.info();
                reports.push(
                    run_target(target, info, Arc::clone(&crowd), args.run_config(run_id(0)))
                        .await?,
                );
            }
        }
    }
    tokio::task::spawn_blocking(move || drop(started_redis)).await?;

    let passed = reports.iter().all(|r| r.audit.passed);
    let mut report = DropReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_at: chrono::Utc::now().to_rfc3339(),
        host: host_name(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        generator: "keydrop-load in one process, 2 tokio worker threads, sharing the machine with the target".into(),
        loadavg_before,
        loadavg_after: loadavg(),
        drop: spec,
        mode,
        targets: reports,
        ceiling: args.ceiling_rps.map(|rps| Ceiling {
            name: "nginx-static".into(),
            requests_per_sec: rps,
            command: if args.ceiling_command.is_empty() {
                args.ceiling_name.clone()
            } else {
                args.ceiling_command.clone()
            },
        }),
        wrk: args
            .wrk_result
            .iter()
            .map(|text| parse_wrk_result(text))
            .collect::<Result<_>>()?,
        open_loop: args
            .open_loop_result
            .iter()
            .map(|text| read_open_loop_result(text))
            .collect::<Result<_>>()?,
        ratios: Vec::new(),
        passed,
    };
    report.compute_ratios();
    Ok(report)
}

fn parse_wrk_result(text: &str) -> Result<Ceiling> {
    let mut parts = text.splitn(3, '|');
    let (Some(name), Some(rps), Some(command)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("--wrk-result takes name|requests per second|command, got {text:?}");
    };
    Ok(Ceiling {
        name: name.to_string(),
        requests_per_sec: rps
            .trim()
            .parse()
            .with_context(|| format!("requests per second in {text:?}"))?,
        command: command.to_string(),
    })
}

fn read_open_loop_result(text: &str) -> Result<(String, crate::open_orders::OrdersReport)> {
    let Some((name, path)) = text.split_once('|') else {
        bail!("--open-loop-result takes name|path, got {text:?}");
    };
    let json = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let report = serde_json::from_str(&json).with_context(|| format!("parsing {path}"))?;
    Ok((name.to_string(), report))
}

/// The `drop` subcommand: runs, prints, writes; fails when an audit failed.
pub fn main(args: DropArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = runtime.block_on(run_drop(&args))?;
    report::print_table(&report);
    if let Some(path) = &args.json {
        crate::stats::write_json(path, &report)?;
    }
    if let Some(stem) = &args.charts {
        for path in crate::charts::write(&report.targets, stem)? {
            eprintln!("wrote {}", path.display());
        }
    }
    if !report.passed {
        bail!("audit failed: see the failures above");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::target::{Answer, ReserveRequest};

    #[derive(Parser)]
    struct TestCli {
        #[command(flatten)]
        args: DropArgs,
    }

    /// A small drop, bounded to a few seconds on any target.
    fn args(extra: &[&str]) -> DropArgs {
        let mut argv = vec![
            "keydrop-load",
            "--cards",
            "300",
            "--buyers",
            "2000",
            "--concurrency",
            "64",
            "--max-secs",
            "10",
            "--seed",
            "7",
            "--quiet",
        ];
        argv.extend_from_slice(extra);
        TestCli::parse_from(argv).args
    }

    fn assert_clean_drop(report: &DropReport) {
        assert_eq!(report.targets.len(), 1);
        let t = &report.targets[0];
        assert!(report.passed, "audit: {:?}", t.audit.failures);
        let c = |name: &str| t.counts[name];
        // Every card went (cancelled ones came back and went again), the rest of
        // the crowd was told sold out, and most winners paid.
        assert!(c("reserved") >= 300, "{:?}", t.counts);
        assert_eq!(c("reserved") + c("sold_out"), 2000, "{:?}", t.counts);
        assert!(c("paid") >= 250, "{:?}", t.counts);
        assert_eq!(t.errors, 0, "{:?}", t.error_samples);
        assert_eq!(t.audit.orders_checked, c("reserved"));
        assert_eq!(t.audit.paid_cards_checked, c("paid"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_engine_drop_passes_its_audit() {
        let report = run_drop(&args(&["--target", "engine"])).await.unwrap();
        assert_clean_drop(&report);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_open_loop_engine_drop_passes_its_audit() {
        let report = run_drop(&args(&[
            "--target",
            "engine",
            "--mode",
            "ramp",
            "--ramp-from",
            "500",
            "--rate",
            "4000",
            "--ramp-secs",
            "1",
        ]))
        .await
        .unwrap();
        assert_clean_drop(&report);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_redis_direct_drop_passes_its_audit() {
        if crate::servers::which("redis-server").is_none() {
            eprintln!("skipped: redis-server is not installed (apt-get install redis-server)");
            return;
        }
        let report = run_drop(&args(&["--target", "redis-direct"]))
            .await
            .unwrap();
        assert_clean_drop(&report);
        assert!(report.targets[0].target.durability.contains("everysec"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_http_drop_against_a_real_node_passes_its_audit() {
        if let Err(error) = find_keydrop(None) {
            eprintln!("skipped: {error:#}");
            return;
        }
        let report = run_drop(&args(&["--target", "http"])).await.unwrap();
        assert_clean_drop(&report);
    }

    /// Acknowledges every 50th reservation with an order id the engine never
    /// issued: a lost order. The audit must catch it, proving the harness can fail.
    struct LosesOrders(EngineTarget);

    impl Target for LosesOrders {
        async fn stock(&self, stock: &Stock) -> Result<()> {
            self.0.stock(stock).await
        }
        async fn reserve(&self, request: ReserveRequest<'_>) -> Answer {
            let buyer: u64 = request.user.trim_start_matches('u').parse().unwrap();
            match self.0.reserve(request).await {
                Answer::Reserved(_) if buyer.is_multiple_of(50) => {
                    Answer::Reserved(format!("{:032x}", 0xdead_0000 + buyer))
                }
                other => other,
            }
        }
        async fn pay(&self, order: &OrderRef, amount_cents: u64) -> Answer {
            self.0.pay(order, amount_cents).await
        }
        async fn cancel(&self, order: &OrderRef) -> Answer {
            self.0.cancel(order).await
        }
        async fn state(&self, orders: &[OrderRef]) -> Result<crate::audit::TargetState> {
            self.0.state(orders).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_audit_catches_a_target_that_loses_orders() {
        let args = args(&[]);
        let crowd = Arc::new(Crowd::new(args.spec(7)).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let inner = EngineTarget::open(dir.path()).await.unwrap();
        let target = Arc::new(LosesOrders(inner));
        let report = run_target(
            Arc::clone(&target),
            EngineTarget::info(),
            crowd,
            args.run_config("canary".into()),
        )
        .await
        .unwrap();
        target.0.close().await;
        assert!(!report.audit.passed);
        assert!(
            report
                .audit
                .failures
                .iter()
                .any(|f| f.contains("does not have it")),
            "{:?}",
            report.audit.failures
        );
    }
}
