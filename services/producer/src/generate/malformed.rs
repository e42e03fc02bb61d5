//! Broken messages of every kind the aggregator must dead-letter, with the reason each must
//! get.

use meterflow_core::codec::WriterVersion;
use meterflow_core::{RejectReason, UsageEventRef};
use rand::rngs::StdRng;
use rand::Rng;

use crate::event::event_id_from;
use crate::producer::EventProducer;
use crate::workload::{Workload, REGIONS};

/// The ways a generated message is broken, with the rejection each must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Malformed {
    Garbage,
    Json,
    Truncated,
    UnknownMeter,
    EmptyTenant,
    EmptyEventId,
    QuantityNaN,
    QuantityExponent,
    NegativeQuantity,
    BadProviderCost,
}

impl Malformed {
    pub(super) const ALL: [Malformed; 10] = [
        Malformed::Garbage,
        Malformed::Json,
        Malformed::Truncated,
        Malformed::UnknownMeter,
        Malformed::EmptyTenant,
        Malformed::EmptyEventId,
        Malformed::QuantityNaN,
        Malformed::QuantityExponent,
        Malformed::NegativeQuantity,
        Malformed::BadProviderCost,
    ];

    pub(super) fn kind(self) -> &'static str {
        match self {
            Malformed::Garbage => "garbage",
            Malformed::Json => "json",
            Malformed::Truncated => "truncated",
            Malformed::UnknownMeter => "unknown_meter",
            Malformed::EmptyTenant => "empty_tenant",
            Malformed::EmptyEventId => "empty_event_id",
            Malformed::QuantityNaN => "quantity_nan",
            Malformed::QuantityExponent => "quantity_exponent",
            Malformed::NegativeQuantity => "negative_quantity",
            Malformed::BadProviderCost => "bad_provider_cost",
        }
    }

    pub(super) fn reason(self) -> RejectReason {
        match self {
            Malformed::Garbage | Malformed::Json | Malformed::Truncated => RejectReason::Undecodable,
            Malformed::UnknownMeter => RejectReason::UnknownMeter,
            Malformed::EmptyTenant => RejectReason::MissingTenant,
            Malformed::EmptyEventId => RejectReason::MissingEventId,
            Malformed::QuantityNaN | Malformed::QuantityExponent => RejectReason::BadQuantity,
            Malformed::NegativeQuantity => RejectReason::NegativeQuantity,
            Malformed::BadProviderCost => RejectReason::BadProviderCost,
        }
    }
}

/// Builds one malformed message: (key, payload).
#[allow(clippy::too_many_arguments)]
pub(super) fn malformed<'w>(
    what: Malformed,
    workload: &'w Workload,
    tenant: usize,
    meter: &str,
    time: i64,
    source: &str,
    producer: &EventProducer,
    rng: &mut StdRng,
) -> (&'w str, Vec<u8>) {
    let key = workload.tenant_name(tenant);
    let mut out = Vec::with_capacity(160);
    match what {
        Malformed::Garbage => {
            // Never a valid framing byte (0x00 Confluent, 0xC3 single-object), so it cannot
            // decode by accident.
            let len = rng.random_range(1..64);
            out.push(rng.random_range(0x01..0xC3u8));
            out.extend((1..len).map(|_| rng.random::<u8>()));
            return (key, out);
        }
        Malformed::Json => {
            // A client that sends JSON instead of Avro.
            let text = format!(r#"{{"event_id":"{}","tenant":"{key}","meter":"{meter}","quantity":"1","event_time":{time}}}"#, event_id_from(rng));
            return (key, text.into_bytes());
        }
        _ => {}
    }
    let event_id = event_id_from(rng);
    let region = REGIONS[rng.random_range(0..REGIONS.len())];
    let mut quantity = rng.random_range(1..5000u32).to_string();
    let mut cost = Some(format!("0.{:06}", rng.random_range(1..1_000_000u32)));
    let (mut tenant_field, mut id_field) = (key, event_id.as_str());
    match what {
        Malformed::EmptyTenant => tenant_field = "",
        Malformed::EmptyEventId => id_field = "",
        Malformed::QuantityNaN => quantity = "NaN".into(),
        Malformed::QuantityExponent => quantity = "1e5".into(),
        Malformed::NegativeQuantity => quantity = "-3".into(),
        Malformed::BadProviderCost => {
            let bad = ["free", "1e-3", "0.0000000001", "1,5", "NaN"];
            cost = Some(bad[rng.random_range(0..bad.len())].into());
        }
        _ => {}
    }
    let ev = UsageEventRef {
        event_id: id_field,
        tenant: tenant_field,
        meter,
        quantity: &quantity,
        event_time_ms: time,
        dimensions: vec![("model", "gpt-4o-mini"), ("region", region)],
        provider_cost: cost.as_deref(),
        source,
    };
    producer.codec().encode_ref(&ev, WriterVersion::V2, producer.framing(), &mut out);
    if what == Malformed::Truncated {
        // Every proper prefix of an encoding fails to decode (the codec's tests check it).
        let cut = rng.random_range(1..out.len());
        out.truncate(cut);
    }
    (if what == Malformed::EmptyTenant { "" } else { key }, out)
}
