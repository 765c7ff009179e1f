//! `keydrop-load`: the flash-sale load harness. Every figure keydrop publishes comes
//! from here, printed next to a baseline measured in the same invocation.

mod audit;
mod charts;
mod disk_probe;
mod driver;
mod drop_cmd;
mod engine_bench;
mod model;
mod node_metrics;
mod open_orders;
mod report;
mod schedule;
mod servers;
mod stats;
mod target;
mod tools;

/// mimalloc: the purchase path allocates many small, short-lived objects across
/// threads; with glibc's malloc, allocation was about 15% of the engine's CPU profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "keydrop-load",
    version,
    about = "Flash-sale load harness for keydrop"
)]
struct Cli {
    #[command(subcommand)]
    target: Target,
}

#[derive(Subcommand)]
enum Target {
    /// In-process against keydrop-engine with a durable (fsync'd) journal: a drop
    /// spread over many SKUs, one hot SKU, the same hot SKU with one fsync per
    /// request (the baseline group commit is measured against), and recovery time.
    Engine(engine_bench::EngineArgs),
    /// A flash-sale drop against one or more targets (engine, http, redis-direct,
    /// redis-http, postgres-direct), each audited afterwards; a failed audit exits
    /// non-zero. Prints a table; --json and --charts write the report.
    Drop(Box<drop_cmd::DropArgs>),
    /// Order requests at a fixed rate over keep-alive connections (one new buyer per
    /// order), timed from each one's due time: the latency of the order route at a
    /// given load
    Orders(open_orders::OrdersArgs),
    /// Runs the Redis-backed HTTP service of the `redis-http` target on its own
    /// (for wrk), printing `listening on http://<addr>`; stops on SIGTERM.
    ServeRedisHttp(tools::ServeRedisHttpArgs),
    /// Defines a SKU and imports cards through API v1's admin routes (for wrk).
    Stock(tools::StockArgs),
    /// Times a small append and its fdatasync on the filesystem of a folder (a
    /// node's data folder), alone and while a large file there is deleted at once
    /// and in chunks: the disk's part of every order's latency, and whether other
    /// writers' deletions stall it.
    Disk(disk_probe::DiskArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.target {
        Target::Engine(args) => engine_bench::run(args),
        Target::Drop(args) => drop_cmd::main(*args),
        Target::Orders(args) => open_orders::main(args),
        Target::ServeRedisHttp(args) => tools::serve_redis_http(args),
        Target::Stock(args) => tools::stock(args),
        Target::Disk(args) => disk_probe::main(args),
    }
}
