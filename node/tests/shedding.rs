//! Orders refused at the edge, without a trip to the SKU's actor, answer exactly as
//! the actor would have.

mod common;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_past_the_in_flight_bound_get_503_at_once() {
    let node = Node::start(&[
        ("KEYDROP_ORDERS_IN_FLIGHT_MAX", "1"),
        ("KEYDROP_RATE_PER_IP", "0"),
    ])
    .await;
    node.sku_with_cards("busy", on_sale(100, 1, 60), &cards("B", 400))
        .await;
    let requests = (0..300).map(|i| {
        let (http, url) = (node.http.clone(), node.at("/v1/skus/busy/orders"));
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
    assert!(
        overloaded > 0,
        "300 concurrent orders never found the one slot taken"
    );
    assert_eq!(created + overloaded, 300);
    let (_, sku) = node.get("/v1/skus/busy").await;
    assert_eq!(sku["reserved"], created, "{sku}");
}
