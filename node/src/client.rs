//! The operator commands (`keydrop sku put|import|show`, `keydrop order show|late`):
//! HTTP calls to a running node's API, printed for people or, with `--json`, as the
//! node's JSON answer on stdout for scripts. Errors go to stderr with a non-zero exit.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{Method, Url};
use serde_json::{json, Value};

use crate::api::skus::CSV_LINE_BYTES_MAX;
use crate::cli::{OrderCommand, Remote, SkuCommand};
use crate::secrets::ADMIN_TOKEN_FILE;

/// Per-request timeout; a chunk of 10,000 cards imports in well under a second.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// A node that does not take the connection in this long is not there: an address
/// that drops packets fails here, not after the whole request timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of one import request at most, well under the node's 64 MiB: a chunk ends
/// at `--chunk-lines` lines or this, whichever comes first.
const IMPORT_CHUNK_BYTES_MAX: usize = 8 << 20;
/// Tries of one import chunk that the node refuses for now (429, 503); it is sent
/// again after the node's `Retry-After`. A chunk sent again is safe: cards already
/// in are counted as duplicates, not added.
const IMPORT_CHUNK_TRIES: u32 = 5;
/// The longest wait between tries, whatever `Retry-After` says.
const IMPORT_RETRY_WAIT_MAX: Duration = Duration::from_secs(30);

pub fn run_sku(command: SkuCommand) -> Result<()> {
    runtime()?.block_on(sku(command))
}

pub fn run_order(command: OrderCommand) -> Result<()> {
    runtime()?.block_on(order(command))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

struct Node {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
    json: bool,
}

impl Node {
    fn new(remote: &Remote, needs_token: bool) -> Result<Node> {
        let base = Url::parse(&remote.url).with_context(|| format!("--url {:?}", remote.url))?;
        let token = match &remote.token {
            Some(token) => Some(token.trim().to_owned()),
            None if needs_token => {
                let path = remote.data_dir.join("secrets").join(ADMIN_TOKEN_FILE);
                let token = std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "no admin token: pass --token or KEYDROP_ADMIN_TOKEN (reading {} failed)",
                        path.display()
                    )
                })?;
                Some(token.trim().to_owned())
            }
            None => None,
        };
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        Ok(Node {
            http,
            base,
            token,
            json: remote.json,
        })
    }

    fn url(&self, segments: &[&str]) -> Result<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| anyhow!("--url {} cannot take a path", self.base))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends, and returns the JSON answer of a 2xx; anything else is an error that
    /// names the node's error code and message.
    async fn call(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        let response = request.send().await.context("calling the node")?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response
            .bytes()
            .await
            .context("reading the node's answer")?;
        let parsed = serde_json::from_slice::<Value>(&body);
        if status.is_success() {
            // A proxy or another service at --url can answer 200 too: only the
            // node's JSON counts as done.
            return parsed.map_err(|_| {
                anyhow!(
                    "the answer ({status}) is not JSON: is {} a keydrop node? It began: {:?}",
                    self.base,
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                )
            });
        }
        let value = parsed.unwrap_or_else(
            |_| json!({"error": "unexpected", "message": String::from_utf8_lossy(&body)}),
        );
        let code = value["error"].as_str().unwrap_or("unknown");
        let message = value["message"].as_str().unwrap_or("");
        Err(ServerError {
            status: status.as_u16(),
            code: code.to_owned(),
            message: message.to_owned(),
            retry_after,
        }
        .into())
    }

    fn print(&self, value: &Value, human: impl FnOnce(&Value)) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).expect("a JSON value always serialises")
            );
        } else {
            human(value);
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the node answered {status} {code}: {message}")]
struct ServerError {
    status: u16,
    code: String,
    message: String,
    retry_after: Option<Duration>,
}

impl ServerError {
    /// Refused for now (throttled or overloaded): the same request may pass later.
    fn is_for_now(&self) -> bool {
        matches!(self.status, 429 | 503)
    }
}

async fn sku(command: SkuCommand) -> Result<()> {
    match command {
        SkuCommand::Put {
            remote,
            sku,
            name,
            price_cents,
            per_user_limit,
            per_device_limit,
            reservation_ttl_secs,
            starts_at,
            ends_at,
            low_stock_threshold,
        } => {
            let node = Node::new(&remote, true)?;
            let mut body = json!({
                "name": name,
                "price_cents": price_cents,
                "per_user_limit": per_user_limit,
                "reservation_ttl_secs": reservation_ttl_secs,
            });
            let optional = [
                ("per_device_limit", per_device_limit.map(Value::from)),
                ("starts_at", starts_at.map(Value::from)),
                ("ends_at", ends_at.map(Value::from)),
                ("low_stock_threshold", low_stock_threshold.map(Value::from)),
            ];
            for (field, value) in optional {
                if let Some(value) = value {
                    body[field] = value;
                }
            }
            let url = node.url(&["v1", "skus", &sku])?;
            let view = node
                .call(node.request(Method::PUT, url).json(&body))
                .await?;
            node.print(&view, print_sku);
        }
        SkuCommand::Show { remote, sku } => {
            let node = Node::new(&remote, true)?;
            let url = node.url(&["v1", "admin", "skus", &sku])?;
            let view = node.call(node.request(Method::GET, url)).await?;
            node.print(&view, print_sku);
        }
        SkuCommand::Import {
            remote,
            sku,
            file,
            chunk_lines,
        } => {
            let node = Node::new(&remote, true)?;
            let summary = import(&node, &sku, &file, chunk_lines.max(1)).await?;
            node.print(&summary, |s| {
                println!(
                    "imported {} cards ({} duplicates skipped) from {} lines",
                    s["imported"], s["duplicates"], s["lines"]
                );
            });
        }
    }
    Ok(())
}

/// Sends the file in chunks of whole lines, so neither side ever holds all of it.
async fn import(node: &Node, sku: &str, path: &Path, chunk_lines: usize) -> Result<Value> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = BufReader::new(file);
    let url = node.url(&["v1", "skus", sku, "cards"])?;
    let progress = ProgressBar::new(size).with_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("the progress template is valid"),
    );
    let (mut imported, mut duplicates, mut lines) = (0u64, 0u64, 0u64);
    // What has been imported when an error stops the import, for the operator who
    // sends the rest.
    let so_far = |imported: u64, duplicates: u64, first_line: u64| {
        format!(
            "{imported} cards imported and {duplicates} duplicates skipped before line {first_line}"
        )
    };
    loop {
        let mut chunk: Vec<u8> = Vec::new();
        let first_line = lines + 1;
        let mut chunk_count = 0usize;
        while chunk_count < chunk_lines && chunk.len() < IMPORT_CHUNK_BYTES_MAX {
            // Read no further than a line the node would take, plus its line break:
            // a file with no line breaks must not be read into memory whole.
            let read = (&mut reader)
                .take(CSV_LINE_BYTES_MAX as u64 + 2)
                .read_until(b'\n', &mut chunk)
                .with_context(|| format!("reading {}", path.display()))?;
            if read == 0 {
                break;
            }
            if read == CSV_LINE_BYTES_MAX + 2 && !chunk.ends_with(b"\n") {
                bail!(
                    "line {}: longer than {CSV_LINE_BYTES_MAX} bytes, the most the node takes; {}",
                    lines + chunk_count as u64 + 1,
                    so_far(imported, duplicates, first_line)
                );
            }
            chunk_count += 1;
            if !chunk.ends_with(b"\n") {
                chunk.push(b'\n');
            }
        }
        if chunk_count == 0 {
            break;
        }
        lines += chunk_count as u64;
        let chunk = axum::body::Bytes::from(chunk);
        let mut tries = 0;
        let answer = loop {
            tries += 1;
            let request = node
                .request(Method::POST, url.clone())
                .header(reqwest::header::CONTENT_TYPE, "text/csv")
                .body(chunk.clone());
            match node.call(request).await {
                Ok(answer) => break answer,
                Err(error) => {
                    let wait = error
                        .downcast_ref::<ServerError>()
                        .filter(|server| server.is_for_now() && tries < IMPORT_CHUNK_TRIES)
                        .map(|server| {
                            server
                                .retry_after
                                .unwrap_or(Duration::from_secs(1))
                                .min(IMPORT_RETRY_WAIT_MAX)
                        });
                    let Some(wait) = wait else {
                        // One line, the node's reason first: what went in after it.
                        return Err(anyhow!(
                            "{:#}; {}",
                            at_file_line(error, first_line),
                            so_far(imported, duplicates, first_line)
                        ));
                    };
                    progress.println(format!(
                        "{error}; sending the chunk from line {first_line} again in {} s",
                        wait.as_secs()
                    ));
                    tokio::time::sleep(wait).await;
                }
            }
        };
        let count = |field: &str| {
            answer[field]
                .as_u64()
                .ok_or_else(|| anyhow!("the node's answer has no `{field}` count: {answer}"))
        };
        imported += count("imported")?;
        duplicates += count("duplicates")?;
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    Ok(json!({"imported": imported, "duplicates": duplicates, "lines": lines}))
}

/// The node numbers lines within one chunk; say where that is in the file.
fn at_file_line(error: anyhow::Error, first_line: u64) -> anyhow::Error {
    if let Some(server) = error.downcast_ref::<ServerError>() {
        let parsed = server
            .message
            .strip_prefix("line ")
            .and_then(|rest| rest.split_once(':'))
            .and_then(|(n, rest)| Some((n.parse::<u64>().ok()?, rest)));
        if let Some((n, rest)) = parsed {
            return anyhow!(
                "line {}:{rest} (the node answered {} {}; lines before {} were imported)",
                first_line + n - 1,
                server.status,
                server.code,
                first_line
            );
        }
    }
    error.context(format!("importing the chunk starting at line {first_line}"))
}

fn print_sku(view: &Value) {
    let text = |field: &str| match &view[field] {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    println!("{} ({}): {}", text("sku"), text("name"), text("status"));
    println!(
        "  price {} cents, per user {}, per device {}, reservation {} s",
        text("price_cents"),
        text("per_user_limit"),
        text("per_device_limit"),
        text("reservation_ttl_secs")
    );
    println!("  sale {} .. {}", text("starts_at"), text("ends_at"));
    println!(
        "  available {}, reserved {}, sold {}, imported {}, low-stock threshold {}",
        text("available"),
        text("reserved"),
        text("sold"),
        text("imported"),
        text("low_stock_threshold")
    );
}

async fn order(command: OrderCommand) -> Result<()> {
    match command {
        OrderCommand::Show { remote, order_id } => {
            let node = Node::new(&remote, false)?;
            let url = node.url(&["v1", "orders", &order_id])?;
            let order = node.call(node.request(Method::GET, url)).await?;
            node.print(&order, |o| {
                println!(
                    "{} sku {}: {} (reservation expires {})",
                    o["order_id"].as_str().unwrap_or("?"),
                    o["sku"].as_str().unwrap_or("?"),
                    o["status"].as_str().unwrap_or("?"),
                    o["expires_at"].as_str().unwrap_or("?")
                );
                if let Some(serial) = o["card"]["serial"].as_str() {
                    println!("  card {serial} (secret not shown; use --json to see it)");
                }
            });
        }
        OrderCommand::Late { remote, sku } => {
            let node = Node::new(&remote, true)?;
            let mut url = node.url(&["v1", "admin", "refunds"])?;
            if let Some(sku) = &sku {
                url.query_pairs_mut().append_pair("sku", sku);
            }
            let answer = node.call(node.request(Method::GET, url)).await?;
            node.print(&answer, |a| {
                let refunds = a["refunds"].as_array().cloned().unwrap_or_default();
                if refunds.is_empty() {
                    println!("no refused payments");
                    return;
                }
                println!("{} refused payment(s) to refund:", refunds.len());
                for r in refunds {
                    println!(
                        "  {} order {} sku {} user {}: {} cents, ref {}, {}",
                        r["refused_at"].as_str().unwrap_or("?"),
                        r["order_id"].as_str().unwrap_or("?"),
                        r["sku"].as_str().unwrap_or("?"),
                        r["user_id"].as_str().unwrap_or("?"),
                        r["amount_cents"],
                        r["payment_ref"].as_str().unwrap_or("?"),
                        r["reason"].as_str().unwrap_or("?")
                    );
                }
            });
        }
    }
    Ok(())
}
