//! `redis-http`: the Lua design of `redis-direct` behind a minimal axum service,
//! what users of that design deploy, so keydrop's HTTP edge is compared like for
//! like. It speaks the routes of keydrop's API v1 the drop uses (SKU definition
//! and import, orders, signed payment callbacks, cancellation, look-ups), so the
//! same `http` client drives both.
//!
//! The service runs on its own runtime and threads, as a separate process would,
//! bound to 127.0.0.1 on a port the OS picks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::redis::RedisStore;
use crate::audit::Status;

/// A callback more than this far from our clock is refused, as keydrop does.
const SIGNATURE_SKEW_SECS_MAX: u64 = 300;

struct Service {
    store: RedisStore,
    admin_token: String,
    payment_secret: Vec<u8>,
    /// Price by SKU, set by the definition route.
    prices: RwLock<HashMap<String, u64>>,
}

fn error(status: StatusCode, code: &str) -> Response {
    (status, Json(json!({"error": code, "message": code}))).into_response()
}

fn authorised(service: &Service, headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| token == service.admin_token)
}

#[derive(Deserialize)]
struct SkuDefBody {
    price_cents: u64,
}

async fn define(
    State(service): State<Arc<Service>>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    Json(body): Json<SkuDefBody>,
) -> Response {
    if !authorised(&service, &headers) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    service
        .prices
        .write()
        .expect("no panic while holding the lock")
        .insert(sku.clone(), body.price_cents);
    (StatusCode::OK, Json(json!({"sku": sku}))).into_response()
}

#[derive(Deserialize)]
struct Card {
    serial: String,
    secret: String,
}

#[derive(Deserialize)]
struct ImportBody {
    cards: Vec<Card>,
}

async fn import(
    State(service): State<Arc<Service>>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    Json(body): Json<ImportBody>,
) -> Response {
    if !authorised(&service, &headers) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let cards: Vec<(String, String)> = body
        .cards
        .into_iter()
        .map(|card| (card.serial, card.secret))
        .collect();
    match service.store.import(&sku, &cards).await {
        Ok(imported) => Json(json!({"imported": imported, "duplicates": 0})).into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

async fn show_sku(State(service): State<Arc<Service>>, Path(sku): Path<String>) -> Response {
    match service.store.counts(&sku).await {
        Ok(counts) => Json(json!({
            "sku": sku,
            "available": counts.available,
            "reserved": counts.reserved,
            "sold": counts.sold,
        }))
        .into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

#[derive(Deserialize)]
struct OrderBody {
    user_id: String,
}

async fn reserve(
    State(service): State<Arc<Service>>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    Json(body): Json<OrderBody>,
) -> Response {
    let Some(price) = service
        .prices
        .read()
        .expect("no panic while holding the lock")
        .get(&sku)
        .copied()
    else {
        return error(StatusCode::NOT_FOUND, "sku_not_found");
    };
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| super::redis::new_order_id("anonymous"));
    match service.store.reserve(&sku, &body.user_id, &key, price).await {
        super::Answer::Reserved(order_id) => (
            StatusCode::CREATED,
            Json(json!({"order_id": order_id, "sku": sku, "status": "reserved", "price_cents": price})),
        )
            .into_response(),
        super::Answer::SoldOut => error(StatusCode::CONFLICT, "sold_out"),
        super::Answer::PurchaseLimit => error(StatusCode::FORBIDDEN, "purchase_limit"),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

/// Checks `t=<unix>,v1=<hex>` against the raw body, in constant time.
fn signature_ok(secret: &[u8], header: Option<&str>, body: &[u8]) -> bool {
    use hmac::Mac;
    let Some(header) = header else { return false };
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.parse::<u64>().ok(),
            Some(("v1", value)) => v1 = hex::decode(value).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if now.abs_diff(t) > SIGNATURE_SKEW_SECS_MAX {
        return false;
    }
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&v1).is_ok()
}

#[derive(Deserialize)]
struct PaymentBody {
    payment_ref: String,
    amount_cents: u64,
}

async fn pay(
    State(service): State<Arc<Service>>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let signature = headers
        .get("x-keydrop-signature")
        .and_then(|v| v.to_str().ok());
    if !signature_ok(&service.payment_secret, signature, &body) {
        return error(StatusCode::UNAUTHORIZED, "bad_signature");
    }
    let Ok(payment) = serde_json::from_slice::<PaymentBody>(&body) else {
        return error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    match service
        .store
        .pay(&order_id, &payment.payment_ref, payment.amount_cents)
        .await
    {
        super::Answer::Paid => {
            Json(json!({"order_id": order_id, "status": "paid"})).into_response()
        }
        super::Answer::Expired => error(StatusCode::CONFLICT, "reservation_expired"),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

async fn cancel(State(service): State<Arc<Service>>, Path(order_id): Path<String>) -> Response {
    match service.store.cancel(&order_id).await {
        super::Answer::Cancelled => Json(json!({"status": "cancelled"})).into_response(),
        super::Answer::Expired => error(StatusCode::CONFLICT, "already_paid"),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

async fn show_order(State(service): State<Arc<Service>>, Path(order_id): Path<String>) -> Response {
    match service.store.orders(&[order_id.as_str()]).await {
        Ok(found) => match found.into_iter().next().flatten() {
            Some(order) => {
                let status = match order.status {
                    Status::Reserved => "reserved",
                    Status::Paid => "paid",
                    Status::Cancelled => "cancelled",
                    Status::Expired => "expired",
                };
                let mut body = json!({"order_id": order_id, "status": status});
                if let Some(serial) = order.serial {
                    body["card"] = json!({ "serial": serial });
                }
                Json(body).into_response()
            }
            None => error(StatusCode::NOT_FOUND, "order_not_found"),
        },
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

/// The service, running on worker threads of its own until stopped or dropped.
pub struct RedisHttpService {
    pub addr: SocketAddr,
    pub durability: String,
    pub endpoint: String,
    pub fsync_policy: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RedisHttpService {
    pub fn start(
        redis_url: &str,
        admin_token: &str,
        payment_secret: &str,
        threads: usize,
    ) -> Result<RedisHttpService> {
        let threads = threads.max(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("redis-http")
            .enable_all()
            .build()
            .context("starting the redis-http runtime")?;
        let store = runtime.block_on(RedisStore::connect(redis_url))?;
        let durability = store.durability.clone();
        let fsync_policy = store.fsync_policy().to_string();
        let endpoint = format!("axum on its own {threads} threads, {}", store.endpoint);
        let service = Arc::new(Service {
            store,
            admin_token: admin_token.to_string(),
            payment_secret: payment_secret.as_bytes().to_vec(),
            prices: RwLock::new(HashMap::new()),
        });
        let app = Router::new()
            .route("/v1/skus/{sku}", put(define).get(show_sku))
            .route("/v1/skus/{sku}/cards", post(import))
            .route("/v1/skus/{sku}/orders", post(reserve))
            .route("/v1/orders/{order_id}", get(show_order).delete(cancel))
            .route("/v1/orders/{order_id}/payment", post(pay))
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
            .with_state(service);
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .context("binding the redis-http service")?;
        let addr = listener.local_addr()?;
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("redis-http".into())
            .spawn(move || {
                let served = runtime.block_on(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stopped.await;
                        })
                        .await
                });
                if let Err(error) = served {
                    tracing::error!(%error, "redis-http service failed");
                }
                runtime.shutdown_timeout(std::time::Duration::from_secs(5));
            })
            .context("spawning the redis-http thread")?;
        Ok(RedisHttpService {
            addr,
            durability,
            endpoint,
            fsync_policy,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RedisHttpService {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_from_the_client_are_accepted_and_others_refused() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let body = br#"{"payment_ref":"p","amount_cents":1}"#;
        let header = crate::target::http::payment_signature(b"k", now, body);
        assert!(signature_ok(b"k", Some(&header), body));
        assert!(!signature_ok(b"other", Some(&header), body));
        assert!(!signature_ok(b"k", Some(&header), b"{}"));
        assert!(!signature_ok(b"k", None, body));
        let stale = crate::target::http::payment_signature(b"k", now - 1000, body);
        assert!(!signature_ok(b"k", Some(&stale), body));
    }
}
