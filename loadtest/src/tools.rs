//! Helpers for `scripts/bench`'s wrk runs, where wrk (not this harness) generates
//! the load: `serve-redis-http` runs the Redis-backed service on its own, and
//! `stock` defines a SKU and imports cards through the API v1 admin routes.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::model::{DropSpec, Skew};
use crate::target::http::{loopback_url, HttpTarget};
use crate::target::redis_http::RedisHttpService;
use crate::target::{Stock, Target};

/// How long `stock` waits for a node that is still recovering.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args, Debug, Clone)]
pub struct ServeRedisHttpArgs {
    /// The Redis server behind the service (loopback).
    #[arg(long)]
    pub redis_url: String,
    #[arg(long, env = "KEYDROP_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,
    #[arg(long, env = "KEYDROP_PAYMENT_SECRET", hide_env_values = true)]
    pub payment_secret: String,
    /// The service's async worker threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

/// Serves until SIGTERM or Ctrl-C; prints `listening on http://<addr>` first.
pub fn serve_redis_http(args: ServeRedisHttpArgs) -> Result<()> {
    let service = RedisHttpService::start(
        &args.redis_url,
        &args.admin_token,
        &args.payment_secret,
        args.threads,
    )?;
    println!("listening on {}", service.url());
    eprintln!("durability: {}", service.durability);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal runtime")?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok::<_, std::io::Error>(())
    })?;
    drop(service);
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct StockArgs {
    /// The API v1 base URL (loopback).
    #[arg(long)]
    pub url: String,
    #[arg(long, env = "KEYDROP_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,
    /// The SKU to define (its id is `<sku>-0`).
    #[arg(long, default_value = "wrk")]
    pub sku: String,
    #[arg(long, default_value_t = 1_000_000)]
    pub cards: u64,
    #[arg(long, default_value_t = 999)]
    pub price_cents: u64,
}

/// Defines `<sku>-0` and imports the cards, once the node answers.
pub fn stock(args: StockArgs) -> Result<()> {
    let base = loopback_url(&args.url)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let ready = format!("{}/readyz", base.as_str().trim_end_matches('/'));
        let started = Instant::now();
        // keydrop answers 503 until recovery is done; the Redis service has no
        // /readyz and answers 404 at once.
        loop {
            match client.get(&ready).send().await {
                Ok(response) if response.status().as_u16() != 503 => break,
                _ if started.elapsed() > READY_TIMEOUT => {
                    bail!("{ready} not ready within {READY_TIMEOUT:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let spec = DropSpec {
            cards: args.cards,
            skus: 1,
            skew: Skew::Hot,
            buyers: 1,
            pay_fraction: 0.0,
            cancel_fraction: 0.0,
            price_cents: args.price_cents,
            reservation_ttl_secs: 3600,
            seed: 0,
        };
        let target = HttpTarget::new(args.url.as_str(), &args.admin_token, "unused")?;
        target.stock(&Stock::new(spec, &args.sku)).await?;
        println!("{}-0", args.sku);
        Ok(())
    })
}
