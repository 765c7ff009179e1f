//! Order routes: `POST /v1/skus/{sku}/orders` (reserve a card), `GET` and `DELETE
//! /v1/orders/{order_id}`.
//!
//! A reservation passes, in order: the overload gate (before anything of the request
//! is parsed, with a response made once, so turning a buyer away costs the node
//! little more than the HTTP exchange), the per-IP bucket (before the body is read, so
//! a flood costs little), body and header parsing, the per-device and per-user buckets,
//! sold-out shedding (no trip to the actor), and only then the SKU's actor, which
//! answers once the reservation is durable.
//!
//! Order lookups and cancellations are rate-limited per IP like orders: the order id
//! is the buyer's capability to see the card, so it must not be guessable by brute
//! force.

use std::net::SocketAddr;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{self as http, header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hyper::body::Incoming;
use keydrop_engine::{
    DeviceId, IdempotencyKey, OrderId, OrderView, RequestFingerprint, Reservation, SkuError, SkuId,
    SkuStatus, UserId,
};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{header_text, parse_json, read_body, ClientIp, OrderPath, SkuPath};
use super::{dispatch, push_rfc3339, rfc3339, AppState};
use crate::admission::Rejected;
use crate::metrics::{ADMISSION_REFUSALS, ORDERS_SHED, ORDER_OUTCOMES, OVERLOAD_SHED};

/// An order body is `{"user_id": "<≤ 128 bytes>"}`; 16 KiB is generous.
pub const ORDER_BODY_BYTES_MAX: usize = 16 * 1024;

// Header names made once: looking a `&str` up parses and hashes it every time.
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const DEVICE_ID: HeaderName = HeaderName::from_static("x-device-id");

#[derive(Deserialize)]
struct OrderBody {
    user_id: String,
}

#[derive(Serialize)]
pub struct CardJson {
    serial: String,
    secret: String,
}

#[derive(Serialize)]
pub struct OrderJson {
    order_id: String,
    sku: String,
    status: &'static str,
    expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    card: Option<CardJson>,
}

/// Counts a token-bucket refusal and turns it into the 429.
pub fn rate_limited(rejected: Rejected) -> ApiError {
    ADMISSION_REFUSALS.increment(rejected.scope.as_str(), 1);
    ApiError::RateLimited(rejected)
}

/// `POST /v1/skus/{sku}/orders` as routed: the router has the `{sku}` segment, and
/// the peer's address is in the request's extensions.
pub async fn create_order(State(state): State<AppState>, request: Request) -> Response {
    place_order(state, request, Routing::Router).await
}

/// The same for a path [`dispatch::order_route_sku`] accepted, sent here ahead of
/// the router by the connection from `peer`: the `{sku}` segment is read from the
/// path itself.
pub async fn create_order_direct(
    state: AppState,
    peer: SocketAddr,
    request: http::Request<Incoming>,
) -> Response {
    place_order(state, request, Routing::Direct { peer }).await
}

/// How an order reached its handler, which says where its `{sku}` and peer are.
enum Routing {
    Router,
    Direct { peer: SocketAddr },
}

async fn place_order<B>(state: AppState, request: http::Request<B>, routing: Routing) -> Response
where
    B: HttpBody<Data = Bytes> + Unpin + Send,
    B::Error: std::fmt::Display,
{
    // Bounded before any work, extractors included: past the bound a buyer is told to
    // come back (503 with Retry-After) rather than wait behind a queue that cannot
    // drain in time, and in a crowd most requests end here, so the refusal costs
    // little more than the HTTP exchange itself. The order's slot is taken once its
    // body is in (`reserve`).
    if let Err(reason) = state.admission.admit_order() {
        OVERLOAD_SHED.increment(reason.as_str(), 1);
        ORDER_OUTCOMES.increment(ApiError::Overloaded.code(), 1);
        return ApiError::overloaded_response();
    }
    let (mut parts, body) = request.into_parts();
    let client_and_sku = match routing {
        Routing::Router => match ClientIp::from_request_parts(&mut parts, &state).await {
            Ok(ClientIp(ip)) => Ok((ip, SkuPath::from_request_parts(&mut parts, &state).await)),
            Err(error) => Err(error),
        },
        Routing::Direct { peer } => {
            let ip = state.admission.client_ip(peer, &parts.headers);
            let sku = dispatch::order_route_sku(parts.uri.path())
                .ok_or(ApiError::NotFound)
                .and_then(SkuPath::parse);
            Ok((ip, sku))
        }
    };
    let outcome = match client_and_sku {
        Ok((ip, sku)) => reserve(&state, ip, sku, &parts.headers, body).await,
        Err(error) => Err(error),
    };
    let label = match &outcome {
        Ok(view) if view.replayed => "replayed",
        Ok(_) => "reserved",
        Err(error) => error.code(),
    };
    ORDER_OUTCOMES.increment(label, 1);
    match outcome {
        Ok(view) => {
            // Built as it is sent: a body's `into_response` would set a text type for
            // the JSON type to replace, two header-map writes per order for one.
            let mut response = Response::new(Body::from(reserved_body(&view)));
            *response.status_mut() = StatusCode::CREATED;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if view.replayed {
                response
                    .headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
            }
            response
        }
        Err(error) => error.into_response(),
    }
}

/// The 201 body: `{"order_id", "sku", "status": "reserved", "price_cents",
/// "expires_at"}`. A replay answers with it too: the order as it was reserved,
/// whatever happened to it since.
///
/// Written by hand because every value is JSON-safe by construction (hex digits, a
/// SKU id's `[A-Za-z0-9_-]`, digits, an RFC 3339 time): there is nothing to escape,
/// and serde_json's character-by-character escaping was a visible share of an order.
/// No formatter either: `write!` of the id and the price was half of what was left.
fn reserved_body(view: &OrderView) -> String {
    let sku = view.sku.as_str();
    debug_assert!(sku.bytes().all(SkuId::allows_byte));
    let mut body = String::with_capacity(RESERVED_BODY_LEN_TYPICAL + sku.len());
    body.push_str(r#"{"order_id":""#);
    body.push_str(view.order_id.write_hex(&mut [0u8; 32]));
    body.push_str(r#"","sku":""#);
    body.push_str(sku);
    body.push_str(r#"","status":"reserved","price_cents":"#);
    body.push_str(itoa::Buffer::new().format(view.price_cents));
    body.push_str(r#","expires_at":""#);
    push_rfc3339(&mut body, view.expires_at);
    body.push_str(r#""}"#);
    body
}

/// The 201 body's length without the SKU id and with a 10-digit price.
const RESERVED_BODY_LEN_TYPICAL: usize = 140;

/// An order body, `{"user_id"}`.
pub fn parse_order_body(body: &[u8]) -> Result<UserId, ApiError> {
    let OrderBody { user_id } = parse_json(body)?;
    UserId::parse(user_id).map_err(|e| ApiError::invalid(format!("user_id: {e}")))
}

/// An order's optional `X-Device-Id` and `Idempotency-Key`.
pub fn parse_order_headers(
    headers: &HeaderMap,
) -> Result<(Option<DeviceId>, Option<IdempotencyKey>), ApiError> {
    let device = header_text(headers, &DEVICE_ID)?
        .map(DeviceId::parse)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("X-Device-Id: {e}")))?;
    let key = header_text(headers, &IDEMPOTENCY_KEY)?
        .map(IdempotencyKey::parse)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("Idempotency-Key: {e}")))?;
    Ok((device, key))
}

async fn reserve<B>(
    state: &AppState,
    ip: std::net::IpAddr,
    sku: Result<SkuPath, ApiError>,
    headers: &HeaderMap,
    body: B,
) -> Result<OrderView, ApiError>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let engine = state.engine()?;
    state.admission.check_ip(ip).map_err(rate_limited)?;
    let SkuPath(sku) = sku?;
    let body = read_body(headers, body, ORDER_BODY_BYTES_MAX, state.body_time_limit).await?;
    let user = parse_order_body(&body)?;
    let (device, key) = parse_order_headers(headers)?;
    if let Some(device) = &device {
        state.admission.check_device(device).map_err(rate_limited)?;
    }
    state.admission.check_user(&user).map_err(rate_limited)?;
    let idempotency = key.map(|key| {
        let device_bytes = device.as_ref().map_or(&b""[..], |d| d.as_str().as_bytes());
        (key, RequestFingerprint::of(&[&body, device_bytes]))
    });
    // Shed orders for a sold-out SKU here, without a trip to its actor. A keyed one
    // is answered as the actor would (with what its key was refused before, if it
    // was), unless one of the SKU's orders may hold its key: it may be the retry of
    // an order that got a card, owed its original 201.
    match engine.available_hint(&sku) {
        None => return Err(ApiError::SkuNotFound),
        Some(0) => {
            // Out of stock, but a SKU outside its sale window answers as the actor
            // would: not on sale, whatever its stock.
            let refusal = match engine.sku_status(&sku) {
                Some(status @ (SkuStatus::Scheduled | SkuStatus::Ended)) => {
                    SkuError::NotOnSale { status }
                }
                _ => SkuError::SoldOut,
            };
            let answer = match &idempotency {
                None => Some(refusal),
                Some((key, fingerprint)) => {
                    engine.refuse_keyed_order(&sku, key, fingerprint, refusal)
                }
            };
            if let Some(refusal) = answer {
                metrics::counter!(ORDERS_SHED).increment(1);
                return Err(ApiError::from(refusal));
            }
        }
        Some(_) => {}
    }
    // Held until the engine answers: the order bound counts the orders the engine
    // is deciding, not the clients still sending.
    let _slot = state.admission.take_order_slot().map_err(|reason| {
        OVERLOAD_SHED.increment(reason.as_str(), 1);
        ApiError::Overloaded
    })?;
    let view = engine
        .reserve(
            &sku,
            Reservation {
                user,
                device,
                idempotency,
            },
        )
        .await?;
    Ok(view)
}

fn admitted_order(
    state: &AppState,
    ip: std::net::IpAddr,
    order: Result<OrderPath, ApiError>,
) -> Result<OrderId, ApiError> {
    state.admission.check_ip(ip).map_err(rate_limited)?;
    let OrderPath(order_id) = order?;
    Ok(order_id)
}

pub async fn get_order(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    order: Result<OrderPath, ApiError>,
) -> Result<Json<OrderJson>, ApiError> {
    let engine = state.engine()?;
    let order_id = admitted_order(&state, ip, order)?;
    let details = engine.order(&order_id).await?;
    let view = details.view;
    Ok(Json(OrderJson {
        order_id: view.order_id.to_string(),
        sku: view.sku.to_string(),
        status: view.status.as_str(),
        expires_at: rfc3339(view.expires_at),
        card: details.card.map(|(serial, secret)| CardJson {
            serial: serial.to_string(),
            secret: secret.expose().to_owned(),
        }),
    }))
}

#[derive(Serialize)]
pub struct CancelledJson {
    status: &'static str,
}

pub async fn cancel_order(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    order: Result<OrderPath, ApiError>,
) -> Result<Json<CancelledJson>, ApiError> {
    let engine = state.engine()?;
    let order_id = admitted_order(&state, ip, order)?;
    let view = engine.cancel(&order_id).await?;
    tracing::debug!(order = %view.order_id, "order cancelled");
    Ok(Json(CancelledJson {
        status: view.status.as_str(),
    }))
}

#[cfg(test)]
mod tests {
    use keydrop_engine::{OrderStatus, Timestamp};

    use super::*;

    #[test]
    fn reserved_body_is_the_json_of_the_view() {
        let sku = SkuId::parse("steam-card_50").unwrap();
        for price_cents in [0, 7, u64::MAX] {
            let view = OrderView {
                order_id: OrderId::generate(&sku),
                sku: sku.clone(),
                user: UserId::parse("buyer \"quoted\"").unwrap(),
                status: OrderStatus::Reserved,
                price_cents,
                created_at: Timestamp::from_millis(1_700_000_000_000),
                expires_at: Timestamp::from_millis(1_700_000_300_123),
                serial: None,
                refused_payments: Vec::new(),
                replayed: false,
            };
            let body = reserved_body(&view);
            let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                parsed,
                serde_json::json!({
                    "order_id": view.order_id.to_string(),
                    "sku": "steam-card_50",
                    "status": "reserved",
                    "price_cents": price_cents,
                    "expires_at": "2023-11-14T22:18:20.123Z",
                }),
                "{body}"
            );
        }
    }
}
