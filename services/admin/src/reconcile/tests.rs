use super::*;
use std::str::FromStr;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn key(t: &str, p: &str, month: &str) -> Key {
    Key { tenant: t.into(), price: p.into(), period_start: parse_time(month).unwrap(), currency: "USD".into() }
}

fn side(a: &str, n: u64) -> Side {
    Side { amount: d(a), quantity: Decimal::ZERO, lines: n }
}

#[test]
fn stripe_export_is_translated_with_minor_units_and_mapping() {
    let csv = "id,Invoice ID,Customer,Price ID,Amount,Currency,Period Start (UTC),Period End (UTC),Quantity\n\
               il_1,in_1,cus_A,price_in,1234,usd,2026-03-01 00:00,2026-04-01 00:00,1000\n\
               il_2,in_1,cus_A,price_out,500,usd,1772323200,1775001600,\n\
               il_3,in_2,cus_B,price_jp,700,jpy,2026-03-15,2026-04-01,\n";
    let mapping = Mapping::from_toml_str(
        "format = \"stripe\"\n[customers]\ncus_A = \"acme\"\n[prices]\nprice_in = \"input_tokens.gpt-4o\"\n",
    )
    .unwrap();
    let lines = parse_external(csv, &mapping).unwrap();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0].key, key("acme", "input_tokens.gpt-4o", "2026-03"));
    assert_eq!(lines[0].amount, d("12.34"));
    assert_eq!(lines[0].quantity, d("1000"));
    assert_eq!(lines[0].line_id, "il_1");
    // Unix seconds 1772323200 = 2026-03-01T00:00:00Z; unmapped price keeps its id.
    assert_eq!(lines[1].key, key("acme", "price_out", "2026-03"));
    assert_eq!(lines[1].amount, d("5"));
    // JPY has no minor unit; unmapped customer is taken as the tenant.
    assert_eq!(lines[2].key, Key { currency: "JPY".into(), ..key("cus_B", "price_jp", "2026-03") });
    assert_eq!(lines[2].amount, d("700"));
}

#[test]
fn neutral_format_and_errors_name_the_line() {
    let m = Mapping::default();
    let m = Mapping { format: "meterflow".into(), tolerance: d("0.01"), ..m };
    let ok = parse_external("tenant,price,period_start,currency,amount\nacme,p,2026-03,usd,1.000000001\n", &m).unwrap();
    assert_eq!(ok[0].amount, d("1.000000001"));
    assert_eq!(ok[0].key.currency, "USD");
    let err = parse_external("tenant,price,period_start,currency,amount\nacme,p,2026-03,usd,1e3\n", &m).unwrap_err();
    assert!(format!("{err:#}").contains("CSV line 2"), "{err:#}");
    let err = parse_external("tenant,price,currency,amount\n", &m).unwrap_err();
    assert!(format!("{err:#}").contains("period_start"), "{err:#}");
    assert!(Mapping::from_toml_str("format = \"paypal\"").is_err());
    assert!(Mapping::from_toml_str("bogus = 1").is_err());
}

#[test]
fn compare_classifies_each_kind_of_difference_and_sums_totals() {
    let mf: BTreeMap<Key, Side> = [
        (key("a", "p1", "2026-03"), side("10.004", 3)), // within a cent of 10.00
        (key("a", "p2", "2026-03"), side("5", 1)),      // not invoiced
        (key("b", "p1", "2026-03"), side("20", 2)),     // invoiced at 25
        (key("b", "p1", "2026-04"), side("99", 1)),     // April: not in the export
    ]
    .into();
    let ext: BTreeMap<Key, Side> = [
        (key("a", "p1", "2026-03"), side("10.00", 1)),
        (key("b", "p1", "2026-03"), side("25", 1)),
        (key("b", "p3", "2026-03"), side("7", 1)), // invoiced, never metered
    ]
    .into();
    let r = compare(&mf, &ext, None, d("0.01"), Decimal::ZERO);
    let got: Vec<(&str, &str, Finding, Status, Decimal)> = r
        .rows
        .iter()
        .map(|r| (r.key.tenant.as_str(), r.key.price.as_str(), r.finding, r.status, r.difference))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a", "p1", Finding::Match, Status::Match, d("-0.004")),
            ("a", "p2", Finding::MissingExternal, Status::UnderBilled, d("-5")),
            ("b", "p1", Finding::AmountMismatch, Status::OverBilled, d("5")),
            ("b", "p3", Finding::ExtraExternal, Status::OverBilled, d("7")),
        ]
    );
    let usd = &r.total["USD"];
    assert_eq!((usd.over_billed, usd.under_billed, usd.mismatches), (d("12"), d("5"), 3));
    assert_eq!(usd.meterflow, d("35.004"));
    assert_eq!(usd.external, d("42.00"));
    assert_eq!(r.by_tenant[&("b".into(), "USD".into())].over_billed, d("12"));
    assert_eq!(r.by_price[&("a".into(), "p2".into(), "USD".into())].under_billed, d("5"));
    // Naming April explicitly compares it too (and finds it missing externally).
    let april: BTreeSet<i64> = [parse_time("2026-04").unwrap()].into();
    let r = compare(&mf, &ext, Some(&april), d("0.01"), Decimal::ZERO);
    assert_eq!(r.rows.len(), 1);
    assert_eq!(r.rows[0].finding, Finding::MissingExternal);
    // A relative tolerance of 25% accepts 20 vs 25.
    let r = compare(&mf, &ext, None, Decimal::ZERO, d("0.25"));
    assert!(r.rows.iter().any(|x| x.key.tenant == "b" && x.key.price == "p1" && x.status == Status::Match));
    let text = render(&r);
    assert!(text.contains("missing_external"), "{text}");
}

/// The worked example of docs/revenue-assurance.md.
#[test]
fn documented_example() {
    let csv = "id,invoice,customer,price,amount,currency,period_start,quantity\n\
               il_1,in_9,cus_Q1w2e3,price_in_4o,1230,usd,2026-03-01 00:00,4200000\n\
               il_2,in_9,cus_Q1w2e3,price_out_4o,4500,usd,2026-03-01 00:00,3000000\n\
               il_3,in_9,cus_Q1w2e3,price_support,900,usd,2026-03-01 00:00,1\n";
    let mapping = Mapping::from_toml_str(
        "format = \"stripe\"\ntolerance = \"0.01\"\n[customers]\ncus_Q1w2e3 = \"acme\"\n\
         [prices]\nprice_in_4o = \"input_tokens.gpt-4o\"\nprice_out_4o = \"output_tokens.gpt-4o\"\n",
    )
    .unwrap();
    let ext = external_sides(&parse_external(csv, &mapping).unwrap());
    let mf: BTreeMap<Key, Side> = [
        (key("acme", "input_tokens.gpt-4o", "2026-03"), side("12.300000000", 40)),
        (key("acme", "output_tokens.gpt-4o", "2026-03"), side("40.000000000", 40)),
        (key("acme", "requests.gpt-4o", "2026-03"), side("1.250000000", 40)),
    ]
    .into();
    let r = compare(&mf, &ext, None, mapping.tolerance, mapping.tolerance_ratio);
    let text = render(&r);
    println!("{text}");
    let usd = &r.total["USD"];
    assert_eq!((usd.over_billed, usd.under_billed, usd.mismatches), (d("14"), d("1.25"), 3));
    assert_eq!((usd.meterflow, usd.external), (d("53.55"), d("66.30")));
}

#[test]
fn dimension_keys_round_trip_with_escapes() {
    let dims: BTreeMap<String, String> =
        [("model".to_string(), "gpt=4,o\\x".to_string()), ("region".to_string(), "eu".to_string())].into();
    let k = meterflow_core::records::dimensions_key(&dims);
    assert_eq!(parse_dimensions_key(&k), dims);
    assert!(parse_dimensions_key("").is_empty());
}

#[test]
fn prices_are_named_by_the_catalog() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/catalog.toml")).unwrap();
    let cat = Catalog::from_toml_str(&text).unwrap();
    assert_eq!(price_of(Some(&cat), "usage", "starter", "input_tokens", "model=gpt-4o,region=us"), "input_tokens.gpt-4o");
    assert_eq!(price_of(Some(&cat), "true_up", "starter", "", ""), TRUE_UP_PRICE);
    assert_eq!(price_of(None, "usage", "starter", "m", "model=x"), "m{model=x}");
}
