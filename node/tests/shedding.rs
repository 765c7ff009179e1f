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
