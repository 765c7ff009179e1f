//! Operational routes: `/healthz` (the process answers), `/readyz` (recovery is done
//! and the node serves), `/metrics` (Prometheus text format), and the operator's
//! `GET /v1/admin/refunds[?sku=...]`: every refused payment (late, wrong amount, or a
//! second payment of a paid order), which is money to give back.

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keydrop_engine::SkuId;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::Admin;
use super::{rfc3339, AppState};

#[derive(Serialize)]
struct StatusJson {
    status: &'static str,
}

pub async fn healthz() -> Json<impl Serialize> {
    Json(StatusJson { status: "ok" })
}

pub async fn readyz(State(state): State<AppState>) -> Result<Json<impl Serialize>, ApiError> {
    state.engine()?;
    Ok(Json(StatusJson { status: "ready" }))
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    // Rendering drains every latency sample recorded since the last drain into its
    // histogram: milliseconds at a drop's rate, which on an async worker every
    // buyer's request due meanwhile would wait out.
    let rendered = tokio::task::spawn_blocking(move || {
        crate::metrics::render(
            &state.metrics,
            state.engine_if_ready(),
            &state.sku_gauges,
            &state.admission,
        )
    })
    .await;
    let text = match rendered {
        Ok(text) => text,
        Err(error) => {
            return ApiError::Internal(format!("rendering metrics failed: {error}")).into_response()
        }
    };
    let mut response = (StatusCode::OK, text).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundsQuery {
    sku: Option<String>,
}

#[derive(Serialize)]
struct RefundJson {
    order_id: String,
    sku: String,
    user_id: String,
    order_status: &'static str,
    price_cents: u64,
    payment_ref: String,
    amount_cents: u64,
    reason: &'static str,
    refused_at: String,
}

#[derive(Serialize)]
pub struct RefundsJson {
    refunds: Vec<RefundJson>,
}

pub async fn refunds(
    State(state): State<AppState>,
    _admin: Admin,
    query: Result<Query<RefundsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RefundsJson>, ApiError> {
    let engine = state.engine()?;
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let only = query
        .sku
        .map(SkuId::parse)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("sku: {e}")))?;
    let orders = engine.refused_payments(only.as_ref()).await?;
    let refunds = orders
        .into_iter()
        .flat_map(|order| {
            order
                .refused_payments
                .iter()
                .map(|refused| RefundJson {
                    order_id: order.order_id.to_string(),
                    sku: order.sku.to_string(),
                    user_id: order.user.to_string(),
                    order_status: order.status.as_str(),
                    price_cents: order.price_cents,
                    payment_ref: refused.payment_ref.to_string(),
                    amount_cents: refused.amount_cents,
                    reason: refused.reason.as_str(),
                    refused_at: rfc3339(refused.at),
                })
                .collect::<Vec<_>>()
        })
        .collect();
    Ok(Json(RefundsJson { refunds }))
}
