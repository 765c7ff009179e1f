//! Whole drops against a real node: a crowd for too few cards, a crash in the
//! middle of a sale, a payment after expiry, and a clean stop and restart.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cards, eventually, on_sale, Node};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::Semaphore;

/// Connections in flight at once: stays under a default open-file limit of 1024 on
/// both sides, while every buyer's task is already waiting to go.
const CONNECTIONS_MAX: usize = 512;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_buyers_for_five_hundred_cards() {
    let node = Node::start(&[("KEYDROP_RATE_PER_IP", "0")]).await;
    crowd_for_five_hundred_cards(node, Duration::ZERO).await;
}

/// The same crowd through the node's overload gates (the harness turns them off
/// elsewhere): the lag gate at its default, and the order bound held to 4 orders
/// inside at once, so that 512 buyers at once are sure to meet it. A buyer
/// told 503 `overloaded` comes back after its `Retry-After`, as a client should, and
/// the outcome is the same to the card.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_buyers_for_five_hundred_cards_through_the_overload_gates() {
    let node = Node::start(&[
        ("KEYDROP_RATE_PER_IP", "0"),
        ("KEYDROP_SHED_LAG_MS", "5"),
        ("KEYDROP_ORDERS_IN_FLIGHT_MAX", "4"),
    ])
    .await;
    let overloaded = crowd_for_five_hundred_cards(node, RETRY_FOR).await;
    assert!(overloaded > 0, "the gates refused no one");
}

/// How long a buyer of the gated crowd keeps coming back: a debug build on a busy
/// machine may run behind its lag limit for a while, and refuse everyone meanwhile.
const RETRY_FOR: Duration = Duration::from_secs(120);

/// 2,000 buyers at once for 500 cards: exactly 500 reservations, 1,500 told sold
/// out, and once everyone pays, 500 distinct imported cards with their secrets. A
/// buyer answered 503 `overloaded` tries again after its `Retry-After`, for up to
/// `retry_for`. Gives how many answers were 503 `overloaded`.
async fn crowd_for_five_hundred_cards(node: Node, retry_for: Duration) -> usize {
    let node = Arc::new(node);
    let stock = cards("drop", 500);
    node.sku_with_cards("drop", on_sale(1_000, 1, 600), &stock)
        .await;
    let secrets: HashMap<String, String> = stock.into_iter().collect();

    let gate = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let overloaded = Arc::new(AtomicUsize::new(0));
    let give_up_at = Instant::now() + retry_for;
    let buyers: Vec<_> = (0..2_000)
        .map(|i| {
            let node = Arc::clone(&node);
            let gate = Arc::clone(&gate);
            let overloaded = Arc::clone(&overloaded);
            tokio::spawn(async move {
                loop {
                    let answer = {
                        let _slot = gate.acquire().await.expect("semaphore open");
                        node.reserve_with_headers("drop", &format!("buyer-{i}"))
                            .await
                    };
                    if answer.0 .0 != StatusCode::SERVICE_UNAVAILABLE {
                        return answer.0;
                    }
                    assert_eq!(answer.0 .1["error"], "overloaded", "{:?}", answer.0);
                    overloaded.fetch_add(1, Ordering::Relaxed);
                    let wait = Duration::from_secs(common::retry_after_secs(&answer));
                    if Instant::now() + wait > give_up_at {
                        return answer.0;
                    }
                    tokio::time::sleep(wait).await;
                }
            })
        })
        .collect();
    let mut orders = Vec::new();
    let mut refusals: HashMap<String, usize> = HashMap::new();
    for buyer in buyers {
        let (status, body) = buyer.await.expect("buyer task");
        match status {
            StatusCode::CREATED => orders.push(body["order_id"].as_str().unwrap().to_owned()),
            _ => {
                *refusals
                    .entry(format!("{status} {}", body["error"]))
                    .or_default() += 1
            }
        }
    }
    let overloaded = overloaded.load(Ordering::Relaxed);
    assert_eq!(
        orders.len(),
        500,
        "refusals: {refusals:?}; 503s retried: {overloaded}"
    );
    assert_eq!(refusals.len(), 1, "only sold_out refusals: {refusals:?}");
    assert_eq!(
        refusals.get("409 Conflict \"sold_out\""),
        Some(&1_500),
        "{refusals:?}"
    );

    // Everyone pays; every buyer then sees a distinct imported card and its secret.
    let payers: Vec<_> = orders
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let node = Arc::clone(&node);
            let gate = Arc::clone(&gate);
            let id = id.clone();
            tokio::spawn(async move {
                let _slot = gate.acquire().await.expect("semaphore open");
                let paid = node.pay(&id, &format!("pay-{i}"), 1_000).await;
                assert_eq!(paid.0, StatusCode::OK, "{}", paid.1);
                node.get(&format!("/v1/orders/{id}")).await
            })
        })
        .collect();
    let mut serials = HashSet::new();
    for payer in payers {
        let (status, order) = payer.await.expect("payer task");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(order["status"], "paid");
        let serial = order["card"]["serial"].as_str().unwrap().to_owned();
        assert_eq!(
            order["card"]["secret"].as_str(),
            secrets.get(&serial).map(String::as_str),
            "{serial}"
        );
        assert!(serials.insert(serial.clone()), "{serial} sold twice");
    }
    assert_eq!(serials.len(), 500);
    let (_, view) = node.get("/v1/skus/drop").await;
    assert_eq!(
        (
            view["available"].as_u64(),
            view["reserved"].as_u64(),
            view["sold"].as_u64()
        ),
        (Some(0), Some(0), Some(500))
    );
    assert_eq!(view["status"], "sold_out");
    overloaded
}

/// What buyers were told during the sale.
#[derive(Default)]
struct Acks {
    reserved: Vec<String>,
    paid: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_sale_loses_no_acknowledged_order() {
    let mut node = Node::start(&[("KEYDROP_RATE_PER_IP", "0")]).await;
    node.sku_with_cards("hot", on_sale(300, 1, 600), &cards("k", 3_000))
        .await;
    let url = node.url.clone();
    let secret = node.payment_secret();
    let acks = Arc::new(Mutex::new(Acks::default()));

    // Buyers reserve and pay in a loop until the node dies under them.
    let http = node.http.clone();
    let workers: Vec<_> = (0..64)
        .map(|w| {
            let (http, url, secret, acks) = (http.clone(), url.clone(), secret.clone(), Arc::clone(&acks));
            tokio::spawn(async move {
                for i in 0.. {
                    let user = format!("w{w}-u{i}");
                    let Ok(response) = http
                        .post(format!("{url}/v1/skus/hot/orders"))
                        .json(&serde_json::json!({ "user_id": user }))
                        .send()
                        .await
                    else {
                        return;
                    };
                    if response.status() != StatusCode::CREATED {
                        continue;
                    }
                    let Ok(order) = response.json::<Value>().await else { return };
                    let id = order["order_id"].as_str().unwrap().to_owned();
                    acks.lock().unwrap().reserved.push(id.clone());
                    if i % 2 == 1 {
                        continue;
                    }
                    let body = serde_json::json!({"payment_ref": format!("pay-{id}"), "amount_cents": 300}).to_string();
                    let Ok(response) = http
                        .post(format!("{url}/v1/orders/{id}/payment"))
                        .header("x-keydrop-signature", common::sign(secret.as_bytes(), common::unix_now(), &body))
                        .body(body)
                        .send()
                        .await
                    else {
                        return;
                    };
                    if response.status() == StatusCode::OK {
                        acks.lock().unwrap().paid.push(id);
                    }
                }
            })
        })
        .collect();

    eventually(
        "a few hundred acknowledged orders",
        Duration::from_secs(120),
        || {
            let acks = Arc::clone(&acks);
            async move { (acks.lock().unwrap().paid.len() >= 200).then_some(()) }
        },
    )
    .await;
    node.sigkill();
    for worker in workers {
        worker.await.expect("worker task");
    }
    let acks = std::mem::take(&mut *acks.lock().unwrap());

    node.start_again().await;
    let mut serials = HashSet::new();
    for id in &acks.reserved {
        let (status, order) = node.get(&format!("/v1/orders/{id}")).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "acknowledged order {id} lost: {order}"
        );
        assert!(
            matches!(order["status"].as_str(), Some("reserved" | "paid")),
            "{order}"
        );
    }
    for id in &acks.paid {
        let (status, order) = node.get(&format!("/v1/orders/{id}")).await;
        assert_eq!(
            (status, order["status"].as_str()),
            (StatusCode::OK, Some("paid")),
            "{id}"
        );
        assert!(
            serials.insert(order["card"]["serial"].as_str().unwrap().to_owned()),
            "card sold twice"
        );
    }
    let (_, view) = node.get("/v1/skus/hot").await;
    let held = view["reserved"].as_u64().unwrap() + view["sold"].as_u64().unwrap();
    assert!(
        held >= acks.reserved.len() as u64,
        "{view} vs {} acked",
        acks.reserved.len()
    );
    assert!(
        view["sold"].as_u64().unwrap() >= acks.paid.len() as u64,
        "{view}"
    );
    assert_eq!(view["available"].as_u64().unwrap() + held, 3_000, "{view}");
}

/// Reserves the only card of `sku` (a 1 s reservation) and waits for the expiry
/// ticker to return it to stock; gives the order id.
async fn reserve_and_let_expire(node: &Node, sku: &str) -> String {
    let (status, order) = node.reserve(sku, "slowpoke").await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    let id = order["order_id"].as_str().unwrap().to_owned();
    let path = format!("/v1/skus/{sku}");
    assert_eq!(node.get(&path).await.1["available"], 0);
    eventually(
        "the reservation to expire",
        Duration::from_secs(30),
        || async {
            let (_, view) = node.get(&path).await;
            (view["available"] == 1).then_some(())
        },
    )
    .await;
    id
}

#[tokio::test]
async fn payment_after_expiry_is_refused_and_the_card_returns() {
    let node = Node::start(&[]).await;
    node.sku_with_cards("fast", on_sale(250, 1, 1), &cards("e", 1))
        .await;
    let id = reserve_and_let_expire(&node, "fast").await;
    let (status, body) = node.pay(&id, "late-pay", 250).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("reservation_expired")),
        "{body}"
    );
    let (_, order) = node.get(&format!("/v1/orders/{id}")).await;
    assert_eq!(order["status"], "expired");
    assert!(order.get("card").is_none());
    assert_eq!(node.get("/v1/skus/fast").await.1["available"], 1);
    assert_eq!(node.metric("keydrop_late_payments_total").await, 1.0);
    // Providers retry a callback answered 409: the same refusal, nothing new to refund.
    let (status, body) = node.pay(&id, "late-pay", 250).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "reservation_expired");
    assert_eq!(node.metric("keydrop_late_payments_total").await, 1.0);

    // The operator sees the refund to make.
    let output = node
        .command()
        .args(["order", "late", "--json", "--url", &node.url])
        .output()
        .expect("keydrop order late");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed: Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    let refunds = listed["refunds"].as_array().unwrap();
    assert_eq!(refunds.len(), 1, "{listed}");
    assert_eq!(refunds[0]["order_id"], id.as_str());
    assert_eq!(refunds[0]["payment_ref"], "late-pay");
    assert_eq!(refunds[0]["amount_cents"], 250);
    assert_eq!(refunds[0]["reason"], "expired");

    // And the card sells again.
    assert_eq!(
        node.reserve("fast", "someone-else").await.0,
        StatusCode::CREATED
    );
}

/// An order keeps 64 refused payments. One past them is refused all the same, not
/// recorded, and left where an operator finds it: a counter, an alert and an
/// error-level log line with its reference and amount.
#[tokio::test]
async fn payments_past_what_an_order_keeps_are_refused_and_reported() {
    let node = Node::start(&[]).await;
    node.sku_with_cards("churn", on_sale(250, 1, 1), &cards("c", 1))
        .await;
    let id = reserve_and_let_expire(&node, "churn").await;
    for n in 0..64 {
        let (status, body) = node.pay(&id, &format!("late-{n}"), 250).await;
        assert_eq!(status, StatusCode::CONFLICT, "payment {n}: {body}");
    }
    assert_eq!(node.metric("keydrop_late_payments_total").await, 64.0);
    assert_eq!(
        node.metric("keydrop_refused_payments_unrecorded_total")
            .await,
        0.0
    );

    let (status, body) = node.pay(&id, "one-too-many", 250).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("reservation_expired")),
        "{body}"
    );
    assert_eq!(node.metric("keydrop_late_payments_total").await, 64.0);
    assert_eq!(
        node.metric("keydrop_refused_payments_unrecorded_total")
            .await,
        1.0
    );
    let log = node.log();
    let line = log
        .lines()
        .find(|line| line.contains("not recorded") && line.contains("one-too-many"))
        .unwrap_or_else(|| panic!("no log line for the unrecorded payment:\n{log}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(&id), "{line}");
    assert!(line.contains("amount_cents=250"), "{line}");
    let (_, order) = node.get(&format!("/v1/orders/{id}")).await;
    assert_eq!(order["status"], "expired", "{order}");
}

#[tokio::test]
async fn sigterm_exits_zero_and_a_restart_keeps_everything() {
    let mut node = Node::start(&[]).await;
    node.sku_with_cards("keep", on_sale(900, 2, 600), &cards("t", 10))
        .await;
    let (_, reserved) = node.reserve("keep", "u1").await;
    let (_, paid) = node.reserve("keep", "u2").await;
    let reserved = reserved["order_id"].as_str().unwrap().to_owned();
    let paid = paid["order_id"].as_str().unwrap().to_owned();
    assert_eq!(node.pay(&paid, "p-1", 900).await.0, StatusCode::OK);
    let (_, card_before) = node.get(&format!("/v1/orders/{paid}")).await;

    let status = node.sigterm();
    assert_eq!(status.code(), Some(0), "log:\n{}", node.log());
    assert!(
        node.log().contains("engine stopped"),
        "log:\n{}",
        node.log()
    );
    node.start_again().await;

    assert_eq!(node.stock("keep").await, (8, 1, 1));
    assert_eq!(
        node.get(&format!("/v1/orders/{reserved}")).await.1["status"],
        "reserved"
    );
    assert_eq!(node.get(&format!("/v1/orders/{paid}")).await.1, card_before);
    let status = node.sigterm();
    assert_eq!(status.code(), Some(0));
}

/// A stop closes the connections that are open but idle (a client pool's keep-alive,
/// or one that has not sent a request yet) at once, rather than waiting out the grace
/// period for them; the open-connection gauge counted both meanwhile.
#[tokio::test]
async fn sigterm_closes_idle_connections_at_once() {
    let mut node = Node::start(&[("KEYDROP_SHUTDOWN_GRACE_SECS", "30")]).await;
    // The test client keeps its connection in its pool after each request.
    assert_eq!(node.get("/healthz").await.0, StatusCode::OK);
    let address = node.url.strip_prefix("http://").expect("an http URL");
    let _silent = tokio::net::TcpStream::connect(address).await.unwrap();
    eventually(
        "both connections to be counted",
        Duration::from_secs(10),
        || async { (node.metric("keydrop_http_connections_open").await == 2.0).then_some(()) },
    )
    .await;

    let status = node.sigterm();
    assert_eq!(status.code(), Some(0), "log:\n{}", node.log());
    let log = node.log();
    assert!(
        log.contains("waiting for open connections to finish") && log.contains("engine stopped"),
        "log:\n{log}"
    );
    assert!(
        !log.contains("did not finish in time"),
        "idle connections held the stop for the whole grace period; log:\n{log}"
    );
}

/// SIGTERM during an import: the node stops taking connections at once, answers the
/// import in full, and exits 0 with every card durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_import_finish() {
    let mut node = Node::start(&[]).await;
    let (status, _) = node.put_sku("bulk", on_sale(100, 1, 600)).await;
    assert_eq!(status, StatusCode::CREATED);
    let csv: String = (0..60_000)
        .map(|i| format!("BULK-{i},secret-{i}\n"))
        .collect();
    let batches = "keydrop_journal_batch_requests_count";
    let before = node.metric(batches).await;
    let import = tokio::spawn(
        node.admin(reqwest::Method::POST, "/v1/skus/bulk/cards")
            .header("content-type", "text/csv")
            .body(csv)
            .send(),
    );
    // Once the first chunk is journaled the request is surely in flight.
    eventually("the import to start", Duration::from_secs(60), || async {
        (node.metric(batches).await > before).then_some(())
    })
    .await;
    node.send_signal("-TERM");
    // Stopping means no new connection is taken while the import drains.
    eventually("the listener to close", Duration::from_secs(20), || async {
        node.log().contains("stopped accepting").then_some(())
    })
    .await;
    let address = node.url.trim_start_matches("http://").to_owned();
    let refused = tokio::net::TcpStream::connect(&address).await;
    assert!(
        refused.is_err(),
        "a connection was accepted after SIGTERM; log:\n{}",
        node.log()
    );
    let response = import
        .await
        .expect("import task")
        .expect("answered before exit");
    let status = node.wait_exit();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["imported"], 60_000, "{body}");
    assert_eq!(status.code(), Some(0), "log:\n{}", node.log());
    let log = node.log();
    let (asked, finished) = (log.find("shutdown requested"), log.find("cards imported"));
    assert!(
        asked.is_some() && asked < finished,
        "the import finished before SIGTERM:\n{log}"
    );
    node.start_again().await;
    assert_eq!(node.get("/v1/skus/bulk").await.1["available"], 60_000);
}
