//! Interop with an independent Avro implementation: fastavro (PyPI), run as a subprocess from
//! the venv `deploy/local/pyenv.sh` creates (`make test` does). Bytes fastavro frames as Avro
//! single-object encoding (header = its own CRC-64-AVRO of the Parsing Canonical Form) must
//! decode with our codec and records, and ours must decode with fastavro, which checks our
//! header against its fingerprint. Fails, never skips, when the venv is missing.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions: a failed unwrap is a failed run
#![allow(clippy::expect_used, reason = "an integration test: its helpers' expects are the test's assertions")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;

use meterflow_core::codec::{Framing, UsageEventCodec, WriterVersion};
use meterflow_core::meter::Aggregation;
use meterflow_core::records::{
    AlertKind, AlertRecord, AvroRecord, Charge, ChargeKind, DeadLetter, MeterAggregate, RaterReason, WalletAdjustment,
};
use meterflow_core::{schema, Error, RejectReason, UsageEvent};
use strum::VariantArray;
use rust_decimal::Decimal;
use serde_json::{json, Value};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("METERFLOW_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("METERFLOW_CACHE").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").expect("HOME is set")).join(".cache/meterflow")
    });
    let py = cache.join("py-venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run deploy/local/pyenv.sh (make test does) to install fastavro for the Avro interop tests",
        py.display()
    );
    py
}

/// Runs the fastavro helper with `lines` on stdin; returns its stdout lines.
fn fastavro(cmd: &str, schema_file: &str, lines: &[String]) -> Vec<String> {
    let mut child = Command::new(python())
        .arg(repo().join("tests/python/fastavro_codec.py"))
        .arg(cmd)
        .arg(repo().join("schemas/avro").join(schema_file))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    // Feed stdin from another thread: python writes while it reads, and a full stdout pipe
    // would otherwise block both sides.
    let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("python runs");
    writer.join().expect("stdin writer").expect("write to python");
    assert!(
        out.status.success(),
        "fastavro {cmd} {schema_file} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8").lines().map(str::to_owned).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

#[test]
fn fastavro_fingerprints_equal_ours_for_every_published_schema() {
    for (file, k) in [
        ("usage_event.v1.avsc", schema::usage_event_v1()),
        ("usage_event.v2.avsc", schema::usage_event_v2()),
        ("meter_aggregate.v1.avsc", schema::meter_aggregate_v1()),
        ("charge.v1.avsc", schema::charge_v1()),
        ("dead_letter.v1.avsc", schema::dead_letter_v1()),
        ("wallet_adjustment.v1.avsc", schema::wallet_adjustment_v1()),
        ("alert.v1.avsc", schema::alert_v1()),
    ] {
        let out = fastavro("fingerprint", file, &[]);
        assert_eq!(out[0], hex(&k.fingerprint.to_le_bytes()), "{file}");
        let text = std::fs::read_to_string(repo().join("schemas/avro").join(file)).unwrap();
        assert_eq!(out[1], schema::parsing_canonical_form(&text).unwrap(), "{file}");
    }
}

#[test]
fn usage_events_encoded_by_fastavro_decode_exactly() {
    let events = [
        json!({"event_id": "fa-1", "tenant": "acme", "meter": "input_tokens", "quantity": "1250",
               "event_time": 1_764_000_000_123_i64, "dimensions": {"model": "gpt-x", "region": "eu"},
               "provider_cost": "0.000123", "source": "python"}),
        json!({"event_id": "fa-2", "tenant": "acme", "meter": "input_tokens", "quantity": "100000000000000000000",
               "event_time": 1_764_000_000_999_i64, "dimensions": {}, "provider_cost": null, "source": ""}),
        json!({"event_id": "fa-3 é", "tenant": "t,=", "meter": "gpu_seconds", "quantity": "-0.000000001",
               "event_time": -5_i64, "dimensions": {"gpu": "h100"}, "provider_cost": null, "source": "s"}),
    ];
    let lines: Vec<String> = events.iter().map(Value::to_string).collect();
    let codec = UsageEventCodec::new();
    for (e, h) in events.iter().zip(fastavro("encode", "usage_event.v2.avsc", &lines)) {
        let bytes = unhex(&h);
        assert_eq!(&bytes[2..10], &codec.fingerprint(WriterVersion::V2).to_le_bytes());
        let ev = codec.decode(&bytes).unwrap_or_else(|err| panic!("{e}: {err}"));
        assert_eq!(ev.event_id, e["event_id"]);
        assert_eq!(ev.tenant, e["tenant"]);
        assert_eq!(ev.meter, e["meter"]);
        assert_eq!(ev.quantity, e["quantity"]);
        assert_eq!(ev.event_time_ms, e["event_time"].as_i64().unwrap());
        assert_eq!(ev.provider_cost, e["provider_cost"].as_str());
        assert_eq!(ev.source, e["source"]);
        let mut dims: Vec<(String, String)> =
            ev.dimensions.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        dims.sort();
        let want: Vec<(String, String)> = e["dimensions"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        assert_eq!(dims, want);
        let owned = ev.to_owned_event().unwrap();
        assert_eq!(owned.quantity, d(e["quantity"].as_str().unwrap()));
    }
    // v1 writers (no provider_cost, no source) too.
    let v1 = json!({"event_id": "old", "tenant": "t", "meter": "requests", "quantity": "1",
                    "event_time": 42, "dimensions": {"model": "m"}});
    let h = &fastavro("encode", "usage_event.v1.avsc", &[v1.to_string()])[0];
    let bytes = unhex(h);
    let ev = codec.decode(&bytes).unwrap();
    assert_eq!((ev.event_id, ev.event_time_ms, ev.provider_cost, ev.source), ("old", 42, None, ""));
}

#[test]
fn our_usage_events_decode_in_fastavro() {
    let codec = UsageEventCodec::new();
    let events = [
        UsageEvent::new("e1", "acme", "input_tokens", d("400000000000000000000000"), 1_764_000_000_000)
            .with_dimension("model", "m1")
            .with_dimension("region", "us")
            .with_provider_cost(d("12.5"))
            .with_source("gw"),
        UsageEvent::new("e2", "beta", "requests", d("1"), 0),
    ];
    let lines: Vec<String> = events
        .iter()
        .map(|e| {
            let mut buf = Vec::new();
            codec.encode(e, Framing::SingleObject, &mut buf);
            hex(&buf)
        })
        .collect();
    let out = fastavro("decode", "usage_event.v2.avsc", &lines);
    assert_eq!(out.len(), events.len());
    for (e, line) in events.iter().zip(out) {
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event_id"], e.event_id.as_str());
        assert_eq!(v["tenant"], e.tenant.as_str());
        assert_eq!(v["quantity"], e.quantity.to_string());
        assert_eq!(v["event_time"].as_i64(), Some(e.event_time_ms));
        assert_eq!(v["provider_cost"].as_str(), e.provider_cost.map(|c| c.to_string()).as_deref());
        assert_eq!(v["source"], e.source.as_str());
        let dims: std::collections::BTreeMap<String, String> =
            serde_json::from_value(v["dimensions"].clone()).unwrap();
        assert_eq!(dims, e.dimensions);
    }
}

/// fastavro writes `record` with `field` set to each of `names` and to names outside the set:
/// every name of the set reads back into that record, every other name is refused by name.
fn names_from_fastavro<R: AvroRecord + PartialEq + std::fmt::Debug>(file: &str, record: &R, field: &'static str, names: &[&str]) {
    let json = fastavro("decode", file, &[hex(&record.to_avro().unwrap())]).remove(0);
    let base: Value = serde_json::from_str(&json).unwrap();
    let unknown = ["", "Usage", "SUM", "true-up", "no_such_name"];
    let lines: Vec<String> = names
        .iter()
        .chain(&unknown)
        .map(|n| {
            let mut v = base.clone();
            v[field] = json!(n);
            v.to_string()
        })
        .collect();
    let encoded = fastavro("encode", file, &lines);
    assert_eq!(encoded.len(), names.len() + unknown.len());
    for (n, h) in names.iter().chain(&unknown).zip(encoded) {
        let read = R::from_avro(&unhex(&h));
        if names.contains(n) {
            let r = read.unwrap_or_else(|e| panic!("{file} {field}={n:?}: {e}"));
            let back: Value = serde_json::from_str(&fastavro("decode", file, &[hex(&r.to_avro().unwrap())])[0]).unwrap();
            assert_eq!(back[field], json!(n), "{file}");
        } else {
            assert_eq!(read, Err(Error::UnknownName { field, value: (*n).to_owned() }), "{file}");
        }
    }
}

/// Ours → fastavro → JSON, and fastavro's encoding of that JSON → ours: the same record.
fn records_round_trip<R: AvroRecord + PartialEq + std::fmt::Debug>(file: &str, records: &[R]) {
    let ours: Vec<String> = records.iter().map(|r| hex(&r.to_avro().unwrap())).collect();
    let decoded = fastavro("decode", file, &ours);
    assert_eq!(decoded.len(), records.len());
    let theirs = fastavro("encode", file, &decoded);
    for (r, h) in records.iter().zip(theirs) {
        assert_eq!(&R::from_avro(&unhex(&h)).unwrap(), r, "{file}");
    }
}

fn aggregate(dims: std::collections::BTreeMap<String, String>) -> MeterAggregate {
    MeterAggregate {
        tenant: "t".into(),
        meter: "input_tokens".into(),
        aggregation: "sum".into(),
        dimensions: dims,
        window_start: 1_764_000_000_000,
        window_end: 1_764_000_060_000,
        revision: 2,
        value: d("400000000000000000000000"),
        previous_value: d("100000000000000000000"),
        event_count: 3,
        provider_cost: d("0.000000001"),
        previous_provider_cost: d("0"),
        source_partition: 1,
        seq: 77,
        emitted_at: 1_764_000_070_000,
        uncosted_value: Some(d("12.5")),
        previous_uncosted_value: Some(d("0")),
    }
}

fn charge(dims: std::collections::BTreeMap<String, String>) -> Charge {
    Charge {
        charge_id: "c".into(),
        kind: "usage".into(),
        tenant: "t".into(),
        plan: "pro".into(),
        currency: "USD".into(),
        meter: "input_tokens".into(),
        dimensions: dims,
        period_start: 1_761_955_200_000,
        window_start: 1_764_000_000_000,
        window_end: 1_764_000_060_000,
        revision: 0,
        quantity: d("100000000000000000000"),
        amount: d("1.5"),
        provider_cost: d("1"),
        margin: d("0.5"),
        seq: 1,
    }
}

fn dead_letter() -> DeadLetter {
    DeadLetter {
        source_topic: "u".into(),
        source_partition: 0,
        source_offset: 9,
        reason: "window_limit".into(),
        detail: "x".into(),
        tenant: None,
        event_id: Some("e".into()),
        payload: vec![0xC3, 0x01, 0, 255],
    }
}

/// A crossing (balances set, no amount) and an expiry (amount and credit kind, no balances).
fn alerts_both_shapes() -> [AlertRecord; 2] {
    let crossing = AlertRecord {
        alert_id: "al-1".into(),
        kind: "spend_limit_hard".into(),
        tenant: "t".into(),
        currency: "EUR".into(),
        balance: Some(d("100.000000001")),
        threshold: Some(d("100")),
        amount: None,
        credit_kind: None,
        trigger: "ch-1".into(),
        at: 1_764_000_000_000,
    };
    let expiry = AlertRecord {
        alert_id: "le-1".into(),
        kind: "credit_expired".into(),
        balance: None,
        threshold: None,
        amount: Some(d("5")),
        credit_kind: Some("promotional".into()),
        trigger: "promo-1".into(),
        ..crossing.clone()
    };
    [crossing, expiry]
}

#[test]
fn records_interoperate_both_ways() {
    records_round_trip("alert.v1.avsc", &alerts_both_shapes());
    let mut dims = std::collections::BTreeMap::new();
    dims.insert("model".to_owned(), "m1".to_owned());
    records_round_trip("meter_aggregate.v2.avsc", &[aggregate(dims.clone())]);
    records_round_trip("charge.v1.avsc", &[charge(dims)]);
    records_round_trip("dead_letter.v1.avsc", &[dead_letter()]);
    records_round_trip(
        "wallet_adjustment.v2.avsc",
        &[WalletAdjustment {
            idempotency_key: "k".into(),
            tenant: "t".into(),
            currency: "USD".into(),
            amount: d("-2.25"),
            kind: "manual".into(),
            reason: "r".into(),
            created_at: 1_764_000_000_000,
            expires_at: Some(1_765_000_000_000),
            priority: 3,
        }],
    );
}

/// The enum-valued string fields: what another implementation writes is held to the same
/// closed sets as what we write (the wire type stays `string`; docs/design.md "Wire format").
#[test]
fn names_written_by_fastavro_are_checked_against_the_enums() {
    let kinds: Vec<&str> = ChargeKind::VARIANTS.iter().map(|k| k.as_str()).collect();
    names_from_fastavro("charge.v1.avsc", &charge(Default::default()), "kind", &kinds);
    let reasons: Vec<&str> = RejectReason::ALL
        .iter()
        .map(|r| r.as_str())
        .chain(RaterReason::VARIANTS.iter().map(|r| r.as_str()))
        .collect();
    names_from_fastavro("dead_letter.v1.avsc", &dead_letter(), "reason", &reasons);
    let alerts: Vec<&str> = AlertKind::ALL.iter().map(|k| k.as_str()).collect();
    names_from_fastavro("alert.v1.avsc", &alerts_both_shapes()[0], "kind", &alerts);
    let aggregations: Vec<&str> = Aggregation::VARIANTS.iter().map(|a| a.as_str()).collect();
    names_from_fastavro("meter_aggregate.v2.avsc", &aggregate(Default::default()), "aggregation", &aggregations);
}
