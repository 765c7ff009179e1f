//! `keydrop`: the node (`keydrop serve`) and the operator's tools (`keydrop sku …`,
//! `keydrop order …`), in one binary. The node itself is the library (`lib.rs`);
//! this file parses the command line, sets up logging and the runtime, and wires.

/// mimalloc: the purchase path allocates many small, short-lived objects across
/// threads; with glibc's malloc, allocation was about 15% of the engine's CPU profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;

use anyhow::{Context, Result};
use clap::Parser;
use tracing_subscriber::EnvFilter;

use keydrop_node::{Cli, Command, Config, LogFormat};

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let config = Config::load(config.as_deref())?;
            init_logging(&config.log, config.log_format)?;
            // Before the runtime and the engine allocate anything large.
            match keydrop_node::set_transparent_huge_pages(config.transparent_huge_pages) {
                Ok(()) => tracing::info!(
                    enabled = config.transparent_huge_pages,
                    "transparent huge pages set for this process"
                ),
                Err(error) => {
                    tracing::warn!(%error, "cannot set transparent huge pages; keeping the system's setting")
                }
            }
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if config.workers > 0 {
                runtime.worker_threads(config.workers.into());
            }
            let runtime = runtime
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async {
                let shutdown = shutdown_signal()?;
                keydrop_node::serve(config, shutdown).await
            })
        }
        Command::Sku(command) => {
            init_logging("warn", LogFormat::Text)?;
            keydrop_node::exit_quietly_on_closed_stdout();
            keydrop_node::run_sku(command)
        }
        Command::Order(command) => {
            init_logging("warn", LogFormat::Text)?;
            keydrop_node::exit_quietly_on_closed_stdout();
            keydrop_node::run_order(command)
        }
    }
}

/// Logs go to stderr: stdout carries the `listening on` line and `--json` output.
fn init_logging(filter: &str, format: LogFormat) -> Result<()> {
    let filter = EnvFilter::try_new(filter).with_context(|| format!("log filter {filter:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// A future that resolves on the first SIGTERM or SIGINT. The handlers are
/// installed now, so a signal that arrives during start-up is not lost.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
