//! The one error type of the HTTP API and its one mapping to responses: every error
//! leaves as `{"error": "<code>", "message": "<text>"}` with the status below. The
//! codes are the contract clients are written against; the messages are for people.
//!
//! Engine errors are converted here too, so that the whole table is in one file.
//! Transient ones (a full queue, a journal that cannot write, a shutdown) become 503
//! with `Retry-After`: the same request may succeed later, unlike a 409.

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keydrop_engine::{EngineError, SkuError};
use serde::Serialize;

use crate::admission::Rejected;

/// What to wait before retrying after an overload or an outage.
const RETRY_AFTER_OVERLOADED: Duration = Duration::from_secs(1);
const RETRY_AFTER_UNAVAILABLE: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub enum ApiError {
    /// A malformed id, field or body.
    InvalidRequest(String),
    /// A request head hyper could not parse (`connections::head_errors`).
    MalformedHead,
    /// A request target past hyper's limit.
    UriTooLong,
    /// More headers, or a longer head, than hyper takes.
    HeadersTooLarge,
    /// Missing or wrong admin token.
    Unauthorized,
    /// Payment callback signature missing, malformed, stale or wrong. One vague
    /// answer for all of them: the caller learns nothing about which check failed.
    BadSignature,
    AmountMismatch {
        expected_cents: u64,
    },
    PurchaseLimit(String),
    SkuNotFound,
    OrderNotFound,
    /// No such route.
    NotFound,
    MethodNotAllowed,
    SoldOut,
    NotOnSale(String),
    ReservationExpired,
    AlreadyPaid,
    Conflict(String),
    PayloadTooLarge {
        limit_bytes: usize,
    },
    UnsupportedMediaType(String),
    /// The request body did not come in time (see `extract::LimitedBody`).
    RequestTimeout {
        limit: Duration,
    },
    IdempotencyKeyReused,
    RateLimited(Rejected),
    /// A bounded queue is full: retry shortly.
    Overloaded,
    /// Not serving yet (recovering) or any more (shutting down), or storage failed.
    Unavailable(String),
    /// A bug or an unexpected failure; details go to the log, not to the client.
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
}

impl ApiError {
    pub fn invalid(message: impl std::fmt::Display) -> Self {
        ApiError::InvalidRequest(message.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_)
            | ApiError::MalformedHead
            | ApiError::AmountMismatch { .. } => StatusCode::BAD_REQUEST,
            ApiError::UriTooLong => StatusCode::URI_TOO_LONG,
            ApiError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Unauthorized | ApiError::BadSignature => StatusCode::UNAUTHORIZED,
            ApiError::PurchaseLimit(_) => StatusCode::FORBIDDEN,
            ApiError::SkuNotFound | ApiError::OrderNotFound | ApiError::NotFound => {
                StatusCode::NOT_FOUND
            }
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::SoldOut
            | ApiError::NotOnSale(_)
            | ApiError::ReservationExpired
            | ApiError::AlreadyPaid
            | ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Overloaded | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) | ApiError::MalformedHead => "invalid_request",
            ApiError::UriTooLong => "uri_too_long",
            ApiError::HeadersTooLarge => "headers_too_large",
            ApiError::Unauthorized => "unauthorized",
            ApiError::BadSignature => "bad_signature",
            ApiError::AmountMismatch { .. } => "amount_mismatch",
            ApiError::PurchaseLimit(_) => "purchase_limit",
            ApiError::SkuNotFound => "sku_not_found",
            ApiError::OrderNotFound => "order_not_found",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::SoldOut => "sold_out",
            ApiError::NotOnSale(_) => "not_on_sale",
            ApiError::ReservationExpired => "reservation_expired",
            ApiError::AlreadyPaid => "already_paid",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::RequestTimeout { .. } => "request_timeout",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::Overloaded => "overloaded",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::InvalidRequest(m)
            | ApiError::PurchaseLimit(m)
            | ApiError::NotOnSale(m)
            | ApiError::Conflict(m)
            | ApiError::UnsupportedMediaType(m)
            | ApiError::Unavailable(m) => m.clone(),
            ApiError::MalformedHead => {
                "the request head is not valid HTTP/1.1 (its request line or a header); the connection is closed".into()
            }
            ApiError::UriTooLong => {
                "the request target is longer than the node reads; the connection is closed".into()
            }
            ApiError::HeadersTooLarge => {
                "over 100 headers, or a request head over the node's read buffer; the connection is closed".into()
            }
            ApiError::Unauthorized => "a valid admin bearer token is required".into(),
            ApiError::BadSignature => "missing, stale or invalid X-Keydrop-Signature".into(),
            ApiError::AmountMismatch { expected_cents } => {
                format!("amount does not match the price of {expected_cents} cents; the payment is recorded for refund")
            }
            ApiError::SkuNotFound => "no such SKU".into(),
            ApiError::OrderNotFound => "no such order".into(),
            ApiError::NotFound => "no such route".into(),
            ApiError::MethodNotAllowed => "method not allowed on this route".into(),
            ApiError::SoldOut => "sold out; a card may come back when a reservation expires".into(),
            ApiError::ReservationExpired => {
                "the reservation expired or was cancelled; a payment for it is recorded for refund"
                    .into()
            }
            ApiError::AlreadyPaid => "the order is already paid".into(),
            ApiError::PayloadTooLarge { limit_bytes } => {
                format!("request body is over this route's limit of {limit_bytes} bytes")
            }
            ApiError::RequestTimeout { limit } => format!(
                "the request body did not come in within {} ms (a card import: each part of it); nothing was done",
                limit.as_millis()
            ),
            ApiError::IdempotencyKeyReused => {
                "this Idempotency-Key was already used with a different request".into()
            }
            ApiError::RateLimited(r) => {
                format!("too many requests per {}; retry later", r.scope.as_str())
            }
            ApiError::Overloaded => "the node is at capacity; retry shortly".into(),
            ApiError::Internal(_) => "internal error".into(),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited(r) => Some(r.retry_after),
            ApiError::Overloaded => Some(RETRY_AFTER_OVERLOADED),
            ApiError::Unavailable(_) => Some(RETRY_AFTER_UNAVAILABLE),
            _ => None,
        }
    }

    /// Answered before the request's body was read to its end: too large, or too
    /// slow to arrive.
    fn leaves_body_unread(&self) -> bool {
        matches!(
            self,
            ApiError::PayloadTooLarge { .. } | ApiError::RequestTimeout { .. }
        )
    }

    /// `ApiError::Overloaded` as a response, made without serialising anything: in a
    /// crowd past the order bound most requests end with it, and its cost is what
    /// the node pays for each buyer it turns away. The same bytes and headers as
    /// `ApiError::Overloaded.into_response()` (a test holds them equal).
    pub fn overloaded_response() -> Response {
        static PREBUILT: OnceLock<(HeaderMap, Bytes)> = OnceLock::new();
        let (headers, body) = PREBUILT.get_or_init(|| {
            let mut headers = HeaderMap::with_capacity(2);
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(
                header::RETRY_AFTER,
                retry_after_value(RETRY_AFTER_OVERLOADED),
            );
            let body =
                serde_json::to_vec(&ApiError::Overloaded.body()).expect("an error body serialises");
            (headers, body.into())
        });
        tracing::debug!(code = ApiError::Overloaded.code(), "request refused");
        // Cloned whole: no header name hashed, no value formatted, no body written.
        let mut response = Response::new(Body::from(body.clone()));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        *response.headers_mut() = headers.clone();
        response
    }

    /// The error's JSON body, for answers made outside axum.
    pub fn body_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body()).expect("an error body serialises")
    }

    fn body(&self) -> ErrorBody<'static> {
        ErrorBody {
            error: self.code(),
            message: self.message(),
        }
    }
}

/// Whole seconds, rounded up, never 0: "retry now" would defeat the point.
fn retry_after_value(wait: Duration) -> HeaderValue {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Internal(detail) => tracing::error!(%detail, "internal error"),
            // Engine outages are logged where they happen; this may be /readyz polling.
            ApiError::Unavailable(detail) => tracing::debug!(%detail, "unavailable"),
            _ => tracing::debug!(code = self.code(), "request refused"),
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        if let Some(wait) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after_value(wait));
        }
        if self.leaves_body_unread() {
            // The rest of the body may still be on its way, and the connection closes
            // after this answer: said out loud, a client does not send its next
            // request down a connection that is going away.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<SkuError> for ApiError {
    fn from(error: SkuError) -> Self {
        match error {
            SkuError::InvalidDefinition(why) => ApiError::InvalidRequest(why),
            SkuError::SoldOut => ApiError::SoldOut,
            e @ SkuError::NotOnSale { .. } => ApiError::NotOnSale(e.to_string()),
            e @ SkuError::PurchaseLimit { .. } => ApiError::PurchaseLimit(e.to_string()),
            SkuError::IdempotencyKeyReused => ApiError::IdempotencyKeyReused,
            SkuError::OrderNotFound => ApiError::OrderNotFound,
            SkuError::AmountMismatch { expected_cents } => {
                ApiError::AmountMismatch { expected_cents }
            }
            SkuError::ReservationExpired => ApiError::ReservationExpired,
            SkuError::AlreadyPaid => ApiError::AlreadyPaid,
            e @ SkuError::NotPaid => ApiError::Conflict(e.to_string()),
            e @ (SkuError::ImportBatchTooLarge { .. } | SkuError::TooManyCards { .. }) => {
                ApiError::InvalidRequest(e.to_string())
            }
            // Order ids carry 96 random bits and are made here, not by clients.
            e @ SkuError::DuplicateOrderId => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::Sku(e) => e.into(),
            EngineError::SkuNotFound => ApiError::SkuNotFound,
            EngineError::Overloaded => ApiError::Overloaded,
            // The storage error's text (paths, RocksDB's words) is for the operator,
            // and the journal writer logs it where it happens.
            EngineError::JournalUnavailable(_) => ApiError::Unavailable(
                "the change could not be made durable; retry it (an order with the same Idempotency-Key)".into(),
            ),
            e if e.is_transient() => ApiError::Unavailable(e.to_string()),
            e @ EngineError::SkuExists => ApiError::Conflict(e.to_string()),
            e @ EngineError::InvalidBundle(_) => ApiError::InvalidRequest(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keydrop_engine::sku::LimitScope;
    use keydrop_engine::SkuStatus;

    const STORAGE_DETAIL: &str = "IO error: No space left on device: /srv/keydrop/db/000012.log";

    #[test]
    fn answers_given_before_the_body_was_read_close_the_connection() {
        let closes = |error: ApiError| {
            error
                .into_response()
                .headers()
                .get(header::CONNECTION)
                .map(|v| v.as_bytes().to_vec())
        };
        assert_eq!(
            closes(ApiError::PayloadTooLarge { limit_bytes: 16 }),
            Some(b"close".to_vec())
        );
        assert_eq!(
            closes(ApiError::RequestTimeout {
                limit: Duration::from_secs(10)
            }),
            Some(b"close".to_vec())
        );
        assert_eq!(closes(ApiError::IdempotencyKeyReused), None);
        assert_eq!(closes(ApiError::Overloaded), None);
    }

    #[test]
    fn engine_errors_map_to_the_contract() {
        let cases: Vec<(EngineError, StatusCode, &str)> = vec![
            (SkuError::SoldOut.into(), StatusCode::CONFLICT, "sold_out"),
            (
                SkuError::NotOnSale {
                    status: SkuStatus::Scheduled,
                }
                .into(),
                StatusCode::CONFLICT,
                "not_on_sale",
            ),
            (
                SkuError::PurchaseLimit {
                    scope: LimitScope::Device,
                    limit: 1,
                }
                .into(),
                StatusCode::FORBIDDEN,
                "purchase_limit",
            ),
            (
                SkuError::IdempotencyKeyReused.into(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
            ),
            (
                SkuError::AmountMismatch { expected_cents: 5 }.into(),
                StatusCode::BAD_REQUEST,
                "amount_mismatch",
            ),
            (
                EngineError::SkuNotFound,
                StatusCode::NOT_FOUND,
                "sku_not_found",
            ),
            (
                EngineError::Overloaded,
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
            ),
            (
                EngineError::ShuttingDown,
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
            (
                EngineError::JournalUnavailable(STORAGE_DETAIL.into()),
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
        ];
        for (error, status, code) in cases {
            let api = ApiError::from(error);
            assert_eq!((api.status(), api.code()), (status, code));
            assert!(
                !api.message().contains(STORAGE_DETAIL),
                "{code}: storage details stay in the log"
            );
            let response = api.into_response();
            if status == StatusCode::SERVICE_UNAVAILABLE {
                assert!(
                    response.headers().contains_key(header::RETRY_AFTER),
                    "{code}"
                );
            }
        }
    }

    #[tokio::test]
    async fn the_prebuilt_overloaded_response_is_the_overloaded_error() {
        let built = ApiError::Overloaded.into_response();
        let prebuilt = ApiError::overloaded_response();
        assert_eq!(prebuilt.status(), built.status());
        assert_eq!(prebuilt.headers(), built.headers());
        let body = |response: Response| axum::body::to_bytes(response.into_body(), usize::MAX);
        let (prebuilt, built) = (body(prebuilt).await.unwrap(), body(built).await.unwrap());
        assert_eq!(prebuilt, built);
        let json: serde_json::Value = serde_json::from_slice(&prebuilt).unwrap();
        assert_eq!(json["error"], "overloaded");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let response = ApiError::RateLimited(Rejected {
            scope: crate::admission::Scope::User,
            retry_after: Duration::from_millis(10),
        })
        .into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
