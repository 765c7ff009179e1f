//! Orders refused at the edge, without a trip to the SKU's actor, answer exactly as
//! the actor would have.

mod common;

use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_stock_outside_the_window_is_not_on_sale_and_inside_is_sold_out() {
    let node = Node::start(&[]).await;
    let later = json!({
        "name": "Tomorrow's drop",
        "price_cents": 100,
        "per_user_limit": 1,
        "reservation_ttl_secs": 60,
        "starts_at": "2099-01-01T00:00:00Z"
    });
    let (status, body) = node.put_sku("tomorrow", later).await;
    assert!(status.is_success(), "{body}");
    let (status, body) = node.reserve("tomorrow", "alice").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "not_on_sale", "{body}");

    let (status, body) = node.put_sku("today", on_sale(100, 1, 60)).await;
    assert!(status.is_success(), "{body}");
    let (status, body) = node.reserve("today", "alice").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "sold_out", "{body}");
    assert!(node.metric("keydrop_orders_shed_total").await >= 2.0);
}

/// Sends `count` orders for `sku` at once, each from a new buyer; every answer must be
/// 201, or 503 `overloaded` with Retry-After. The SKU's `reserved` must equal the
/// 201s, and every 503 must be counted as shed for `reason`. Returns the count of 503s.
async fn burst_of_orders(node: &Node, sku: &str, count: usize, reason: &str) -> u64 {
    let requests = (0..count).map(|i| {
        let (http, url) = (
            node.http.clone(),
            node.at(&format!("/v1/skus/{sku}/orders")),
        );
        tokio::spawn(async move {
            let response = http
                .post(url)
                .header("content-type", "application/json")
                .body(json!({"user_id": format!("buyer-{i}")}).to_string())
                .send()
                .await
                .expect("answer");
            let status = response.status();
            let retry_after = response.headers().contains_key("retry-after");
            let body: serde_json::Value = response.json().await.expect("JSON body");
            (status, retry_after, body)
        })
    });
    let (mut created, mut overloaded) = (0u64, 0u64);
    for request in requests.collect::<Vec<_>>() {
        let (status, retry_after, body) = request.await.expect("request task");
        match status {
            StatusCode::CREATED => created += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(body["error"], "overloaded", "{body}");
                assert!(retry_after, "503 carries Retry-After");
                overloaded += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(created + overloaded, count as u64);
    let (_, view) = node.get(&format!("/v1/skus/{sku}")).await;
    assert_eq!(view["reserved"], created, "{view}");
    let shed = format!("keydrop_orders_overload_shed_total{{reason=\"{reason}\"}}");
    assert!(node.metric(&shed).await >= overloaded as f64, "{shed}");
    overloaded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_past_the_in_flight_bound_get_503_at_once() {
    let node = Node::start(&[
        ("KEYDROP_ORDERS_IN_FLIGHT_MAX", "1"),
        ("KEYDROP_RATE_PER_IP", "0"),
    ])
    .await;
    node.sku_with_cards("busy", on_sale(100, 1, 60), &cards("B", 400))
        .await;
    let overloaded = burst_of_orders(&node, "busy", 300, "in_flight").await;
    assert!(
        overloaded > 0,
        "300 concurrent orders never found the one slot taken"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_shed_while_the_workers_lag_and_taken_again_after() {
    // One async worker and a 1 ms limit: 500 orders at once queue in front of the
    // handlers for far longer than that, so the probe wakes late and the rest of the
    // burst is shed. No slot bound, so lag is the only reason for a 503.
    let node = Node::start(&[
        ("TOKIO_WORKER_THREADS", "1"),
        ("KEYDROP_SHED_LAG_MS", "1"),
        ("KEYDROP_ORDERS_IN_FLIGHT_MAX", "0"),
        ("KEYDROP_RATE_PER_IP", "0"),
    ])
    .await;
    node.sku_with_cards("crowded", on_sale(100, 1, 60), &cards("C", 600))
        .await;
    let overloaded = burst_of_orders(&node, "crowded", 500, "lag").await;
    assert!(
        overloaded > 0,
        "a 500-order burst on one worker never lagged 1 ms"
    );
    // Once the burst is over the lag decays and orders are taken again.
    eventually(
        "an order admitted after the burst",
        Duration::from_secs(10),
        || async {
            let (status, _) = node.reserve("crowded", "late-buyer").await;
            (status == StatusCode::CREATED).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_bound_starts_at_its_ceiling_and_comes_down_under_a_crowd() {
    // A 1 ms target: 250 orders at once on a debug build spend far longer than that
    // inside on average (the last waits for all before it), so the bound is cut.
    let node = Node::start(&[
        ("KEYDROP_ORDERS_IN_FLIGHT_MAX", "600"),
        ("KEYDROP_ORDERS_IN_FLIGHT_MIN", "4"),
        ("KEYDROP_ORDERS_IN_FLIGHT_TARGET_MS", "1"),
        ("KEYDROP_RATE_PER_IP", "0"),
    ])
    .await;
    let limit = "keydrop_orders_in_flight_limit";
    eventually(
        "the bound at its ceiling",
        Duration::from_secs(10),
        || async { (node.metric(limit).await == 600.0).then_some(()) },
    )
    .await;
    let mut bound = 600.0;
    for crowd in 0..10 {
        let sku = format!("crowd{crowd}");
        node.sku_with_cards(&sku, on_sale(100, 1, 60), &cards(&sku, 250))
            .await;
        burst_of_orders(&node, &sku, 250, "in_flight").await;
        // The bound moves every 100 ms.
        tokio::time::sleep(Duration::from_millis(250)).await;
        bound = node.metric(limit).await;
        if bound < 600.0 {
            break;
        }
    }
    assert!(
        (4.0..600.0).contains(&bound),
        "bound after the crowds: {bound}"
    );
}

/// Keyed orders for a sold-out SKU are answered at the edge too, as the actor would
/// answer them (a held refusal again, another request with the key 422), except the
/// retry of an order that holds its key, which only the actor can answer with its
/// original 201.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_orders_for_a_sold_out_sku_are_shed_unless_an_order_holds_the_key() {
    let node = Node::start(&[("KEYDROP_RATE_PER_IP", "0"), ("KEYDROP_RATE_PER_USER", "0")]).await;
    node.sku_with_cards("keyed", on_sale(100, 1, 600), &cards("k", 1))
        .await;
    let keyed = |user: &str, key: &str| {
        node.http
            .post(node.at("/v1/skus/keyed/orders"))
            .header("idempotency-key", key)
            .json(&json!({ "user_id": user }))
    };
    let (status, won) = node.send(keyed("winner", "k-winner")).await;
    assert_eq!(status, StatusCode::CREATED, "{won}");
    let shed = || node.metric("keydrop_orders_shed_total");
    let replayed = || node.metric("keydrop_idempotent_refusals_replayed_total");
    let (shed_before, replayed_before) = (shed().await, replayed().await);

    // The winner's retry reaches the actor: its 201 again, marked replayed.
    let ((status, again), headers) = node.send_with_headers(keyed("winner", "k-winner")).await;
    assert_eq!((status, &again), (StatusCode::CREATED, &won));
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_error(
        &node.send(keyed("thief", "k-winner")).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    );
    assert_eq!(
        shed().await,
        shed_before,
        "a held key was refused at the edge"
    );

    // A new key: refused at the edge, and held there for its retries.
    let late = node.send(keyed("late", "k-late")).await;
    assert_error(&late, StatusCode::CONFLICT, "sold_out");
    assert_eq!(node.send(keyed("late", "k-late")).await, late);
    assert_error(
        &node.send(keyed("other", "k-late")).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    );
    assert_eq!(shed().await, shed_before + 3.0);
    assert_eq!(replayed().await, replayed_before + 2.0);

    // The card comes back: the edge lets orders through, and the actor answers the
    // held key as the edge did, while a fresh key gets the card.
    let id = won["order_id"].as_str().unwrap();
    let (status, _) = node
        .send(node.http.delete(node.at(&format!("/v1/orders/{id}"))))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(node.send(keyed("late", "k-late")).await, late);
    let (status, order) = node.send(keyed("fresh", "k-fresh")).await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    assert_eq!(shed().await, shed_before + 3.0);
    assert_eq!(replayed().await, replayed_before + 3.0);
    assert_eq!(node.stock("keyed").await, (0, 1, 0));
}
