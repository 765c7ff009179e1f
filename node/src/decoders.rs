//! The parsers of what clients send, reachable from outside the crate for the fuzz
//! targets (`fuzz/`) and the decoder tests (`tests/decoders.rs`). Each takes the
//! bytes as they arrive and returns what the route makes of them, with the route's
//! own code; a refusal is an error, never a panic. Errors are `<code>: <message>` as
//! in the 400 a client would get; a signature's, the reason its 401 does not tell.

use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use keydrop_engine::{
    CardSecret, CardSerial, DeviceId, IdempotencyKey, PaymentRef, SkuDef, Timestamp, UserId,
};

use crate::admission::Admission;
use crate::api::{self, error::ApiError};
use crate::config::Config;
use crate::signature::{self, SignatureError};

fn text(error: ApiError) -> String {
    format!("{}: {}", error.code(), error.message())
}

/// `X-Keydrop-Signature` over `body`, checked with `secret` at `now_unix_secs`: the
/// signing time, or why it is refused.
pub fn payment_signature(
    secret: &[u8],
    header: &[u8],
    body: &[u8],
    now_unix_secs: i64,
) -> Result<i64, SignatureError> {
    signature::verify(secret, Some(header), body, now_unix_secs)
}

/// A `text/csv` import body, arriving in `chunks`: the cards, or the 400's message.
/// Cards go to the engine a batch at a time; this returns all of them.
pub fn csv_cards<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<(CardSerial, CardSecret)>, String> {
    api::skus::parse_csv(chunks).map_err(text)
}

/// A JSON import body (`{"cards": [{"serial", "secret"}, …]}`).
pub fn json_cards(body: &[u8]) -> Result<Vec<(CardSerial, CardSecret)>, String> {
    api::skus::parse_json_cards(Bytes::copy_from_slice(body)).map_err(text)
}

/// A `PUT /v1/skus/{sku}` body, checked as the engine checks a definition.
pub fn sku_definition(body: &[u8]) -> Result<SkuDef, String> {
    let def = api::skus::parse_sku_body(body).map_err(text)?;
    def.validate().map_err(|e| text(ApiError::from(e)))?;
    Ok(def)
}

/// A `POST /v1/skus/{sku}/orders` body.
pub fn order_body(body: &[u8]) -> Result<UserId, String> {
    api::orders::parse_order_body(body).map_err(text)
}

/// An order's `X-Device-Id` and `Idempotency-Key` header values, each optional. A
/// value that is not a valid header value is refused as the HTTP parser would.
pub fn order_headers(
    device_id: Option<&[u8]>,
    idempotency_key: Option<&[u8]>,
) -> Result<(Option<DeviceId>, Option<IdempotencyKey>), String> {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("x-device-id", device_id),
        ("idempotency-key", idempotency_key),
    ] {
        if let Some(value) = value {
            let value = HeaderValue::from_bytes(value)
                .map_err(|_| format!("{name}: not a header value"))?;
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    api::orders::parse_order_headers(&headers).map_err(text)
}

/// A payment callback body.
pub fn payment_body(body: &[u8]) -> Result<(PaymentRef, u64), String> {
    api::payments::parse_payment_body(body).map_err(text)
}

/// An RFC 3339 time, as in a SKU's `starts_at` and `ends_at`.
pub fn rfc3339(value: &str) -> Result<Timestamp, String> {
    api::parse_rfc3339("time", value).map_err(text)
}

/// The token of an `Authorization` header value, if it is a bearer token.
pub fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    api::extract::bearer_token(value)
}

/// The client address a request from `peer` with these `X-Forwarded-For` lines is
/// accounted to, when `trusted_proxies` are the proxies configured. Lines that are not
/// valid header values are left out, as an HTTP parser would refuse them.
pub fn client_ip<'a>(
    trusted_proxies: &[IpAddr],
    peer: SocketAddr,
    forwarded_for: impl IntoIterator<Item = &'a [u8]>,
) -> IpAddr {
    let admission = Admission::new(&Config {
        trusted_proxies: trusted_proxies.to_vec(),
        ..Config::default()
    });
    let mut headers = HeaderMap::new();
    for line in forwarded_for {
        if let Ok(value) = HeaderValue::from_bytes(line) {
            headers.append("x-forwarded-for", value);
        }
    }
    admission.client_ip(peer, &headers)
}
