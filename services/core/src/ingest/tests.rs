use std::str::FromStr;

use super::*;

const METERS: &str = r#"
[[meter]]
name = "input_tokens"
aggregation = "sum"
group_by = ["model", "region"]
window = "minute"
event_type = "prompt"
value_property = "$.usage.input"
[meter.dimension_properties]
model = "$['model.name']"

[[meter]]
name = "output_tokens"
aggregation = "sum"
group_by = ["model"]
window = "minute"
event_type = "prompt"
value_property = "$.usage.output"
provider_cost_property = "$.cost"
[meter.dimension_properties]
model = "$['model.name']"

[[meter]]
name = "requests"
aggregation = "count"
group_by = ["model"]
window = "minute"

[[meter]]
name = "credit"
aggregation = "sum"
window = "minute"
allow_negative = true
"#;

const NOW: i64 = 1_764_684_000_000; // 2025-12-02T14:00:00Z
const DAY: i64 = 86_400_000;

fn meters() -> MeterCatalog {
    MeterCatalog::from_toml_str(METERS).unwrap()
}

fn cx(tenant: &str) -> Context<'_> {
    Context { tenant, any_tenant: false, now_ms: NOW, dedup_horizon_ms: 35 * DAY }
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn one(format: Format, body: &str, cx: &Context<'_>) -> ItemResult {
    let mut r = decode(format, body.as_bytes(), &meters(), cx).unwrap();
    assert_eq!(r.len(), 1);
    r.remove(0)
}

/// Decodes each body as one item and checks its outcome: "ok" or the reject reason.
fn expect_each(format: Format, cases: impl IntoIterator<Item = (impl AsRef<str>, &'static str)>, cx: &Context<'_>) {
    for (body, want) in cases {
        let body = body.as_ref();
        let r = one(format, body, cx);
        let got = r.as_ref().map_or_else(|e| e.reason.as_str(), |_| "ok");
        assert_eq!(got, want, "{body}: {r:?}");
    }
}

fn reason(r: &ItemResult) -> &'static str {
    r.as_ref().unwrap_err().reason.as_str()
}

#[test]
fn content_types() {
    assert_eq!(Format::from_content_type("application/json; charset=utf-8"), Some(Format::Json));
    assert_eq!(Format::from_content_type("Application/CloudEvents+JSON"), Some(Format::CloudEvent));
    assert_eq!(Format::from_content_type("application/cloudevents-batch+json"), Some(Format::CloudEventBatch));
    assert_eq!(Format::from_content_type("text/plain"), None);
    assert_eq!(Format::from_content_type(""), None);
}

#[test]
fn json_event_exact_and_defaults() {
    let body = r#"{"event_id":"e1","meter":"input_tokens","quantity":0.1,"event_time":"2025-12-02T13:59:00.250+01:00",
                   "dimensions":{"model":"m1"},"provider_cost":"0.000000001","source":"svc"}"#;
    let ev = one(Format::Json, body, &cx("acme")).unwrap().remove(0);
    assert_eq!(ev.tenant, "acme");
    assert_eq!(ev.quantity, d("0.1"));
    assert_eq!(ev.quantity.to_string(), "0.1");
    assert_eq!(ev.provider_cost, Some(d("0.000000001")));
    // 13:59:00.250 at +01:00 is 12:59:00.250 UTC, one hour and 59.75 s before NOW.
    assert_eq!(ev.event_time_ms, NOW - 3_600_000 - 59_750);
    assert_eq!(ev.dimensions.get("model").map(String::as_str), Some("m1"));
    assert_eq!(ev.source, "svc");

    // No time: now. Big integers and exponents are exact.
    let ev = one(Format::Json, r#"{"event_id":"e2","meter":"input_tokens","quantity":12345678901234567890123}"#, &cx("acme"))
        .unwrap()
        .remove(0);
    assert_eq!(ev.event_time_ms, NOW);
    assert_eq!(ev.quantity, d("12345678901234567890123"));
    let ev = one(Format::Json, r#"{"event_id":"e3","meter":"input_tokens","quantity":1.5e3,"event_time":1764683999000}"#, &cx("acme"))
        .unwrap()
        .remove(0);
    assert_eq!(ev.quantity, d("1500"));
    assert_eq!(ev.event_time_ms, NOW - 1000);
}

#[test]
fn json_event_rejections_use_the_aggregators_reasons() {
    let c = cx("acme");
    let cases = [
        (r#"{"meter":"input_tokens","quantity":"1"}"#, "missing_event_id"),
        (r#"{"event_id":"","meter":"input_tokens","quantity":"1"}"#, "missing_event_id"),
        (r#"{"event_id":"x","meter":"nope","quantity":"1"}"#, "unknown_meter"),
        (r#"{"event_id":"x","meter":"input_tokens","quantity":"1e3"}"#, "bad_quantity"),
        (r#"{"event_id":"x","meter":"input_tokens","quantity":"0.0000000001"}"#, "bad_quantity"),
        (r#"{"event_id":"x","meter":"input_tokens","quantity":true}"#, "bad_quantity"),
        (r#"{"event_id":"x","meter":"input_tokens"}"#, "bad_quantity"),
        (r#"{"event_id":"x","meter":"input_tokens","quantity":"-1"}"#, "negative_quantity"),
        (r#"{"event_id":"x","meter":"credit","quantity":"-1"}"#, "ok"),
        (r#"{"event_id":"x","meter":"input_tokens","quantity":"1","provider_cost":"NaN"}"#, "bad_provider_cost"),
        (r#"{"event_id":"x","meter":"input_tokens","quantity":"1","event_time":1}"#, "too_late"),
        (r#"{"event_id":"x","meter":"input_tokens","quantity":"1","event_time":"2025-12-02T14:05:01Z"}"#, "too_early"),
        (r#"{"event_id":"x","meter":"input_tokens","quantity":"1","event_time":"2025-12-02T14:05:00Z"}"#, "ok"),
        (r#"{"event_id":"x","meter":"input_tokens","quantity":"1","event_time":"yesterday"}"#, "undecodable"),
        (r#"{"event_id":"x","meter":"input_tokens","quantity":"1","colour":"red"}"#, "undecodable"),
        (r#"{"event_id":"x","meter":"input_tokens","quantity":"1","dimensions":{"a":1}}"#, "undecodable"),
        (r#"{"event_id":"x","tenant":"other","meter":"input_tokens","quantity":"1"}"#, "tenant_mismatch"),
        (r#"{"event_id":"x","tenant":"acme","meter":"input_tokens","quantity":"1"}"#, "ok"),
        (r#"[1]"#, "undecodable"),
    ];
    expect_each(Format::Json, cases, &c);
}

#[test]
fn admin_keys_may_name_the_tenant() {
    let admin = Context { any_tenant: true, ..cx("ops") };
    let ev = one(Format::Json, r#"{"event_id":"x","tenant":"acme","meter":"requests","quantity":"1"}"#, &admin).unwrap().remove(0);
    assert_eq!(ev.tenant, "acme");
    let ev = one(Format::Json, r#"{"event_id":"x","meter":"requests","quantity":"1"}"#, &admin).unwrap().remove(0);
    assert_eq!(ev.tenant, "ops", "no tenant named: the key's");
    // A JSON event is the Avro record: its quantity is required even for a count meter, as
    // the aggregator requires it.
    let r = one(Format::Json, r#"{"event_id":"x","tenant":"acme","meter":"requests"}"#, &admin);
    assert_eq!(reason(&r), "bad_quantity");
}

#[test]
fn whole_body_errors() {
    let m = meters();
    let c = cx("acme");
    for (f, body) in [
        (Format::Json, "not json"),
        (Format::Json, "42"),
        (Format::Json, "\"s\""),
        (Format::CloudEvent, "[]"),
        (Format::CloudEventBatch, "{}"),
        (Format::Json, "[{}"),
        (Format::Json, "\u{0}"),
    ] {
        assert!(decode(f, body.as_bytes(), &m, &c).is_err(), "{body}");
    }
    assert!(decode(Format::Json, &[0xff, 0xfe], &m, &c).is_err());
    assert_eq!(decode(Format::CloudEventBatch, b"[]", &m, &c).unwrap().len(), 0);
}

/// OpenMeter's ingest example shape: one `prompt` event feeds two meters.
#[test]
fn cloud_event_fans_out_to_every_meter_of_its_type() {
    let body = r#"{"specversion":"1.0","type":"prompt","id":"00001","time":"2025-12-02T13:59:30.001Z","source":"chat-app",
        "subject":"acme","data":{"usage":{"input":123,"output":"45.5"},"model.name":"gpt-4","region":"eu","cost":0.25}}"#;
    let evs = one(Format::CloudEvent, body, &cx("acme")).unwrap();
    assert_eq!(evs.len(), 2);
    let (i, o) = (&evs[0], &evs[1]);
    assert_eq!((i.meter.as_str(), i.quantity), ("input_tokens", d("123")));
    assert_eq!((o.meter.as_str(), o.quantity), ("output_tokens", d("45.5")));
    assert_eq!(i.event_time_ms, NOW - 29_999);
    assert_eq!(i.dimensions, [("model".to_string(), "gpt-4".to_string()), ("region".to_string(), "eu".to_string())].into());
    assert_eq!(o.dimensions, [("model".to_string(), "gpt-4".to_string())].into());
    assert_eq!(i.provider_cost, None);
    assert_eq!(o.provider_cost, Some(d("0.25")));
    assert_eq!(i.event_id, "ce:input_tokens:8:chat-app:00001");
    assert_ne!(i.event_id, o.event_id);
    assert_eq!(i.source, "chat-app");
    assert_eq!(i.tenant, "acme");
}

#[test]
fn cloud_event_ids_do_not_collide() {
    assert_ne!(cloud_event_id("m", "a:1", "2"), cloud_event_id("m", "a", "1:2"));
    assert_ne!(cloud_event_id("m", "a", "b"), cloud_event_id("m", "a:", "b"));
}

#[test]
fn cloud_event_defaults_and_rejections() {
    let c = cx("acme");
    // count meter by its own name, no subject (the key's tenant), no time (now), no data.
    let evs = one(Format::CloudEvent, r#"{"specversion":"1.0","type":"requests","id":"r1","source":"s","data":{"model":"m"}}"#, &c).unwrap();
    assert_eq!(evs.len(), 1);
    assert_eq!((evs[0].quantity, evs[0].event_time_ms, evs[0].tenant.as_str()), (d("1"), NOW, "acme"));
    assert_eq!(evs[0].dimension_model(), Some("m"));
    let evs = one(Format::CloudEvent, r#"{"specversion":"1.0","type":"requests","id":"r2","source":"s"}"#, &c).unwrap();
    assert!(evs[0].dimensions.is_empty());
    // default value path $.value
    let evs = one(Format::CloudEvent, r#"{"specversion":"1.0","type":"credit","id":"c","source":"s","data":{"value":-2.5}}"#, &c).unwrap();
    assert_eq!(evs[0].quantity, d("-2.5"));

    let base = |extra: &str| format!(r#"{{"specversion":"1.0","id":"1","source":"s","type":"prompt","data":{{"usage":{{"input":1,"output":2}}}}{extra}}}"#);
    let cases = [
        (r#"{"specversion":"0.3","type":"requests","id":"1","source":"s"}"#.to_string(), "undecodable"),
        (r#"{"type":"requests","id":"1","source":"s"}"#.to_string(), "undecodable"),
        (r#"{"specversion":"1.0","type":"requests","source":"s"}"#.to_string(), "missing_event_id"),
        (r#"{"specversion":"1.0","type":"requests","id":"1"}"#.to_string(), "undecodable"),
        (r#"{"specversion":"1.0","type":"nope","id":"1","source":"s"}"#.to_string(), "unknown_meter"),
        (r#"{"specversion":"1.0","type":"prompt","id":"1","source":"s","data":{"usage":{"input":1}}}"#.to_string(), "bad_quantity"),
        (r#"{"specversion":"1.0","type":"prompt","id":"1","source":"s","data":{"usage":{"input":-1,"output":1}}}"#.to_string(), "negative_quantity"),
        (base(r#","subject":"other""#), "tenant_mismatch"),
        (base(r#","time":"2020-01-01T00:00:00Z""#), "too_late"),
        (base(r#","time":"2025-12-02T15:00:00Z""#), "too_early"),
        (base(r#","time":1764684000000"#), "ok"),
        (base(r#","datacontenttype":"application/xml""#), "undecodable"),
        (base(r#","datacontenttype":"application/json""#), "ok"),
        (base(r#","extension":"ignored""#), "ok"),
    ];
    expect_each(Format::CloudEvent, cases, &c);
}

#[test]
fn batches_answer_per_item() {
    let body = r#"[{"specversion":"1.0","type":"requests","id":"1","source":"s"}, 7,
                   {"specversion":"1.0","type":"nope","id":"2","source":"s"},
                   {"specversion":"1.0","type":"requests","id":"3","source":"s"}]"#;
    let r = decode(Format::CloudEventBatch, body.as_bytes(), &meters(), &cx("acme")).unwrap();
    let kinds: Vec<_> = r.iter().map(|x| x.as_ref().map(|v| v.len()).map_err(|e| e.reason.as_str())).collect();
    assert_eq!(kinds, vec![Ok(1), Err("undecodable"), Err("unknown_meter"), Ok(1)]);
    assert_eq!(reason(&r[1]), "undecodable");
}

#[test]
fn paths() {
    let data = r#"{"a":{"b":[10,{"c":"x"}]},"d.e":true,"q'\\":1,"n":null}"#;
    let sel = |p: &str| JsonPath::parse(p).unwrap().select(data).unwrap().map(|v| v.get().to_string());
    assert_eq!(sel("$.a.b[0]").as_deref(), Some("10"));
    assert_eq!(sel("$.a.b[1].c").as_deref(), Some("\"x\""));
    assert_eq!(sel("$['d.e']").as_deref(), Some("true"));
    assert_eq!(sel(r"$['q\'\\']").as_deref(), Some("1"));
    assert_eq!(sel("$.n").as_deref(), Some("null"));
    assert_eq!(sel("$.a.b[2]"), None);
    assert_eq!(sel("$.a.x"), None);
    assert_eq!(sel("$.a[0]"), None, "an index into an object selects nothing");
    assert!(sel("$").unwrap().starts_with('{'));
    for bad in ["", "a", "$.", "$[", "$[x]", "$['a'", "$['a]", "$..a", "$.a b", r"$['\n']", "$[-1]"] {
        assert!(JsonPath::parse(bad).is_err(), "{bad:?}");
    }
    assert!(JsonPath::parse("$.a").unwrap().select("{").is_err());
}

#[test]
fn meters_file_errors_name_the_field() {
    let bad = "[[meter]]\nname = \"x\"\naggregation = \"sum\"\nwindow = 60\nvalue_property = \"tokens\"";
    match MeterCatalog::from_toml_str(bad) {
        Err(crate::Error::InvalidMeter { meter, field, .. }) => assert_eq!((meter.as_str(), field.as_str()), ("x", "value_property")),
        other => panic!("{other:?}"),
    }
}

trait ModelDim {
    fn dimension_model(&self) -> Option<&str>;
}
impl ModelDim for UsageEvent {
    fn dimension_model(&self) -> Option<&str> {
        self.dimensions.get("model").map(String::as_str)
    }
}
