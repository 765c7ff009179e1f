//! Master key rotation through the node: list the new key first and the old one
//! after it, restart, and the node re-seals every card; then the old key can go.

mod common;

use std::time::Duration;

use common::*;
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_master_key_reseals_every_card() {
    let old_key = "11".repeat(32);
    let new_key = "22".repeat(32);
    let mut node = Node::start(&[("KEYDROP_MASTER_KEY", old_key.as_str())]).await;
    node.sku_with_cards("rotate", on_sale(500, 1, 60), &cards("R", 50))
        .await;
    let (status, order) = node.reserve("rotate", "alice").await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    let order_id = order["order_id"].as_str().expect("order id").to_string();
    let (status, paid) = node.pay(&order_id, "pay-1", 500).await;
    assert_eq!(status, StatusCode::OK, "{paid}");

    node.set_env("KEYDROP_MASTER_KEY", &format!("{new_key}\n{old_key}"));
    node.restart().await;
    eventually("the background re-seal", Duration::from_secs(60), || {
        let done = node.log().contains("key rotation done");
        async move { done.then_some(()) }
    })
    .await;
    // 50 cards, the paid one included, re-sealed; the rotation says it is over.
    assert_eq!(node.metric("keydrop_cards_resealed_total").await, 50.0);
    assert_eq!(node.metric("keydrop_key_rotation_running").await, 0.0);
    assert!(
        node.log().contains("key rotation started"),
        "{}",
        node.log()
    );

    // Only the new key from now on: every card must still open.
    node.set_env("KEYDROP_MASTER_KEY", &new_key);
    node.restart().await;
    let (status, body) = node.get(&format!("/v1/orders/{order_id}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["card"]["secret"], "secret-R-000000-x", "{body}");
}
