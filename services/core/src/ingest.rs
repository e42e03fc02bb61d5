//! HTTP ingest formats: meterflow's JSON event and CloudEvents 1.0 as OpenMeter takes them,
//! decoded into [`UsageEvent`]s and checked with the aggregator's stateless rules.
//!
//! Why in the core: the decoders face hostile input, so they are fuzzed like the Avro decoder
//! (`services/core/fuzz`), and [`validate`] must give the same verdict and reason as the
//! engine, which a property test checks against [`crate::engine::PartitionEngine`] itself.
//!
//! Numbers are never read as floats: a JSON number is kept as its source text (serde_json's
//! `RawValue`) and parsed exactly, so `0.1` stays `0.1` and `12345678901234567890` loses nothing.
//!
//! Which CloudEvents feed which meter, and where their values are, is [`mapping`].

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::event::{RejectReason, UsageEventRef};
use crate::meter::{MeterCatalog, MeterDef};
use crate::time::SubMillis;
use crate::UsageEvent;

mod mapping;
pub use mapping::{meter_ingest, IngestMap, JsonPath, MeterIngest, RawIngest};

/// Why an item of a request was not accepted: the aggregator's reasons plus the two that
/// only the API can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ItemReason {
    /// One of the aggregator's dead-letter reasons (same string).
    Core(RejectReason),
    /// The item names a tenant (`tenant` or CloudEvents `subject`) other than the API key's.
    TenantMismatch,
}

impl ItemReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemReason::Core(r) => r.as_str(),
            ItemReason::TenantMismatch => "tenant_mismatch",
        }
    }
}

impl std::fmt::Display for ItemReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected item: its reason and a human-readable detail (at most a few hundred bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemError {
    pub reason: ItemReason,
    pub detail: String,
}

impl ItemError {
    fn core(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self { reason: ItemReason::Core(reason), detail: truncate(&detail.into(), 300) }
    }
    fn undecodable(detail: impl Into<String>) -> Self {
        Self::core(RejectReason::Undecodable, detail)
    }
}

/// The request as a whole is not what its content type says (not JSON, not an object or an
/// array of them): answered 400 without looking at items.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(pub String);

/// Which of the ingest formats a body is in (from its `Content-Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/json`: one meterflow event object or an array of them.
    Json,
    /// `application/cloudevents+json`: one CloudEvent (structured mode).
    CloudEvent,
    /// `application/cloudevents-batch+json`: an array of CloudEvents.
    CloudEventBatch,
}

impl Format {
    /// The format of a `Content-Type` value (parameters such as `charset=utf-8` ignored), or
    /// `None` for anything else (415).
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            "application/json" => Some(Format::Json),
            "application/cloudevents+json" => Some(Format::CloudEvent),
            "application/cloudevents-batch+json" => Some(Format::CloudEventBatch),
            _ => None,
        }
    }
}

/// The request's context: who sent it (from the API key) and when.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The API key's tenant.
    pub tenant: &'a str,
    /// Admin keys may write any tenant's usage (the item's `tenant` / `subject`).
    pub any_tenant: bool,
    /// Event time of items without one, and the clock of the time checks (Unix ms).
    pub now_ms: i64,
    /// The aggregator's dedup horizon (events older than `now - horizon` are too late).
    pub dedup_horizon_ms: i64,
}

/// The outcome of one item of a request, in request order.
pub type ItemResult = Result<Vec<UsageEvent>, ItemError>;

/// Splits a body into its items (one for a single object) or fails as a whole.
pub fn split_items(format: Format, body: &[u8]) -> Result<Vec<&RawValue>, BodyError> {
    let text = std::str::from_utf8(body).map_err(|e| BodyError(format!("body is not UTF-8: {e}")))?;
    let trimmed = text.trim_start();
    let want_array = match format {
        Format::CloudEventBatch => true,
        Format::CloudEvent => false,
        Format::Json => trimmed.starts_with('['),
    };
    if want_array {
        serde_json::from_str::<Vec<&RawValue>>(text)
            .map_err(|e| BodyError(format!("expected a JSON array: {e}")))
    } else {
        let one: &RawValue = serde_json::from_str(text).map_err(|e| BodyError(format!("invalid JSON: {e}")))?;
        if !one.get().trim_start().starts_with('{') {
            return Err(BodyError("expected a JSON object or an array of objects".into()));
        }
        Ok(vec![one])
    }
}

/// Decodes and validates every item of a body.
pub fn decode(format: Format, body: &[u8], meters: &MeterCatalog, cx: &Context<'_>) -> Result<Vec<ItemResult>, BodyError> {
    let items = split_items(format, body)?;
    Ok(items
        .into_iter()
        .map(|raw| match format {
            Format::Json => decode_json_event(raw, meters, cx).map(|e| vec![e]),
            Format::CloudEvent | Format::CloudEventBatch => decode_cloud_event(raw, meters, cx),
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// meterflow JSON events

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEvent<'a> {
    #[serde(borrow, default)]
    event_id: Option<&'a RawValue>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    meter: Option<String>,
    #[serde(borrow, default)]
    quantity: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event_time: Option<&'a RawValue>,
    #[serde(default)]
    dimensions: BTreeMap<String, String>,
    #[serde(borrow, default)]
    provider_cost: Option<&'a RawValue>,
    #[serde(default)]
    source: String,
}

/// One meterflow JSON event: the Avro record's fields, `event_time` as RFC 3339 or Unix ms
/// (default: now), `quantity` and `provider_cost` as canonical decimal strings or JSON numbers.
pub fn decode_json_event(raw: &RawValue, meters: &MeterCatalog, cx: &Context<'_>) -> Result<UsageEvent, ItemError> {
    let ev: JsonEvent<'_> = serde_json::from_str(raw.get()).map_err(|e| ItemError::undecodable(e.to_string()))?;
    let tenant = resolve_tenant(ev.tenant.as_deref(), "tenant", cx)?;
    let event_id = match ev.event_id {
        None => String::new(),
        Some(v) => scalar_text(v).ok_or_else(|| ItemError::undecodable("event_id must be a string"))?,
    };
    let meter = ev.meter.unwrap_or_default();
    let event_time_ms = match ev.event_time {
        None => cx.now_ms,
        Some(v) => parse_time_value(v)?,
    };
    let quantity = match ev.quantity {
        None => String::new(),
        Some(v) => decimal_text(v).map_err(|d| ItemError::core(RejectReason::BadQuantity, format!("quantity {d}")))?,
    };
    let provider_cost = ev
        .provider_cost
        .map(|v| decimal_text(v).map_err(|d| ItemError::core(RejectReason::BadProviderCost, format!("provider_cost {d}"))))
        .transpose()?;
    let mut out = UsageEvent {
        event_id,
        tenant,
        meter,
        quantity: Decimal::ZERO,
        event_time_ms,
        dimensions: ev.dimensions,
        provider_cost: None,
        source: ev.source,
    };
    let def = validate_parts(&out, &quantity, provider_cost.as_deref(), meters, cx)?;
    finish(&mut out, def, &quantity, provider_cost.as_deref());
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// CloudEvents

#[derive(Deserialize)]
struct CloudEvent<'a> {
    #[serde(default)]
    specversion: Option<String>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(default)]
    source: Option<String>,
    #[serde(rename = "type", default)]
    ty: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(borrow, default)]
    time: Option<&'a RawValue>,
    #[serde(default)]
    datacontenttype: Option<String>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// The usage event id of a CloudEvent for one meter. CloudEvents are unique by
/// `(source, id)` (OpenMeter dedups on both) and one event may feed several meters, while the
/// aggregator dedups on `(tenant, event_id)`: all three go into the id. The meter name cannot
/// contain `:` and the source is length-prefixed, so distinct triples never collide.
pub fn cloud_event_id(meter: &str, source: &str, id: &str) -> String {
    format!("ce:{meter}:{}:{source}:{id}", source.len())
}

/// One CloudEvent (structured JSON) -> one usage event per meter its `type` feeds. All or
/// nothing: if any meter's event is invalid, the CloudEvent is rejected.
pub fn decode_cloud_event(raw: &RawValue, meters: &MeterCatalog, cx: &Context<'_>) -> Result<Vec<UsageEvent>, ItemError> {
    let ce: CloudEvent<'_> = serde_json::from_str(raw.get()).map_err(|e| ItemError::undecodable(e.to_string()))?;
    match ce.specversion.as_deref() {
        Some("1.0") => {}
        Some(v) => return Err(ItemError::undecodable(format!("specversion {:?} is not \"1.0\"", truncate(v, 16)))),
        None => return Err(ItemError::undecodable("specversion is required")),
    }
    let id = match ce.id {
        None => String::new(),
        Some(v) => scalar_text(v).ok_or_else(|| ItemError::undecodable("id must be a string"))?,
    };
    if id.is_empty() {
        return Err(ItemError::core(RejectReason::MissingEventId, "id is required"));
    }
    let source = ce.source.unwrap_or_default();
    if source.is_empty() {
        return Err(ItemError::undecodable("source is required"));
    }
    if let Some(ct) = ce.datacontenttype.as_deref() {
        if Format::from_content_type(ct) != Some(Format::Json) {
            return Err(ItemError::undecodable(format!("datacontenttype {:?} is not application/json", truncate(ct, 64))));
        }
    }
    let tenant = resolve_tenant(ce.subject.as_deref(), "subject", cx)?;
    let ty = ce.ty.unwrap_or_default();
    let targets = meters.ingest().meters_for(&ty);
    if targets.is_empty() {
        return Err(ItemError::core(RejectReason::UnknownMeter, format!("no meter reads events of type {:?}", truncate(&ty, 64))));
    }
    let event_time_ms = match ce.time {
        None => cx.now_ms,
        Some(v) => parse_time_value(v)?,
    };
    let data = ce.data.map(RawValue::get).unwrap_or("null");
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        let DataFields { quantity, provider_cost, dimensions } = from_data(t, data)?;
        let mut ev = UsageEvent {
            event_id: cloud_event_id(&t.meter, &source, &id),
            tenant: tenant.clone(),
            meter: t.meter.clone(),
            quantity: Decimal::ZERO,
            event_time_ms,
            dimensions,
            provider_cost: None,
            source: source.clone(),
        };
        let def = validate_parts(&ev, &quantity, provider_cost.as_deref(), meters, cx)?;
        finish(&mut ev, def, &quantity, provider_cost.as_deref());
        out.push(ev);
    }
    Ok(out)
}

/// What one meter reads from a CloudEvent's `data`.
struct DataFields {
    /// Decimal text; 1 (an event) when the meter reads no value.
    quantity: String,
    provider_cost: Option<String>,
    /// A dimension missing from the data is left out.
    dimensions: BTreeMap<String, String>,
}

fn from_data(t: &MeterIngest, data: &str) -> Result<DataFields, ItemError> {
    let quantity = match &t.value {
        Some(path) => match path.select(data) {
            Ok(Some(v)) => decimal_text(v).map_err(|d| {
                ItemError::core(RejectReason::BadQuantity, format!("meter {}: {} {d}", t.meter, path.as_str()))
            })?,
            Ok(None) => {
                return Err(ItemError::core(RejectReason::BadQuantity, format!("meter {}: {} is missing in data", t.meter, path.as_str())))
            }
            Err(e) => return Err(ItemError::undecodable(format!("data: {e}"))),
        },
        None => "1".to_owned(),
    };
    let provider_cost = match &t.provider_cost {
        Some(path) => match path.select(data) {
            Ok(Some(v)) => Some(decimal_text(v).map_err(|d| {
                ItemError::core(RejectReason::BadProviderCost, format!("meter {}: {} {d}", t.meter, path.as_str()))
            })?),
            Ok(None) => None,
            Err(e) => return Err(ItemError::undecodable(format!("data: {e}"))),
        },
        None => None,
    };
    let mut dimensions = BTreeMap::new();
    for (name, path) in &t.dimensions {
        match path.select(data) {
            Ok(Some(v)) => {
                if let Some(text) = dimension_text(v) {
                    dimensions.insert(name.clone(), text);
                }
            }
            Ok(None) => {}
            Err(e) => return Err(ItemError::undecodable(format!("data: {e}"))),
        }
    }
    Ok(DataFields { quantity, provider_cost, dimensions })
}

// ---------------------------------------------------------------------------------------------
// Validation: the engine's stateless rules.

/// The aggregator's verdict on an event that is not a duplicate, decided without its state:
/// the same checks in the same order as [`crate::engine::PartitionEngine`] (tenant, event
/// id, meter, too late, too early, quantity, sign, provider cost), with `now_ms` standing in
/// for the record's timestamp. `Ok` returns the meter. An event the API accepts at the edge
/// of the horizon may still be dead-lettered `too_late` if it reaches the aggregator later:
/// never lost, but not counted.
pub fn validate<'m>(
    ev: &UsageEventRef<'_>,
    meters: &'m MeterCatalog,
    now_ms: i64,
    dedup_horizon_ms: i64,
) -> Result<&'m MeterDef, (RejectReason, String)> {
    use crate::engine::MAX_ABS_EVENT_TIME_MS;
    let UsageEventRef { tenant, event_id, meter, quantity, event_time_ms, provider_cost, .. } = *ev;
    if tenant.is_empty() {
        return Err((RejectReason::MissingTenant, "empty tenant".into()));
    }
    if event_id.is_empty() {
        return Err((RejectReason::MissingEventId, "empty event_id".into()));
    }
    let Some(m) = meters.get(meter) else {
        return Err((RejectReason::UnknownMeter, format!("unknown meter {:?}", truncate(meter, 64))));
    };
    let floor = now_ms.saturating_sub(dedup_horizon_ms);
    if event_time_ms < -MAX_ABS_EVENT_TIME_MS || event_time_ms < floor {
        return Err((RejectReason::TooLate, format!("event time {event_time_ms} is older than the dedup horizon (earliest accepted {floor})")));
    }
    let latest = now_ms.saturating_add(m.max_future_ms);
    if event_time_ms > MAX_ABS_EVENT_TIME_MS || event_time_ms > latest {
        return Err((RejectReason::TooEarly, format!("event time {event_time_ms} is beyond max_future (latest accepted {latest})")));
    }
    let q = crate::decimal::parse("quantity", quantity).map_err(|e| (RejectReason::BadQuantity, e.to_string()))?;
    if !m.allow_negative && q < Decimal::ZERO {
        return Err((
            RejectReason::NegativeQuantity,
            format!("quantity {} is negative and meter {} does not allow_negative", truncate(quantity, 64), m.name),
        ));
    }
    if let Some(c) = provider_cost {
        crate::decimal::parse("provider_cost", c).map_err(|e| (RejectReason::BadProviderCost, e.to_string()))?;
    }
    Ok(m)
}

fn validate_parts<'m>(
    ev: &UsageEvent,
    quantity: &str,
    provider_cost: Option<&str>,
    meters: &'m MeterCatalog,
    cx: &Context<'_>,
) -> Result<&'m MeterDef, ItemError> {
    let r = UsageEventRef {
        event_id: &ev.event_id,
        tenant: &ev.tenant,
        meter: &ev.meter,
        quantity,
        event_time_ms: ev.event_time_ms,
        dimensions: Vec::new(),
        provider_cost,
        source: &ev.source,
    };
    validate(&r, meters, cx.now_ms, cx.dedup_horizon_ms).map_err(|(r, d)| ItemError::core(r, d))
}

/// Fills in the decimals [`validate`] has accepted.
fn finish(ev: &mut UsageEvent, _def: &MeterDef, quantity: &str, provider_cost: Option<&str>) {
    // Both parsed successfully in `validate`.
    ev.quantity = crate::decimal::parse("quantity", quantity).unwrap_or_default();
    ev.provider_cost = provider_cost.map(|c| crate::decimal::parse("provider_cost", c).unwrap_or_default());
}

fn resolve_tenant(claimed: Option<&str>, field: &str, cx: &Context<'_>) -> Result<String, ItemError> {
    match claimed {
        None | Some("") => Ok(cx.tenant.to_owned()),
        Some(t) if t == cx.tenant => Ok(t.to_owned()),
        Some(t) if cx.any_tenant => Ok(t.to_owned()),
        Some(t) => Err(ItemError {
            reason: ItemReason::TenantMismatch,
            detail: format!("{field} {:?} is not the API key's tenant", truncate(t, 64)),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// JSON scalars, exactly

/// A JSON string's content (or a number's text, for ids sent as numbers).
fn scalar_text(v: &RawValue) -> Option<String> {
    let s = v.get().trim();
    if s.starts_with('"') {
        serde_json::from_str::<String>(s).ok()
    } else if s.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        Some(s.to_owned())
    } else {
        None
    }
}

/// The canonical decimal text of a JSON number or string. Strings are passed on as they are
/// (the decimal check rejects anything non-canonical); numbers are exact: `1.50` -> `1.50`,
/// `1e3` -> `1000`, and any number the canonical form cannot hold exactly is an error.
fn decimal_text(v: &RawValue) -> Result<String, String> {
    let s = v.get().trim();
    if s.starts_with('"') {
        return serde_json::from_str::<String>(s).map_err(|e| format!("is not a string: {e}"));
    }
    if !s.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return Err(format!("must be a number or a decimal string, got {}", truncate(s, 32)));
    }
    if s.contains(['e', 'E']) {
        let d = Decimal::from_scientific(s).map_err(|e| format!("{}: {e}", truncate(s, 32)))?;
        return Ok(crate::decimal::format(&d));
    }
    Ok(s.to_owned())
}

/// A dimension's text: strings as they are, numbers and booleans as written, other JSON
/// as its compact text; `null` drops the dimension.
fn dimension_text(v: &RawValue) -> Option<String> {
    let s = v.get().trim();
    if s == "null" {
        return None;
    }
    if s.starts_with('"') {
        return serde_json::from_str::<String>(s).ok();
    }
    if s.starts_with(['{', '[']) {
        return serde_json::from_str::<serde_json::Value>(s).ok().map(|v| v.to_string());
    }
    Some(s.to_owned())
}

/// `time`: an RFC 3339 string (CloudEvents), or for meterflow JSON also Unix milliseconds.
fn parse_time_value(v: &RawValue) -> Result<i64, ItemError> {
    let s = v.get().trim();
    if s.starts_with('"') {
        let text: String = serde_json::from_str(s).map_err(|e| ItemError::undecodable(format!("time: {e}")))?;
        return crate::time::parse_rfc3339(&text, SubMillis::Truncate)
            .map_err(|_| ItemError::undecodable(format!("time {:?} is not RFC 3339", truncate(&text, 40))));
    }
    s.parse::<i64>()
        .map_err(|_| ItemError::undecodable(format!("time {} is neither RFC 3339 nor whole Unix milliseconds", truncate(s, 40))))
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests;
