//! `keydrop-load orders`: order requests at a fixed rate over plain HTTP/1.1
//! keep-alive connections, for the latency of the order route at a given load.
//!
//! It is the open-loop counterpart of `wrk -s bench/wrk-orders.lua`: the same request
//! (one order, a new buyer each time), but each is due at its own time on a fixed
//! schedule and timed from then, not from when it left. A stall therefore counts
//! against every order that should have gone out during it (no coordinated
//! omission), and so does the generator's own lateness: its timers have a
//! resolution of 1 ms, which the figures include.
//!
//! The drop's HTTP client (reqwest, JSON answers, the audit's bookkeeping) costs
//! several times the CPU of a request written and read here, which matters when the
//! generator shares two cores with the node it measures.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::node_metrics::{scrape, NodeWindow};
use crate::stats::{format_us, new_histogram, write_json, Percentiles};
use crate::target::http::loopback_url;

/// Longest run; the schedule is bounded in time as well as in count.
const SECS_MAX: f64 = 600.0;
/// Most headers an answer may carry.
const HEADERS_MAX: usize = 32;
/// Largest answer head, and largest body, read before giving up on a connection.
const HEAD_BYTES_MAX: usize = 16 * 1024;
const BODY_BYTES_MAX: usize = 1024 * 1024;
/// How long one answer may take before the connection is dropped and redialled.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args, Debug, Clone)]
pub struct OrdersArgs {
    /// The API v1 base URL (loopback).
    #[arg(long)]
    pub url: String,
    /// The SKU whose orders are posted; stock it with more cards than `rate × secs`.
    #[arg(long, default_value = "wrk-0")]
    pub sku: String,
    /// Orders per second, spread evenly over the run.
    #[arg(long)]
    pub rate: f64,
    /// Length of the run.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Seconds of orders at the same rate, over the same connections, sent before
    /// the measured run and left out of every figure: a node's first moments on
    /// thousands of new connections (accepting them, growing buffers) are not what
    /// the run measures.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_secs: f64,
    /// Keep-alive connections, each with at most one order in flight: the most
    /// orders outstanding at once. When all are busy, due orders wait (and their
    /// wait is counted).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Buyer ids are `<user-prefix><connection>-<n>`: a prefix no other run used
    /// keeps per-user limits from refusing them.
    #[arg(long, default_value = "open")]
    pub user_prefix: String,
    /// Also write the result as JSON here.
    #[arg(long)]
    pub json: Option<String>,
    /// The target is a keydrop node: read its `/metrics` before the warm-up and after
    /// the last answer, and report what its journal and overload gate did in between
    /// (fsyncs over 10 and 50 ms, answers that waited for a worker, orders shed).
    #[arg(long)]
    pub node_metrics: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrdersReport {
    pub command: String,
    pub url: String,
    pub offered_per_sec: f64,
    pub secs: f64,
    pub connections: usize,
    /// Orders sent in the warm-up, not counted below.
    pub warmup_orders: u64,
    pub sent: u64,
    pub created: u64,
    /// Answers other than 201, by status code.
    pub other_statuses: Vec<(u16, u64)>,
    /// Orders that got no answer (connection error or timeout).
    pub failed: u64,
    pub answered_per_sec: f64,
    /// Latency of the 201 answers, from each order's due time.
    pub created_latency: Percentiles,
    /// The same answers timed from when each order was written to its connection:
    /// the node's part alone, without the wait for a free connection that a crowd
    /// of buyers, each on a connection of their own, would not have.
    pub created_from_send: Percentiles,
    /// 503 answers timed from send: shedding is only worth it when it is quick.
    pub overloaded_from_send: Percentiles,
    /// How late orders left for reasons of the generator's own: from the moment an
    /// order could go (its due time, or the answer before it on its connection if
    /// that came later) to when it went. Timer resolution and a generator starved of
    /// CPU show here, not a slow server; when this is near the latency, the figure
    /// measures the generator.
    pub send_lag: Percentiles,
    /// When the measured schedule started, in milliseconds since the Unix epoch, to line a
    /// slow second up with the node's logs and metrics.
    pub started_at_unix_ms: u64,
    /// The schedule second by second (orders by due time): a stall shows as the
    /// seconds it spans, which one overall percentile cannot tell apart from a
    /// tail spread over the whole run.
    pub timeline: Vec<ScheduleSecond>,
    /// With `--node-metrics`: the node's own account of the run, warm-up included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeWindow>,
}

/// The orders due in one second of the schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleSecond {
    /// Seconds from the start of the schedule.
    pub second: u64,
    pub due: u64,
    pub created: u64,
    /// The slowest 201 among them, from due time.
    pub slowest_created_us: u64,
}

impl ScheduleSecond {
    fn merge(&mut self, other: &ScheduleSecond) {
        debug_assert_eq!(self.second, other.second);
        self.due += other.due;
        self.created += other.created;
        self.slowest_created_us = self.slowest_created_us.max(other.slowest_created_us);
    }
}

/// How many of the slowest seconds are printed.
const SLOWEST_SECONDS_SHOWN: usize = 3;

pub fn main(args: OrdersArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = runtime.block_on(run(&args))?;
    print(&report);
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    ensure!(report.sent > 0, "no order was sent");
    Ok(())
}

fn print(report: &OrdersReport) {
    let latency = &report.created_latency;
    println!(
        "orders at {:.0}/s for {} s over {} connections (after {} warm-up orders): {} sent, {} created (201), {} failed, other answers {:?}; {:.0} answered/s",
        report.offered_per_sec,
        report.secs,
        report.connections,
        report.warmup_orders,
        report.sent,
        report.created,
        report.failed,
        report.other_statuses,
        report.answered_per_sec,
    );
    println!(
        "201 latency from due time: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        format_us(latency.p50_us),
        format_us(latency.p90_us),
        format_us(latency.p99_us),
        format_us(latency.p999_us),
        format_us(latency.max_us),
    );
    let from_send = &report.created_from_send;
    println!(
        "201 latency from send: p50 {}  p99 {}  max {}; 503 from send: p99 {}",
        format_us(from_send.p50_us),
        format_us(from_send.p99_us),
        format_us(from_send.max_us),
        format_us(report.overloaded_from_send.p99_us),
    );
    let lag = &report.send_lag;
    println!(
        "generator's own lag before sending: p50 {}  p99 {}  max {}",
        format_us(lag.p50_us),
        format_us(lag.p99_us),
        format_us(lag.max_us),
    );
    let mut slowest: Vec<&ScheduleSecond> = report
        .timeline
        .iter()
        .filter(|second| second.created > 0)
        .collect();
    slowest.sort_by_key(|second| std::cmp::Reverse(second.slowest_created_us));
    let shown: Vec<String> = slowest
        .iter()
        .take(SLOWEST_SECONDS_SHOWN)
        .map(|second| {
            format!(
                "+{} s: max {} ({} of {} due created)",
                second.second,
                format_us(second.slowest_created_us),
                second.created,
                second.due
            )
        })
        .collect();
    if !shown.is_empty() {
        println!(
            "slowest seconds of the schedule (started at {} ms since the epoch): {}",
            report.started_at_unix_ms,
            shown.join("; ")
        );
    }
    if let Some(node) = &report.node {
        println!("the node, warm-up included: {}", node.summary());
    }
}

/// What one connection saw. Latencies are kept as plain microsecond samples and
/// go into the run's histograms once every connection is done: four histograms
/// per connection (139 KiB each at three digits up to 60 s) would be zeroed as the
/// schedule starts, 285 MiB for 512 connections, holding back the first 0.7 s of
/// orders on a 2-core machine and then sending them in one burst.
struct ConnectionTally {
    sent: u64,
    created: Vec<u32>,
    created_from_send: Vec<u32>,
    overloaded_from_send: Vec<u32>,
    send_lag: Vec<u32>,
    other_statuses: Vec<(u16, u64)>,
    failed: u64,
    timeline: Vec<ScheduleSecond>,
}

/// Microseconds since `from`, at least 1 (a histogram's lowest value).
fn micros_since(from: Instant) -> u32 {
    u32::try_from(from.elapsed().as_micros())
        .unwrap_or(u32::MAX)
        .max(1)
}

/// Adds microsecond samples to a histogram, clamping any past its highest value.
fn record_all(histogram: &mut Histogram<u64>, samples: &[u32]) {
    for &sample in samples {
        histogram.saturating_record(u64::from(sample));
    }
}

pub async fn run(args: &OrdersArgs) -> Result<OrdersReport> {
    ensure!(
        args.rate.is_finite() && args.rate > 0.0,
        "--rate must be above 0"
    );
    ensure!(
        args.secs > 0.0 && args.secs <= SECS_MAX,
        "--secs must be in (0, {SECS_MAX}]"
    );
    ensure!(
        args.warmup_secs >= 0.0 && args.warmup_secs + args.secs <= SECS_MAX,
        "--warmup-secs must be at least 0, and with --secs at most {SECS_MAX}"
    );
    ensure!(args.connections > 0, "--connections must be at least 1");
    let url = loopback_url(&args.url)?;
    let address: SocketAddr = url
        .socket_addrs(|| None)
        .context("resolving the URL")?
        .into_iter()
        .next()
        .context("the URL names no address")?;
    let host = url.authority().to_owned();
    let warmup = (args.rate * args.warmup_secs).round() as u64;
    let total = warmup + (args.rate * args.secs).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let head = format!(
        "POST /v1/skus/{}/orders HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: ",
        args.sku
    );
    // Read before the connections open and after the last answer, so that the reading
    // (the node renders every series) costs nothing inside the schedule.
    let node_before = if args.node_metrics {
        let client = reqwest::Client::new();
        let before = scrape(&client, &args.url).await?;
        Some((client, before))
    } else {
        None
    };
    // Every connection is open before the clock starts, so dialling is not timed.
    let mut streams = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        streams.push(dial(address).await?);
    }
    let (now, wall_now) = (Instant::now(), std::time::SystemTime::now());
    // Connection `index` sends orders `index`, `index + connections`, …
    let whole = Schedule {
        start: now + Duration::from_millis(20),
        interval,
        first: 0,
        step: args.connections as u64,
        total,
        warmup,
    };
    let measured_start = whole.measured_start();
    let started_at_unix_ms = (wall_now + (measured_start - now))
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_millis() as u64;
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(index, stream)| {
            let schedule = Schedule {
                first: index as u64,
                ..whole
            };
            let head = head.clone();
            let user = format!("{}{index}-", args.user_prefix);
            tokio::spawn(drive_connection(address, stream, schedule, head, user))
        })
        .collect();
    let mut created = new_histogram();
    let mut created_from_send = new_histogram();
    let mut overloaded_from_send = new_histogram();
    let mut send_lag = new_histogram();
    let mut other: std::collections::BTreeMap<u16, u64> = std::collections::BTreeMap::new();
    let (mut sent, mut failed) = (0, 0);
    let mut timeline = whole.seconds();
    for task in tasks {
        let tally = task.await.context("a connection task panicked")?;
        for (merged, second) in timeline.iter_mut().zip(&tally.timeline) {
            merged.merge(second);
        }
        sent += tally.sent;
        failed += tally.failed;
        record_all(&mut created, &tally.created);
        record_all(&mut created_from_send, &tally.created_from_send);
        record_all(&mut overloaded_from_send, &tally.overloaded_from_send);
        record_all(&mut send_lag, &tally.send_lag);
        for (status, count) in tally.other_statuses {
            *other.entry(status).or_default() += count;
        }
    }
    let elapsed = measured_start.elapsed().as_secs_f64().max(args.secs);
    let node = match node_before {
        Some((client, before)) => Some(NodeWindow::between(
            &before,
            &scrape(&client, &args.url).await?,
        )),
        None => None,
    };
    let answered = created.len() + other.values().sum::<u64>();
    Ok(OrdersReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        url: args.url.clone(),
        offered_per_sec: args.rate,
        secs: args.secs,
        connections: args.connections,
        warmup_orders: warmup,
        sent,
        created: created.len(),
        other_statuses: other.into_iter().collect(),
        failed,
        answered_per_sec: answered as f64 / elapsed,
        created_latency: Percentiles::of(&created),
        created_from_send: Percentiles::of(&created_from_send),
        overloaded_from_send: Percentiles::of(&overloaded_from_send),
        send_lag: Percentiles::of(&send_lag),
        started_at_unix_ms,
        timeline,
        node,
    })
}

/// The orders one connection sends: `first`, `first + step`, … below `total`, order
/// `n` due at `start + n × interval`; those below `warmup` are not measured.
#[derive(Clone, Copy)]
struct Schedule {
    start: Instant,
    interval: Duration,
    first: u64,
    step: u64,
    total: u64,
    warmup: u64,
}

impl Schedule {
    /// When the first measured order is due.
    fn measured_start(self) -> Instant {
        self.start + self.interval.mul_f64(self.warmup as f64)
    }

    /// Which second of the measured schedule an order due then falls in.
    fn second_of(self, due: Instant) -> usize {
        (due - self.measured_start()).as_secs() as usize
    }

    /// One empty tally per second the measured schedule spans.
    fn seconds(self) -> Vec<ScheduleSecond> {
        let measured = self.total.saturating_sub(self.warmup);
        let span = self.interval.mul_f64(measured.saturating_sub(1) as f64);
        (0..=span.as_secs())
            .map(|second| ScheduleSecond {
                second,
                ..ScheduleSecond::default()
            })
            .collect()
    }

    /// How many of this connection's orders are measured (not warm-up).
    fn measured_orders(self) -> usize {
        let first_measured = if self.warmup <= self.first {
            self.first
        } else {
            // The first n ≥ warmup with n ≡ first (mod step).
            self.first + (self.warmup - self.first).div_ceil(self.step) * self.step
        };
        self.total
            .saturating_sub(first_measured)
            .div_ceil(self.step) as usize
    }

    fn due_times(self) -> impl Iterator<Item = (u64, Instant)> {
        (self.first..self.total)
            .step_by(self.step as usize)
            .map(move |n| (n, self.start + self.interval.mul_f64(n as f64)))
    }
}

async fn dial(address: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn drive_connection(
    address: SocketAddr,
    stream: TcpStream,
    schedule: Schedule,
    head: String,
    user: String,
) -> ConnectionTally {
    let measured_orders = schedule.measured_orders();
    let mut tally = ConnectionTally {
        sent: 0,
        created: Vec::with_capacity(measured_orders),
        created_from_send: Vec::with_capacity(measured_orders),
        overloaded_from_send: Vec::new(),
        send_lag: Vec::with_capacity(measured_orders),
        other_statuses: Vec::new(),
        failed: 0,
        timeline: schedule.seconds(),
    };
    let mut stream = Some(stream);
    let mut request = Vec::with_capacity(head.len() + 128);
    let mut buffer = Vec::with_capacity(1024);
    let mut previous_answer = schedule.start;
    for (n, due) in schedule.due_times() {
        tokio::time::sleep_until(due.into()).await;
        let could_go = due.max(previous_answer);
        request.clear();
        let body = format!(r#"{{"user_id":"{user}{n}"}}"#);
        request.extend_from_slice(head.as_bytes());
        request.extend_from_slice(format!("{}\r\n\r\n{body}", body.len()).as_bytes());
        let measured = n >= schedule.warmup;
        if measured {
            tally.sent += 1;
            tally.send_lag.push(micros_since(could_go));
        }
        let sent_at = Instant::now();
        let connection = match stream.take() {
            Some(connection) => Ok(connection),
            None => dial(address).await,
        };
        let answer = match connection {
            Ok(mut connection) => {
                let answer = tokio::time::timeout(
                    ANSWER_TIMEOUT,
                    exchange(&mut connection, &request, &mut buffer),
                )
                .await
                .unwrap_or_else(|_| bail!("no answer within {ANSWER_TIMEOUT:?}"));
                if answer.is_ok() {
                    stream = Some(connection);
                }
                answer
            }
            Err(error) => Err(error),
        };
        previous_answer = Instant::now();
        if !measured {
            continue;
        }
        // The span and each due time are rounded separately; the last order may
        // land a hair past the last second.
        let last = tally.timeline.len() - 1;
        let second = &mut tally.timeline[schedule.second_of(due).min(last)];
        second.due += 1;
        match answer {
            Ok(201) => {
                let waited = micros_since(due);
                tally.created.push(waited);
                tally.created_from_send.push(micros_since(sent_at));
                second.created += 1;
                second.slowest_created_us = second.slowest_created_us.max(u64::from(waited));
            }
            Ok(status) => {
                if status == 503 {
                    tally.overloaded_from_send.push(micros_since(sent_at));
                }
                match tally.other_statuses.iter_mut().find(|(s, _)| *s == status) {
                    Some((_, count)) => *count += 1,
                    None => tally.other_statuses.push((status, 1)),
                }
            }
            Err(error) => {
                tracing::debug!(%error, "order failed; redialling");
                tally.failed += 1;
            }
        }
    }
    tally
}

/// Writes one request and reads its answer; returns the status code.
async fn exchange(stream: &mut TcpStream, request: &[u8], buffer: &mut Vec<u8>) -> Result<u16> {
    stream.write_all(request).await?;
    buffer.clear();
    let (status, head_len, body_len) = loop {
        if let Some(parsed) = parse_head(buffer)? {
            break parsed;
        }
        ensure!(
            buffer.len() < HEAD_BYTES_MAX,
            "answer head over {HEAD_BYTES_MAX} bytes"
        );
        read_more(stream, buffer).await?;
    };
    ensure!(
        body_len <= BODY_BYTES_MAX,
        "answer body of {body_len} bytes"
    );
    while buffer.len() < head_len + body_len {
        read_more(stream, buffer).await?;
    }
    ensure!(
        buffer.len() == head_len + body_len,
        "bytes past the answer: the server sent what was not asked for"
    );
    Ok(status)
}

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0u8; 4096];
    let read = stream.read(&mut chunk).await?;
    if read == 0 {
        bail!("connection closed by the server");
    }
    buffer.extend_from_slice(&chunk[..read]);
    Ok(())
}

/// `(status, head length, body length)` once the head is complete.
fn parse_head(bytes: &[u8]) -> Result<Option<(u16, usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head_len) = response.parse(bytes)? else {
        return Ok(None);
    };
    let status = response.code.context("answer without a status code")?;
    let mut body_len = None;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("chunked answers are not read here");
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(header.value).context("Content-Length")?;
            body_len = Some(text.trim().parse::<usize>().context("Content-Length")?);
        }
    }
    let body_len = body_len.context("answer without Content-Length")?;
    Ok(Some((status, head_len, body_len)))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use axum::http::StatusCode;
    use axum::routing::post;
    use axum::Router;

    use super::*;

    #[test]
    fn schedules_interleave_and_cover_every_order_once() {
        let start = Instant::now();
        let total = 10;
        let mut seen: Vec<u64> = (0..3)
            .flat_map(|first| {
                Schedule {
                    start,
                    interval: Duration::from_millis(2),
                    first,
                    step: 3,
                    total,
                    warmup: 0,
                }
                .due_times()
                .map(move |(n, due)| {
                    assert_eq!(due - start, Duration::from_millis(2 * n));
                    n
                })
            })
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..total).collect::<Vec<_>>());
    }

    #[test]
    fn each_connection_knows_how_many_of_its_orders_are_measured() {
        let start = Instant::now();
        for total in [0, 1, 7, 10, 31] {
            for warmup in [0, 1, 3, 9, 10, 40] {
                for step in [1, 3, 4, 64] {
                    for first in 0..step.min(total.max(1)) {
                        let schedule = Schedule {
                            start,
                            interval: Duration::from_millis(1),
                            first,
                            step,
                            total,
                            warmup,
                        };
                        let counted = schedule.due_times().filter(|(n, _)| *n >= warmup).count();
                        assert_eq!(
                            schedule.measured_orders(),
                            counted,
                            "total {total}, warm-up {warmup}, step {step}, first {first}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_timeline_spans_every_due_second() {
        let start = Instant::now();
        let schedule = |total| Schedule {
            start,
            interval: Duration::from_millis(250),
            first: 0,
            step: 1,
            total,
            warmup: 0,
        };
        // Orders due at 0, 0.25, …, 2.0 s: seconds 0, 1 and 2.
        let seconds = schedule(9).seconds();
        assert_eq!(
            seconds.iter().map(|s| s.second).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        for (n, due) in schedule(9).due_times() {
            let index = (due - start).as_secs() as usize;
            assert!(index < seconds.len(), "order {n} due past the timeline");
        }
        assert_eq!(schedule(1).seconds().len(), 1);
        // With the first 4 (1 s) as warm-up, the measured 5 are due at 1.0-2.0 s.
        let warmed = Schedule {
            warmup: 4,
            ..schedule(9)
        };
        assert_eq!(warmed.seconds().len(), 2);
        let measured: Vec<usize> = warmed
            .due_times()
            .filter(|(n, _)| *n >= 4)
            .map(|(_, due)| warmed.second_of(due))
            .collect();
        assert_eq!(measured, vec![0, 0, 0, 0, 1]);
    }

    #[test]
    fn heads_parse_only_when_complete() {
        let answer = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_head(&answer[..20]).unwrap(), None);
        let (status, head_len, body_len) = parse_head(answer).unwrap().unwrap();
        assert_eq!((status, body_len), (201, 2));
        assert_eq!(&answer[head_len..], b"{}");
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err(), "no length");
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
    }

    /// Orders for SKU `s-0` from buyers `t<connection>-<n>`, no JSON file.
    fn test_args(url: String, rate: f64, secs: f64, connections: usize) -> OrdersArgs {
        OrdersArgs {
            url,
            sku: "s-0".into(),
            rate,
            secs,
            warmup_secs: 0.0,
            connections,
            user_prefix: "t".into(),
            json: None,
            node_metrics: false,
        }
    }

    /// A server that answers the first 3 orders 409 and the rest 201 after 5 ms.
    async fn slow_server() -> (String, Arc<AtomicU64>) {
        let seen = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&seen);
        let app = Router::new().route(
            "/v1/skus/{sku}/orders",
            post(move |body: String| {
                let counter = Arc::clone(&counter);
                async move {
                    assert!(body.starts_with(r#"{"user_id":"t"#), "{body}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    if counter.fetch_add(1, Ordering::SeqCst) < 3 {
                        (StatusCode::CONFLICT, "{}")
                    } else {
                        (StatusCode::CREATED, "{}")
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, seen)
    }

    #[tokio::test]
    async fn sends_the_schedule_and_times_from_due_time() {
        let (url, seen) = slow_server().await;
        let args = test_args(url, 400.0, 0.5, 4);
        let report = run(&args).await.unwrap();
        assert_eq!(report.sent, 200);
        assert_eq!(seen.load(Ordering::SeqCst), 200);
        assert_eq!(report.created, 197);
        assert_eq!(report.other_statuses, vec![(409, 3)]);
        assert_eq!(report.failed, 0);
        assert_eq!(report.timeline.len(), 1, "0.5 s of schedule is one second");
        assert_eq!(
            (report.timeline[0].due, report.timeline[0].created),
            (200, 197)
        );
        // The histogram keeps three significant digits; the timeline the exact value.
        let slowest = report.timeline[0].slowest_created_us;
        assert!(
            slowest.abs_diff(report.created_latency.max_us) <= slowest / 100,
            "{slowest} µs against {:?}",
            report.created_latency
        );
        assert!(
            report.created_latency.p50_us >= 5_000,
            "latency counts the server's 5 ms: {:?}",
            report.created_latency
        );
        assert!(
            report.send_lag.p50_us < report.created_latency.p50_us,
            "orders leave on time when connections are free: {:?}",
            report.send_lag
        );
    }

    #[tokio::test]
    async fn warm_up_orders_are_sent_but_not_counted() {
        let (url, seen) = slow_server().await;
        let mut args = test_args(url, 400.0, 0.25, 4);
        args.warmup_secs = 0.25;
        let report = run(&args).await.unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 200, "both parts were sent");
        assert_eq!((report.warmup_orders, report.sent), (100, 100));
        // The server's three 409s went to the warm-up.
        assert_eq!((report.created, report.other_statuses.len()), (100, 0));
        let due: u64 = report.timeline.iter().map(|second| second.due).sum();
        assert_eq!(due, 100);
    }

    #[tokio::test]
    async fn a_server_that_cannot_keep_up_shows_in_the_latency() {
        // 4 connections × one 5 ms answer each = at most 800/s; ask for 2,000/s.
        let (url, _) = slow_server().await;
        let args = test_args(url, 2000.0, 0.2, 4);
        let report = run(&args).await.unwrap();
        assert_eq!(report.sent, 400);
        // The last orders were due at 0.2 s but could only finish near 0.5 s.
        assert!(
            report.created_latency.max_us >= 250_000,
            "queueing behind busy connections is counted: {:?}",
            report.created_latency
        );
        assert!(
            report.send_lag.p99_us < 50_000,
            "waiting for a busy connection is the server's, not the generator's: {:?}",
            report.send_lag
        );
        assert!(
            report.created_from_send.max_us < 100_000,
            "from send, each order took the server's 5 ms, not the queue: {:?}",
            report.created_from_send
        );
        assert!(report.created_from_send.p50_us >= 5_000);
    }

    #[tokio::test]
    async fn reads_the_node_metrics_before_and_after_the_run() {
        // Each read of /metrics shows 10 more fsyncs, one of them over 50 ms.
        let reads = Arc::new(AtomicU64::new(0));
        let metrics_reads = Arc::clone(&reads);
        let app = Router::new()
            .route(
                "/v1/skus/{sku}/orders",
                post(|| async { (StatusCode::CREATED, "{}") }),
            )
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let n = metrics_reads.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        format!(
                            "keydrop_journal_fsync_seconds_bucket{{le=\"0.01\"}} {fast}\n\
                             keydrop_journal_fsync_seconds_bucket{{le=\"0.05\"}} {fast}\n\
                             keydrop_journal_fsync_seconds_bucket{{le=\"0.1\"}} {all}\n\
                             keydrop_journal_fsync_seconds_bucket{{le=\"+Inf\"}} {all}\n",
                            fast = 9 * n,
                            all = 10 * n
                        )
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let mut args = test_args(url.clone(), 200.0, 0.1, 2);
        let report = run(&args).await.unwrap();
        assert_eq!(report.node, None, "not read unless asked");
        assert_eq!(reads.load(Ordering::SeqCst), 0);

        args.node_metrics = true;
        let report = run(&args).await.unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 2, "once before, once after");
        let node = report.node.expect("the node's account");
        assert_eq!(node.fsyncs.count, 10);
        assert_eq!(
            (node.fsyncs.over_10ms, node.fsyncs.over_50ms),
            (Some(1), Some(1))
        );
        assert_eq!(node.fsyncs.slowest_at_most_secs, Some(0.1));
        assert_eq!(node.answer_waits.count, 0);

        args.url = format!("{url}/nowhere");
        assert!(
            run(&args).await.is_err(),
            "a target without /metrics is an error when they are asked for"
        );
    }

    #[tokio::test]
    async fn refuses_a_bad_rate_and_a_remote_url() {
        let mut args = test_args("http://127.0.0.1:9".into(), 0.0, 1.0, 1);
        assert!(run(&args).await.is_err());
        args.rate = 10.0;
        args.url = "http://192.0.2.1:80".into();
        assert!(run(&args).await.is_err());
    }
}
