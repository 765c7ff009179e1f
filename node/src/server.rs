//! `keydrop serve`: binds, serves, recovers the engine, and drains on shutdown.
//!
//! The listener is bound first and `/healthz` answers at once; `/readyz` turns 200
//! only once the journal is recovered, and until then every route that needs the
//! engine answers 503 `unavailable`. The shutdown future (SIGTERM/SIGINT in the
//! binary, anything in tests) stops new connections, lets in-flight requests finish
//! (up to `shutdown_grace_secs`), then shuts the engine down, which snapshots every
//! SKU and closes the journal once everything is on disk.

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use keydrop_engine::{Engine, EngineConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission::{Admission, EVICT_INTERVAL};
use crate::api::{self, AppState};
use crate::config::Config;
use crate::{connections, metrics, secrets};

/// How often the Prometheus recorder drains histograms and SKU gauges refresh (so
/// the low-stock log line appears even with nobody scraping).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    tracing::info!(config = %config.redacted(), "effective configuration");
    let metrics_handle = metrics::install()?;
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    ::metrics::gauge!(metrics::RUNTIME_WORKERS).set(workers as f64);
    tracing::info!(workers, "async runtime started");
    let secrets = secrets::load(&config)?;
    let state = AppState::new(
        Admission::new(&config),
        &secrets.admin_token,
        secrets.payment_secret,
        metrics_handle.clone(),
        (config.body_read_timeout_ms > 0)
            .then(|| Duration::from_millis(config.body_read_timeout_ms.into())),
    );

    let listener = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    let addr = listener.local_addr()?;
    // The one line on stdout: scripts and tests read the bound port from it.
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on http://{addr}")?;
        stdout.flush()?;
    }
    tracing::info!(%addr, "listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_on_signal = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested: draining in-flight requests");
        let _ = stop_on_signal.send(true);
    });

    let api = api::dispatch::Api::new(state.clone());
    let idle_timeout = (config.connection_idle_timeout_secs > 0)
        .then(|| Duration::from_secs(config.connection_idle_timeout_secs.into()));
    let server = tokio::spawn(connections::serve(
        listener,
        api,
        idle_timeout,
        stop_rx.clone(),
    ));

    // Recover while /healthz already answers.
    let db_dir = config.db_dir();
    std::fs::create_dir_all(&db_dir).with_context(|| format!("creating {}", db_dir.display()))?;
    let mut engine_config = EngineConfig::new(&db_dir, secrets.keys);
    engine_config.journal.linger = Duration::from_micros(config.journal_linger_us.into());
    let engine = match Engine::open(engine_config).await {
        Ok(engine) => engine,
        Err(error) => {
            let _ = stop_tx.send(true);
            let _ = server.await;
            return Err(error).with_context(|| format!("recovering {}", db_dir.display()));
        }
    };
    state.set_engine(engine.clone());
    tracing::info!("ready");
    if engine.key_ring().key_ids().len() > 1 {
        // Older keys are listed only while rotating: re-seal every card under the
        // newest key in the background, so the old ones can then be dropped.
        let engine = engine.clone();
        tracing::info!(
            older_keys = engine.key_ring().key_ids().len() - 1,
            "key rotation started: re-sealing every card under the newest master key"
        );
        ::metrics::gauge!(crate::metrics::KEY_ROTATION_RUNNING).set(1.0);
        tokio::spawn(async move {
            match engine.rotate_keys().await {
                Ok(resealed) => {
                    ::metrics::gauge!(crate::metrics::KEY_ROTATION_RUNNING).set(0.0);
                    tracing::info!(
                        resealed,
                        "key rotation done; older master keys can now be removed"
                    )
                }
                Err(error) => {
                    // Left at 1: the alert on a rotation that does not end sees it.
                    tracing::error!(%error, "key rotation stopped; it resumes at the next start")
                }
            }
        });
    }
    spawn_upkeep(state.clone(), stop_rx.clone());
    {
        let lag = std::sync::Arc::clone(&state.admission.lag);
        let (shed_after, stop) = (state.admission.shed_lag, stop_rx.clone());
        tokio::spawn(async move { lag.run(shed_after, stop).await });
    }
    if let Some((slots, bound)) = &state.admission.order_slots {
        let (slots, bound, stop) = (std::sync::Arc::clone(slots), bound.clone(), stop_rx.clone());
        tokio::spawn(async move { slots.run(bound, stop).await });
    }

    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let mut grace_stop = stop_rx.clone();
    tokio::select! {
        served = server => served.context("server task")?,
        _ = async {
            let _ = grace_stop.wait_for(|stop| *stop).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(grace_secs = config.shutdown_grace_secs, "in-flight requests did not finish in time; stopping anyway");
        }
    }
    engine.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Background upkeep: evicts idle admission buckets, drains histograms, purges the
/// payment callbacks' replay guard, refreshes SKU gauges. Stops with the server.
fn spawn_upkeep(state: AppState, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut evict = tokio::time::interval(EVICT_INTERVAL);
        let mut upkeep = tokio::time::interval(UPKEEP_INTERVAL);
        evict.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = async { drop(stop.wait_for(|stop| *stop).await) } => return,
                // Both passes run off the async workers that answer buyers: sweeping
                // millions of buckets takes a while, and draining the histograms
                // folds in every latency sample recorded since the last pass
                // (0.5-2.2 ms of one core every 5 s at 16,500 orders/s), which on
                // a single worker held every request due meanwhile.
                _ = evict.tick() => {
                    let state = state.clone();
                    let _ = tokio::task::spawn_blocking(move || state.admission.evict_idle()).await;
                }
                _ = upkeep.tick() => {
                    let state = state.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        state.metrics.run_upkeep();
                        state.callbacks_seen.purge(crate::signature::unix_now_secs());
                        if let Some(engine) = state.engine_if_ready() {
                            state.sku_gauges.refresh(engine);
                        }
                    })
                    .await;
                }
            }
        }
    });
}
