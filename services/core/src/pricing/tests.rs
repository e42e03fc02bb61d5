use super::calendar::DAY_MS;
use super::*;
use std::str::FromStr;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

#[test]
fn calendar_months() {
    let nov15 = parse_rfc3339_ms("2026-11-15T00:00:00Z").unwrap();
    assert_eq!(period_start(nov15), parse_rfc3339_ms("2026-11-01T00:00:00Z").unwrap());
    assert_eq!(period_end(nov15), parse_rfc3339_ms("2026-12-01T00:00:00Z").unwrap());
    let dec31 = parse_rfc3339_ms("2026-12-31T23:59:59.999Z").unwrap();
    assert_eq!(period_end(dec31), parse_rfc3339_ms("2027-01-01T00:00:00Z").unwrap());
    let feb = parse_rfc3339_ms("2028-02-10T00:00:00Z").unwrap();
    assert_eq!(period_end(feb) - period_start(feb), 29 * DAY_MS);
    assert_eq!(period_start(-1), parse_rfc3339_ms("1969-12-01T00:00:00Z").unwrap());
    assert_eq!(parse_rfc3339_ms("1970-01-01T01:00:00+01:00").unwrap(), 0);
    assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00.250Z").unwrap(), 250);
    for bad in ["2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z", "2026-01-01", "2026-01-01T00:00:00", "2026-01-01T00:00:00.0001Z"] {
        assert!(parse_rfc3339_ms(bad).is_err(), "{bad}");
    }
}

#[test]
fn half_even_division() {
    assert_eq!(div_round_half_even(5, 2), 2);
    assert_eq!(div_round_half_even(7, 2), 4);
    assert_eq!(div_round_half_even(7, 3), 2);
    assert_eq!(div_round_half_even(8, 3), 3);
}

#[test]
fn package_rounds_partial_packages_up() {
    let m = PriceModel::Package { package_size: d("1000"), package_price: d("0.5") };
    assert_eq!(m.exact(d("1")), Some(d("0.5")));
    assert_eq!(m.exact(d("1000")), Some(d("0.5")));
    assert_eq!(m.exact(d("1000.000000001")), Some(d("1.0")));
    assert_eq!(m.exact(d("2500")), Some(d("1.5")));
}

#[test]
fn margin_percent_rounds() {
    assert_eq!(margin_percent(d("3"), d("1")), Some(d("33.33")));
    assert_eq!(margin_percent(d("0"), d("1")), None);
}

/// A bad leaf is reported where the file has it: plan id, price name, the path inside the
/// price, what is wrong, and the line.
#[test]
fn leaf_errors_carry_path_and_line() {
    let text = "[[plan]]\nid = \"gold\"\ncurrency = \"USD\"\n[[plan.price]]\nmeter = \"m\"\nmodel = \"graduated\"\n\
                tiers = [\n  { up_to = \"10\", unit_price = \"1\" },\n  { up_to = \"2e3\", unit_price = \"1\" },\n  { unit_price = \"1\" },\n]\n";
    let err = Catalog::from_toml_str(text).unwrap_err().to_string();
    assert_eq!(
        err,
        "invalid catalog: plan \"gold\", price \"m\", field tiers[1].up_to: \"2e3\" is not a decimal like \"0.0025\" (line 9, column 13)"
    );
    let text = "[[plan]]\nid = \"gold\"\ncurrency = \"USD\"\n[[plan.price]]\nmeter = \"m\"\nname = \"n\"\nmodel = \"median\"\n";
    let err = Catalog::from_toml_str(text).unwrap_err().to_string();
    assert!(err.starts_with("invalid catalog: plan \"gold\", price \"n\", field model: unknown variant `median`"), "{err}");
    assert!(err.ends_with("(line 7, column 9)"), "{err}");
    // A missing key is named at the table that lacks it.
    let text = "[[plan]]\ncurrency = \"USD\"\n";
    let err = Catalog::from_toml_str(text).unwrap_err().to_string();
    assert!(err.starts_with("invalid catalog: plan \"plan[0]\", price \"\", field id: missing field `id`"), "{err}");
    // A bare TOML datetime is an RFC 3339 instant too.
    let text = "[[plan]]\nid = \"p\"\ncurrency = \"USD\"\n[[assignment]]\ntenant = \"t\"\nplan = \"p\"\nfrom = 2026-11-15T00:00:00Z\n";
    let c = Catalog::from_toml_str(text).unwrap();
    assert_eq!(c.assignments("t")[0].from_ms, parse_rfc3339_ms("2026-11-15T00:00:00Z").unwrap());
}
