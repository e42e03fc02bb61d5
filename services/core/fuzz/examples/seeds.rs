//! Writes the seed corpus (`corpus/<target>/seed-*`): valid encodings of every shape the
//! decoders accept, in each target's input format (first byte = mode, see the targets).
//!
//! `cargo +nightly run --manifest-path services/core/fuzz/Cargo.toml --example seeds`

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use meterflow_core::codec::{Framing, UsageEventCodec, WriterVersion};
use meterflow_core::records::{AvroRecord, Charge, DeadLetter, MeterAggregate, WalletAdjustment};
use meterflow_core::{UsageEvent, UsageEventRef};
use rust_decimal::Decimal;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).expect("seed decimal")
}

fn write(dir: &Path, name: &str, mode: u8, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("corpus dir");
    let mut data = vec![mode];
    data.extend_from_slice(bytes);
    std::fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let codec = UsageEventCodec::new();
    write_event_seeds(&root.join("decode_event"), &codec);
    write_record_seeds(&root.join("decode_records"));
    println!("seeds written to {}", root.display());
}

/// Events of every shape the decoder accepts: dimensions, provider cost, source, extreme
/// quantities and times, non-ASCII names.
fn sample_events() -> [UsageEvent; 5] {
    [
        UsageEvent::new("0b7f6c1e-4a2d-4e8f-9c3b-1d2e3f4a5b6c.input_tokens", "tenant-000", "input_tokens", d("1234"), 1_767_225_600_123)
            .with_dimension("endpoint", "chat")
            .with_dimension("model", "gpt-4o")
            .with_dimension("region", "us-east")
            .with_provider_cost(d("0.003085"))
            .with_source("meterflow-producer"),
        UsageEvent::new("r1.gpu_seconds", "t", "gpu_seconds", d("0.125"), 0).with_dimension("gpu", "h100"),
        UsageEvent::new("r2.requests", "tenant-049", "requests", Decimal::ONE, -1),
        UsageEvent::new("neg", "tenant-001", "credits", d("-3.000000001"), i64::MAX).with_provider_cost(d("0")),
        UsageEvent::new("ünï", "テナント", "input_tokens", d("79228162514264337593543950335"), i64::MIN)
            .with_dimension("k=,\\", "v=,\\"),
    ]
}

/// Each sample event in every framing and writer version, and a map written in blocks.
fn write_event_seeds(dir: &Path, codec: &UsageEventCodec) {
    for (i, ev) in sample_events().iter().enumerate() {
        let mut single = Vec::new();
        codec.encode(ev, Framing::SingleObject, &mut single);
        write(dir, &format!("v2-single-{i}"), 0, &single);
        write(dir, &format!("v2-body-{i}"), 1, &single[10..]);
        let mut confluent = Vec::new();
        codec.encode(ev, Framing::Confluent { schema_id: 2 }, &mut confluent);
        write(dir, &format!("v2-confluent-{i}"), 0, &confluent);
        let q = ev.quantity.to_string();
        let r = UsageEventRef {
            event_id: &ev.event_id,
            tenant: &ev.tenant,
            meter: &ev.meter,
            quantity: &q,
            event_time_ms: ev.event_time_ms,
            dimensions: ev.dimensions.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            provider_cost: None,
            source: "",
        };
        let mut v1 = Vec::new();
        codec.encode_ref(&r, WriterVersion::V1, Framing::SingleObject, &mut v1);
        write(dir, &format!("v1-single-{i}"), 0, &v1);
        write(dir, &format!("v1-body-{i}"), 2, &v1[10..]);
    }
    // A map written in blocks with a negative count (count, byte size), as other Avro writers do.
    let mut blocks = Vec::new();
    let r = UsageEventRef { event_id: "b", tenant: "t", meter: "requests", quantity: "1", event_time_ms: 5, ..Default::default() };
    codec.encode_ref(&r, WriterVersion::V2, Framing::SingleObject, &mut blocks);
    // Replace the empty map (a single 0) with one block of -1 entry: zigzag(-1) = 1, size 4.
    let map_at = blocks.len() - 3; // map terminator, provider_cost union index 0, empty source
    let mut with_block = blocks[..map_at].to_vec();
    with_block.extend_from_slice(&[0x01, 0x08, 0x02, b'k', 0x02, b'v', 0x00]);
    with_block.extend_from_slice(&blocks[map_at + 1..]);
    write(dir, "v2-map-block", 0, &with_block);
}

fn sample_aggregate(dims: BTreeMap<String, String>) -> MeterAggregate {
    MeterAggregate {
        tenant: "tenant-003".into(),
        meter: "input_tokens".into(),
        aggregation: "sum".into(),
        dimensions: dims,
        window_start: 1_767_225_600_000,
        window_end: 1_767_225_660_000,
        revision: 2,
        value: d("12345.000000001"),
        previous_value: d("12000"),
        event_count: 17,
        provider_cost: d("0.25"),
        previous_provider_cost: d("0.2"),
        source_partition: 3,
        seq: 99,
        emitted_at: 1_767_225_700_000,
        uncosted_value: Some(d("345.000000001")),
        previous_uncosted_value: Some(d("300")),
    }
}

fn sample_charge(dims: BTreeMap<String, String>) -> Charge {
    Charge {
        charge_id: "c-7f3a".into(),
        kind: "usage".into(),
        tenant: "tenant-003".into(),
        plan: "pro".into(),
        currency: "USD".into(),
        meter: "input_tokens".into(),
        dimensions: dims,
        period_start: 1_764_547_200_000,
        window_start: 1_767_225_600_000,
        window_end: 1_767_225_660_000,
        revision: 0,
        quantity: d("10"),
        amount: d("0.000000015"),
        provider_cost: d("0.00000001"),
        margin: d("0.000000005"),
        seq: 1,
    }
}

/// One record of each kind, as a bare body and framed (mode bit 4).
fn write_record_seeds(dir: &Path) {
    let dims: BTreeMap<String, String> = [("model".to_string(), "gpt-4o".to_string()), ("region".to_string(), "eu-west".to_string())].into();
    let dead = DeadLetter {
        source_topic: "meterflow.usage-events".into(),
        source_partition: 1,
        source_offset: 42,
        reason: "undecodable".into(),
        detail: "truncated payload while reading tenant".into(),
        tenant: None,
        event_id: Some("e".into()),
        payload: vec![0xC3, 0x01, 0, 1, 2, 255],
    };
    let wallet = WalletAdjustment {
        idempotency_key: "pay_1".into(),
        tenant: "tenant-001".into(),
        currency: "USD".into(),
        amount: d("-25.50"),
        kind: "adjustment".into(),
        reason: "goodwill".into(),
        created_at: 1_767_225_600_000,
        expires_at: None,
        priority: 0,
    };
    let encoded = [
        ("aggregate", 0u8, sample_aggregate(dims.clone()).to_avro().expect("encode")),
        ("charge", 1, sample_charge(dims).to_avro().expect("encode")),
        ("dead-letter", 2, dead.to_avro().expect("encode")),
        ("wallet", 3, wallet.to_avro().expect("encode")),
    ];
    for (name, kind, bytes) in encoded {
        write(dir, &format!("{name}-body"), kind, &bytes[10..]);
        write(dir, &format!("{name}-framed"), kind | 4, &bytes);
    }
}
