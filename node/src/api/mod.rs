//! HTTP API v1: the router, the state every handler shares, and the request metrics
//! middleware. One file per route group:
//! - [`skus`]: define, stock and read SKUs;
//! - [`orders`]: reserve, read and cancel orders;
//! - [`payments`]: the payment provider's signed callback;
//! - [`health`]: liveness, readiness, metrics, and the refunds list for operators.
//!
//! Routes (admin ones need `Authorization: Bearer <admin token>`):
//! - `GET /healthz`, `GET /readyz`, `GET /metrics`;
//! - `PUT /v1/skus/{sku}` (admin), `GET /v1/skus/{sku}`, `POST /v1/skus/{sku}/cards`
//!   (admin; `application/json` or `text/csv`), `GET /v1/admin/skus/{sku}` (admin: the
//!   view plus `imported` and `low_stock_threshold`);
//! - `POST /v1/skus/{sku}/orders`, `GET` / `DELETE /v1/orders/{order_id}`,
//!   `POST /v1/orders/{order_id}/payment` (signed callback);
//! - `GET /v1/admin/refunds[?sku=<sku>]` (admin): `{"refunds": [{"order_id", "sku",
//!   "user_id", "order_status", "price_cents", "payment_ref", "amount_cents", "reason",
//!   "refused_at"}]}`, one entry per refused payment; `keydrop order late` prints it.
//!
//! Every error leaves through [`error::ApiError`], as JSON.

pub mod error;
pub mod extract;
pub mod health;
pub mod orders;
pub mod payments;
pub mod skus;

use std::ops::Deref;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::Router;
use chrono::{DateTime, SecondsFormat, Utc};
use keydrop_engine::{Engine, Timestamp};
use metrics_exporter_prometheus::PrometheusHandle;

use self::error::ApiError;
use crate::admission::Admission;
use crate::metrics::{SkuGauges, HTTP_DURATION, HTTP_REQUESTS};

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    /// Set once recovery is done; until then routes that need it answer 503.
    engine: OnceLock<Engine>,
    pub admission: Admission,
    pub admin_token_digest: [u8; 32],
    pub payment_secret: Vec<u8>,
    pub callbacks_seen: crate::signature::ReplayGuard,
    pub metrics: PrometheusHandle,
    pub sku_gauges: SkuGauges,
}

impl Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub fn new(
        admission: Admission,
        admin_token: &str,
        payment_secret: Vec<u8>,
        metrics: PrometheusHandle,
    ) -> Self {
        AppState(Arc::new(Shared {
            engine: OnceLock::new(),
            admission,
            admin_token_digest: extract::token_digest(admin_token.as_bytes()),
            payment_secret,
            callbacks_seen: crate::signature::ReplayGuard::default(),
            metrics,
            sku_gauges: SkuGauges::default(),
        }))
    }

    /// Makes the node ready: called once, after recovery.
    pub fn set_engine(&self, engine: Engine) {
        assert!(
            self.0.engine.set(engine).is_ok(),
            "the engine is set once, after recovery"
        );
    }

    pub fn engine_if_ready(&self) -> Option<&Engine> {
        self.0.engine.get()
    }

    pub fn engine(&self) -> Result<&Engine, ApiError> {
        self.engine_if_ready()
            .ok_or_else(|| ApiError::Unavailable("the node is recovering its journal".into()))
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/v1/skus/{sku}", put(skus::put_sku).get(skus::get_sku))
        .route("/v1/skus/{sku}/cards", post(skus::import_cards))
        .route("/v1/skus/{sku}/orders", post(orders::create_order))
        .route(
            "/v1/orders/{order_id}",
            get(orders::get_order).delete(orders::cancel_order),
        )
        .route(
            "/v1/orders/{order_id}/payment",
            post(payments::confirm_payment),
        )
        .route("/v1/admin/skus/{sku}", get(skus::get_sku_admin))
        .route("/v1/admin/refunds", get(health::refunds))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(record_request))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Counts and times every request by route template (never the raw path: ids in
/// label values would make one time series per order).
async fn record_request(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(HTTP_DURATION, "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(HTTP_REQUESTS, "route" => route, "status" => status).increment(1);
    response
}

/// RFC 3339 in UTC with milliseconds, as every timestamp in the API.
pub fn rfc3339(at: Timestamp) -> String {
    i64::try_from(at.as_millis())
        .ok()
        .and_then(DateTime::<Utc>::from_timestamp_millis)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn parse_rfc3339(field: &str, text: &str) -> Result<Timestamp, ApiError> {
    let at = DateTime::parse_from_rfc3339(text)
        .map_err(|e| ApiError::invalid(format!("{field}: not an RFC 3339 time ({e})")))?;
    u64::try_from(at.timestamp_millis())
        .map(Timestamp::from_millis)
        .map_err(|_| ApiError::invalid(format!("{field}: must be after 1970")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        let at = parse_rfc3339("t", "2030-01-02T03:04:05.678+02:00").unwrap();
        assert_eq!(rfc3339(at), "2030-01-02T01:04:05.678Z");
        assert!(parse_rfc3339("t", "yesterday").is_err());
        assert!(parse_rfc3339("t", "1969-12-31T23:59:59Z").is_err());
        // Out of chrono's range: clamped, not a panic.
        assert!(!rfc3339(Timestamp::from_millis(u64::MAX)).is_empty());
    }
}
