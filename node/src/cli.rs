//! The `keydrop` command line: `serve` runs a node; `sku` and `order` are the
//! operator's tools against a running node's admin API. The doc comments here are
//! the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// keydrop: sells digital card keys in flash sales.
#[derive(Debug, Parser)]
#[command(name = "keydrop", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: HTTP API, admission control and the durable engine.
    ///
    /// Every setting comes from the config file (defaults: config/keydrop.toml)
    /// and can be overridden by a KEYDROP_* environment variable.
    Serve {
        /// TOML config file; without it, the built-in defaults apply.
        #[arg(long, env = "KEYDROP_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Define, stock and inspect SKUs.
    #[command(subcommand)]
    Sku(SkuCommand),
    /// Inspect orders and the payments to refund.
    #[command(subcommand)]
    Order(OrderCommand),
}

/// How the operator tools reach a node.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// Base URL of the node.
    #[arg(long, env = "KEYDROP_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Admin bearer token. Without it, the token the node generated in
    /// <data-dir>/secrets/admin-token is used.
    #[arg(long, env = "KEYDROP_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The node's data directory, to find a generated admin token.
    #[arg(long, env = "KEYDROP_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Print the node's answer as JSON on stdout, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum SkuCommand {
    /// Create a SKU or update its definition.
    Put {
        #[command(flatten)]
        remote: Remote,
        /// SKU id: 1 to 64 of A-Z a-z 0-9 _ -.
        sku: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// Price in cents; payments must match it exactly.
        #[arg(long)]
        price_cents: u64,
        /// Reserved plus paid orders one user may hold.
        #[arg(long, default_value_t = 1)]
        per_user_limit: u32,
        /// Reserved plus paid orders one device (X-Device-Id) may hold.
        #[arg(long)]
        per_device_limit: Option<u32>,
        /// Seconds a reservation holds its card before it returns to stock.
        #[arg(long, default_value_t = 600)]
        reservation_ttl_secs: u64,
        /// Sale opens at (RFC 3339, e.g. 2030-01-01T10:00:00Z).
        #[arg(long)]
        starts_at: Option<String>,
        /// Sale closes at (RFC 3339).
        #[arg(long)]
        ends_at: Option<String>,
        /// Available stock at or below which the SKU counts as low (0 = off).
        #[arg(long)]
        low_stock_threshold: Option<u64>,
    },
    /// Import cards from a CSV file of `serial,secret` lines, of any size.
    ///
    /// The file is sent in chunks; re-running an interrupted import is safe,
    /// since serials already imported are counted as duplicates.
    Import {
        #[command(flatten)]
        remote: Remote,
        sku: String,
        /// CSV file: one `serial,secret` per line; a `serial,secret` header is skipped.
        file: PathBuf,
        /// Lines per request (a request also ends at 8 MiB).
        #[arg(long, default_value_t = 10_000)]
        chunk_lines: usize,
    },
    /// Show a SKU's definition and stock.
    Show {
        #[command(flatten)]
        remote: Remote,
        sku: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum OrderCommand {
    /// Show one order (and its card, with --json, once paid).
    Show {
        #[command(flatten)]
        remote: Remote,
        order_id: String,
    },
    /// List refused payments to refund: late (after expiry or cancellation),
    /// wrong amount, or a second payment of a paid order.
    Late {
        #[command(flatten)]
        remote: Remote,
        /// Only this SKU.
        #[arg(long)]
        sku: Option<String>,
    },
}
