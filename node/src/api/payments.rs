//! `POST /v1/orders/{order_id}/payment`: the payment provider's callback.
//!
//! The signature is checked first, over the raw body, before anything in the
//! request is believed (see [`crate::signature`]). Payment callbacks are not
//! rate-limited per IP: a provider sends all of a drop's payments from a few
//! addresses, and throttling them would expire paid reservations.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use keydrop_engine::{EngineError, PaymentRef, SkuError};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{parse_json, read_body, OrderPath};
use super::AppState;
use crate::metrics::PAYMENTS;
use crate::signature;

const PAYMENT_BODY_BYTES_MAX: usize = 16 * 1024;
pub const SIGNATURE_HEADER: &str = "x-keydrop-signature";

#[derive(Deserialize)]
struct PaymentBody {
    payment_ref: String,
    amount_cents: u64,
}

#[derive(Serialize)]
pub struct PaidJson {
    order_id: String,
    status: &'static str,
}

/// A callback body, `{"payment_ref", "amount_cents"}`; read only once its signature
/// has been checked.
pub fn parse_payment_body(body: &[u8]) -> Result<(PaymentRef, u64), ApiError> {
    let PaymentBody {
        payment_ref,
        amount_cents,
    } = parse_json(body)?;
    let payment_ref = PaymentRef::parse(payment_ref)
        .map_err(|e| ApiError::invalid(format!("payment_ref: {e}")))?;
    Ok((payment_ref, amount_cents))
}

pub async fn confirm_payment(
    State(state): State<AppState>,
    order: Result<OrderPath, ApiError>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<PaidJson>, ApiError> {
    let engine = state.engine()?;
    let body = read_body(
        &headers,
        body,
        PAYMENT_BODY_BYTES_MAX,
        state.body_time_limit,
    )
    .await?;
    let now_secs = i64::try_from(engine.now().as_millis() / 1000).unwrap_or(i64::MAX);
    let presented = headers.get(SIGNATURE_HEADER).map(|v| v.as_bytes());
    let signed_at = match signature::verify(&state.payment_secret, presented, &body, now_secs) {
        Ok(t) => t,
        Err(reason) => {
            // Debug, not info: anyone can send these. The metric shows a misconfigured secret.
            tracing::debug!(%reason, "payment callback refused");
            metrics::counter!(PAYMENTS, "outcome" => "bad_signature").increment(1);
            return Err(ApiError::BadSignature);
        }
    };
    let OrderPath(order_id) = order?;
    if let Err(reason) = state
        .callbacks_seen
        .check(signed_at, &body, order_id.as_bytes())
    {
        tracing::warn!(order = %order_id, %reason, "payment callback refused");
        // Apart from bad signatures: this one was signed with our secret, so it says
        // someone replays captured callbacks (or a restart caught one), not that the
        // secret is wrong. The caller is told the same vague 401 either way.
        metrics::counter!(PAYMENTS, "outcome" => "replayed").increment(1);
        return Err(ApiError::BadSignature);
    }
    let (payment_ref, amount_cents) = parse_payment_body(&body).inspect_err(|_| {
        metrics::counter!(PAYMENTS, "outcome" => "invalid_body").increment(1);
    })?;
    let outcome = engine
        .confirm_payment(&order_id, payment_ref.clone(), amount_cents)
        .await;
    let label = match &outcome {
        Ok(_) => "paid",
        Err(EngineError::Sku(SkuError::ReservationExpired)) => {
            // Every refusal, retries included; the engine counts and logs each late
            // payment once, when it is recorded for refund.
            tracing::info!(order = %order_id, payment_ref = %payment_ref, amount_cents, "late payment refused");
            "reservation_expired"
        }
        Err(EngineError::Sku(SkuError::AmountMismatch { .. })) => "amount_mismatch",
        Err(EngineError::Sku(SkuError::AlreadyPaid)) => "already_paid",
        Err(EngineError::Sku(SkuError::OrderNotFound)) => "order_not_found",
        Err(_) => "error",
    };
    metrics::counter!(PAYMENTS, "outcome" => label).increment(1);
    let view = outcome?;
    Ok(Json(PaidJson {
        order_id: view.order_id.to_string(),
        status: view.status.as_str(),
    }))
}
