//! The customer page: `POST /v1/portal/tokens` (admin) gives a short-lived signed link,
//! `GET /portal/{token}` renders one tenant's page on the server (usage over the current
//! month with an SVG chart, balance, invoice preview): no JavaScript, no build step, nothing
//! loaded from elsewhere. Tokens are [`meterflow_core::portal`], signed with the
//! deployment's record key (`--record-key`, else the `record_keys` table).

mod page;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use meterflow_core::auth::RecordKey;
use meterflow_core::meter::Aggregation;
use meterflow_core::portal::{self, TokenError};
use meterflow_core::usage::{UsageRequest, WindowSize};
use meterflow_core::{decimal, pricing};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::events::now_ms;
use crate::access::{Admin, Key};
use crate::http::{ApiError, ErrorBody};
use meterflow_core::time::format_rfc3339_s;
use crate::AppState;

pub use page::{render_error, render_page, Balance, MeterUsage, PageData};

/// Lifetime of a token when the request names none.
pub const DEFAULT_TTL_MS: i64 = 3_600_000;

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The customer whose page the link opens.
    pub tenant: String,
    /// Lifetime, e.g. `15m`, `1h` (default), at most `24h`.
    #[serde(default)]
    pub ttl: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    pub tenant: String,
    /// A bearer credential for the page: hand it to the customer only.
    pub token: String,
    /// Path of the page, relative to the API's address.
    pub url: String,
    /// RFC 3339.
    pub expires_at: String,
}

/// The key that signs links: `--record-key`, or the `record_keys` table once
/// [`spawn_key_load`] read it (503 until then).
fn signing_key(state: &AppState) -> Result<&RecordKey, ApiError> {
    state.portal_key.get().ok_or_else(|| ApiError::unavailable("the record key that signs portal links is not loaded yet (ClickHouse)"))
}

/// Reads the record key from ClickHouse in the background (retrying through outages, as every
/// service does), unless `--record-key` gave it already.
pub fn spawn_key_load(state: &AppState, shutdown: CancellationToken) {
    if state.portal_key.initialized() {
        return;
    }
    let st = state.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            r = meterflow_runtime::record_key::resolve(&st.auth, &st.clickhouse) => match r {
                Ok(k) => {
                    let _ = st.portal_key.set(k);
                }
                Err(e) => tracing::error!(error = %format!("{e:#}"), "no record key: customer-page links answer 503"),
            },
        }
    });
}

/// Create a customer-page link (admin).
///
/// The token is signed, names the tenant and its expiry, and is checked without any lookup;
/// it cannot be revoked before it expires (rotating the record key revokes all of them), so
/// keep lifetimes short.
#[utoipa::path(
    post,
    path = "/v1/portal/tokens",
    tag = "portal",
    security(("bearer" = [])),
    request_body(content = TokenRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "the link", body = TokenResponse),
        (status = 400, description = "invalid body or lifetime", body = ErrorBody),
        Key<Admin>,
        (status = 503, description = "no record key (ClickHouse unavailable)", body = ErrorBody),
    )
)]
pub async fn create_token(State(state): State<AppState>, _: Key<Admin>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let req: TokenRequest = ApiError::json_body(&body)?;
    if req.tenant.is_empty() || req.tenant.len() > 255 {
        return Err(ApiError::bad_request("tenant must be 1-255 bytes"));
    }
    let ttl = match req.ttl.as_deref() {
        None => DEFAULT_TTL_MS,
        Some(s) => meterflow_core::meter::parse_duration(s).map_err(|e| ApiError::bad_request(format!("ttl: {e}")))?,
    };
    if ttl <= 0 || ttl > portal::MAX_TTL_MS {
        return Err(ApiError::bad_request("ttl must be positive and at most 24h"));
    }
    let expires = now_ms() + ttl;
    let token = portal::issue(signing_key(&state)?, &req.tenant, expires);
    let resp = TokenResponse { tenant: req.tenant, url: format!("/portal/{token}"), token, expires_at: format_rfc3339_s(expires) };
    Ok((StatusCode::CREATED, Json(resp)).into_response())
}

/// The customer page (HTML). The token in the path is the credential.
#[utoipa::path(
    get,
    path = "/portal/{token}",
    tag = "portal",
    params(("token" = String, Path, description = "from POST /v1/portal/tokens")),
    responses(
        (status = 200, description = "the page", content_type = "text/html", body = String),
        (status = 401, description = "expired or forged token (an HTML page)", content_type = "text/html", body = String),
        (status = 503, description = "ClickHouse unavailable (an HTML page)", content_type = "text/html", body = String),
    )
)]
pub async fn page(State(state): State<AppState>, Path(token): Path<String>) -> Response {
    let now = now_ms();
    let key = match signing_key(&state) {
        Ok(k) => k,
        Err(e) => return html(StatusCode::SERVICE_UNAVAILABLE, render_error("Temporarily unavailable", &e.message)),
    };
    let claims = match portal::verify(key, &token, now) {
        Ok(c) => c,
        Err(e) => {
            metrics::counter!(crate::metrics::PORTAL_VIEWS, "result" => e.as_str()).increment(1);
            let why = match e {
                TokenError::Expired => "This link has expired. Ask your provider for a new one.",
                TokenError::Malformed | TokenError::Forged => "This link is not valid.",
            };
            return html(StatusCode::UNAUTHORIZED, render_error("Link not valid", why));
        }
    };
    match gather(&state, &claims.tenant, claims.expires_at_ms, now).await {
        Ok(data) => {
            metrics::counter!(crate::metrics::PORTAL_VIEWS, "result" => "ok").increment(1);
            html(StatusCode::OK, render_page(&data))
        }
        Err(e) => html(StatusCode::SERVICE_UNAVAILABLE, render_error("Temporarily unavailable", &e.message)),
    }
}

fn html(status: StatusCode, body: String) -> Response {
    let mut resp = (status, Html(body)).into_response();
    let h = resp.headers_mut();
    // Inline styles and inline SVG only; the token is in the URL, so no referrer and no cache.
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; img-src data:"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Everything on the page, read with the same code as the API endpoints so the page shows
/// what they return.
async fn gather(state: &AppState, tenant: &str, expires_at_ms: i64, now: i64) -> Result<PageData, ApiError> {
    let period = pricing::period_start(now);
    let mut meters = Vec::new();
    for m in state.meters.meters() {
        if !matches!(m.aggregation, Aggregation::Sum | Aggregation::Count) || page::DAY_MS % m.window_ms != 0 {
            continue;
        }
        let req = UsageRequest {
            tenant: tenant.to_owned(),
            meter: m.name.clone(),
            from_ms: period,
            to_ms: pricing::period_end(period),
            window_size: WindowSize::Day,
            group_by: Vec::new(),
        };
        let usage = crate::usage::query(state, &req).await?;
        let days = usage
            .data
            .iter()
            .map(|v| Ok((meterflow_core::time::parse_rfc3339_ms(&v.window_start)?, decimal::parse("value", &v.value).map_err(|e| e.to_string())?)))
            .collect::<Result<Vec<_>, String>>()
            .map_err(ApiError::unavailable)?;
        meters.push(MeterUsage { meter: m.name.clone(), aggregation: m.aggregation.as_str(), days });
    }
    let invoice = crate::invoice::to_json(&crate::invoice::preview(state, tenant, period).await?);
    Ok(PageData {
        tenant: tenant.to_owned(),
        now_ms: now,
        expires_at_ms,
        period_start_ms: period,
        period_end_ms: pricing::period_end(period),
        meters,
        balances: balance_view(state, tenant).await?,
        invoice,
    })
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct BalanceRow {
    currency: String,
    balance: i128,
}

/// The balance shown on the page: the real-time balance (settled, the pending spend of open
/// windows and available, from the rater's balance records the API keeps in memory, as
/// `GET /v1/customers/{tenant}/balance`) where the API has one for the tenant, and the settled
/// wallet balance the rater booked (`wallet_balances`, without a pending part) for any other
/// currency, or while the balances topic is still being read after a start.
pub async fn balance_view(state: &AppState, tenant: &str) -> Result<Vec<Balance>, ApiError> {
    let rows = state
        .clickhouse
        .query("SELECT currency, balance FROM wallet_balances WHERE tenant = ? ORDER BY currency")
        .bind(tenant)
        .fetch_all::<BalanceRow>()
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot read balances: {e}")))?;
    let live = state.balances.get(tenant).filter(|_| state.balances.is_caught_up());
    let mut out: Vec<Balance> = live
        .iter()
        .map(|b| Balance { currency: b.currency.clone(), settled: b.settled, pending: Some(b.pending), available: Some(b.available) })
        .collect();
    out.extend(
        rows.into_iter()
            .filter(|r| live.as_ref().is_none_or(|b| b.currency != r.currency))
            .map(|r| Balance { currency: r.currency, settled: decimal::from_ch_i128(r.balance), pending: None, available: None }),
    );
    Ok(out)
}
