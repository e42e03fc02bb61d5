//! Real-time economic control, answered from memory:
//!
//! * `GET /v1/customers/{tenant}/balance` (read): settled, pending and available balance.
//! * `POST /v1/entitlements/check` (read or ingest): may the tenant use this much of a
//!   meter now? The quantity is priced with the catalog (`--catalog`, the rater's file) at
//!   the period's quantity so far, and compared with the available balance (prepaid tenants)
//!   and the hard spend limits.
//!
//! The rater publishes every tenant's balance to the compacted balances topic whenever it
//! changes (pending spend of open windows within about a second of the usage, see
//! `meterflow_core::rating::pending`); [`Balances`] reads that topic from its beginning into a
//! map, so a request costs a map lookup and a price computation, never a query. Until the
//! reader has caught up with the topic's end as of start-up, both endpoints answer 503.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use meterflow_core::rating::balance::{self, Balance};
use meterflow_runtime::args::KafkaArgs;
use meterflow_runtime::tail::{self, Start, Tail};
use rdkafka::consumer::Consumer as _;
use rdkafka::{Message as _, Offset};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::events::now_ms;
use crate::access::{named_tenant, AnyScope, Key, Read, TenantPath};
use crate::http::{ApiError, ErrorBody};
use crate::AppState;

/// The newest balance per tenant, from the balances topic.
#[derive(Debug, Clone, Default)]
pub struct Balances {
    map: Arc<RwLock<HashMap<String, Arc<Balance>>>>,
    caught_up: Arc<AtomicBool>,
}

impl Balances {
    pub fn get(&self, tenant: &str) -> Option<Arc<Balance>> {
        self.map.read().unwrap_or_else(PoisonError::into_inner).get(tenant).cloned()
    }

    /// Whether everything the topic held at start-up has been read.
    pub fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    fn put(&self, b: Balance) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        // One tenant is one key, so its records arrive in order; the check guards against a
        // rebalanced rater publishing an older view.
        if map.get(&b.tenant).is_none_or(|old| old.updated_at <= b.updated_at) {
            map.insert(b.tenant.clone(), Arc::new(b));
        }
    }

    /// Reads the balances topic until `shutdown`.
    pub fn spawn_reader(&self, kafka: KafkaArgs, topic: String, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let Some(tail) = tail::open_when_ready(&kafka, &topic, Start::Beginning, &shutdown).await else { return };
            this.read(tail, shutdown).await;
        });
    }

    async fn read(&self, tail: Tail, shutdown: CancellationToken) {
        let mut check = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                msg = tail.consumer.recv() => match msg {
                    Ok(msg) => match serde_json::from_slice::<Balance>(msg.payload().unwrap_or_default()) {
                        Ok(b) => self.put(b),
                        Err(e) => {
                            ::metrics::counter!(crate::metrics::BALANCES_UNREADABLE).increment(1);
                            tracing::warn!(error = %e, offset = msg.offset(), "unreadable balance record");
                        }
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "balances topic");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
                _ = check.tick(), if !self.is_caught_up() => {
                    if caught_up(&tail) {
                        tracing::info!(tenants = self.map.read().unwrap_or_else(PoisonError::into_inner).len(), "balances loaded");
                        self.caught_up.store(true, Ordering::Release);
                    }
                }
            }
        }
    }
}

/// Every partition's position is at (or past) its end offset as of opening.
fn caught_up(tail: &Tail) -> bool {
    let Ok(positions) = tail.consumer.position() else { return false };
    tail.ends.iter().enumerate().all(|(p, &end)| {
        end == 0
            || positions
                .find_partition(&tail.topic, p as i32)
                .is_some_and(|e| matches!(e.offset(), Offset::Offset(o) if o >= end))
    })
}

/// A decimal in JSON: as a string (always exact) or an integer.
fn decimal_field(field: &'static str, v: &serde_json::Value) -> Result<Decimal, ApiError> {
    let text = match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        serde_json::Value::Number(_) => {
            return Err(ApiError::bad_request(format!("{field}: send fractional values as a decimal string, e.g. \"10.25\"")))
        }
        _ => return Err(ApiError::bad_request(format!("{field} must be a decimal string"))),
    };
    meterflow_core::decimal::parse(field, &text).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// A limit as reported to the customer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LimitBody {
    /// `hard` (entitlement checks deny beyond it) or `soft` (alert only).
    pub kind: String,
    pub currency: String,
    /// `month`: the billing period.
    pub period: String,
    #[schema(example = "250")]
    pub amount: String,
    /// Settled plus pending usage spend of the period.
    pub spent: String,
    pub remaining: String,
    pub exceeded: bool,
}

/// A tenant's balance in the currency of its current plan. Decimals are exact strings.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CustomerBalance {
    pub tenant: String,
    pub currency: String,
    /// Wallet balance after every settled charge (negative: owed).
    #[schema(example = "120.5")]
    pub settled: String,
    /// Spend of usage in windows that are still open (priced as they will be settled).
    #[schema(example = "0.42")]
    pub pending: String,
    /// `settled - pending`.
    #[schema(example = "120.08")]
    pub available: String,
    /// Has a prepaid wallet (its available balance bounds entitlement checks).
    pub prepaid: bool,
    /// Usage spend of the current billing period, settled plus pending.
    pub period_spend: String,
    pub limits: Vec<LimitBody>,
    /// When the rater composed it (Unix ms); null: nothing known about the tenant yet.
    pub updated_at: Option<i64>,
}

impl CustomerBalance {
    fn of(state: &AppState, tenant: &str, b: Option<&Balance>) -> Self {
        let zero = Decimal::ZERO.to_string();
        match b {
            Some(b) => Self {
                tenant: tenant.to_owned(),
                currency: b.currency.clone(),
                settled: b.settled.normalize().to_string(),
                pending: b.pending.normalize().to_string(),
                available: b.available.normalize().to_string(),
                prepaid: b.prepaid,
                period_spend: b.period_spend.normalize().to_string(),
                limits: b
                    .limits
                    .iter()
                    .map(|l| LimitBody {
                        kind: l.kind.as_str().to_owned(),
                        currency: l.currency.clone(),
                        period: l.period.clone(),
                        amount: l.amount.normalize().to_string(),
                        spent: l.spent.normalize().to_string(),
                        remaining: l.remaining.normalize().to_string(),
                        exceeded: l.exceeded,
                    })
                    .collect(),
                updated_at: Some(b.updated_at),
            },
            None => Self {
                tenant: tenant.to_owned(),
                currency: state.catalog.plan_for(tenant, now_ms()).map_or("USD", |p| p.currency.as_str()).to_owned(),
                settled: zero.clone(),
                pending: zero.clone(),
                available: zero.clone(),
                prepaid: false,
                period_spend: zero,
                limits: Vec::new(),
                updated_at: None,
            },
        }
    }
}

fn loaded(state: &AppState) -> Result<(), ApiError> {
    if state.balances.is_caught_up() {
        Ok(())
    } else {
        Err(ApiError::unavailable("balances are still loading; retry shortly"))
    }
}

/// A tenant's real-time balance: settled, pending (open windows) and available.
#[utoipa::path(
    get,
    path = "/v1/customers/{tenant}/balance",
    tag = "control",
    security(("bearer" = [])),
    params(("tenant" = String, Path, description = "the customer (tenant)")),
    responses(
        (status = 200, description = "the balance (zeros and a null updated_at for a tenant nothing is known about)", body = CustomerBalance),
        TenantPath<Read>,
        (status = 503, description = "balances still loading after a start", body = ErrorBody),
    )
)]
pub async fn customer_balance(
    State(state): State<AppState>,
    TenantPath { tenant, .. }: TenantPath<Read>,
) -> Result<Json<CustomerBalance>, ApiError> {
    loaded(&state)?;
    let b = state.balances.get(&tenant);
    Ok(Json(CustomerBalance::of(&state, &tenant, b.as_deref())))
}

/// An entitlement check.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EntitlementRequest {
    /// The meter the usage would be recorded on.
    #[schema(example = "output_tokens")]
    pub meter: String,
    /// Decimal string (or integer), at least 0, at most 9 fractional digits.
    #[schema(value_type = String, example = "2000")]
    pub quantity: serde_json::Value,
    /// Dimension values of the usage (they select the price, e.g. the model).
    #[serde(default)]
    pub dimensions: BTreeMap<String, String>,
    /// Admin keys only: the tenant to check (a tenant's key always checks its own).
    #[serde(default)]
    pub tenant: Option<String>,
}

/// The answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EntitlementResponse {
    pub tenant: String,
    pub allowed: bool,
    /// Money left under the tightest constraint (available balance, hard limits) after this
    /// usage; null when nothing constrains the tenant.
    pub remaining: Option<String>,
    /// `ok`, `no_price` (allowed: nothing would be charged), `insufficient_balance` or
    /// `hard_limit`.
    pub reason: String,
    /// What the usage would be charged.
    pub cost: String,
    pub currency: String,
}

/// May the tenant use `quantity` of `meter` now? Answered from memory.
#[utoipa::path(
    post,
    path = "/v1/entitlements/check",
    tag = "control",
    security(("bearer" = [])),
    request_body(content = EntitlementRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "allowed or not, with the reason and what is left", body = EntitlementResponse),
        (status = 400, description = "invalid body, unknown meter, negative quantity", body = ErrorBody),
        (status = 403, description = "a key of another tenant (without admin scope)", body = ErrorBody),
        Key<AnyScope>,
        (status = 503, description = "balances still loading after a start", body = ErrorBody),
    )
)]
pub async fn check(
    State(state): State<AppState>,
    Key(key, _): Key<AnyScope>,
    body: axum::body::Bytes,
) -> Result<Json<EntitlementResponse>, ApiError> {
    let req: EntitlementRequest = ApiError::json_body(&body)?;
    let tenant = named_tenant(&key, req.tenant.as_deref())?;
    if state.meters.get(&req.meter).is_none() {
        return Err(ApiError::bad_request(format!("unknown meter {:?}", req.meter)));
    }
    let quantity = decimal_field("quantity", &req.quantity)?;
    if quantity < Decimal::ZERO {
        return Err(ApiError::bad_request("quantity must not be negative"));
    }
    loaded(&state)?;
    let b = state.balances.get(&tenant);
    let e = balance::check(&state.catalog, &tenant, b.as_deref(), &req.meter, &req.dimensions, quantity, now_ms())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    ::metrics::counter!(crate::metrics::ENTITLEMENT_CHECKS, "reason" => e.reason).increment(1);
    Ok(Json(EntitlementResponse {
        tenant,
        allowed: e.allowed,
        remaining: e.remaining.map(|r| r.normalize().to_string()),
        reason: e.reason.to_owned(),
        cost: e.cost.normalize().to_string(),
        currency: e.currency,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_in_json() {
        assert_eq!(decimal_field("q", &serde_json::json!("1.5")).unwrap(), Decimal::new(15, 1));
        assert_eq!(decimal_field("q", &serde_json::json!(7)).unwrap(), Decimal::from(7));
        assert!(decimal_field("q", &serde_json::json!(1.5)).is_err());
        assert!(decimal_field("q", &serde_json::json!("1.0000000001")).is_err());
    }
}
