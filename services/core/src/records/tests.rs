use super::*;
use apache_avro::types::Value;
use std::str::FromStr;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

#[test]
fn aggregate_round_trip() {
    let a = MeterAggregate {
        tenant: "acme".into(),
        meter: "input_tokens".into(),
        aggregation: "sum".into(),
        dimensions: [("model".to_string(), "m1".to_string())].into(),
        window_start: 1_700_000_000_000,
        window_end: 1_700_000_060_000,
        revision: 2,
        value: d("12345.000000001"),
        previous_value: d("12000"),
        event_count: 17,
        provider_cost: d("0.25"),
        previous_provider_cost: d("0.2"),
        source_partition: 3,
        seq: 99,
        emitted_at: 1_700_000_070_000,
        uncosted_value: Some(d("345.000000001")),
        previous_uncosted_value: None,
    };
    assert_eq!(MeterAggregate::from_avro(&a.to_avro().unwrap()).unwrap(), a);
    // v1 bytes (written by older aggregators) still read, the v2 fields as None.
    let v1 = schema::meter_aggregate_v1();
    let value = apache_avro::to_value(&a).unwrap();
    let apache_avro::types::Value::Record(fields) = value else { panic!() };
    let fields: Vec<_> = fields.into_iter().filter(|(k, _)| !k.contains("uncosted")).collect();
    let value = apache_avro::types::Value::Record(fields).resolve(&v1.schema).unwrap();
    let mut bytes = vec![0xC3, 0x01];
    bytes.extend_from_slice(&v1.fingerprint.to_le_bytes());
    bytes.extend_from_slice(&apache_avro::to_avro_datum(&v1.schema, value).unwrap());
    let old = MeterAggregate::from_avro(&bytes).unwrap();
    assert_eq!(old, MeterAggregate { uncosted_value: None, previous_uncosted_value: None, ..a.clone() });
    assert_ne!(v1.fingerprint, MeterAggregate::known().fingerprint);
}

#[test]
fn maps_encode_deterministically_and_like_apache_avro() {
    let dims: BTreeMap<String, String> =
        (0..12).map(|i| (format!("k{i}"), format!("v{i}"))).collect();
    let mut a = MeterAggregate {
        tenant: "t".into(),
        meter: "m".into(),
        aggregation: "sum".into(),
        dimensions: dims,
        window_end: 60_000,
        value: d("1"),
        event_count: 1,
        seq: 1,
        uncosted_value: Some(d("1")),
        previous_uncosted_value: Some(d("0")),
        ..MeterAggregate::default()
    };
    let first = a.to_avro().unwrap();
    for _ in 0..20 {
        assert_eq!(a.to_avro().unwrap(), first, "same record, same bytes");
    }
    // apache-avro reads our bytes back to the same value it would have written.
    let known = MeterAggregate::known();
    let theirs = apache_avro::to_avro_datum(&known.schema, apache_avro::to_value(&a).unwrap().resolve(&known.schema).unwrap()).unwrap();
    let ours_value = apache_avro::from_avro_datum(&known.schema, &mut &first[10..], None).unwrap();
    let theirs_value = apache_avro::from_avro_datum(&known.schema, &mut &theirs[..], None).unwrap();
    assert_eq!(ours_value, theirs_value);
    a.dimensions.clear();
    assert_eq!(MeterAggregate::from_avro(&a.to_avro().unwrap()).unwrap(), a);
}

/// Writes the spec's fingerprint; reads records headed by it or by the legacy one.
fn check_fingerprints<R: AvroRecord + PartialEq + std::fmt::Debug>(r: &R) {
    let known = R::known();
    let ours = r.to_avro().unwrap();
    assert_eq!(&ours[..2], &[0xC3, 0x01]);
    assert_eq!(&ours[2..10], &known.fingerprint.to_le_bytes());
    let mut legacy = ours.clone();
    legacy[2..10].copy_from_slice(&known.legacy_fingerprint.to_le_bytes());
    assert_eq!(&R::from_avro(&legacy).unwrap(), r);
    // apache-avro's own single-object writer (legacy header) reads too.
    let value = apache_avro::to_value(r).unwrap().resolve(&known.schema).unwrap();
    let mut writer = apache_avro::GenericSingleObjectWriter::new_with_capacity(&known.schema, 64).unwrap();
    let mut theirs = Vec::new();
    writer.write_value(value, &mut theirs).unwrap();
    assert_eq!(&theirs[2..10], &known.legacy_fingerprint.to_le_bytes());
    assert_eq!(&R::from_avro(&theirs).unwrap(), r);
    let mut other = ours;
    other[2..10].copy_from_slice(&(known.fingerprint ^ 1).to_le_bytes());
    assert!(matches!(R::from_avro(&other), Err(Error::UnknownFingerprint(_))));
}

#[test]
fn every_record_writes_the_spec_fingerprint_and_reads_both() {
    let mut dims = BTreeMap::new();
    dims.insert("model".to_owned(), "m1".to_owned());
    check_fingerprints(&MeterAggregate {
        tenant: "t".into(),
        meter: "m".into(),
        aggregation: "sum".into(),
        dimensions: dims.clone(),
        window_start: 0,
        window_end: 60_000,
        revision: 1,
        value: d("100000000000000000000"),
        previous_value: d("1"),
        event_count: 2,
        provider_cost: d("0.5"),
        previous_provider_cost: d("0"),
        source_partition: 3,
        seq: 9,
        emitted_at: 60_000,
        uncosted_value: Some(d("7")),
        previous_uncosted_value: None,
    });
    check_fingerprints(&Charge { dimensions: dims, ..charge("1.5", "1", "0.5") });
    check_fingerprints(&DeadLetter {
        source_topic: "u".into(),
        source_partition: 0,
        source_offset: 1,
        reason: "undecodable".into(),
        detail: "x".into(),
        tenant: Some("t".into()),
        event_id: None,
        payload: vec![1, 2],
    });
    check_fingerprints(&WalletAdjustment {
        idempotency_key: "k".into(),
        tenant: "t".into(),
        currency: "USD".into(),
        amount: d("5"),
        kind: "top_up".into(),
        reason: "r".into(),
        created_at: 7,
        expires_at: Some(9),
        priority: 2,
    });
    check_fingerprints(&AlertRecord {
        alert_id: "a".into(),
        kind: "credit_expired".into(),
        tenant: "t".into(),
        currency: "USD".into(),
        balance: None,
        threshold: None,
        amount: Some(d("5")),
        credit_kind: Some("paid".into()),
        trigger: "g".into(),
        at: 60_000,
    });
}

#[test]
fn decimals_finer_than_nine_digits_are_refused_on_read() {
    let w = WalletAdjustment {
        idempotency_key: "k".into(),
        tenant: "t".into(),
        currency: "USD".into(),
        amount: d("0.0000000001"),
        kind: "top_up".into(),
        reason: "r".into(),
        created_at: 7,
        expires_at: None,
        priority: 0,
    };
    let bytes = w.to_avro().unwrap();
    assert!(matches!(WalletAdjustment::from_avro(&bytes), Err(Error::BadDecimal { field: "amount", .. })));
    let ok = WalletAdjustment { amount: d("4000000000000000000.000000001"), ..w };
    assert_eq!(WalletAdjustment::from_avro(&ok.to_avro().unwrap()).unwrap(), ok);
}

#[test]
fn dead_letter_round_trip_keeps_bytes() {
    let dl = DeadLetter {
        source_topic: "usage".into(),
        source_partition: 1,
        source_offset: 42,
        reason: "undecodable".into(),
        detail: "truncated".into(),
        tenant: None,
        event_id: Some("e".into()),
        payload: vec![0, 1, 2, 255],
    };
    assert_eq!(DeadLetter::from_avro(&dl.to_avro().unwrap()).unwrap(), dl);
}

#[test]
fn lengths_beyond_the_input_are_rejected_before_allocating() {
    // Found by fuzzing: a charge whose dimensions map claims ~2^30 entries made apache-avro
    // reserve ~21 GB (an abort), from a 66-byte message.
    let crash: [u8; 56] = [
        0x1c, 0x1c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c,
        0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x00, 0x31, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x8f, 0xf3, 0xf3, 0x71, 0x65, 0x67, 0x69, 0x6f, 0x04, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c,
        0x0c, 0x0c,
    ];
    let mut framed = vec![0xC3, 0x01];
    framed.extend_from_slice(&Charge::known().fingerprint.to_le_bytes());
    framed.extend_from_slice(&crash);
    assert!(Charge::from_avro(&framed).is_err());
    // A string claiming 500 MB in a 20-byte message.
    let mut big = vec![0xC3, 0x01];
    big.extend_from_slice(&WalletAdjustment::known().fingerprint.to_le_bytes());
    crate::avro_wire::write_long(&mut big, 500 << 20);
    big.extend_from_slice(b"pay_1");
    assert_eq!(WalletAdjustment::from_avro(&big), Err(Error::Truncated("string")));
    // Valid records still read.
    let w = WalletAdjustment {
        idempotency_key: "k".into(),
        tenant: "t".into(),
        currency: "USD".into(),
        amount: d("1"),
        kind: "top_up".into(),
        reason: "r".into(),
        created_at: 1,
        expires_at: None,
        priority: 0,
    };
    assert_eq!(WalletAdjustment::from_avro(&w.to_avro().unwrap()).unwrap(), w);
}

/// A usage charge of 10 units in the first minute, with these amounts.
fn charge(amount: &str, provider_cost: &str, margin: &str) -> Charge {
    Charge {
        charge_id: "c1".into(),
        kind: "usage".into(),
        tenant: "t".into(),
        plan: "pro".into(),
        currency: "USD".into(),
        meter: "m".into(),
        dimensions: BTreeMap::new(),
        period_start: 0,
        window_start: 0,
        window_end: 60_000,
        revision: 0,
        quantity: d("10"),
        amount: d(amount),
        provider_cost: d(provider_cost),
        margin: d(margin),
        seq: 1,
    }
}

#[test]
fn charge_and_wallet_round_trip() {
    let c = charge("0.000000015", "0.00000001", "0.000000005");
    assert_eq!(Charge::from_avro(&c.to_avro().unwrap()).unwrap(), c);
    let w = WalletAdjustment {
        idempotency_key: "pay_1".into(),
        tenant: "t".into(),
        currency: "USD".into(),
        amount: d("-5.5"),
        kind: "adjustment".into(),
        reason: "goodwill".into(),
        created_at: 5,
        expires_at: Some(1_800_000_000_000),
        priority: -3,
    };
    assert_eq!(WalletAdjustment::from_avro(&w.to_avro().unwrap()).unwrap(), w);
}

/// A v1 record (written by apache-avro's own writer with the v1 schema, framed with the
/// v1 fingerprint) still reads, with v2's defaults for the new fields.
#[test]
fn wallet_adjustment_v1_reads_with_defaults() {
    use apache_avro::types::Record;
    let v1 = schema::wallet_adjustment_v1();
    let mut r = Record::new(&v1.schema).unwrap();
    r.put("idempotency_key", "pay_9");
    r.put("tenant", "acme");
    r.put("currency", "USD");
    r.put("amount", "25.5");
    r.put("kind", "top_up");
    r.put("reason", "card");
    r.put("created_at", Value::TimestampMillis(1_700_000_000_000));
    let datum = apache_avro::to_avro_datum(&v1.schema, r).unwrap();
    let mut framed = vec![0xC3, 0x01];
    framed.extend_from_slice(&v1.fingerprint.to_le_bytes());
    framed.extend_from_slice(&datum);
    let w = WalletAdjustment::from_avro(&framed).unwrap();
    assert_eq!(w.amount, d("25.5"));
    assert_eq!((w.kind.as_str(), w.created_at, w.expires_at, w.priority), ("top_up", 1_700_000_000_000, None, 0));
    assert_ne!(v1.fingerprint, WalletAdjustment::known().fingerprint);
    // New records are written with v2's fingerprint.
    let again = w.to_avro().unwrap();
    assert_eq!(&again[2..10], &WalletAdjustment::known().fingerprint.to_le_bytes());
    // A truncated v1 body is an error, not a panic.
    assert!(WalletAdjustment::from_avro(&framed[..framed.len() - 3]).is_err());
}

/// Frames `r` as `from_avro` expects, with apache-avro's own writer: a writer that does not
/// check names (another language's client, an old build).
fn unchecked_frame<R: AvroRecord>(r: &R) -> Vec<u8> {
    let known = R::known();
    let value = apache_avro::to_value(r).unwrap().resolve(&known.schema).unwrap();
    let mut framed = vec![0xC3, 0x01];
    framed.extend_from_slice(&known.fingerprint.to_le_bytes());
    framed.extend_from_slice(&apache_avro::to_avro_datum(&known.schema, value).unwrap());
    framed
}

/// Every known name round-trips, an unknown one is refused by `to_avro` and, written by a
/// writer that does not check, by `from_avro`, naming the field and the value.
fn check_names_both_ways<R: AvroRecord + Clone + PartialEq + std::fmt::Debug>(
    r: &R,
    field: &'static str,
    known: &[&str],
    set: impl Fn(&mut R, &str),
) {
    for name in known {
        let mut ok = r.clone();
        set(&mut ok, name);
        assert_eq!(R::from_avro(&ok.to_avro().unwrap()).unwrap(), ok, "{field} {name}");
    }
    for bad in ["", "Usage", "SUM", "true-up", "unknown"] {
        let mut wrong = r.clone();
        set(&mut wrong, bad);
        let refused = Error::UnknownName { field, value: bad.into() };
        assert_eq!(wrong.to_avro(), Err(refused.clone()));
        assert_eq!(R::from_avro(&unchecked_frame(&wrong)), Err(refused));
    }
}

#[test]
fn names_outside_their_enum_are_refused_on_write_and_on_read() {
    use crate::event::RejectReason;
    use crate::meter::Aggregation;
    use strum::VariantArray;
    let charge = charge("1.5", "1", "0.5");
    let kinds: Vec<&str> = ChargeKind::VARIANTS.iter().map(|k| k.as_str()).collect();
    check_names_both_ways(&charge, "kind", &kinds, |c, n| c.kind = n.into());

    let dead = DeadLetter {
        source_topic: "u".into(),
        source_partition: 0,
        source_offset: 1,
        reason: "undecodable".into(),
        detail: "x".into(),
        tenant: None,
        event_id: None,
        payload: vec![1],
    };
    let reasons: Vec<&str> = RejectReason::ALL
        .iter()
        .map(|r| r.as_str())
        .chain(RaterReason::VARIANTS.iter().map(|r| r.as_str()))
        .collect();
    check_names_both_ways(&dead, "reason", &reasons, |r, n| r.reason = n.into());

    let aggregate = MeterAggregate {
        tenant: "t".into(),
        meter: "m".into(),
        aggregation: "sum".into(),
        window_end: 60_000,
        value: d("7"),
        event_count: 1,
        seq: 1,
        emitted_at: 60_000,
        ..MeterAggregate::default()
    };
    let aggregations: Vec<&str> = Aggregation::VARIANTS.iter().map(|a| a.as_str()).collect();
    check_names_both_ways(&aggregate, "aggregation", &aggregations, |a, n| a.aggregation = n.into());
}
