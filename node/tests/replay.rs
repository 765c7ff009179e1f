//! A signed payment callback cannot be replayed against another order: the signature
//! covers the body, not the URL, so the node remembers which order each signed
//! callback was for.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_callback_does_not_pay_another_order() {
    let node = Node::start(&[]).await;
    node.sku_with_cards("replay", on_sale(700, 1, 60), &cards("P", 5))
        .await;
    let (_, first) = node.reserve("replay", "alice").await;
    let (_, second) = node.reserve("replay", "bob").await;
    let first = first["order_id"].as_str().expect("order id").to_string();
    let second = second["order_id"].as_str().expect("order id").to_string();

    let body = json!({"payment_ref": "psp-1", "amount_cents": 700}).to_string();
    let signature = node.sign(&body);
    let post = |order: &str| {
        node.http
            .post(node.at(&format!("/v1/orders/{order}/payment")))
            .header("content-type", "application/json")
            .header("x-keydrop-signature", signature.clone())
            .body(body.clone())
    };
    let (status, paid) = node.send(post(&first)).await;
    assert_eq!(status, StatusCode::OK, "{paid}");
    // The provider retrying the same callback is fine.
    let (status, again) = node.send(post(&first)).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    // The same bytes against Bob's order are refused, and Bob's order stays unpaid.
    let (status, replayed) = node.send(post(&second)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{replayed}");
    assert_eq!(replayed["error"], "bad_signature");
    let (_, order) = node.get(&format!("/v1/orders/{second}")).await;
    assert_eq!(order["status"], "reserved", "{order}");
    // Counted as a replay, apart from callbacks signed with a wrong secret.
    assert_eq!(
        node.metric(r#"keydrop_payments_total{outcome="replayed"}"#)
            .await,
        1.0
    );
    assert_eq!(
        node.metric(r#"keydrop_payments_total{outcome="bad_signature"}"#)
            .await,
        0.0
    );
}

/// The guard's memory dies with the process: a callback signed before the node
/// started may have paid another order in the process before, so it is refused, and
/// the provider's retry, signed anew, goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_signed_before_the_node_started_is_refused() {
    let node = Node::start(&[]).await;
    node.sku_with_cards("restarted", on_sale(700, 1, 60), &cards("R", 2))
        .await;
    let (_, order) = node.reserve("restarted", "carol").await;
    let order = order["order_id"].as_str().expect("order id").to_string();
    let body = json!({"payment_ref": "psp-9", "amount_cents": 700}).to_string();
    let post = |signature: String| {
        node.http
            .post(node.at(&format!("/v1/orders/{order}/payment")))
            .header("content-type", "application/json")
            .header("x-keydrop-signature", signature)
            .body(body.clone())
    };
    let secret = node.payment_secret();
    let before_start = sign(secret.as_bytes(), unix_now() - 30, &body);
    let (status, refused) = node.send(post(before_start)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{refused}");
    assert_eq!(refused["error"], "bad_signature");
    let (status, paid) = node.send(post(node.sign(&body))).await;
    assert_eq!(status, StatusCode::OK, "{paid}");
}
