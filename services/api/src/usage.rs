//! `GET /v1/usage`: a tenant's usage of one meter over time, from the rollups (migration 016)
//! or the windows. Planning and validation are [`meterflow_core::usage`]; this module parses
//! the request, enforces the key's tenant, runs the SQL and shapes the answer.

use axum::extract::{Query, State};
use axum::Json;
use meterflow_core::decimal;
pub use meterflow_core::time::format_rfc3339_s as rfc3339;
use meterflow_core::time::{format_rfc3339_s, parse_rfc3339_ms};
use meterflow_core::usage::{self, Bind, SourceRow, UsagePlan, UsageRequest, WindowSize};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::access::{named_tenant, Key, Read};
use crate::http::{ApiError, ErrorBody};
use crate::AppState;

/// Query parameters of `GET /v1/usage`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// The meter (config/meters.toml).
    pub meter: String,
    /// Start, inclusive, RFC 3339 (e.g. `2026-11-01T00:00:00Z`); on a window boundary of the meter.
    pub from: String,
    /// End, exclusive, RFC 3339; on a window boundary of the meter.
    pub to: String,
    /// `minute`, `hour` (default), `day` or `month` (UTC calendar months).
    #[serde(default)]
    pub window_size: Option<String>,
    /// Comma-separated dimensions of the meter to split by (default: none, one series).
    #[serde(default)]
    pub group_by: Option<String>,
    /// The tenant: a tenant's key may only name its own (the default); an admin key must name one.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// One bucket of usage.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageValue {
    /// RFC 3339, UTC; clipped to `from` when the bucket starts before it.
    pub window_start: String,
    /// RFC 3339, UTC, exclusive; clipped to `to`.
    pub window_end: String,
    /// Values of the `group_by` dimensions.
    pub dimensions: std::collections::BTreeMap<String, String>,
    /// Exact decimal as a string.
    #[schema(value_type = String, example = "1250.5")]
    pub value: String,
}

/// The answer of `GET /v1/usage`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageResponse {
    pub tenant: String,
    pub meter: String,
    /// The meter's aggregation (`sum`, `count`, `min`, `max`, `avg`, `unique_count`, `latest`).
    pub aggregation: String,
    pub window_size: String,
    pub from: String,
    pub to: String,
    pub group_by: Vec<String>,
    /// What answered: `usage_rollup_day`, `usage_rollup_hour` or `meter_totals` (the windows).
    pub source: String,
    /// Buckets with usage, by start, then dimensions.
    pub data: Vec<UsageValue>,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct Row {
    bucket_ms: i64,
    dims: Vec<String>,
    value: i128,
    last_ms: i64,
}

/// Usage of one meter over time, exact.
///
/// Sum and count meters are answered from hourly and daily rollups when the range and the
/// window size allow it (a month of usage reads ~30 rows per dimension set); other
/// aggregations and finer ranges from the windows' latest revisions. Restated windows count
/// with their corrected value.
#[utoipa::path(
    get,
    path = "/v1/usage",
    tag = "usage",
    security(("bearer" = [])),
    params(UsageParams),
    responses(
        (status = 200, description = "usage per bucket", body = UsageResponse),
        (status = 400, description = "unknown meter or dimension, misaligned range, too many buckets, a combination the aggregation does not allow", body = ErrorBody),
        (status = 403, description = "another tenant named (without admin scope)", body = ErrorBody),
        Key<Read>,
        (status = 503, description = "ClickHouse unavailable", body = ErrorBody),
    )
)]
pub async fn get_usage(
    State(state): State<AppState>,
    Key(key, _): Key<Read>,
    params: Result<Query<UsageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<UsageResponse>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let tenant = named_tenant(&key, p.tenant.as_deref())?;
    let window_size = match p.window_size.as_deref() {
        None => WindowSize::Hour,
        Some(s) => WindowSize::parse(s).ok_or_else(|| ApiError::bad_request("window_size must be minute, hour, day or month"))?,
    };
    let group_by: Vec<String> = p.group_by.as_deref().unwrap_or("").split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    let time = |field: &str, v: &str| parse_rfc3339_ms(v).map_err(|e| ApiError::bad_request(format!("{field}: {e}")));
    let req = UsageRequest { tenant, meter: p.meter, from_ms: time("from", &p.from)?, to_ms: time("to", &p.to)?, window_size, group_by };
    Ok(Json(query(&state, &req).await?))
}

/// Plans, runs and folds `req` (also used by the customer page).
pub async fn query(state: &AppState, req: &UsageRequest) -> Result<UsageResponse, ApiError> {
    let meter = state.meters.get(&req.meter).ok_or_else(|| ApiError::bad_request(format!("unknown meter {:?}", req.meter)))?;
    let plan = usage::plan(meter, req).map_err(|e| ApiError::bad_request(e.0))?;
    let rows = run(state, &plan).await?;
    metrics::counter!(crate::metrics::USAGE_QUERIES, "source" => plan.source.table()).increment(1);
    let data = plan
        .fold(rows)
        .into_iter()
        .map(|p| UsageValue {
            window_start: format_rfc3339_s(p.window_start_ms),
            window_end: format_rfc3339_s(p.window_end_ms),
            dimensions: p.dimensions,
            value: decimal::format(&p.value),
        })
        .collect();
    Ok(UsageResponse {
        tenant: req.tenant.clone(),
        meter: req.meter.clone(),
        aggregation: plan.aggregation.as_str().to_owned(),
        window_size: req.window_size.as_str().to_owned(),
        from: format_rfc3339_s(req.from_ms),
        to: format_rfc3339_s(req.to_ms),
        group_by: req.group_by.clone(),
        source: plan.source.table().to_owned(),
        data,
    })
}

async fn run(state: &AppState, plan: &UsagePlan) -> Result<Vec<SourceRow>, ApiError> {
    // One tenant's meter: a few hundred rollup rows (or one month of windows). One thread
    // answers that faster than a pool started per query, and leaves the cores to ingest.
    let mut q = state.clickhouse.query(&plan.sql).with_setting("max_threads", "1");
    for b in &plan.binds {
        q = match b {
            Bind::Str(s) => q.bind(s.as_str()),
            Bind::Int(i) => q.bind(*i),
        };
    }
    let rows = q.fetch_all::<Row>().await.map_err(|e| ApiError::unavailable(format!("cannot read usage: {e}")))?;
    Ok(rows
        .into_iter()
        .map(|r| SourceRow { bucket_ms: r.bucket_ms, dims: r.dims, value: decimal::from_ch_i128(r.value), last_ms: r.last_ms })
        .collect())
}
