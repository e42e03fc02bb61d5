//! The usage event, owned (for producers) and borrowed (for the hot decode path).

use std::collections::BTreeMap;

use rust_decimal::Decimal;

/// One unit of metered usage as a producer builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    /// Idempotency key. Dedup is by `(tenant, meter, event_id)` over the whole dedup horizon
    /// (see [`crate::dedup`]): a retried send carries the same id (its event time may differ,
    /// a re-stamped retry is still a duplicate); one request may report several meters under
    /// one id.
    pub event_id: String,
    pub tenant: String,
    pub meter: String,
    pub quantity: Decimal,
    /// Event time, Unix milliseconds, UTC.
    pub event_time_ms: i64,
    /// Sorted so that the same dimensions always encode to the same bytes.
    pub dimensions: BTreeMap<String, String>,
    pub provider_cost: Option<Decimal>,
    pub source: String,
}

impl UsageEvent {
    pub fn new(
        event_id: impl Into<String>,
        tenant: impl Into<String>,
        meter: impl Into<String>,
        quantity: Decimal,
        event_time_ms: i64,
    ) -> Self {
        Self {
            event_id: event_id.into(),
            tenant: tenant.into(),
            meter: meter.into(),
            quantity,
            event_time_ms,
            dimensions: BTreeMap::new(),
            provider_cost: None,
            source: String::new(),
        }
    }

    pub fn with_dimension(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.dimensions.insert(key.into(), value.into());
        self
    }

    pub fn with_provider_cost(mut self, cost: Decimal) -> Self {
        self.provider_cost = Some(cost);
        self
    }

    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }
}

/// A decoded event borrowing from the message bytes. Numbers stay as text until a meter
/// needs them, so a duplicate costs no decimal parsing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsageEventRef<'a> {
    pub event_id: &'a str,
    pub tenant: &'a str,
    pub meter: &'a str,
    pub quantity: &'a str,
    pub event_time_ms: i64,
    /// In wire order (producers using this crate write them sorted).
    pub dimensions: Vec<(&'a str, &'a str)>,
    pub provider_cost: Option<&'a str>,
    pub source: &'a str,
}

impl UsageEventRef<'_> {
    /// The value of one dimension, if present.
    pub fn dimension(&self, key: &str) -> Option<&str> {
        self.dimensions.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// Converts to an owned event, validating the decimals.
    pub fn to_owned_event(&self) -> crate::Result<UsageEvent> {
        Ok(UsageEvent {
            event_id: self.event_id.to_owned(),
            tenant: self.tenant.to_owned(),
            meter: self.meter.to_owned(),
            quantity: crate::decimal::parse("quantity", self.quantity)?,
            event_time_ms: self.event_time_ms,
            dimensions: self
                .dimensions
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            provider_cost: self
                .provider_cost
                .map(|c| crate::decimal::parse("provider_cost", c))
                .transpose()?,
            source: self.source.to_owned(),
        })
    }
}

/// Why an input record was not counted. The string form is the `reason` column of
/// `dead_letters` and the label of the dead-letter metric, so it is stable and bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[derive(strum::IntoStaticStr, strum::EnumString, strum::Display)]
#[strum(serialize_all = "snake_case")]
pub enum RejectReason {
    /// The bytes are not a usage event in any known schema.
    Undecodable,
    UnknownMeter,
    MissingTenant,
    MissingEventId,
    /// Not a canonical decimal (NaN, inf, exponent, too many digits).
    BadQuantity,
    /// Negative where the meter forbids it.
    NegativeQuantity,
    BadProviderCost,
    /// Older than the dedup horizon: it could no longer be told apart from a duplicate.
    TooLate,
    /// Further in the future than the meter allows.
    TooEarly,
    /// Above the meter's `max_quantity` (in absolute value).
    QuantityOutOfRange,
    /// Would open a window beyond a per-partition memory limit (windows in memory, or open
    /// windows of one tenant); see `EngineConfig::max_windows`.
    WindowLimit,
    /// On a partition other than its tenant's (message key not the tenant, or another
    /// partitioner): its duplicates and its windows live on the tenant's partition.
    WrongPartition,
    /// A control record (idle tick) without a valid tag of the deployment's record key: a
    /// producer cannot move a partition's time.
    Unauthenticated,
}

impl RejectReason {
    /// In snapshot order: new reasons are appended, never inserted (engine stats are indexed
    /// by position and checkpointed).
    pub const ALL: [RejectReason; 13] = [
        RejectReason::Undecodable,
        RejectReason::UnknownMeter,
        RejectReason::MissingTenant,
        RejectReason::MissingEventId,
        RejectReason::BadQuantity,
        RejectReason::NegativeQuantity,
        RejectReason::BadProviderCost,
        RejectReason::TooLate,
        RejectReason::TooEarly,
        RejectReason::QuantityOutOfRange,
        RejectReason::WindowLimit,
        RejectReason::WrongPartition,
        RejectReason::Unauthenticated,
    ];

    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub fn parse(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::RejectReason;
    use crate::meter::Aggregation;
    use strum::VariantArray;

    /// The names are stored (dead_letters.reason, meter definitions) and are metric labels:
    /// pinned here against a rename of a variant.
    #[test]
    fn wire_names_are_stable() {
        let names: Vec<&str> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "undecodable", "unknown_meter", "missing_tenant", "missing_event_id", "bad_quantity", "negative_quantity",
                "bad_provider_cost", "too_late", "too_early", "quantity_out_of_range", "window_limit", "wrong_partition",
                "unauthenticated",
            ]
        );
        assert!(RejectReason::ALL.iter().all(|r| RejectReason::parse(r.as_str()) == Some(*r) && r.to_string() == r.as_str()));
        assert_eq!(RejectReason::parse("Undecodable"), None);
        let names: Vec<&str> = Aggregation::VARIANTS.iter().map(|a| a.as_str()).collect();
        assert_eq!(names, ["sum", "count", "min", "max", "avg", "unique_count", "latest"]);
        assert!(Aggregation::VARIANTS.iter().all(|a| Aggregation::parse(a.as_str()) == Some(*a)));
    }
}
