//! HTTP API v1: the router and the state every handler shares. One file per route
//! group, and one for the middleware around them:
//! - [`skus`]: define, stock and read SKUs;
//! - [`orders`]: reserve, read and cancel orders;
//! - [`payments`]: the payment provider's signed callback;
//! - [`health`]: liveness, readiness, metrics, and the refunds list for operators;
//! - [`request_metrics`]: counts and times every request by route template;
//! - [`dispatch`]: the service the server runs, the router with order placement
//!   dispatched ahead of it.
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

pub mod dispatch;
pub mod error;
pub mod extract;
pub mod health;
pub mod orders;
pub mod payments;
pub mod request_metrics;
pub mod skus;

use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use axum::handler::Handler;
use axum::routing::{get, post, put, MethodRouter};
use axum::Router;
use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use keydrop_engine::{Engine, Timestamp};
use metrics_exporter_prometheus::PrometheusHandle;

use self::error::ApiError;
use self::request_metrics::RequestMetricsLayer;
use crate::admission::Admission;
use crate::metrics::SkuGauges;

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
    /// How long a request body may take to come in (`extract::LimitedBody`);
    /// `None`: forever.
    pub body_time_limit: Option<std::time::Duration>,
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
        body_time_limit: Option<std::time::Duration>,
    ) -> Self {
        AppState(Arc::new(Shared {
            engine: OnceLock::new(),
            admission,
            admin_token_digest: extract::token_digest(admin_token.as_bytes()),
            payment_secret,
            callbacks_seen: crate::signature::ReplayGuard::starting_at(
                crate::signature::unix_now_secs(),
            ),
            metrics,
            sku_gauges: SkuGauges::default(),
            body_time_limit,
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
    let routes: [(&'static str, MethodRouter<AppState>); 10] = [
        ("/healthz", get(health::healthz)),
        ("/readyz", get(health::readyz)),
        ("/metrics", get(health::metrics)),
        ("/v1/skus/{sku}", put(skus::put_sku).get(skus::get_sku)),
        ("/v1/skus/{sku}/cards", post(skus::import_cards)),
        (dispatch::ORDERS_ROUTE, post(orders::create_order)),
        (
            "/v1/orders/{order_id}",
            get(orders::get_order).delete(orders::cancel_order),
        ),
        (
            "/v1/orders/{order_id}/payment",
            post(payments::confirm_payment),
        ),
        ("/v1/admin/skus/{sku}", get(skus::get_sku_admin)),
        ("/v1/admin/refunds", get(health::refunds)),
    ];
    let router = routes
        .into_iter()
        .fold(Router::new(), |router, (template, methods)| {
            // Layered per route, so that a wrong method is counted under the route.
            router.route(
                template,
                methods
                    .fallback(method_not_allowed)
                    .layer(RequestMetricsLayer::new(template)),
            )
        });
    router
        .fallback(not_found.layer(RequestMetricsLayer::new(request_metrics::UNMATCHED)))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// RFC 3339 in UTC with milliseconds, as every timestamp in the API.
pub fn rfc3339(at: Timestamp) -> String {
    let mut text = String::with_capacity(RFC3339_MILLIS_LEN);
    push_rfc3339(&mut text, at);
    text
}

/// Length of `2030-01-02T03:04:05.678Z`.
const RFC3339_MILLIS_LEN: usize = 24;

/// Appends [`rfc3339`]'s text. Written digit by digit for four-digit years (every
/// real one): chrono's formatter runs each field through `fmt`, a visible share of
/// the work of answering an order.
pub fn push_rfc3339(out: &mut String, at: Timestamp) {
    let time = i64::try_from(at.as_millis())
        .ok()
        .and_then(DateTime::<Utc>::from_timestamp_millis)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    let Ok(year @ 0..=9999) = u32::try_from(time.year()) else {
        out.push_str(&time.to_rfc3339_opts(SecondsFormat::Millis, true));
        return;
    };
    let mut text = *b"0000-00-00T00:00:00.000Z";
    for (value, at, digits) in [
        (year, 0, 4),
        (time.month(), 5, 2),
        (time.day(), 8, 2),
        (time.hour(), 11, 2),
        (time.minute(), 14, 2),
        (time.second(), 17, 2),
        (time.timestamp_subsec_millis(), 20, 3),
    ] {
        let mut rest = value;
        for slot in text[at..at + digits].iter_mut().rev() {
            *slot = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
    }
    out.push_str(std::str::from_utf8(&text).expect("digits and separators are ASCII"));
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

    #[test]
    fn timestamps_match_chrono_formatting() {
        let chrono_text = |millis: u64| {
            DateTime::<Utc>::from_timestamp_millis(millis as i64)
                .unwrap()
                .to_rfc3339_opts(SecondsFormat::Millis, true)
        };
        let year_10000 = 253_402_300_800_000;
        let mut cases = vec![
            0,
            1,
            999,
            1_000,
            86_399_999,
            951_782_400_000, // 2000-02-29
            year_10000 - 1,
            year_10000,
            year_10000 + 123_456_789,
        ];
        // A spread of times from 1970 to past 9999, by a fixed-seed LCG.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            cases.push(x % (year_10000 + 10_000_000_000_000));
        }
        for millis in cases {
            assert_eq!(
                rfc3339(Timestamp::from_millis(millis)),
                chrono_text(millis),
                "{millis} ms"
            );
        }
    }
}
