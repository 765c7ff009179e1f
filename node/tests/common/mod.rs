//! Test harness: starts the real `keydrop` binary on 127.0.0.1 with port 0 and a
//! temporary data dir, reads the bound port from its one stdout line, waits for
//! `/readyz`, and stops it with SIGTERM or SIGKILL. Also signs payment callbacks the
//! way a provider does. Every wait is bounded by a deadline.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::Sha256;

/// Generous bounds: a debug build on a busy 2-core machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Node {
    pub dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    child: Option<Child>,
    _stdout: Option<BufReader<ChildStdout>>,
    pub url: String,
    pub http: reqwest::Client,
    starts: usize,
    /// Arguments after `serve`, at every start.
    args: Vec<String>,
}

impl Node {
    /// Starts a node on a fresh data dir with extra `KEYDROP_*` settings.
    pub async fn start(env: &[(&str, &str)]) -> Node {
        Node::start_with_args(env, &[]).await
    }

    /// Starts a node like [`Node::start`], with `args` after `serve` (a `--config`,
    /// say), at this start and every later one.
    pub async fn start_with_args(env: &[(&str, &str)], args: &[&str]) -> Node {
        let mut node = Node {
            dir: tempfile::tempdir().expect("temp dir"),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            _stdout: None,
            url: String::new(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("HTTP client"),
            starts: 0,
            args: args.iter().map(|arg| arg.to_string()).collect(),
        };
        node.spawn().await;
        node
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The server's stderr so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Sets (or replaces) a `KEYDROP_*` setting for the next start.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(existing, _)| existing != name);
        self.env.push((name.to_string(), value.to_string()));
    }

    /// A command line for the binary with this node's environment (for CLI tests).
    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keydrop"));
        for (name, _) in std::env::vars() {
            if name.starts_with("KEYDROP_") {
                command.env_remove(name);
            }
        }
        command
            .env("KEYDROP_HTTP_ADDR", "127.0.0.1:0")
            .env("KEYDROP_DATA_DIR", self.data_dir())
            .env("KEYDROP_LOG", "info,keydrop=debug")
            .env("KEYDROP_SHUTDOWN_GRACE_SECS", "20")
            // Debug builds on a shared machine lag behind timers now and then, and
            // their orders can spend more than the 5 ms target inside; tests that
            // count exact outcomes must see neither gate's 503s, so lag shedding is
            // off and the order bound fixed at its ceiling. The gates themselves are
            // tested in admission.rs, lag.rs, order_slots.rs and tests/shedding.rs.
            .env("KEYDROP_SHED_LAG_MS", "0")
            .env("KEYDROP_ORDERS_IN_FLIGHT_TARGET_MS", "0");
        for (name, value) in &self.env {
            command.env(name, value);
        }
        command
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut child = self
            .command()
            .arg("serve")
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawning keydrop serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let read = reader.read_line(&mut line);
            let _ = tx.send((read.map(|_| line), reader));
        });
        let (line, reader) = match rx.recv_timeout(START_TIMEOUT) {
            Ok((Ok(line), reader)) => (line, reader),
            other => {
                let _ = child.kill();
                panic!(
                    "no `listening on` line ({:?}); log:\n{}",
                    other.map(|(line, _)| line),
                    self.log()
                )
            }
        };
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}; log:\n{}", self.log()))
            .to_owned();
        self.url = url;
        self.child = Some(child);
        self._stdout = Some(reader);
        self.wait_ready().await;
    }

    /// Polls `/readyz` until it answers 200. Every start checks the contract while
    /// the node recovers: `/readyz` is 503 `unavailable` with `Retry-After`, and
    /// `/healthz` answers 200 meanwhile.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(response) = self.http.get(self.at("/readyz")).send().await {
                let status = response.status();
                if status == StatusCode::OK {
                    return;
                }
                let retry_after = response.headers().get("retry-after").cloned();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                assert_error(
                    &(status, body.clone()),
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                );
                assert!(
                    retry_after.is_some(),
                    "/readyz {status} without Retry-After: {body}"
                );
                let (health, _) = self.get("/healthz").await;
                assert_eq!(health, StatusCode::OK, "/healthz while recovering");
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "keydrop exited with {status} while starting; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "not ready in time; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the node on the same data dir and starts it again.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            let status = self.sigterm();
            assert!(status.success(), "{status}; log:\n{}", self.log());
        }
        self.spawn().await;
    }

    /// Starts again after a stop or a kill.
    pub async fn start_again(&mut self) {
        self.spawn().await;
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM, then waits for the exit status.
    pub fn sigterm(&mut self) -> ExitStatus {
        self.signal("-TERM")
    }

    /// SIGINT (what Ctrl-C sends), then waits for the exit status.
    pub fn sigint(&mut self) -> ExitStatus {
        self.signal("-INT")
    }

    fn signal(&mut self, signal: &str) -> ExitStatus {
        self.send_signal(signal);
        self.wait_exit()
    }

    /// Sends `signal` ("-TERM", say) without waiting; [`Node::wait_exit`] waits.
    pub fn send_signal(&self, signal: &str) {
        let pid = self.pid().to_string();
        let sent = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("running kill");
        assert!(sent.success());
    }

    /// SIGKILL: the process gets no chance to flush or snapshot anything.
    pub fn sigkill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        self._stdout = None;
    }

    /// Waits for the process to exit, up to a deadline.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for keydrop") {
                self._stdout = None;
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("keydrop did not exit in time; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Where the node keeps the secrets it generates.
    pub fn secrets_dir(&self) -> PathBuf {
        self.data_dir().join("secrets")
    }

    fn secret_file(&self, name: &str) -> String {
        std::fs::read_to_string(self.secrets_dir().join(name))
            .expect("generated secret file")
            .trim()
            .to_owned()
    }

    pub fn admin_token(&self) -> String {
        self.secret_file("admin-token")
    }

    pub fn payment_secret(&self) -> String {
        self.secret_file("payment-secret")
    }

    /// `X-Keydrop-Signature` for `body`, signed now.
    pub fn sign(&self, body: &str) -> String {
        sign(self.payment_secret().as_bytes(), unix_now(), body)
    }

    // ---- requests ----

    /// Sends and returns the status and the JSON body (`Null` when not JSON).
    pub async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        self.send_with_headers(request).await.0
    }

    /// Like [`Node::send`], with the response's headers.
    pub async fn send_with_headers(
        &self,
        request: reqwest::RequestBuilder,
    ) -> ((StatusCode, Value), HeaderMap) {
        let response = request.send().await.expect("request sent");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("response body");
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        ((status, value), headers)
    }

    pub fn admin(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.at(path))
            .bearer_auth(self.admin_token())
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.get(self.at(path))).await
    }

    pub async fn put_sku(&self, sku: &str, def: Value) -> (StatusCode, Value) {
        self.send(
            self.admin(Method::PUT, &format!("/v1/skus/{sku}"))
                .json(&def),
        )
        .await
    }

    /// Creates an on-sale SKU and imports `cards` (serial, secret) pairs.
    pub async fn sku_with_cards(&self, sku: &str, def: Value, cards: &[(String, String)]) {
        let (status, body) = self.put_sku(sku, def).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, body) = self.import(sku, cards).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["imported"], cards.len() as u64);
    }

    pub async fn import(&self, sku: &str, cards: &[(String, String)]) -> (StatusCode, Value) {
        let cards: Vec<Value> = cards
            .iter()
            .map(|(serial, secret)| json!({"serial": serial, "secret": secret}))
            .collect();
        self.send(
            self.admin(Method::POST, &format!("/v1/skus/{sku}/cards"))
                .json(&json!({ "cards": cards })),
        )
        .await
    }

    /// A SKU's (available, reserved, sold), as `GET /v1/skus/{sku}` shows them.
    pub async fn stock(&self, sku: &str) -> (u64, u64, u64) {
        let (status, view) = self.get(&format!("/v1/skus/{sku}")).await;
        assert_eq!(status, StatusCode::OK, "{view}");
        let count = |field: &str| view[field].as_u64().unwrap_or_else(|| panic!("{view}"));
        (count("available"), count("reserved"), count("sold"))
    }

    pub async fn reserve(&self, sku: &str, user: &str) -> (StatusCode, Value) {
        self.reserve_with_headers(sku, user).await.0
    }

    /// An order for `sku` by `user`, with the answer's headers.
    pub async fn reserve_with_headers(
        &self,
        sku: &str,
        user: &str,
    ) -> ((StatusCode, Value), HeaderMap) {
        self.send_with_headers(
            self.http
                .post(self.at(&format!("/v1/skus/{sku}/orders")))
                .json(&json!({ "user_id": user })),
        )
        .await
    }

    pub async fn pay(&self, order_id: &str, payment_ref: &str, amount: u64) -> (StatusCode, Value) {
        let body = json!({"payment_ref": payment_ref, "amount_cents": amount}).to_string();
        self.send(
            self.http
                .post(self.at(&format!("/v1/orders/{order_id}/payment")))
                .header("content-type", "application/json")
                .header("x-keydrop-signature", self.sign(&body))
                .body(body),
        )
        .await
    }

    /// The `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.at("/metrics"))
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("metrics text")
    }

    /// The value of one sample in the `/metrics` text (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// What a payment provider sends: `t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub fn sign(secret: &[u8], t: i64, body: impl AsRef<[u8]>) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body.as_ref());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// A SKU definition on sale now.
pub fn on_sale(price_cents: u64, per_user_limit: u32, ttl_secs: u64) -> Value {
    json!({
        "name": "Test card",
        "price_cents": price_cents,
        "per_user_limit": per_user_limit,
        "reservation_ttl_secs": ttl_secs,
    })
}

/// `n` cards with predictable serials and secrets.
pub fn cards(prefix: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("{prefix}-{i:06}"),
                format!("secret-{prefix}-{i:06}-x"),
            )
        })
        .collect()
}

/// Polls `check` until it returns `Some`, or panics at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The checkout the tests run in. `cargo test` names the package's folder at run
/// time; the compile-time path is only a fallback, since a shared target dir can hold
/// a test binary built from another checkout of the same tree.
pub fn repo_root() -> &'static Path {
    static ROOT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let package = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
            || env!("CARGO_MANIFEST_DIR").into(),
            std::path::PathBuf::from,
        );
        package.join("..")
    })
}

/// An answer is the contract's error: this status, this code, and a message.
pub fn assert_error(answer: &(StatusCode, Value), status: StatusCode, code: &str) {
    let (got_status, body) = answer;
    assert_eq!(
        (*got_status, body["error"].as_str()),
        (status, Some(code)),
        "{body}"
    );
    assert!(body["message"].is_string(), "{body}");
    assert_eq!(body.as_object().map(|o| o.len()), Some(2), "{body}");
}

/// The `Retry-After` of an answer, in whole seconds, or a panic naming the body.
pub fn retry_after_secs(answer: &((StatusCode, Value), HeaderMap)) -> u64 {
    let ((status, body), headers) = answer;
    headers
        .get("retry-after")
        .unwrap_or_else(|| panic!("{status} without Retry-After: {body}"))
        .to_str()
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After not in whole seconds: {headers:?}"))
}
