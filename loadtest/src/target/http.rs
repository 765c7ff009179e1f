//! `http`: keydrop's API v1 over loopback, against a running `keydrop serve` or one
//! started here on a temporary data folder. The Redis-backed service of
//! `redis_http` speaks the same routes, so this client drives both.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;
use tokio::io::AsyncBufReadExt;
use tokio::sync::Semaphore;

use super::{Answer, OrderRef, ReserveRequest, Stock, Target};
use crate::audit::{OrderState, SkuCounts, Status, TargetState};
use crate::node_metrics::{samples, scrape};

/// Cards per import request: well under the 64 MiB import limit.
const IMPORT_CHUNK_CARDS_MAX: usize = 20_000;
/// Order look-ups in flight at once during the audit.
const AUDIT_LOOKUPS_IN_FLIGHT_MAX: usize = 64;
/// Attempts per audit look-up refused with 429 or 503 before the audit gives up.
const AUDIT_LOOKUP_ATTEMPTS_MAX: u32 = 20;
/// How long a started node may take to print its address (recovery included).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a started node may take to drain and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Idle keep-alive connections kept per host: one per buyer in flight, or near.
const POOL_IDLE_PER_HOST_MAX: usize = 4096;

/// Refuses anything but a loopback `http://` URL: the harness floods its target.
pub fn loopback_url(url: &str) -> Result<reqwest::Url> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("parsing URL {url}"))?;
    ensure!(parsed.scheme() == "http", "only http:// targets: {url}");
    let host = parsed.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    ensure!(loopback, "refusing a non-loopback target: {url}");
    Ok(parsed)
}

/// The signature header of a payment callback: `t=<unix>,v1=<hex HMAC-SHA256 of
/// "<t>.<body>">`, as issue 3's contract defines it.
pub fn payment_signature(secret: &[u8], unix_secs: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(unix_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={unix_secs},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: String,
}

#[derive(Debug, Deserialize)]
struct OrderCreated {
    order_id: String,
}

#[derive(Debug, Deserialize)]
struct Imported {
    imported: u64,
}

#[derive(Debug, Deserialize)]
struct SkuBody {
    available: u64,
    reserved: u64,
    sold: u64,
}

#[derive(Debug, Deserialize)]
struct CardBody {
    serial: String,
}

#[derive(Debug, Deserialize)]
struct OrderBody {
    status: String,
    card: Option<CardBody>,
}

pub struct HttpTarget {
    client: reqwest::Client,
    base: String,
    admin_token: String,
    payment_secret: Vec<u8>,
    skus: std::sync::OnceLock<Vec<String>>,
    /// Cards each SKU reported imported, by index.
    imported: Mutex<BTreeMap<usize, u64>>,
}

impl HttpTarget {
    pub fn new(base: &str, admin_token: &str, payment_secret: &str) -> Result<HttpTarget> {
        let base = loopback_url(base)?
            .to_string()
            .trim_end_matches('/')
            .to_string();
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(POOL_IDLE_PER_HOST_MAX)
            .tcp_nodelay(true)
            .no_proxy()
            .build()
            .context("building the HTTP client")?;
        Ok(HttpTarget {
            client,
            base,
            admin_token: admin_token.to_string(),
            payment_secret: payment_secret.as_bytes().to_vec(),
            skus: std::sync::OnceLock::new(),
            imported: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn sku(&self, index: usize) -> Option<&str> {
        self.skus
            .get()
            .and_then(|skus| skus.get(index))
            .map(String::as_str)
    }

    async fn admin(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<reqwest::Response> {
        let response = request
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .with_context(|| format!("{what}: sending"))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("{what}: HTTP {status}: {body}");
        }
        Ok(response)
    }

    async fn get_order(&self, id: &str) -> Result<Option<OrderState>> {
        let url = format!("{}/v1/orders/{id}", self.base);
        for _ in 0..AUDIT_LOOKUP_ATTEMPTS_MAX {
            let response = self.client.get(&url).send().await?;
            match response.status().as_u16() {
                200 => {
                    let body: OrderBody = response.json().await?;
                    let status = match body.status.as_str() {
                        "reserved" => Status::Reserved,
                        "paid" => Status::Paid,
                        "expired" => Status::Expired,
                        "cancelled" => Status::Cancelled,
                        other => bail!("order {id}: unknown status {other}"),
                    };
                    return Ok(Some(OrderState {
                        status,
                        serial: body.card.map(|card| card.serial),
                    }));
                }
                404 => return Ok(None),
                429 | 503 => {
                    let wait = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(1);
                    tokio::time::sleep(Duration::from_secs(wait.clamp(1, 5))).await;
                }
                other => bail!("order {id}: HTTP {other}"),
            }
        }
        bail!("order {id}: still refused after {AUDIT_LOOKUP_ATTEMPTS_MAX} attempts")
    }
}

/// Maps an error answer to what the driver counts.
async fn refusal(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let code = response
        .json::<ErrorBody>()
        .await
        .map(|body| body.error)
        .unwrap_or_default();
    match (status, code.as_str()) {
        (409, "sold_out") => Answer::SoldOut,
        (403, "purchase_limit") => Answer::PurchaseLimit,
        (409, "reservation_expired") => Answer::Expired,
        (429, _) => Answer::RateLimited,
        (503, _) => Answer::Overloaded,
        _ => Answer::Error(format!("HTTP {status} {code}")),
    }
}

fn transport(error: reqwest::Error) -> Answer {
    Answer::Error(format!("transport: {error}"))
}

impl Target for HttpTarget {
    async fn stock(&self, stock: &Stock) -> Result<()> {
        let def = json!({
            "name": "keydrop-load drop",
            "price_cents": stock.spec.price_cents,
            "per_user_limit": 1,
            "reservation_ttl_secs": stock.spec.reservation_ttl_secs,
        });
        for (index, name) in stock.skus.iter().enumerate() {
            let url = format!("{}/v1/skus/{name}", self.base);
            self.admin(self.client.put(&url).json(&def), "defining a SKU")
                .await?;
            let mut cards = stock.cards(index).peekable();
            let mut imported = 0;
            while cards.peek().is_some() {
                let chunk: Vec<serde_json::Value> = cards
                    .by_ref()
                    .take(IMPORT_CHUNK_CARDS_MAX)
                    .map(|(serial, secret)| json!({"serial": serial, "secret": secret}))
                    .collect();
                let response = self
                    .admin(
                        self.client
                            .post(format!("{url}/cards"))
                            .json(&json!({ "cards": chunk })),
                        "importing cards",
                    )
                    .await?;
                imported += response.json::<Imported>().await?.imported;
            }
            self.imported
                .lock()
                .expect("no panic while holding the lock")
                .insert(index, imported);
        }
        self.skus
            .set(stock.skus.clone())
            .map_err(|_| anyhow::anyhow!("the http target was stocked twice"))
    }

    async fn reserve(&self, request: ReserveRequest<'_>) -> Answer {
        let Some(sku) = self.sku(request.sku) else {
            return Answer::Error(format!("SKU index {} not stocked", request.sku));
        };
        let response = self
            .client
            .post(format!("{}/v1/skus/{sku}/orders", self.base))
            .header("Idempotency-Key", request.idempotency_key)
            .json(&json!({ "user_id": request.user }))
            .send()
            .await;
        match response {
            Ok(response) if response.status().as_u16() == 201 => {
                match response.json::<OrderCreated>().await {
                    Ok(body) => Answer::Reserved(body.order_id),
                    Err(error) => Answer::Error(format!("reading an order: {error}")),
                }
            }
            Ok(response) => refusal(response).await,
            Err(error) => transport(error),
        }
    }

    async fn pay(&self, order: &OrderRef, amount_cents: u64) -> Answer {
        let body =
            json!({"payment_ref": format!("pay-{}", order.id), "amount_cents": amount_cents})
                .to_string();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let response = self
            .client
            .post(format!("{}/v1/orders/{}/payment", self.base, order.id))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                "X-Keydrop-Signature",
                payment_signature(&self.payment_secret, now, body.as_bytes()),
            )
            .body(body)
            .send()
            .await;
        match response {
            Ok(response) if response.status().as_u16() == 200 => Answer::Paid,
            Ok(response) => refusal(response).await,
            Err(error) => transport(error),
        }
    }

    async fn cancel(&self, order: &OrderRef) -> Answer {
        let response = self
            .client
            .delete(format!("{}/v1/orders/{}", self.base, order.id))
            .send()
            .await;
        match response {
            Ok(response) if response.status().as_u16() == 200 => Answer::Cancelled,
            Ok(response) => refusal(response).await,
            Err(error) => transport(error),
        }
    }

    async fn state(&self, orders: &[OrderRef]) -> Result<TargetState> {
        let mut state = TargetState::default();
        let imported = self
            .imported
            .lock()
            .expect("no panic while holding the lock")
            .clone();
        for (index, name) in self.skus.get().into_iter().flatten().enumerate() {
            let response = self
                .client
                .get(format!("{}/v1/skus/{name}", self.base))
                .send()
                .await?;
            ensure!(
                response.status().is_success(),
                "reading SKU {name}: HTTP {}",
                response.status()
            );
            let body: SkuBody = response.json().await?;
            state.skus.insert(
                index,
                SkuCounts {
                    available: body.available,
                    reserved: body.reserved,
                    sold: body.sold,
                    imported: imported.get(&index).copied().unwrap_or(0),
                },
            );
        }
        let in_flight = Arc::new(Semaphore::new(AUDIT_LOOKUPS_IN_FLIGHT_MAX));
        let mut lookups = tokio::task::JoinSet::new();
        let this = Arc::new(self.shallow_clone());
        for order in orders {
            let permit = Arc::clone(&in_flight).acquire_owned().await?;
            let (this, id) = (Arc::clone(&this), order.id.clone());
            lookups.spawn(async move {
                let _permit = permit;
                let found = this.get_order(&id).await;
                (id, found)
            });
        }
        while let Some(done) = lookups.join_next().await {
            let (id, found) = done.context("an order look-up panicked")?;
            if let Some(order) = found? {
                state.orders.insert(id, order);
            }
        }
        Ok(state)
    }

    async fn breakdown(&self) -> Vec<(String, String)> {
        // A node whose metrics cannot be read leaves the breakdown out, not the run.
        scrape(&self.client, &self.base)
            .await
            .map(|metrics| journal_breakdown(&metrics))
            .unwrap_or_default()
    }
}

/// Sums the `_sum` and `_count` series of a Prometheus histogram or summary.
fn sum_and_count(metrics: &str, name: &str) -> Option<(f64, f64)> {
    let total = |suffix: &str| {
        let series = format!("{name}{suffix}");
        samples(metrics, &series)
            .map(|(_, value)| value)
            .reduce(|a, b| a + b)
    };
    Some((total("_sum")?, total("_count")?))
}

/// Journal figures from keydrop's `/metrics`: fsyncs, their mean latency, the
/// mean requests per batch.
pub fn journal_breakdown(metrics: &str) -> Vec<(String, String)> {
    let mut lines = Vec::new();
    if let Some((sum, count)) = sum_and_count(metrics, "keydrop_journal_fsync_seconds") {
        lines.push(("journal fsyncs".into(), format!("{count:.0}")));
        if count > 0.0 {
            lines.push((
                "journal fsync mean".into(),
                format!("{:.3} ms", sum / count * 1000.0),
            ));
        }
        lines.push(("journal fsync total".into(), format!("{sum:.3} s")));
    }
    if let Some((sum, count)) = sum_and_count(metrics, "keydrop_journal_batch_requests") {
        if count > 0.0 {
            lines.push((
                "journal requests per batch (mean)".into(),
                format!("{:.1}", sum / count),
            ));
        }
    }
    lines
}

impl HttpTarget {
    /// A handle on the same client and configuration, for look-up tasks.
    fn shallow_clone(&self) -> HttpTarget {
        HttpTarget {
            client: self.client.clone(),
            base: self.base.clone(),
            admin_token: self.admin_token.clone(),
            payment_secret: self.payment_secret.clone(),
            skus: self.skus.clone(),
            imported: Mutex::new(BTreeMap::new()),
        }
    }
}

/// A `keydrop serve` this harness started, on a temporary data folder; stopped
/// with SIGTERM (then SIGKILL) by its pid when closed or dropped.
pub struct KeydropNode {
    child: Option<tokio::process::Child>,
    pub url: String,
    pub admin_token: String,
    pub payment_secret: String,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

/// Finds the `keydrop` binary: the one given, else next to this executable (both
/// are built into the same target folder), else its parent (for test binaries in
/// `target/<profile>/deps`).
pub fn find_keydrop(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = given {
        ensure!(path.is_file(), "no keydrop binary at {}", path.display());
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    for _ in 0..2 {
        let Some(here) = dir else { break };
        let candidate = here.join("keydrop");
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = here.parent().map(Path::to_path_buf);
    }
    bail!(
        "no keydrop binary next to {}: build it (cargo build -p keydrop-node) or pass --keydrop-bin",
        exe.display()
    )
}

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl KeydropNode {
    /// Starts `bin serve` on 127.0.0.1 (a port the OS picks) with its data in a
    /// new temporary folder, and waits for `listening on http://<addr>`.
    /// `extra_env` adds settings (e.g. admission limits).
    pub async fn start(bin: &Path, extra_env: &[(String, String)]) -> Result<KeydropNode> {
        let dir = tempfile::tempdir().context("creating the node's data folder")?;
        let admin_token = random_token();
        let payment_secret = random_token();
        let log = dir.path().join("keydrop.log");
        let log_file = std::fs::File::create(&log).context("creating the node's log")?;
        let mut command = tokio::process::Command::new(bin);
        command
            .arg("serve")
            .current_dir(dir.path())
            .env("KEYDROP_HTTP_ADDR", "127.0.0.1:0")
            .env("KEYDROP_DATA_DIR", dir.path().join("data"))
            .env("KEYDROP_ADMIN_TOKEN", &admin_token)
            .env("KEYDROP_PAYMENT_SECRET", &payment_secret)
            // Every buyer comes from 127.0.0.1: a per-IP limit would throttle the crowd.
            .env("KEYDROP_RATE_PER_IP", "0")
            .envs(extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let found = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    return Ok::<_, std::io::Error>(Some(rest.trim().to_string()));
                }
            }
            Ok(None)
        })
        .await;
        let url = match found {
            Ok(Ok(Some(url))) => url,
            other => {
                let _ = child.kill().await;
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: String = tail.lines().rev().take(20).collect::<Vec<_>>().join("\n");
                bail!("keydrop did not print its address ({other:?}); last log lines (newest first):\n{tail}");
            }
        };
        loopback_url(&url)?;
        // Keep draining stdout so the node never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        // The node binds before it recovers: orders wait for /readyz.
        let client = reqwest::Client::new();
        let ready = tokio::time::timeout(START_TIMEOUT, async {
            loop {
                if let Ok(response) = client.get(format!("{url}/readyz")).send().await {
                    if response.status().is_success() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if ready.is_err() {
            let _ = child.kill().await;
            bail!("keydrop at {url} was not ready within {START_TIMEOUT:?}");
        }
        Ok(KeydropNode {
            child: Some(child),
            url,
            admin_token,
            payment_secret,
            log,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|child| child.id())
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`STOP_TIMEOUT`].
    pub async fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            let _ = tokio::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(status) => {
                let status = status?;
                ensure!(
                    status.success(),
                    "keydrop exited with {status} after SIGTERM"
                );
                Ok(())
            }
            Err(_) => {
                child.kill().await?;
                bail!("keydrop did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_urls_are_accepted() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://127.1.2.3/",
            "http://localhost:1",
            "http://[::1]:80",
        ] {
            assert!(loopback_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:8080",
            "http://example.com",
            "https://127.0.0.1",
            "http://0.0.0.0:80",
            "not a url",
        ] {
            assert!(loopback_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn journal_figures_are_read_from_prometheus_text() {
        let text = "# TYPE keydrop_journal_fsync_seconds summary\n\
            keydrop_journal_fsync_seconds{quantile=\"0.5\"} 0.001\n\
            keydrop_journal_fsync_seconds_sum 2.5\n\
            keydrop_journal_fsync_seconds_count 1000\n\
            keydrop_journal_batch_requests_sum{x=\"a\"} 30000\n\
            keydrop_journal_batch_requests_count{x=\"a\"} 1000\n\
            keydrop_journal_fsync_seconds_sumx 99\n";
        let lines = journal_breakdown(text);
        let get = |name: &str| {
            lines
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("journal fsyncs"), Some("1000"));
        assert_eq!(get("journal fsync mean"), Some("2.500 ms"));
        assert_eq!(get("journal requests per batch (mean)"), Some("30.0"));
        assert!(journal_breakdown("").is_empty());
    }

    #[test]
    fn payment_signature_matches_a_known_vector() {
        // printf '1700000000.{}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            payment_signature(b"secret", 1_700_000_000, b"{}"),
            "t=1700000000,v1=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
        assert_ne!(
            payment_signature(b"other", 1_700_000_000, b"{}"),
            payment_signature(b"secret", 1_700_000_000, b"{}")
        );
    }
}
