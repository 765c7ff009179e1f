//! HTTP API v1 against a real `keydrop serve`: every route, status and error code of
//! the contract, malformed input, and rate limiting.

mod common;

use common::{assert_error, cards, eventually, on_sale, retry_after_secs, sign, unix_now, Node};
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

#[tokio::test]
async fn health_readiness_and_unknown_routes() {
    let node = Node::start(&[]).await;
    assert_eq!(
        node.get("/healthz").await,
        (StatusCode::OK, json!({"status": "ok"}))
    );
    assert_eq!(
        node.get("/readyz").await,
        (StatusCode::OK, json!({"status": "ready"}))
    );
    let response = node.http.get(node.at("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_error(&node.get("/nope").await, StatusCode::NOT_FOUND, "not_found");
    assert_error(
        &node.get("/v1/skus").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let patch = node.send(node.http.patch(node.at("/v1/skus/a"))).await;
    assert_error(&patch, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}

#[tokio::test]
async fn sku_routes() {
    let node = Node::start(&[]).await;
    let def = on_sale(500, 2, 60);
    // Admin routes want the bearer token.
    let anonymous = node
        .send(node.http.put(node.at("/v1/skus/s1")).json(&def))
        .await;
    assert_error(&anonymous, StatusCode::UNAUTHORIZED, "unauthorized");
    let wrong = node
        .send(
            node.http
                .put(node.at("/v1/skus/s1"))
                .bearer_auth("not-the-token")
                .json(&def),
        )
        .await;
    assert_error(&wrong, StatusCode::UNAUTHORIZED, "unauthorized");

    // Invalid id or field → 400.
    assert_error(
        &node.put_sku("bad%20id", def.clone()).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    assert_error(
        &node.put_sku(&"x".repeat(65), def.clone()).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    // So on the other routes that name a SKU (its view, the operator's view, orders,
    // imports): its id is public, and the message says why.
    let too_long = "x".repeat(65);
    for bad in ["bad%20id", "bad.id", too_long.as_str()] {
        let answers = [
            node.get(&format!("/v1/skus/{bad}")).await,
            node.send(node.admin(Method::GET, &format!("/v1/admin/skus/{bad}")))
                .await,
            node.reserve(bad, "alice").await,
            node.import(bad, &cards("b", 1)).await,
        ];
        for answer in answers {
            assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
            assert!(
                answer.1["message"].as_str().unwrap().contains("sku"),
                "{bad}: {}",
                answer.1
            );
        }
    }
    for bad in [
        json!({"name": "", "price_cents": 1, "per_user_limit": 1, "reservation_ttl_secs": 60}),
        json!({"name": "n", "price_cents": 1, "per_user_limit": 0, "reservation_ttl_secs": 60}),
        json!({"name": "n", "price_cents": 1, "per_user_limit": 1, "reservation_ttl_secs": 0}),
        json!({"name": "n", "price_cents": -1, "per_user_limit": 1, "reservation_ttl_secs": 60}),
        json!({"name": "n", "price_cents": 1, "per_user_limit": 1, "reservation_ttl_secs": 60, "starts_at": "soon"}),
        json!({"name": "n", "price_cents": 1, "per_user_limit": 1, "reservation_ttl_secs": 60,
               "starts_at": "2030-01-02T00:00:00Z", "ends_at": "2030-01-01T00:00:00Z"}),
        json!({"name": "n", "price_cents": 1, "per_user_limit": 1, "reservation_ttl_secs": 60, "colour": "red"}),
        json!({"price_cents": 1, "per_user_limit": 1, "reservation_ttl_secs": 60}),
    ] {
        assert_error(
            &node.put_sku("s1", bad).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    }
    let malformed = node
        .send(node.admin(Method::PUT, "/v1/skus/s1").body("{\"name\":"))
        .await;
    assert_error(&malformed, StatusCode::BAD_REQUEST, "invalid_request");

    // Create (201), update (200).
    let (status, view) = node.put_sku("s1", def.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    assert_eq!(view["status"], "sold_out");
    let mut updated = def.clone();
    updated["starts_at"] = json!("2020-01-01T00:00:00+01:00");
    updated["low_stock_threshold"] = json!(1);
    let (status, view) = node.put_sku("s1", updated).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["starts_at"], "2019-12-31T23:00:00.000Z");
    assert_eq!(view["low_stock_threshold"], 1);

    // Import: JSON, then CSV; known serials count as duplicates.
    assert_error(
        &node.import("nope", &cards("c", 1)).await,
        StatusCode::NOT_FOUND,
        "sku_not_found",
    );
    let (status, body) = node.import("s1", &cards("c", 3)).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"imported": 3, "duplicates": 0}))
    );
    let csv = "serial,secret\nc-000000,dup\nd-1,secret one\n\nd-2,secret,with,commas\n";
    let (status, body) = node
        .send(
            node.admin(Method::POST, "/v1/skus/s1/cards")
                .header("content-type", "text/csv")
                .body(csv),
        )
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"imported": 2, "duplicates": 1}))
    );
    let bad_csv = node
        .send(
            node.admin(Method::POST, "/v1/skus/s1/cards")
                .header("content-type", "text/csv; charset=utf-8")
                .body("e-1,x\ne-2,y\ne-3\n"),
        )
        .await;
    assert_error(&bad_csv, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(
        bad_csv.1["message"]
            .as_str()
            .unwrap()
            .starts_with("line 3:"),
        "{}",
        bad_csv.1
    );
    let bad_card = node.import("s1", &[("ok".into(), String::new())]).await;
    assert_error(&bad_card, StatusCode::BAD_REQUEST, "invalid_request");
    let xml = node
        .send(
            node.admin(Method::POST, "/v1/skus/s1/cards")
                .header("content-type", "application/xml")
                .body("<cards/>"),
        )
        .await;
    assert_error(
        &xml,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let no_token = node
        .send(
            node.http
                .post(node.at("/v1/skus/s1/cards"))
                .json(&json!({"cards": []})),
        )
        .await;
    assert_error(&no_token, StatusCode::UNAUTHORIZED, "unauthorized");

    // The public view has exactly the contract's fields (plus the sale's terms).
    let (status, view) = node.get("/v1/skus/s1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        view,
        json!({"sku": "s1", "name": "Test card", "price_cents": 500, "per_user_limit": 2,
               "available": 5, "reserved": 0, "sold": 0, "status": "on_sale",
               "reservation_ttl_secs": 60, "starts_at": "2019-12-31T23:00:00.000Z"})
    );
    assert_error(
        &node.get("/v1/skus/unknown").await,
        StatusCode::NOT_FOUND,
        "sku_not_found",
    );
    assert_error(
        &node.get("/v1/skus/bad%20id").await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    let (status, admin_view) = node
        .send(node.admin(Method::GET, "/v1/admin/skus/s1"))
        .await;
    assert_eq!(
        (status, admin_view["imported"].as_u64()),
        (StatusCode::OK, Some(5))
    );
}

/// A keyed order that was refused gets the same refusal again when retried with the
/// same key and body, even once a card is back; another body with the key is 422.
/// "Not on sale yet" is the exception: a retry after the opening gets its chance.
#[tokio::test]
async fn a_refused_keyed_order_is_answered_the_same_to_its_retries() {
    let node = Node::start(&[("KEYDROP_RATE_PER_IP", "0")]).await;
    node.sku_with_cards("r1", on_sale(500, 1, 600), &cards("r", 1))
        .await;
    let (status, taken) = node.reserve("r1", "alice").await;
    assert_eq!(status, StatusCode::CREATED, "{taken}");

    let keyed = |sku: &str, user: &str, key: &str| {
        node.http
            .post(node.at(&format!("/v1/skus/{sku}/orders")))
            .header("idempotency-key", key)
            .json(&json!({"user_id": user}))
    };
    let first = node.send(keyed("r1", "bob", "kb")).await;
    assert_error(&first, StatusCode::CONFLICT, "sold_out");

    // The card comes back to stock; the retry still gets its original answer.
    let id = taken["order_id"].as_str().unwrap();
    let (status, _) = node
        .send(node.http.delete(node.at(&format!("/v1/orders/{id}"))))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(node.send(keyed("r1", "bob", "kb")).await, first);
    assert_error(
        &node.send(keyed("r1", "carol", "kb")).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    );
    // A new key is a new request: it gets the card back in stock.
    assert_eq!(
        node.send(keyed("r1", "bob", "kb-2")).await.0,
        StatusCode::CREATED
    );

    // Over the purchase limit (on a SKU with stock left), told again to the retry.
    node.sku_with_cards("r2", on_sale(500, 1, 600), &cards("q", 3))
        .await;
    assert_eq!(
        node.send(keyed("r2", "dave", "kd-1")).await.0,
        StatusCode::CREATED
    );
    let limited = node.send(keyed("r2", "dave", "kd-2")).await;
    assert_error(&limited, StatusCode::FORBIDDEN, "purchase_limit");
    assert_eq!(node.send(keyed("r2", "dave", "kd-2")).await, limited);

    // Too early: refused now, served by the same key once the sale opens.
    let opens = chrono::Utc::now() + chrono::Duration::seconds(3);
    let mut early = on_sale(500, 1, 600);
    early["starts_at"] = json!(opens.to_rfc3339());
    node.sku_with_cards("r3", early, &cards("e", 2)).await;
    assert_error(
        &node.send(keyed("r3", "erin", "ke")).await,
        StatusCode::CONFLICT,
        "not_on_sale",
    );
    let wait = (opens - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(200)).await;
    assert_eq!(
        node.send(keyed("r3", "erin", "ke")).await.0,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn reservations_and_their_refusals() {
    let node = Node::start(&[("KEYDROP_RATE_PER_IP", "0")]).await;
    node.sku_with_cards("s1", on_sale(500, 1, 600), &cards("a", 3))
        .await;

    // 201 with the contract's fields.
    let (status, order) = node.reserve("s1", "alice").await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    let id = order["order_id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    assert!(id
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_eq!(
        (order["sku"].as_str(), order["status"].as_str()),
        (Some("s1"), Some("reserved"))
    );
    assert_eq!(order["price_cents"], 500);
    assert!(order["expires_at"].as_str().unwrap().ends_with('Z'));

    // Per-user limit → 403.
    assert_error(
        &node.reserve("s1", "alice").await,
        StatusCode::FORBIDDEN,
        "purchase_limit",
    );

    // Idempotency: same key and body → the original 201 body; another body → 422.
    let keyed = |user: &str, key: &str, device: Option<&str>| {
        let mut request = node
            .http
            .post(node.at("/v1/skus/s1/orders"))
            .header("idempotency-key", key)
            .json(&json!({"user_id": user}));
        if let Some(device) = device {
            request = request.header("x-device-id", device);
        }
        request
    };
    let first = node.send(keyed("bob", "k-1", Some("dev-1"))).await;
    assert_eq!(first.0, StatusCode::CREATED);
    let again = keyed("bob", "k-1", Some("dev-1")).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["content-type"], "application/json");
    assert_eq!(again.json::<Value>().await.unwrap(), first.1);
    assert_error(
        &node.send(keyed("carol", "k-1", Some("dev-1"))).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    );
    assert_error(
        &node.send(keyed("bob", "k-1", Some("dev-2"))).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    );

    // Bad bodies and headers → 400; oversized → 413; unknown SKU → 404.
    for body in [
        "",
        "{",
        "[]",
        "{\"user\":\"x\"}",
        "{\"user_id\":\"\"}",
        "{\"user_id\":42}",
    ] {
        let answer = node
            .send(node.http.post(node.at("/v1/skus/s1/orders")).body(body))
            .await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
    }
    let long_user = json!({"user_id": "u".repeat(129)});
    let answer = node
        .send(
            node.http
                .post(node.at("/v1/skus/s1/orders"))
                .json(&long_user),
        )
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
    let answer = node
        .send(
            node.http
                .post(node.at("/v1/skus/s1/orders"))
                .header("idempotency-key", "k".repeat(129))
                .json(&json!({"user_id": "x"})),
        )
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
    let huge = format!(
        "{{\"user_id\":\"x\",\"pad\":\"{}\"}}",
        "p".repeat(17 * 1024)
    );
    let answer = node
        .send(node.http.post(node.at("/v1/skus/s1/orders")).body(huge))
        .await;
    assert_error(&answer, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert_error(
        &node.reserve("nope", "x").await,
        StatusCode::NOT_FOUND,
        "sku_not_found",
    );
    assert_error(
        &node.reserve("bad%20id", "x").await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );

    // Last card, then sold out: shed at the edge.
    assert_eq!(node.reserve("s1", "dave").await.0, StatusCode::CREATED);
    assert_error(
        &node.reserve("s1", "erin").await,
        StatusCode::CONFLICT,
        "sold_out",
    );
    assert!(node.metric("keydrop_orders_shed_total").await >= 1.0);
    // An idempotent retry of a reserved order still gets its answer when sold out.
    assert_eq!(node.send(keyed("bob", "k-1", Some("dev-1"))).await, first);

    // Per-device limit → 403.
    let mut def = on_sale(100, 5, 600);
    def["per_device_limit"] = json!(1);
    node.sku_with_cards("s2", def, &cards("b", 5)).await;
    let with_device = |user: &str| {
        node.http
            .post(node.at("/v1/skus/s2/orders"))
            .header("x-device-id", "phone-1")
            .json(&json!({"user_id": user}))
    };
    assert_eq!(node.send(with_device("u1")).await.0, StatusCode::CREATED);
    assert_error(
        &node.send(with_device("u2")).await,
        StatusCode::FORBIDDEN,
        "purchase_limit",
    );

    // Outside the sale window → 409 not_on_sale, before and after.
    let mut later = on_sale(100, 1, 600);
    later["starts_at"] = json!("2999-01-01T00:00:00Z");
    node.sku_with_cards("s3", later, &cards("c", 1)).await;
    assert_error(
        &node.reserve("s3", "x").await,
        StatusCode::CONFLICT,
        "not_on_sale",
    );
    let mut over = on_sale(100, 1, 600);
    over["ends_at"] = json!("2000-01-01T00:00:00Z");
    node.sku_with_cards("s4", over, &cards("d", 1)).await;
    assert_error(
        &node.reserve("s4", "x").await,
        StatusCode::CONFLICT,
        "not_on_sale",
    );
}

/// Orders on a path in canonical form skip the router; any other spelling of the same
/// route goes through it. Both must be the same route to buyers and to the metrics.
#[tokio::test]
async fn an_order_is_the_same_whichever_way_its_path_is_dispatched() {
    let node = Node::start(&[("KEYDROP_RATE_PER_IP", "0")]).await;
    node.sku_with_cards("s-9", on_sale(700, 1, 600), &cards("p", 3))
        .await;
    let order_at = |path: &str, user: &str| {
        node.http
            .post(node.at(path))
            .json(&json!({ "user_id": user }))
    };

    // `%2D` is `-`: only the router decodes it.
    for (path, user) in [
        ("/v1/skus/s-9/orders", "ann"),
        ("/v1/skus/s%2D9/orders", "ben"),
    ] {
        let response = order_at(path, user).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{path}"
        );
        assert!(!response.headers().contains_key("idempotent-replayed"));
        let order: Value = response.json().await.unwrap();
        assert_eq!(order["sku"], "s-9");
        assert_eq!(order["price_cents"], 700);
    }
    // The same buyer on the other path meets the same per-user limit.
    assert_error(
        &node.send(order_at("/v1/skus/s%2D9/orders", "ann")).await,
        StatusCode::FORBIDDEN,
        "purchase_limit",
    );
    assert_error(
        &node.send(order_at("/v1/skus/s-9/orders", "ben")).await,
        StatusCode::FORBIDDEN,
        "purchase_limit",
    );
    assert_error(
        &node
            .send(node.http.get(node.at("/v1/skus/s-9/orders")))
            .await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    assert_error(
        &node.send(order_at("/v1/skus/s-9/orders/", "cat")).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_eq!(node.stock("s-9").await, (1, 2, 0));

    let series = |status: u16| {
        format!(
            "keydrop_http_requests_total{{route=\"/v1/skus/{{sku}}/orders\",status=\"{status}\"}}"
        )
    };
    assert_eq!(node.metric(&series(201)).await, 2.0);
    assert_eq!(node.metric(&series(403)).await, 2.0);
    assert_eq!(node.metric(&series(405)).await, 1.0);
}

#[tokio::test]
async fn orders_payments_and_cancellation() {
    let node = Node::start(&[("KEYDROP_RATE_PER_IP", "0")]).await;
    node.sku_with_cards("s1", on_sale(700, 5, 600), &cards("p", 4))
        .await;
    let order_id = |answer: (StatusCode, Value)| {
        assert_eq!(answer.0, StatusCode::CREATED, "{}", answer.1);
        answer.1["order_id"].as_str().unwrap().to_owned()
    };
    let reserved = node.reserve("s1", "u1").await;
    let expires_at = reserved.1["expires_at"].clone();
    let paid = order_id(reserved);
    let cancelled = order_id(node.reserve("s1", "u1").await);

    // Lookup: the order as reserved, no card until paid; unknown and malformed ids
    // are 404.
    assert_eq!(
        node.get(&format!("/v1/orders/{paid}")).await,
        (
            StatusCode::OK,
            json!({"order_id": paid, "sku": "s1", "status": "reserved", "expires_at": expires_at})
        )
    );
    for id in [
        "0123456789abcdef0123456789abcdef",
        "xyz",
        "0123456789ABCDEF0123456789ABCDEF",
    ] {
        assert_error(
            &node.get(&format!("/v1/orders/{id}")).await,
            StatusCode::NOT_FOUND,
            "order_not_found",
        );
    }

    // Signatures: missing, wrong, stale, or for another body → 401.
    let body = json!({"payment_ref": "pay-1", "amount_cents": 700}).to_string();
    let url = node.at(&format!("/v1/orders/{paid}/payment"));
    let secret = node.payment_secret();
    let attempts = [
        None,
        Some("garbage".to_owned()),
        Some(sign(b"some-other-secret-entirely", unix_now(), &body)),
        Some(sign(secret.as_bytes(), unix_now() - 301, &body)),
        Some(sign(secret.as_bytes(), unix_now() + 301, &body)),
        Some(sign(secret.as_bytes(), unix_now(), "{}")),
    ];
    for header in attempts {
        let mut request = node.http.post(&url).body(body.clone());
        if let Some(header) = header {
            request = request.header("x-keydrop-signature", header);
        }
        assert_error(
            &node.send(request).await,
            StatusCode::UNAUTHORIZED,
            "bad_signature",
        );
    }
    // A valid signature over a malformed body is still a 400.
    let junk = "{\"payment_ref\":";
    let answer = node
        .send(
            node.http
                .post(&url)
                .header("x-keydrop-signature", node.sign(junk))
                .body(junk),
        )
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(
        &node.pay("0123456789abcdef0123456789abcdef", "r", 700).await,
        StatusCode::NOT_FOUND,
        "order_not_found",
    );

    // Wrong amount → 400; right one → 200 paid; same ref → 200 again; another → 409.
    assert_error(
        &node.pay(&paid, "pay-0", 699).await,
        StatusCode::BAD_REQUEST,
        "amount_mismatch",
    );
    let first_payment = node.pay(&paid, "pay-1", 700).await;
    assert_eq!(
        first_payment,
        (StatusCode::OK, json!({"order_id": paid, "status": "paid"}))
    );
    assert_eq!(node.pay(&paid, "pay-1", 700).await, first_payment);
    assert_error(
        &node.pay(&paid, "pay-2", 700).await,
        StatusCode::CONFLICT,
        "already_paid",
    );
    // Each is money to refund, counted once per payment_ref: the provider's retry
    // of the second payment is refused again but not counted again.
    assert_error(
        &node.pay(&paid, "pay-2", 700).await,
        StatusCode::CONFLICT,
        "already_paid",
    );
    for reason in ["amount_mismatch", "already_paid"] {
        let series = format!(r#"keydrop_refused_payments_recorded_total{{reason="{reason}"}}"#);
        assert_eq!(node.metric(&series).await, 1.0, "{reason}");
    }
    let (status, view) = node.get(&format!("/v1/orders/{paid}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["status"], "paid");
    let serial = view["card"]["serial"].as_str().unwrap();
    assert_eq!(
        view["card"]["secret"].as_str().unwrap(),
        format!("secret-{serial}-x")
    );

    // Cancel: 200 while reserved, 409 once paid; paying a cancelled order → 409.
    let delete = |id: &str| node.send(node.http.delete(node.at(&format!("/v1/orders/{id}"))));
    assert_eq!(
        delete(&cancelled).await,
        (StatusCode::OK, json!({"status": "cancelled"}))
    );
    assert_error(&delete(&paid).await, StatusCode::CONFLICT, "already_paid");
    assert_error(
        &delete("nothex").await,
        StatusCode::NOT_FOUND,
        "order_not_found",
    );
    let (status, view) = node.get(&format!("/v1/orders/{cancelled}")).await;
    assert_eq!(
        (status, view["status"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{view}"
    );
    assert!(view.get("card").is_none(), "{view}");
    let late_before = node.metric("keydrop_late_payments_total").await;
    assert_error(
        &node.pay(&cancelled, "pay-3", 700).await,
        StatusCode::CONFLICT,
        "reservation_expired",
    );
    assert_eq!(
        node.metric("keydrop_late_payments_total").await,
        late_before + 1.0
    );
    assert_eq!(node.get("/v1/skus/s1").await.1["available"], 3);

    // Every refused payment is listed for refund (admin only).
    let anonymous = node.get("/v1/admin/refunds").await;
    assert_error(&anonymous, StatusCode::UNAUTHORIZED, "unauthorized");
    let (status, list) = node
        .send(node.admin(Method::GET, "/v1/admin/refunds?sku=s1"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut reasons: Vec<&str> = list["refunds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        ["already_paid", "amount_mismatch", "cancelled"],
        "{list}"
    );
    let bad = node
        .send(node.admin(Method::GET, "/v1/admin/refunds?sku=no%20pe"))
        .await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "invalid_request");
    let unknown = node
        .send(node.admin(Method::GET, "/v1/admin/refunds?sku=nope"))
        .await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "sku_not_found");
}

#[tokio::test]
async fn token_buckets_answer_429_with_retry_after() {
    let node = Node::start(&[
        ("KEYDROP_RATE_PER_USER", "1"),
        ("KEYDROP_BURST_PER_USER", "1"),
        ("KEYDROP_RATE_PER_IP", "1"),
        ("KEYDROP_BURST_PER_IP", "4"),
    ])
    .await;
    node.sku_with_cards("s1", on_sale(100, 5, 600), &cards("r", 5))
        .await;
    // Per user: the second order within a second is throttled.
    assert_eq!(node.reserve("s1", "alice").await.0, StatusCode::CREATED);
    let response = node
        .http
        .post(node.at("/v1/skus/s1/orders"))
        .json(&json!({"user_id": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    // Per IP: lookups count too, so order ids cannot be guessed at speed. Two
    // orders spent two of the four tokens.
    let (lookups, throttled) = lookups_until_throttled(&node, 10).await;
    let throttled = throttled.unwrap_or_else(|| panic!("never throttled: {lookups:?}"));
    assert_error(&throttled.0, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry_after = retry_after_secs(&throttled);
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert!(
        node.metric("keydrop_admission_rejected_total{scope=\"user\"}")
            .await
            >= 1.0
    );
    assert!(
        node.metric("keydrop_admission_rejected_total{scope=\"ip\"}")
            .await
            >= 1.0
    );
}

/// Looks an unknown order up until the per-IP bucket refuses, at most `n` times:
/// the statuses, and the refusal with its headers.
async fn lookups_until_throttled(
    node: &Node,
    n: usize,
) -> (
    Vec<StatusCode>,
    Option<((StatusCode, Value), reqwest::header::HeaderMap)>,
) {
    let mut statuses = Vec::new();
    for _ in 0..n {
        let answer = node
            .send_with_headers(
                node.http
                    .get(node.at("/v1/orders/0123456789abcdef0123456789abcdef")),
            )
            .await;
        statuses.push(answer.0 .0);
        if answer.0 .0 == StatusCode::TOO_MANY_REQUESTS {
            return (statuses, Some(answer));
        }
    }
    (statuses, None)
}

/// With the default buckets (5 orders a second per user, a burst of 5), a buyer who
/// sends twelve orders at once gets five, plus one per 200 ms the burst took, and is
/// told to wait for the rest, even with the purchase limit and the stock to spare.
#[tokio::test]
async fn the_default_per_user_bucket_admits_a_burst_of_five() {
    let node = Arc::new(Node::start(&[]).await);
    node.sku_with_cards("burst", on_sale(100, 20, 600), &cards("b", 20))
        .await;
    const ORDERS: usize = 12;
    let started = std::time::Instant::now();
    let orders: Vec<_> = (0..ORDERS)
        .map(|_| {
            let node = Arc::clone(&node);
            tokio::spawn(async move { node.reserve_with_headers("burst", "eager").await })
        })
        .collect();
    let mut created = 0;
    let mut throttled = Vec::new();
    for order in orders {
        let answer = order.await.expect("order task");
        if answer.0 .0 == StatusCode::CREATED {
            created += 1;
        } else {
            throttled.push(answer);
        }
    }
    // The bucket starts full (5) and refills 5 a second: however slow the machine,
    // no more than that got through, and in under a second some were refused.
    let elapsed = started.elapsed().as_secs_f64();
    let most = 5 + (5.0 * elapsed).ceil() as usize;
    assert!(
        (5..=most).contains(&created),
        "{created} created in {elapsed:.2} s: {throttled:?}"
    );
    if elapsed < 1.0 {
        assert!(
            !throttled.is_empty(),
            "all {ORDERS} admitted in {elapsed:.2} s"
        );
    }
    for answer in &throttled {
        assert_error(&answer.0, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
        let retry_after = retry_after_secs(answer);
        assert!((1..=2).contains(&retry_after), "{retry_after}");
    }
    let created = created as u64;
    assert_eq!(node.stock("burst").await, (20 - created, created, 0));
}

/// Orders without an Idempotency-Key for a sold-out SKU are refused at the edge; once
/// a reserved card returns to stock (a cancellation), the edge lets a new buyer
/// through again.
#[tokio::test]
async fn shedding_a_sold_out_sku_ends_when_a_card_returns() {
    let node = Node::start(&[("KEYDROP_RATE_PER_IP", "0"), ("KEYDROP_RATE_PER_USER", "0")]).await;
    node.sku_with_cards("last", on_sale(100, 1, 600), &cards("l", 2))
        .await;
    let (status, first) = node.reserve("last", "u1").await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let (status, second) = node.reserve("last", "u2").await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    let shed_before = node.metric("keydrop_orders_shed_total").await;
    assert_error(
        &node.reserve("last", "u3").await,
        StatusCode::CONFLICT,
        "sold_out",
    );
    assert_eq!(
        node.metric("keydrop_orders_shed_total").await,
        shed_before + 1.0,
        "the sold-out order was not refused at the edge"
    );

    let id = first["order_id"].as_str().unwrap();
    assert_eq!(
        node.send(node.http.delete(node.at(&format!("/v1/orders/{id}"))))
            .await,
        (StatusCode::OK, json!({"status": "cancelled"}))
    );
    let order = eventually(
        "an order to be taken after the cancellation",
        Duration::from_secs(10),
        || async {
            let answer = node.reserve("last", "u4").await;
            match answer.0 {
                StatusCode::CREATED => Some(answer.1),
                StatusCode::CONFLICT if answer.1["error"] == "sold_out" => None,
                _ => panic!("{answer:?}"),
            }
        },
    )
    .await;
    assert_eq!(order["status"], "reserved", "{order}");
    assert_eq!(node.stock("last").await, (0, 2, 0));
}

/// The limits are inclusive and counted in bytes: a user id of 128 bytes (64 two-byte
/// characters) is taken and one of 129 refused; an order body of exactly 16 KiB is
/// taken and one byte more is 413; a payment signed 300 s ahead of the node's clock is
/// within the 300 s window (the node reads its clock after the test does, so it sees
/// 300 s or a little less).
#[tokio::test]
async fn limits_are_inclusive_and_counted_in_bytes() {
    let node = Node::start(&[("KEYDROP_RATE_PER_IP", "0")]).await;
    node.sku_with_cards("edge", on_sale(300, 1, 600), &cards("e", 5))
        .await;

    let longest_user = "é".repeat(64);
    assert_eq!(longest_user.len(), 128);
    let (status, order) = node.reserve("edge", &longest_user).await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    let too_long_user = format!("{}a", "é".repeat(64));
    assert_eq!(too_long_user.len(), 129);
    assert_error(
        &node.reserve("edge", &too_long_user).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );

    let body_of = |user: &str, len: usize| {
        let head = format!("{{\"user_id\":\"{user}\",\"pad\":\"");
        let tail = "\"}";
        let body = format!("{head}{}{tail}", "p".repeat(len - head.len() - tail.len()));
        assert_eq!(body.len(), len);
        body
    };
    let order_of = |body: String| {
        node.send(
            node.http
                .post(node.at("/v1/skus/edge/orders"))
                .header("content-type", "application/json")
                .body(body),
        )
    };
    let (status, largest) = order_of(body_of("largest", 16 * 1024)).await;
    assert_eq!(status, StatusCode::CREATED, "{largest}");
    let (too_large, headers) = node
        .send_with_headers(
            node.http
                .post(node.at("/v1/skus/edge/orders"))
                .header("content-type", "application/json")
                .body(body_of("too-large", 16 * 1024 + 1)),
        )
        .await;
    assert_error(
        &too_large,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    // Refused unread, so the connection closes: the answer says so.
    assert_eq!(
        headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "{headers:?}"
    );

    let id = largest["order_id"].as_str().unwrap();
    let body = json!({"payment_ref": "ahead", "amount_cents": 300}).to_string();
    let signature = sign(node.payment_secret().as_bytes(), unix_now() + 300, &body);
    let answer = node
        .send(
            node.http
                .post(node.at(&format!("/v1/orders/{id}/payment")))
                .header("x-keydrop-signature", signature)
                .body(body),
        )
        .await;
    assert_eq!(
        answer,
        (StatusCode::OK, json!({"order_id": id, "status": "paid"}))
    );
    assert_eq!(node.stock("edge").await, (3, 1, 1));
}
