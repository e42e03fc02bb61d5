//! Wallets: top-ups from a payment provider (`POST .../adjustments`, admin) and balances
//! (`GET /v1/wallets/{tenant}`, read).
//!
//! Idempotency, across retries and API restarts: the adjustment published to the wallet
//! topic carries the `Idempotency-Key` itself as its `idempotency_key`, and the rater counts
//! each `(tenant, idempotency_key)` once, forever: a retry can never credit twice, whatever
//! the API remembers. The API additionally records the first request per key (a hash of its
//! canonical fields and the answer) in ClickHouse `api_idempotency`, which survives restarts:
//! the same key with the same body gets the same answer (and the stored adjustment is
//! published again, byte-identical, harmless, in case the first publish never completed),
//! the same key with another body gets 409. The record is written before publishing, so a
//! crash in between leaves a record whose retry publishes.

use std::str::FromStr;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use meterflow_core::decimal;
use meterflow_core::records::{AvroRecord, WalletAdjustment};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use utoipa::ToSchema;

use crate::events::now_ms;
use crate::access::{Admin, Read, TenantPath};
use crate::http::{ApiError, ErrorBody};
use crate::AppState;

/// A balance adjustment, typically a top-up after a payment succeeded.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdjustmentRequest {
    /// Canonical decimal string (or JSON number), at most 9 fractional digits; positive
    /// credits the wallet, negative debits it.
    #[schema(value_type = String, example = "100.00")]
    pub amount: serde_json::Value,
    /// ISO 4217 code, e.g. `USD`.
    pub currency: String,
    /// Free text shown in the wallet's history.
    #[serde(default)]
    pub reason: String,
    /// The payment provider's reference (e.g. a payment intent id).
    #[serde(default)]
    pub payment_reference: String,
    /// `top_up` (default for positive amounts) or `adjustment` (default for negative ones),
    /// or another `[a-z_]` kind.
    #[serde(default)]
    pub kind: Option<String>,
    /// Credit grants (`paid`, `promotional`): when the unused remainder expires (Unix ms).
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
    /// Credit grants: burn order, highest first (then earliest expiry).
    #[serde(default)]
    pub priority: i32,
}

/// The recorded adjustment; a retry with the same key and body gets exactly this again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AdjustmentResponse {
    pub tenant: String,
    pub idempotency_key: String,
    #[schema(value_type = String)]
    pub amount: String,
    pub currency: String,
    pub kind: String,
    pub reason: String,
    pub payment_reference: String,
    /// Unix ms of the first request with this key.
    pub created_at_ms: i64,
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
    #[serde(default)]
    pub priority: i32,
}

impl AdjustmentResponse {
    fn record(&self) -> Result<WalletAdjustment, ApiError> {
        let amount = Decimal::from_str(&self.amount).map_err(|e| ApiError::unavailable(format!("stored amount unreadable: {e}")))?;
        let reason = if self.payment_reference.is_empty() {
            self.reason.clone()
        } else {
            format!("{} [payment_reference={}]", self.reason, self.payment_reference)
        };
        Ok(WalletAdjustment {
            idempotency_key: self.idempotency_key.clone(),
            tenant: self.tenant.clone(),
            currency: self.currency.clone(),
            amount,
            kind: self.kind.clone(),
            reason,
            created_at: self.created_at_ms,
            expires_at: self.expires_at_ms,
            priority: self.priority,
        })
    }
}

/// What makes two requests "the same body": the canonical fields (amount normalised, so
/// `"100"` and `"100.00"` are the same request), each length-prefixed so no two field lists
/// hash alike by shifting text between fields.
fn request_hash(r: &AdjustmentResponse) -> String {
    let mut h = Sha256::new();
    for f in [&r.tenant, &r.amount, &r.currency, &r.kind, &r.reason, &r.payment_reference] {
        h.update((f.len() as u64).to_le_bytes());
        h.update(f.as_bytes());
    }
    // Grant terms are part of the request (absent ones hash as before).
    if r.expires_at_ms.is_some() || r.priority != 0 {
        h.update(r.expires_at_ms.unwrap_or(i64::MIN).to_le_bytes());
        h.update(r.priority.to_le_bytes());
    }
    hex::encode(h.finalize())
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct StoredRow {
    request_hash: String,
    response: String,
}

const MAX_KEY_LEN: usize = 255;

/// Adjust a tenant's prepaid balance (admin scope), idempotently.
///
/// `Idempotency-Key` (required, at most 255 characters): a retry with the same key and the
/// same body returns the same answer (header `Idempotent-Replayed: true`) and credits once;
/// the same key with another body is 409. The key is also the adjustment's
/// `idempotency_key`, which the rater counts once.
#[utoipa::path(
    post,
    path = "/v1/wallets/{tenant}/adjustments",
    tag = "wallets",
    security(("bearer" = [])),
    params(("tenant" = String, Path, description = "the wallet's tenant"),
           ("Idempotency-Key" = String, Header, description = "unique per payment, e.g. the provider's event id")),
    request_body(content = AdjustmentRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "published to the wallet topic (or replayed)", body = AdjustmentResponse),
        (status = 400, description = "invalid body or missing Idempotency-Key", body = ErrorBody),
        TenantPath<Admin>,
        (status = 409, description = "Idempotency-Key already used with another body", body = ErrorBody),
        (status = 415, description = "not application/json", body = ErrorBody),
        (status = 503, description = "ClickHouse or the broker unavailable; retry with the same key", body = ErrorBody),
    )
)]
pub async fn adjust(
    State(state): State<AppState>,
    TenantPath { tenant, .. }: TenantPath<Admin>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let canonical = validated(&tenant, &headers, &body)?;
    let request_hash = request_hash(&canonical);
    let (response, replayed) = recorded(&state, canonical, &request_hash).await?;
    let payload = response.record()?.to_avro().map_err(|e| ApiError::unavailable(format!("encoding: {e}")))?;
    let rec = FutureRecord::to(&state.wallet_topic).key(tenant.as_str()).payload(&payload);
    state
        .producer
        .send(rec, Timeout::After(state.produce_timeout.min(Duration::from_secs(30))))
        .await
        .map_err(|(e, _)| ApiError::unavailable(format!("the broker did not store the adjustment ({e}); retry with the same Idempotency-Key")))?;
    metrics::counter!(crate::metrics::ADJUSTMENTS, "result" => if replayed { "replayed" } else { "created" }).increment(1);
    let mut resp = (StatusCode::CREATED, Json(response)).into_response();
    if replayed {
        resp.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// The adjustment a request asks for, checked, as it would be answered (`created_at_ms` 0).
fn validated(tenant: &str, headers: &HeaderMap, body: &[u8]) -> Result<AdjustmentResponse, ApiError> {
    let ct = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if meterflow_core::ingest::Format::from_content_type(ct) != Some(meterflow_core::ingest::Format::Json) {
        return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "Content-Type must be application/json"));
    }
    let idem = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::bad_request("the Idempotency-Key header is required"))?
        .to_owned();
    if idem.len() > MAX_KEY_LEN {
        return Err(ApiError::bad_request(format!("Idempotency-Key is longer than {MAX_KEY_LEN} characters")));
    }
    if tenant.is_empty() {
        return Err(ApiError::bad_request("empty tenant"));
    }
    let req: AdjustmentRequest = ApiError::json_body(body)?;
    let amount_text = match &req.amount {
        serde_json::Value::String(s) => s.clone(),
        // serde_json without arbitrary precision: only integers are exact as numbers.
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        serde_json::Value::Number(_) => return Err(ApiError::bad_request("amount: send fractional amounts as a decimal string, e.g. \"10.25\"")),
        _ => return Err(ApiError::bad_request("amount must be a decimal string")),
    };
    let amount = decimal::parse("amount", &amount_text).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if amount.is_zero() {
        return Err(ApiError::bad_request("amount must not be zero"));
    }
    if req.currency.len() != 3 || !req.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ApiError::bad_request("currency must be an ISO 4217 code such as USD"));
    }
    let kind = req.kind.clone().unwrap_or_else(|| if amount > Decimal::ZERO { "top_up".into() } else { "adjustment".into() });
    if kind.is_empty() || kind.len() > 32 || !kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        return Err(ApiError::bad_request("kind must be 1-32 characters [a-z_]"));
    }
    if req.reason.len() > 1000 || req.payment_reference.len() > 255 {
        return Err(ApiError::bad_request("reason (1000) or payment_reference (255) too long"));
    }
    Ok(AdjustmentResponse {
        tenant: tenant.to_owned(),
        idempotency_key: idem,
        amount: decimal::format(&amount),
        currency: req.currency.clone(),
        kind,
        reason: req.reason.clone(),
        payment_reference: req.payment_reference.clone(),
        created_at_ms: 0,
        expires_at_ms: req.expires_at_ms,
        priority: req.priority,
    })
}

/// Records the first answer to an Idempotency-Key, or finds it: (answer, replayed). The same
/// key with another request is a conflict.
async fn recorded(state: &AppState, canonical: AdjustmentResponse, request_hash: &str) -> Result<(AdjustmentResponse, bool), ApiError> {
    let (tenant, idem) = (canonical.tenant.clone(), canonical.idempotency_key.clone());
    let _serial = state.adjust_lock.lock().await;
    let stored = state
        .clickhouse
        .query("SELECT request_hash, response FROM api_idempotency WHERE tenant = ? AND idempotency_key = ? ORDER BY created_at_ms LIMIT 1")
        .bind(&tenant)
        .bind(&idem)
        .fetch_optional::<StoredRow>()
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot read idempotency records: {e}")))?;
    Ok(match stored {
        Some(row) if row.request_hash == request_hash => {
            let r: AdjustmentResponse =
                serde_json::from_str(&row.response).map_err(|e| ApiError::unavailable(format!("stored response unreadable: {e}")))?;
            (r, true)
        }
        Some(_) => {
            metrics::counter!(crate::metrics::ADJUSTMENTS, "result" => "conflict").increment(1);
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("Idempotency-Key {idem:?} was already used with a different request"),
            ));
        }
        None => {
            let r = AdjustmentResponse { created_at_ms: now_ms(), ..canonical };
            let json = serde_json::to_string(&r).map_err(|e| ApiError::unavailable(e.to_string()))?;
            state
                .clickhouse
                .query("INSERT INTO api_idempotency (tenant, idempotency_key, request_hash, response, created_at_ms) VALUES (?, ?, ?, ?, ?)")
                .bind(&tenant)
                .bind(&idem)
                .bind(request_hash)
                .bind(&json)
                .bind(r.created_at_ms)
                .execute()
                .await
                .map_err(|e| ApiError::unavailable(format!("cannot record the request: {e}")))?;
            (r, false)
        }
    })
}

/// One currency's balance.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Balance {
    pub currency: String,
    #[schema(value_type = String)]
    pub credited: String,
    #[schema(value_type = String)]
    pub charged: String,
    #[schema(value_type = String)]
    pub balance: String,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct BalanceRow {
    currency: String,
    credited: i128,
    charged: i128,
    balance: i128,
}

/// A tenant's prepaid balances as the rater has booked them (read scope, own tenant; admin:
/// any tenant).
#[utoipa::path(
    get,
    path = "/v1/wallets/{tenant}",
    tag = "wallets",
    security(("bearer" = [])),
    params(("tenant" = String, Path, description = "the wallet's tenant")),
    responses(
        (status = 200, description = "balances per currency", body = [Balance]),
        TenantPath<Read>,
        (status = 503, description = "ClickHouse unavailable", body = ErrorBody),
    )
)]
pub async fn balance(State(state): State<AppState>, TenantPath { tenant, .. }: TenantPath<Read>) -> Result<Json<Vec<Balance>>, ApiError> {
    let rows = state
        .clickhouse
        .query("SELECT currency, credited, charged, balance FROM wallet_balances WHERE tenant = ? ORDER BY currency")
        .bind(&tenant)
        .fetch_all::<BalanceRow>()
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot read balances: {e}")))?;
    Ok(Json(
        rows.into_iter()
            .map(|r| Balance {
                currency: r.currency,
                credited: decimal::format(&decimal::from_ch_i128(r.credited)),
                charged: decimal::format(&decimal::from_ch_i128(r.charged)),
                balance: decimal::format(&decimal::from_ch_i128(r.balance)),
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(amount: &str, reason: &str, reference: &str) -> AdjustmentResponse {
        AdjustmentResponse {
            tenant: "acme".into(),
            idempotency_key: "k".into(),
            amount: decimal::format(&decimal::parse("amount", amount).unwrap()),
            currency: "USD".into(),
            kind: "top_up".into(),
            reason: reason.into(),
            payment_reference: reference.into(),
            created_at_ms: 0,
            expires_at_ms: None,
            priority: 0,
        }
    }

    #[test]
    fn same_body_same_hash() {
        assert_eq!(request_hash(&req("100", "card", "pi_1")), request_hash(&req("100.000", "card", "pi_1")));
        assert_ne!(request_hash(&req("100", "card", "pi_1")), request_hash(&req("100.01", "card", "pi_1")));
        // Text moved between fields is another request.
        assert_ne!(request_hash(&req("1", "ab", "c")), request_hash(&req("1", "a", "bc")));
        // The creation time is not part of the request.
        let mut later = req("100", "card", "pi_1");
        later.created_at_ms = 5;
        assert_eq!(request_hash(&later), request_hash(&req("100", "card", "pi_1")));
    }

    #[test]
    fn record_carries_the_key_and_the_reference() {
        let mut r = req("10.5", "card payment", "pi_9");
        r.created_at_ms = 1_700_000_000_000;
        let rec = r.record().unwrap();
        assert_eq!(rec.idempotency_key, "k");
        assert_eq!(rec.amount, Decimal::from_str("10.5").unwrap());
        assert_eq!(rec.reason, "card payment [payment_reference=pi_9]");
        assert_eq!(rec.created_at, 1_700_000_000_000);
        // Byte-identical on every replay: the rater sees the same record.
        assert_eq!(rec.to_avro().unwrap(), r.record().unwrap().to_avro().unwrap());
        assert_eq!(req("1", "x", "").record().unwrap().reason, "x");
    }
}
