//! The HTTP ingest decoders (`meterflow_core::ingest::decode`: meterflow JSON, CloudEvents,
//! CloudEvents batches) on arbitrary bytes. They must never panic, and everything they accept
//! must be an event the aggregator would accept too: the tenant is the key's (unless the key
//! is an admin key), the decimals are canonical with at most 9 fractional digits, the event
//! time is within the horizon and max_future, and the event survives the Avro codec.
//!
//! The first byte picks the format (`% 3`: JSON, CloudEvent, batch) and whether the key is an
//! admin key (`& 4`); the rest is the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meterflow_core::codec::{Framing, UsageEventCodec};
use meterflow_core::ingest::{decode, Context, Format};
use meterflow_core::meter::MeterCatalog;

const METERS: &str = r#"
[[meter]]
name = "t"
aggregation = "sum"
group_by = ["model"]
window = 60
event_type = "prompt"
value_property = "$.tokens"
provider_cost_property = "$.cost"
[meter.dimension_properties]
model = "$['m'][0]"

[[meter]]
name = "r"
aggregation = "count"
window = 60
event_type = "prompt"

[[meter]]
name = "n"
aggregation = "sum"
window = 60
allow_negative = true
"#;

const NOW: i64 = 1_764_684_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let format = match mode % 3 {
        0 => Format::Json,
        1 => Format::CloudEvent,
        _ => Format::CloudEventBatch,
    };
    static CATALOG: std::sync::OnceLock<MeterCatalog> = std::sync::OnceLock::new();
    let meters = CATALOG.get_or_init(|| MeterCatalog::from_toml_str(METERS).expect("valid meters"));
    let cx = Context { tenant: "acme", any_tenant: mode & 4 != 0, now_ms: NOW, dedup_horizon_ms: 86_400_000 };
    let Ok(items) = decode(format, body, meters, &cx) else { return };
    let codec = UsageEventCodec::new();
    for ev in items.into_iter().flatten().flatten() {
        assert!(cx.any_tenant || ev.tenant == "acme");
        assert!(!ev.tenant.is_empty() && !ev.event_id.is_empty());
        let m = meters.get(&ev.meter).expect("accepted events name a meter");
        assert!(ev.quantity.scale() <= 9);
        assert!(m.allow_negative || !ev.quantity.is_sign_negative() || ev.quantity.is_zero());
        assert!(ev.provider_cost.is_none_or(|c| c.scale() <= 9));
        assert!(ev.event_time_ms >= NOW - 86_400_000 && ev.event_time_ms <= NOW + m.max_future_ms);
        let mut bytes = Vec::new();
        codec.encode(&ev, Framing::SingleObject, &mut bytes);
        let back = codec.decode(&bytes).expect("encoded event decodes").to_owned_event().expect("decimals valid");
        assert_eq!(back, ev);
    }
});
