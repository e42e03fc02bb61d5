//! `POST /v1/events`: usage ingest.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::future::join_all;
use governor::clock::{Clock as _, DefaultClock};
use meterflow_core::codec::Framing;
use meterflow_core::ingest::{self, Context, Format};
use meterflow_core::UsageEvent;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use serde::Serialize;
use utoipa::ToSchema;

use crate::access::{Ingest, Key};
use crate::http::{ApiError, ErrorBody};
use crate::keys::Scope;
use crate::AppState;

/// The answer to an ingest request: one result per item, in request order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IngestResponse {
    /// Items accepted (written to the usage topic and acknowledged by the broker).
    pub accepted: usize,
    /// Items rejected (nothing written for them).
    pub rejected: usize,
    /// Usage events written (a CloudEvent read by several meters writes one per meter).
    pub events: usize,
    pub results: Vec<ItemResult>,
}

/// One item's outcome.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ItemResult {
    /// Position of the item in the request (0 for a single object).
    pub index: usize,
    /// `accepted` or `rejected`.
    pub status: &'static str,
    /// For rejected items: the aggregator's dead-letter reason (`undecodable`,
    /// `unknown_meter`, `missing_tenant`, `missing_event_id`, `bad_quantity`,
    /// `negative_quantity`, `bad_provider_cost`, `too_late`, `too_early`) or
    /// `tenant_mismatch`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Ingest usage events.
///
/// Content types: `application/json` (a meterflow event or an array of them:
/// `{"event_id", "meter", "quantity", "event_time"?, "dimensions"?, "provider_cost"?,
/// "source"?, "tenant"?}`), `application/cloudevents+json` and
/// `application/cloudevents-batch+json` (CloudEvents 1.0: `specversion`, `id`, `source`,
/// `type` = a meter's event type, `subject` = tenant, `time`, `data`). 202 only after the
/// broker acknowledged every accepted event; 400 if every item was rejected.
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "ingest",
    security(("bearer" = [])),
    request_body(description = "JSON event(s) or CloudEvent(s)", content(
        (String = "application/json"),
        (String = "application/cloudevents+json"),
        (String = "application/cloudevents-batch+json"))),
    responses(
        (status = 202, description = "accepted items written and acknowledged (rejected ones listed)", body = IngestResponse),
        (status = 400, description = "malformed body, or every item rejected", body = IngestResponse),
        Key<Ingest>,
        (status = 413, description = "body or batch too large", body = ErrorBody),
        (status = 415, description = "unsupported Content-Type", body = ErrorBody),
        (status = 429, description = "tenant rate limit or backpressure; see Retry-After", body = ErrorBody),
        (status = 503, description = "the broker did not acknowledge; retry (events are deduplicated by id)", body = ErrorBody),
    )
)]
pub async fn ingest(State(state): State<AppState>, Key(key, _): Key<Ingest>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let format = Format::from_content_type(content_type).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "Content-Type {content_type:?} is not application/json, application/cloudevents+json or application/cloudevents-batch+json"
            ),
        )
    })?;
    if let Some(len) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok()) {
        if len > state.max_body_bytes {
            return Err(ApiError::too_large(format!("body of {len} bytes exceeds the limit of {} bytes", state.max_body_bytes)));
        }
    }
    let bytes = axum::body::to_bytes(body, state.max_body_bytes)
        .await
        .map_err(|_| ApiError::too_large(format!("body exceeds the limit of {} bytes", state.max_body_bytes)))?;

    let items = ingest::split_items(format, &bytes).map_err(|e| ApiError::bad_request(e.0))?;
    if items.len() > state.max_batch {
        return Err(ApiError::too_large(format!("{} items exceed the batch limit of {}", items.len(), state.max_batch)));
    }
    let cx = Context {
        tenant: &key.tenant,
        any_tenant: key.scope == Scope::Admin,
        now_ms: now_ms(),
        dedup_horizon_ms: state.dedup_horizon_ms,
    };
    let decoded: Vec<ingest::ItemResult> = items
        .into_iter()
        .map(|raw| match format {
            Format::Json => ingest::decode_json_event(raw, &state.meters, &cx).map(|e| vec![e]),
            Format::CloudEvent | Format::CloudEventBatch => ingest::decode_cloud_event(raw, &state.meters, &cx),
        })
        .collect();

    let mut results = Vec::with_capacity(decoded.len());
    let mut events: Vec<UsageEvent> = Vec::new();
    for (index, r) in decoded.into_iter().enumerate() {
        match r {
            Ok(evs) => {
                events.extend(evs);
                results.push(ItemResult { index, status: "accepted", reason: None, detail: None });
            }
            Err(e) => {
                metrics::counter!(crate::metrics::EVENTS_REJECTED, "reason" => e.reason.as_str()).increment(1);
                results.push(ItemResult { index, status: "rejected", reason: Some(e.reason.as_str()), detail: Some(e.detail) });
            }
        }
    }
    let accepted = results.iter().filter(|r| r.status == "accepted").count();
    let response = IngestResponse { accepted, rejected: results.len() - accepted, events: events.len(), results };
    if accepted == 0 && response.rejected > 0 {
        return Ok((StatusCode::BAD_REQUEST, Json(response)).into_response());
    }

    throttle(&state, &events)?;
    let permits = u32::try_from(events.len()).unwrap_or(u32::MAX);
    let _permit = match state.in_flight.clone().try_acquire_many_owned(permits) {
        Ok(p) => p,
        Err(_) => {
            metrics::counter!(crate::metrics::THROTTLED, "cause" => "backpressure").increment(1);
            return Err(ApiError::too_many(
                "overloaded",
                format!("more than {} events are waiting for the broker; retry later", state.max_in_flight),
                1,
            ));
        }
    };
    metrics::gauge!(crate::metrics::IN_FLIGHT).set((state.max_in_flight - state.in_flight.available_permits()) as f64);
    produce(&state, &events).await?;
    metrics::counter!(crate::metrics::EVENTS_ACCEPTED).increment(events.len() as u64);
    Ok((StatusCode::ACCEPTED, Json(response)).into_response())
}

/// Per-tenant token buckets (governor's GCRA), charged one token per event.
fn throttle(state: &AppState, events: &[UsageEvent]) -> Result<(), ApiError> {
    let Some(limiter) = &state.limiter else { return Ok(()) };
    let mut per_tenant: BTreeMap<&str, u32> = BTreeMap::new();
    for e in events {
        *per_tenant.entry(e.tenant.as_str()).or_default() += 1;
    }
    for (tenant, n) in per_tenant {
        let Some(n) = NonZeroU32::new(n) else { continue };
        match limiter.check_key_n(&tenant.to_owned(), n) {
            Ok(Ok(())) => {}
            Ok(Err(not_until)) => {
                metrics::counter!(crate::metrics::THROTTLED, "cause" => "rate_limit").increment(1);
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                return Err(ApiError::too_many(
                    "rate_limited",
                    format!("tenant {tenant:?} is over its rate limit; retry after {} ms", wait.as_millis()),
                    wait.as_secs_f64().ceil() as u64,
                ));
            }
            Err(_) => {
                metrics::counter!(crate::metrics::THROTTLED, "cause" => "rate_limit").increment(1);
                return Err(ApiError::too_many(
                    "rate_limited",
                    format!("{n} events for tenant {tenant:?} exceed its burst; send smaller batches"),
                    1,
                ));
            }
        }
    }
    Ok(())
}

/// Produces every event (key = tenant) and waits for all acknowledgements. Any failure is a
/// 503: some events may have been written, and the retry the client makes is deduplicated
/// by the aggregator (same tenant and event id).
async fn produce(state: &AppState, events: &[UsageEvent]) -> Result<(), ApiError> {
    let payloads: Vec<Vec<u8>> = events
        .iter()
        .map(|e| {
            let mut out = Vec::with_capacity(160);
            state.codec.encode(e, Framing::SingleObject, &mut out);
            out
        })
        .collect();
    let started = Instant::now();
    let sends = events.iter().zip(&payloads).map(|(e, p)| {
        let record = FutureRecord::to(&state.usage_topic).key(e.tenant.as_str()).payload(p.as_slice());
        state.producer.send(record, Timeout::After(state.produce_timeout))
    });
    let results = match tokio::time::timeout(state.produce_timeout, join_all(sends)).await {
        Ok(r) => r,
        Err(_) => {
            metrics::counter!(crate::metrics::PRODUCE_ERRORS).increment(1);
            return Err(ApiError::unavailable("the broker did not acknowledge in time; retry the request"));
        }
    };
    metrics::histogram!(crate::metrics::PRODUCE_SECONDS).record(started.elapsed().as_secs_f64());
    if let Some(Err((e, _))) = results.into_iter().find(Result::is_err) {
        metrics::counter!(crate::metrics::PRODUCE_ERRORS).increment(1);
        tracing::warn!(error = %e, "produce failed");
        return Err(ApiError::unavailable(format!("the broker did not store the events ({e}); retry the request")));
    }
    Ok(())
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
