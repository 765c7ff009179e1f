//! The node's settings: one [`Config`], read from an optional TOML file (defaults in
//! `config/keydrop.toml`) and then from `KEYDROP_*` environment variables, which win.
//!
//! Unknown fields are refused: the binary and its config ship together, so a typo
//! fails start-up instead of silently leaving a default in place.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Every setting of `keydrop serve`. The env var of a field is `KEYDROP_` followed by
/// its name in upper case (`rate_per_user` → `KEYDROP_RATE_PER_USER`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP server binds; port 0 picks a free port.
    pub http_addr: SocketAddr,
    /// Holds `db/` (RocksDB) and `secrets/` (generated dev secrets).
    pub data_dir: PathBuf,
    /// Bearer token for the admin routes; generated into `secrets/` when absent.
    pub admin_token: Option<Secret>,
    /// HMAC key the payment provider signs callbacks with; generated when absent.
    pub payment_secret: Option<Secret>,
    /// Master keys (64 hex digits or base64 of 32 bytes), one per line, newest first.
    pub master_key: Option<Secret>,
    /// A file holding the master keys, as `master_key` would.
    pub master_key_file: Option<PathBuf>,
    /// Order requests per second per user id; 0 turns the limit off.
    pub rate_per_user: u32,
    pub burst_per_user: u32,
    /// Requests per second per client IP on order routes; 0 turns the limit off.
    pub rate_per_ip: u32,
    pub burst_per_ip: u32,
    /// Order requests per second per `X-Device-Id`; 0 turns the limit off.
    pub rate_per_device: u32,
    pub burst_per_device: u32,
    /// Peers whose `X-Forwarded-For` header names the client IP.
    pub trusted_proxies: Vec<IpAddr>,
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax.
    pub log: String,
    pub log_format: LogFormat,
    /// How long a shutdown waits for in-flight requests before it stops anyway.
    pub shutdown_grace_secs: u64,
    /// Milliseconds a request body may take to come in (a card import: each part of
    /// it) before the request is answered 408 `request_timeout`; 0 waits forever.
    pub body_read_timeout_ms: u32,
    /// Seconds a connection may start no request while not inside one (idle
    /// keep-alive, or a head that never completes) before it is closed; 0 never.
    pub connection_idle_timeout_secs: u32,
    /// The most orders inside the node at once (their body read, not yet answered); past
    /// the bound, new ones get 503 `overloaded` at once instead of queueing in front
    /// of the engine. The bound starts here and moves between `orders_in_flight_min`
    /// and this with the time orders spend inside (see `order_slots.rs`). 0 turns it
    /// off.
    pub orders_in_flight_max: u32,
    /// The floor of the order bound.
    pub orders_in_flight_min: u32,
    /// Milliseconds an order may spend inside the node on average before the bound
    /// comes down; set it above the disk's usual fsync time. 0 fixes the bound at
    /// `orders_in_flight_max`.
    pub orders_in_flight_target_ms: u32,
    /// Milliseconds the order bound may sit at its floor without shortening the wait
    /// before it opens to `orders_in_flight_max` for a second, so that a flood the
    /// node cannot answer even by refusing is sold at full speed (see
    /// `order_slots.rs`). 0 (the default): never.
    pub orders_in_flight_open_after_ms: u32,
    /// Microseconds the journal may hold a small batch for requests still on their
    /// way, when the previous batch was larger (fewer, fuller fsyncs under load; no
    /// wait when idle). 0 syncs at once.
    pub journal_linger_us: u32,
    /// Milliseconds of scheduling lag past which order requests start being shed
    /// with 503 `overloaded`: a share in proportion to the lag past it, all from
    /// twice it (see `lag.rs`, `admission::lag_shed_share`). 0 turns lag shedding off.
    pub shed_lag_ms: u32,
    /// Transparent huge pages for the node's memory (see `platform.rs` for why they
    /// are off by default).
    pub transparent_huge_pages: bool,
    /// Async worker threads serving HTTP and the SKU actors; 0 means one per core.
    pub workers: u16,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            admin_token: None,
            payment_secret: None,
            master_key: None,
            master_key_file: None,
            rate_per_user: 5,
            burst_per_user: 5,
            rate_per_ip: 200,
            burst_per_ip: 200,
            rate_per_device: 0,
            burst_per_device: 0,
            trusted_proxies: Vec::new(),
            log: "info".to_owned(),
            log_format: LogFormat::Text,
            shutdown_grace_secs: 30,
            body_read_timeout_ms: 10_000,
            connection_idle_timeout_secs: 60,
            orders_in_flight_max: 1024,
            orders_in_flight_min: 32,
            orders_in_flight_target_ms: 5,
            orders_in_flight_open_after_ms: 0,
            journal_linger_us: 200,
            shed_lag_ms: 5,
            transparent_huge_pages: false,
            workers: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A secret setting: its `Debug` never shows the value, and the effective config
/// printed at start-up shows `<redacted>` in its place.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    #[cfg(test)]
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Config {
    /// Defaults, then the file (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        let mut config = match file {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Config::from_toml(&text).with_context(|| format!("parsing config file {}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Config> {
        Ok(toml::from_str(text)?)
    }

    /// Overrides every setting whose `KEYDROP_*` variable `lookup` finds.
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<()> {
        fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T>
        where
            T::Err: std::fmt::Display,
        {
            value
                .trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("{name}={value:?}: {e}"))
        }
        let get = |name: &str| lookup(name).filter(|value| !value.is_empty());
        if let Some(v) = get("KEYDROP_HTTP_ADDR") {
            self.http_addr = parse("KEYDROP_HTTP_ADDR", &v)?;
        }
        if let Some(v) = get("KEYDROP_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = get("KEYDROP_ADMIN_TOKEN") {
            self.admin_token = Some(Secret(v));
        }
        if let Some(v) = get("KEYDROP_PAYMENT_SECRET") {
            self.payment_secret = Some(Secret(v));
        }
        if let Some(v) = get("KEYDROP_MASTER_KEY") {
            self.master_key = Some(Secret(v));
        }
        if let Some(v) = get("KEYDROP_MASTER_KEY_FILE") {
            self.master_key_file = Some(PathBuf::from(v));
        }
        let numbers: [(&str, &mut u32); 6] = [
            ("KEYDROP_RATE_PER_USER", &mut self.rate_per_user),
            ("KEYDROP_BURST_PER_USER", &mut self.burst_per_user),
            ("KEYDROP_RATE_PER_IP", &mut self.rate_per_ip),
            ("KEYDROP_BURST_PER_IP", &mut self.burst_per_ip),
            ("KEYDROP_RATE_PER_DEVICE", &mut self.rate_per_device),
            ("KEYDROP_BURST_PER_DEVICE", &mut self.burst_per_device),
        ];
        for (name, field) in numbers {
            if let Some(v) = get(name) {
                *field = parse(name, &v)?;
            }
        }
        if let Some(v) = lookup("KEYDROP_TRUSTED_PROXIES") {
            self.trusted_proxies = v
                .split(',')
                .map(str::trim)
                .filter(|ip| !ip.is_empty())
                .map(|ip| parse("KEYDROP_TRUSTED_PROXIES", ip))
                .collect::<Result<_>>()?;
        }
        if let Some(v) = get("KEYDROP_LOG") {
            self.log = v;
        }
        if let Some(v) = get("KEYDROP_LOG_FORMAT") {
            self.log_format = match v.trim() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => bail!("KEYDROP_LOG_FORMAT={other:?}: expected text or json"),
            };
        }
        if let Some(v) = get("KEYDROP_SHUTDOWN_GRACE_SECS") {
            self.shutdown_grace_secs = parse("KEYDROP_SHUTDOWN_GRACE_SECS", &v)?;
        }
        if let Some(v) = get("KEYDROP_BODY_READ_TIMEOUT_MS") {
            self.body_read_timeout_ms = parse("KEYDROP_BODY_READ_TIMEOUT_MS", &v)?;
        }
        if let Some(v) = get("KEYDROP_CONNECTION_IDLE_TIMEOUT_SECS") {
            self.connection_idle_timeout_secs = parse("KEYDROP_CONNECTION_IDLE_TIMEOUT_SECS", &v)?;
        }
        if let Some(v) = get("KEYDROP_ORDERS_IN_FLIGHT_MAX") {
            self.orders_in_flight_max = parse("KEYDROP_ORDERS_IN_FLIGHT_MAX", &v)?;
        }
        if let Some(v) = get("KEYDROP_ORDERS_IN_FLIGHT_MIN") {
            self.orders_in_flight_min = parse("KEYDROP_ORDERS_IN_FLIGHT_MIN", &v)?;
        }
        if let Some(v) = get("KEYDROP_ORDERS_IN_FLIGHT_TARGET_MS") {
            self.orders_in_flight_target_ms = parse("KEYDROP_ORDERS_IN_FLIGHT_TARGET_MS", &v)?;
        }
        if let Some(v) = get("KEYDROP_ORDERS_IN_FLIGHT_OPEN_AFTER_MS") {
            self.orders_in_flight_open_after_ms =
                parse("KEYDROP_ORDERS_IN_FLIGHT_OPEN_AFTER_MS", &v)?;
        }
        if let Some(v) = get("KEYDROP_JOURNAL_LINGER_US") {
            self.journal_linger_us = parse("KEYDROP_JOURNAL_LINGER_US", &v)?;
        }
        if let Some(v) = get("KEYDROP_SHED_LAG_MS") {
            self.shed_lag_ms = parse("KEYDROP_SHED_LAG_MS", &v)?;
        }
        if let Some(v) = get("KEYDROP_TRANSPARENT_HUGE_PAGES") {
            self.transparent_huge_pages = parse("KEYDROP_TRANSPARENT_HUGE_PAGES", &v)?;
        }
        if let Some(v) = get("KEYDROP_WORKERS") {
            self.workers = parse("KEYDROP_WORKERS", &v)?;
        }
        Ok(())
    }

    /// The RocksDB folder. Nothing else goes in it, master keys least of all.
    pub fn db_dir(&self) -> PathBuf {
        self.data_dir.join("db")
    }

    /// Where generated development secrets live, outside the RocksDB folder.
    pub fn secrets_dir(&self) -> PathBuf {
        self.data_dir.join("secrets")
    }

    /// The effective configuration on one line of JSON, every secret redacted.
    pub fn redacted(&self) -> String {
        let mut shown = self.clone();
        for secret in [
            &mut shown.admin_token,
            &mut shown.payment_secret,
            &mut shown.master_key,
        ]
        .into_iter()
        .flatten()
        {
            *secret = Secret("<redacted>".to_owned());
        }
        serde_json::to_string(&shown).expect("a Config always serialises to JSON")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// `cargo test` names the package's folder at run time; a test binary in a shared
    /// target dir may have been built from another checkout.
    fn shipped_file() -> PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from)
            .join("../config/keydrop.toml")
    }

    #[test]
    fn shipped_file_equals_defaults() {
        assert_eq!(
            Config::from_file(&shipped_file()).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn unknown_field_is_an_error() {
        let error = Config::from_toml("rate_per_usr = 3\n").unwrap_err();
        assert!(format!("{error:#}").contains("rate_per_usr"), "{error:#}");
        let error = Config::from_toml("log_format = \"xml\"\n").unwrap_err();
        assert!(format!("{error:#}").contains("xml"), "{error:#}");
    }

    #[test]
    fn env_wins_over_file() {
        let mut config =
            Config::from_toml("rate_per_user = 3\nhttp_addr = \"127.0.0.1:9000\"\n").unwrap();
        assert_eq!(config.rate_per_user, 3);
        let env: HashMap<&str, &str> = [
            ("KEYDROP_RATE_PER_USER", "7"),
            ("KEYDROP_HTTP_ADDR", "127.0.0.1:0"),
            ("KEYDROP_TRUSTED_PROXIES", "10.0.0.1, ::1"),
            ("KEYDROP_ADMIN_TOKEN", "tok"),
            ("KEYDROP_LOG_FORMAT", "json"),
            ("KEYDROP_WORKERS", "1"),
            ("KEYDROP_ORDERS_IN_FLIGHT_OPEN_AFTER_MS", "1000"),
        ]
        .into_iter()
        .collect();
        config
            .apply_env(|name| env.get(name).map(|v| v.to_string()))
            .unwrap();
        assert_eq!(config.rate_per_user, 7);
        assert_eq!(config.http_addr.port(), 0);
        assert_eq!(config.trusted_proxies.len(), 2);
        assert_eq!(config.admin_token, Some(Secret::new("tok")));
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.workers, 1);
        assert_eq!(config.orders_in_flight_open_after_ms, 1_000);
        // Untouched settings keep the file's or the default value.
        assert_eq!(config.rate_per_ip, 200);
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        let mut config = Config::default();
        let error = config
            .apply_env(|name| (name == "KEYDROP_RATE_PER_IP").then(|| "lots".to_owned()))
            .unwrap_err();
        assert!(error.to_string().contains("KEYDROP_RATE_PER_IP"), "{error}");
    }

    #[test]
    fn redacted_hides_secrets() {
        let master_key = "00".repeat(32);
        let config = Config {
            admin_token: Some(Secret::new("hunter2")),
            master_key: Some(Secret::new(master_key.clone())),
            ..Config::default()
        };
        let shown = config.redacted();
        assert!(
            !shown.contains("hunter2") && !shown.contains(&master_key),
            "{shown}"
        );
        assert!(shown.contains("<redacted>"));
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
