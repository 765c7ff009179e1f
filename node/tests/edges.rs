//! Edges of the contract against a real `keydrop serve` on loopback: the per-device
//! token bucket, `X-Forwarded-For` from trusted proxies, card imports over the body
//! limit or malformed, and SIGINT as a clean stop.

mod common;

use std::time::{Duration, Instant};

use common::{assert_error, cards, on_sale, Node};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;

/// The card import route's body limit (`IMPORT_BODY_BYTES_MAX`, 64 MiB).
const IMPORT_LIMIT: usize = 64 * 1024 * 1024;

/// How long a raw exchange may wait for its answer; a node that refuses early answers
/// in milliseconds, one that waits for a body nobody sends never does.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// An order, and the `Retry-After` header of its answer.
async fn order_from_device(
    node: &Node,
    sku: &str,
    user: &str,
    device: &str,
) -> (StatusCode, Value, Option<String>) {
    let response = node
        .http
        .post(node.at(&format!("/v1/skus/{sku}/orders")))
        .header("x-device-id", device)
        .json(&json!({ "user_id": user }))
        .send()
        .await
        .expect("request sent");
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().expect("ASCII Retry-After").to_owned());
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body, retry_after)
}

/// A device bucket spans users: sharing a phone between accounts does not multiply
/// its budget, and each device has its own.
#[tokio::test]
async fn orders_from_one_device_share_a_bucket_whatever_the_user() {
    let node = Node::start(&[
        ("KEYDROP_RATE_PER_IP", "0"),
        ("KEYDROP_RATE_PER_DEVICE", "1"),
        ("KEYDROP_BURST_PER_DEVICE", "2"),
    ])
    .await;
    node.sku_with_cards("dev", on_sale(100, 1, 600), &cards("dv", 10))
        .await;

    // Four users on one phone at once: all four checks land well inside the second
    // a token takes to come back, so exactly the burst of two is served. Each
    // user is new to the per-user bucket, so only the device's can refuse.
    let (a, b, c, d) = tokio::join!(
        order_from_device(&node, "dev", "a0", "phone-a"),
        order_from_device(&node, "dev", "a1", "phone-a"),
        order_from_device(&node, "dev", "a2", "phone-a"),
        order_from_device(&node, "dev", "a3", "phone-a"),
    );
    let answers = [a, b, c, d];
    let served = answers
        .iter()
        .filter(|(status, _, _)| *status == StatusCode::CREATED)
        .count();
    assert_eq!(served, 2, "{answers:?}");
    let mut waits = Vec::new();
    for (status, body, retry_after) in answers.iter().filter(|a| a.0 != StatusCode::CREATED) {
        assert_error(
            &(*status, body.clone()),
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
        );
        let wait: u64 = retry_after
            .as_deref()
            .unwrap_or_else(|| panic!("429 without Retry-After: {body}"))
            .parse()
            .expect("Retry-After in whole seconds");
        // At 1 per second a token is back within a second.
        assert_eq!(wait, 1, "{answers:?}");
        waits.push(wait);
    }
    assert_eq!(
        node.metric("keydrop_admission_rejected_total{scope=\"device\"}")
            .await,
        2.0
    );
    // The refused orders cost no card.
    let (_, view) = node.get("/v1/skus/dev").await;
    assert_eq!(
        (view["reserved"].as_u64(), view["available"].as_u64()),
        (Some(2), Some(8)),
        "{view}"
    );

    // Another device is served at once.
    let (status, body, _) = order_from_device(&node, "dev", "b0", "phone-b").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // Waiting as long as Retry-After says is enough for the first device.
    tokio::time::sleep(Duration::from_secs(waits[0])).await;
    let (status, body, _) = order_from_device(&node, "dev", "a4", "phone-a").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// An order lookup, as the per-IP bucket counts it, optionally through a proxy that
/// wrote `X-Forwarded-For`. Admitted lookups of this unknown id are 404.
async fn lookup_via(node: &Node, forwarded_for: Option<&str>) -> (StatusCode, Value) {
    let mut request = node
        .http
        .get(node.at("/v1/orders/0123456789abcdef0123456789abcdef"));
    if let Some(forwarded_for) = forwarded_for {
        request = request.header("x-forwarded-for", forwarded_for);
    }
    node.send(request).await
}

fn assert_admitted(answer: &(StatusCode, Value), what: &str) {
    assert_eq!(
        (answer.0, answer.1["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("order_not_found")),
        "{what}: {}",
        answer.1
    );
}

fn assert_throttled(answer: &(StatusCode, Value), what: &str) {
    assert_eq!(
        (answer.0, answer.1["error"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited")),
        "{what}: {}",
        answer.1
    );
}

/// Behind a trusted proxy every request comes from the proxy's address; the bucket
/// must be the client's the proxy names, or one busy client throttles everyone.
/// 1 per second with a burst of 2: the third lookup of a client, sent right after its
/// first two, is refused with a second to spare.
#[tokio::test]
async fn forwarded_for_from_a_trusted_proxy_buckets_each_client_apart() {
    let node = Node::start(&[
        ("KEYDROP_TRUSTED_PROXIES", "127.0.0.1"),
        ("KEYDROP_RATE_PER_IP", "1"),
        ("KEYDROP_BURST_PER_IP", "2"),
    ])
    .await;
    let a = Some("198.51.100.1");
    assert_admitted(&lookup_via(&node, a).await, "A, first");
    assert_admitted(&lookup_via(&node, a).await, "A, second");
    assert_throttled(&lookup_via(&node, a).await, "A, over its burst");
    // B, behind the same proxy, is not throttled by A.
    let b = Some("198.51.100.2");
    assert_admitted(&lookup_via(&node, b).await, "B, first");
    assert_admitted(&lookup_via(&node, b).await, "B, second");

    // The proxy appends the address it saw to whatever the client sent: anything to
    // the left of that is the client's own writing. Junk there must not move the
    // request onto the proxy's bucket, nor a made-up address onto a fresh one.
    let c = "203.0.113.7";
    assert_admitted(
        &lookup_via(&node, Some("junk, 203.0.113.7")).await,
        "C with junk",
    );
    assert_admitted(&lookup_via(&node, Some(c)).await, "C");
    assert_throttled(
        &lookup_via(&node, Some("junk, 203.0.113.7")).await,
        "C with junk, over C's burst",
    );
    assert_throttled(
        &lookup_via(&node, Some("198.51.100.99, 203.0.113.7")).await,
        "C claiming another address, over C's burst",
    );
    // Requests of the proxy itself (no header) have the proxy's own, untouched bucket.
    assert_admitted(&lookup_via(&node, None).await, "the proxy itself");
    assert!(
        node.metric("keydrop_admission_rejected_total{scope=\"ip\"}")
            .await
            >= 3.0
    );
}

/// Orders skip the router, which is where lookups get the peer's address from: the
/// buckets of a proxy's clients must work the same for them.
#[tokio::test]
async fn orders_behind_a_trusted_proxy_are_bucketed_by_client() {
    let node = Node::start(&[
        ("KEYDROP_TRUSTED_PROXIES", "127.0.0.1"),
        ("KEYDROP_RATE_PER_IP", "1"),
        ("KEYDROP_BURST_PER_IP", "2"),
    ])
    .await;
    node.sku_with_cards("xff", on_sale(100, 1, 600), &cards("x", 10))
        .await;
    let order_via = |forwarded_for: Option<&str>, user: &str| {
        let mut request = node
            .http
            .post(node.at("/v1/skus/xff/orders"))
            .json(&json!({ "user_id": user }));
        if let Some(forwarded_for) = forwarded_for {
            request = request.header("x-forwarded-for", forwarded_for);
        }
        node.send(request)
    };
    let created = |answer: (StatusCode, Value), what: &str| {
        assert_eq!(answer.0, StatusCode::CREATED, "{what}: {}", answer.1);
    };
    let a = Some("198.51.100.1");
    created(order_via(a, "a1").await, "A, first");
    created(order_via(a, "a2").await, "A, second");
    assert_throttled(&order_via(a, "a3").await, "A, over its burst");
    created(
        order_via(Some("198.51.100.2"), "b1").await,
        "B, behind the same proxy",
    );
    created(order_via(None, "p1").await, "the proxy itself");
}

/// From a peer that is not a trusted proxy the header is the client's own claim:
/// every request counts against the socket's address whatever it says.
#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let node = Node::start(&[("KEYDROP_RATE_PER_IP", "1"), ("KEYDROP_BURST_PER_IP", "2")]).await;
    assert_admitted(&lookup_via(&node, Some("198.51.100.1")).await, "first");
    assert_admitted(&lookup_via(&node, Some("198.51.100.2")).await, "second");
    assert_throttled(
        &lookup_via(&node, Some("198.51.100.3")).await,
        "a third claimed address, same socket address",
    );
}

/// A buyer whose client stops mid-body is answered 408 `request_timeout` once the
/// body has not come in within the configured time, and meanwhile holds no order
/// slot: with a bound of one, another buyer's order goes through while it stalls.
#[tokio::test]
async fn a_stalled_order_body_times_out_and_holds_no_slot() {
    let node = Node::start(&[
        ("KEYDROP_BODY_READ_TIMEOUT_MS", "1500"),
        ("KEYDROP_ORDERS_IN_FLIGHT_MAX", "1"),
        ("KEYDROP_ORDERS_IN_FLIGHT_MIN", "1"),
    ])
    .await;
    node.sku_with_cards("stalled", on_sale(100, 1, 60), &cards("S", 3))
        .await;
    let body = br#"{"user_id":"slow-buyer"}"#;
    let head = order_head(&node, "stalled", body.len());
    let stalled = raw_exchange(&node, move |mut w| async move {
        w.write_all(head.as_bytes()).await?;
        w.write_all(&body[..10]).await?;
        w.flush().await?;
        // The rest never comes; the connection stays open until answered.
        std::future::pending::<()>().await;
        Ok(())
    });
    let other = async {
        // Sent while the first body is stalled (well inside its 1.5 s).
        tokio::time::sleep(Duration::from_millis(300)).await;
        node.reserve("stalled", "prompt-buyer").await
    };
    let (stalled, other) = tokio::join!(stalled, other);
    assert_eq!(other.0, StatusCode::CREATED, "{other:?}");
    assert_error(&stalled, StatusCode::REQUEST_TIMEOUT, "request_timeout");
    // Nothing was done for the stalled buyer.
    let (status, _) = node.reserve("stalled", "slow-buyer").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(stock(&node, "stalled").await, (Some(1), Some(3)));
}

/// A card import's body is timed by part, JSON as well as CSV: an import that comes
/// in over longer than the body time limit, in parts each well inside it, is taken
/// whole; a part that stalls past the limit is answered 408 with nothing imported.
/// Parts 200 ms apart against a 1 s limit: a late sleep in this process only makes
/// the whole longer, and a part 800 ms late is needed to fail it wrongly.
#[tokio::test]
async fn a_slow_import_is_timed_by_part() {
    let limit = Duration::from_millis(1_000);
    let node = Node::start(&[(
        "KEYDROP_BODY_READ_TIMEOUT_MS",
        &limit.as_millis().to_string(),
    )])
    .await;
    node.put_sku("slow-json", on_sale(100, 1, 60)).await;
    node.put_sku("slow-csv", on_sale(100, 1, 60)).await;
    let json = br#"{"cards":[{"serial":"J-1","secret":"s-1"},{"serial":"J-2","secret":"s-2"}]}"#;
    let csv = b"serial,secret\nC-1,s-1\nC-2,s-2\nC-3,s-3\n";
    for (sku, content_type, body, cards) in [
        ("slow-json", "application/json", &json[..], 2),
        ("slow-csv", "text/csv", &csv[..], 3),
    ] {
        let framing = format!("Content-Length: {}", body.len());
        let head = import_head(&node, sku, content_type, &framing);
        let parts: Vec<Vec<u8>> = body
            .chunks(body.len().div_ceil(8))
            .map(<[u8]>::to_vec)
            .collect();
        let started = Instant::now();
        let answer = raw_exchange(&node, move |mut w| async move {
            w.write_all(head.as_bytes()).await?;
            for part in parts {
                w.write_all(&part).await?;
                w.flush().await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            std::future::pending::<()>().await;
            Ok(())
        })
        .await;
        assert_eq!(answer.0, StatusCode::OK, "{sku}: {answer:?}");
        assert_eq!(answer.1["imported"], cards, "{sku}: {answer:?}");
        assert!(started.elapsed() > limit, "{sku}: {:?}", started.elapsed());
        assert_eq!(stock(&node, sku).await, (Some(cards), Some(cards)));
    }
    // A JSON part that stalls: 408, and no card of it imported.
    node.put_sku("stalled-json", on_sale(100, 1, 60)).await;
    let framing = format!("Content-Length: {}", json.len());
    let head = import_head(&node, "stalled-json", "application/json", &framing);
    let answer = raw_exchange(&node, move |mut w| async move {
        w.write_all(head.as_bytes()).await?;
        w.write_all(&json[..20]).await?;
        w.flush().await?;
        std::future::pending::<()>().await;
        Ok(())
    })
    .await;
    assert_error(&answer, StatusCode::REQUEST_TIMEOUT, "request_timeout");
    assert_eq!(stock(&node, "stalled-json").await, (Some(0), Some(0)));
}

/// A connection that starts no request for the idle timeout is closed: one that
/// never sends anything, and one that trickles a request head it never finishes. A
/// connection in use every 300 ms stays open throughout.
#[tokio::test]
async fn idle_and_trickling_connections_are_closed_and_busy_ones_kept() {
    let node = Node::start(&[("KEYDROP_CONNECTION_IDLE_TIMEOUT_SECS", "1")]).await;
    let addr = node
        .url
        .strip_prefix("http://")
        .expect("an http:// URL")
        .to_owned();
    // Reads until the node closes the connection; how long that took.
    async fn closed_after(read: &mut tokio::net::tcp::OwnedReadHalf) -> Duration {
        let started = tokio::time::Instant::now();
        let mut sink = [0u8; 1024];
        let until_closed = async { while read.read(&mut sink).await.map_or(0, |n| n) > 0 {} };
        tokio::time::timeout(Duration::from_secs(10), until_closed)
            .await
            .expect("closed by the node within 10 s");
        started.elapsed()
    }
    let silent = async {
        let (mut read, _write) = TcpStream::connect(&addr).await.unwrap().into_split();
        closed_after(&mut read).await
    };
    let trickling = async {
        let (mut read, mut write) = TcpStream::connect(&addr).await.unwrap().into_split();
        let trickle = tokio::spawn(async move {
            for byte in
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            {
                if write.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let after = closed_after(&mut read).await;
        trickle.abort();
        after
    };
    let busy = async {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        let mut answer = [0u8; 4096];
        for _ in 0..10 {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("the busy connection is still open");
            let n = stream.read(&mut answer).await.unwrap();
            assert!(
                answer[..n].starts_with(b"HTTP/1.1 200"),
                "{:?}",
                String::from_utf8_lossy(&answer[..n])
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let used_then_idle = async {
        let (mut read, mut write) = TcpStream::connect(&addr).await.unwrap().into_split();
        write
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 4096];
        let n = read.read(&mut answer).await.unwrap();
        assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
        closed_after(&mut read).await
    };
    let (silent, trickling, used_then_idle, ()) =
        tokio::join!(silent, trickling, used_then_idle, busy);
    for (what, after) in [
        ("silent", silent),
        ("trickling", trickling),
        ("used, then idle", used_then_idle),
    ] {
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_secs(5),
            "{what} connection closed after {after:?}"
        );
    }
    assert!(
        node.metric("keydrop_http_connections_closed_idle_total")
            .await
            >= 3.0
    );
}

/// A connection inside a request is not idle, however long the request takes: an
/// order whose body comes in two parts 3.5 s apart, with no body time limit and an
/// idle timeout of 1 s, is answered.
#[tokio::test]
async fn a_connection_inside_a_request_is_not_closed_as_idle() {
    let node = Node::start(&[
        ("KEYDROP_CONNECTION_IDLE_TIMEOUT_SECS", "1"),
        ("KEYDROP_BODY_READ_TIMEOUT_MS", "0"),
    ])
    .await;
    node.sku_with_cards("patient", on_sale(100, 1, 60), &cards("P", 1))
        .await;
    let body = br#"{"user_id":"slow-but-sure"}"#;
    let head = order_head(&node, "patient", body.len());
    let answer = raw_exchange(&node, move |mut w| async move {
        w.write_all(head.as_bytes()).await?;
        w.write_all(&body[..10]).await?;
        // Past twice the idle timeout, when the sweep would close even a connection
        // it had only asked to finish.
        tokio::time::sleep(Duration::from_millis(3_500)).await;
        w.write_all(&body[10..]).await?;
        std::future::pending::<()>().await;
        Ok(())
    })
    .await;
    assert_eq!(answer.0, StatusCode::CREATED, "{answer:?}");
}

/// Status and JSON body of an HTTP/1.1 exchange written by hand on its own
/// connection. `write` sends the request and runs alongside the read: a node that
/// refuses early answers before the body is sent and may drop the connection under
/// the rest, so write errors are ignored and the writer is stopped once answered.
async fn raw_exchange<F, Fut>(node: &Node, write: F) -> (StatusCode, Value)
where
    F: FnOnce(OwnedWriteHalf) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    let addr = node.url.strip_prefix("http://").expect("an http:// URL");
    let stream = TcpStream::connect(addr).await.expect("connecting");
    let (mut read, write_half) = stream.into_split();
    let writer = tokio::spawn(write(write_half));
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = read.read(&mut chunk).await.expect("reading the answer");
            assert!(n > 0, "connection closed before an answer: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&buf[..head_end]).expect("ASCII head");
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad status line: {head}"));
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("no Content-Length: {head}"));
        while buf.len() < head_end + length {
            let n = read.read(&mut chunk).await.expect("reading the body");
            assert!(n > 0, "connection closed inside the body");
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or(Value::Null);
        (StatusCode::from_u16(status).expect("a status code"), body)
    })
    .await;
    writer.abort();
    answer.unwrap_or_else(|_| panic!("no answer in {ANSWER_TIMEOUT:?}; log:\n{}", node.log()))
}

/// The head of an order of `body_len` bytes, written by hand.
fn order_head(node: &Node, sku: &str, body_len: usize) -> String {
    let host = node.url.strip_prefix("http://").expect("an http:// URL");
    format!(
        "POST /v1/skus/{sku}/orders HTTP/1.1\r\nHost: {host}\r\n\
         Content-Type: application/json\r\nContent-Length: {body_len}\r\n\r\n"
    )
}

fn import_head(node: &Node, sku: &str, content_type: &str, framing: &str) -> String {
    let host = node.url.strip_prefix("http://").expect("an http:// URL");
    format!(
        "POST /v1/skus/{sku}/cards HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: {content_type}\r\n{framing}\r\n\r\n",
        node.admin_token()
    )
}

async fn stock(node: &Node, sku: &str) -> (Option<u64>, Option<u64>) {
    let (status, view) = node
        .send(node.admin(Method::GET, &format!("/v1/admin/skus/{sku}")))
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    (view["available"].as_u64(), view["imported"].as_u64())
}

/// A declared length over the limit is refused before a byte of the body is read.
/// The bytes that do follow the head are good cards, more than a CSV import batch:
/// a node that started reading would import them before noticing the size.
#[tokio::test]
async fn an_import_declared_over_64_mib_is_refused_before_reading_it() {
    let node = Node::start(&[]).await;
    let (status, view) = node.put_sku("big", on_sale(100, 1, 600)).await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    let csv: String = (0..12_000)
        .map(|i| format!("BIG-{i},secret-{i}\n"))
        .collect();
    let json = json!({"cards": [{"serial": "BIG-J", "secret": "s"}]}).to_string();
    for (content_type, prefix) in [("text/csv", csv), ("application/json", json)] {
        let head = import_head(
            &node,
            "big",
            content_type,
            &format!("Content-Length: {}", IMPORT_LIMIT + 1),
        );
        let started = Instant::now();
        let answer = raw_exchange(&node, |mut w| async move {
            w.write_all(head.as_bytes()).await?;
            w.write_all(prefix.as_bytes()).await?;
            // Not shut down: a node that waits for the declared rest must not get
            // an early end of the body to answer instead.
            std::future::pending().await
        })
        .await;
        assert_error(&answer, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{content_type}: answered only after {:?}",
            started.elapsed()
        );
        assert_eq!(
            stock(&node, "big").await,
            (Some(0), Some(0)),
            "{content_type}"
        );
    }
    // The SKU takes an import within the limit: the zero above is the refusal's.
    let (status, body) = node.import("big", &cards("ok", 1)).await;
    assert_eq!(
        (status, &body["imported"]),
        (StatusCode::OK, &json!(1)),
        "{body}"
    );
}

/// Without a declared length the limit is counted as the body arrives. The body is
/// a valid JSON import of one card padded with whitespace past 64 MiB: a node
/// without the running count would import the card.
#[tokio::test]
async fn a_chunked_import_past_64_mib_is_refused_and_imports_nothing() {
    let node = Node::start(&[]).await;
    let (status, view) = node.put_sku("big", on_sale(100, 1, 600)).await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    let head = import_head(
        &node,
        "big",
        "application/json",
        "Transfer-Encoding: chunked",
    );
    const CHUNK: usize = 1024 * 1024;
    let chunks = IMPORT_LIMIT / CHUNK + 1;
    let answer = raw_exchange(&node, move |mut w| async move {
        let frame = |data: &[u8]| {
            let mut framed = format!("{:x}\r\n", data.len()).into_bytes();
            framed.extend_from_slice(data);
            framed.extend_from_slice(b"\r\n");
            framed
        };
        w.write_all(head.as_bytes()).await?;
        w.write_all(&frame(br#"{"cards":[{"serial":"BIG-C","secret":"s"}"#))
            .await?;
        let padding = frame(&vec![b' '; CHUNK]);
        for _ in 0..chunks {
            w.write_all(&padding).await?;
        }
        w.write_all(&frame(b"]}")).await?;
        w.write_all(b"0\r\n\r\n").await?;
        std::future::pending().await
    })
    .await;
    assert_error(&answer, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert_eq!(stock(&node, "big").await, (Some(0), Some(0)));
}

/// A JSON import is parsed whole before any card is stored: a body cut short or of
/// the wrong shape is a 400, even when good cards come before the fault.
#[tokio::test]
async fn a_malformed_json_import_is_a_400_and_imports_nothing() {
    let node = Node::start(&[]).await;
    let (status, view) = node.put_sku("m", on_sale(100, 1, 600)).await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    for body in [
        r#"{"cards": ["#,
        r#"{"cards": [{"serial": "M-1", "secret": "s-1"},"#,
        r#"{"cards": 5}"#,
        r#"{"cards": [{"serial": "M-2", "secret": "s-2"}, 5]}"#,
        r#"{"cards": [{"serial": "M-3", "secret": "s-3"}], "extra": true}"#,
    ] {
        let answer = node
            .send(
                node.admin(Method::POST, "/v1/skus/m/cards")
                    .header("content-type", "application/json")
                    .body(body),
            )
            .await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
        assert_eq!(stock(&node, "m").await, (Some(0), Some(0)), "after {body}");
    }
    // The same route takes a well-formed body: the zeros above are the refusals'.
    let (status, body) = node.import("m", &cards("m", 2)).await;
    assert_eq!(
        (status, &body["imported"]),
        (StatusCode::OK, &json!(2)),
        "{body}"
    );
}

/// Ctrl-C in a terminal, or an init system that sends SIGINT, must stop the node as
/// cleanly as SIGTERM: in-flight work drained, the engine shut down, exit 0.
#[tokio::test]
async fn sigint_exits_zero_and_a_restart_keeps_a_reserved_order() {
    let mut node = Node::start(&[]).await;
    node.sku_with_cards("keep", on_sale(900, 2, 600), &cards("i", 5))
        .await;
    let (status, order) = node.reserve("keep", "u1").await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    let id = order["order_id"].as_str().unwrap().to_owned();

    let status = node.sigint();
    // Killed by the signal's default action, the status would have no code.
    assert_eq!(status.code(), Some(0), "{status}; log:\n{}", node.log());
    let log = node.log();
    assert!(
        log.contains("SIGINT received") && log.contains("engine stopped"),
        "log:\n{log}"
    );
    node.start_again().await;

    assert_eq!(node.stock("keep").await, (4, 1, 0));
    let (status, order) = node.get(&format!("/v1/orders/{id}")).await;
    assert_eq!(
        (status, order["status"].as_str()),
        (StatusCode::OK, Some("reserved")),
        "{order}"
    );
    let status = node.sigint();
    assert_eq!(status.code(), Some(0), "log:\n{}", node.log());
}

/// A CSV import stopped by a bad line after whole batches went in says how many went
/// in, and those cards are counted and stocked like any import's.
#[tokio::test]
async fn a_csv_import_stopped_partway_counts_what_went_in() {
    let node = Node::start(&[]).await;
    node.put_sku("partway", on_sale(100, 1, 600)).await;
    let good: String = (0..10_500).map(|i| format!("W-{i},s-{i}\n")).collect();
    let bad = "no comma here\n";
    let framing = format!("Content-Length: {}", good.len() + bad.len());
    let head = import_head(&node, "partway", "text/csv", &framing);
    // The bad line comes in a later part of the body, once the cards before it
    // (10,000 or more: a batch) have gone in.
    let answer = raw_exchange(&node, move |mut w| async move {
        w.write_all(head.as_bytes()).await?;
        w.write_all(good.as_bytes()).await?;
        w.flush().await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        w.write_all(bad.as_bytes()).await?;
        std::future::pending::<()>().await;
        Ok(())
    })
    .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
    let message = answer.1["message"].as_str().unwrap();
    assert!(
        message.starts_with("line 10501:")
            && message.contains("(10500 cards before it were imported"),
        "{message}"
    );
    assert_eq!(stock(&node, "partway").await, (Some(10_500), Some(10_500)));
    assert_eq!(node.metric("keydrop_cards_imported_total").await, 10_500.0);
    assert!(
        node.log().contains("card import stopped partway"),
        "{}",
        node.log()
    );
}
