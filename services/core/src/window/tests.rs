use super::*;
use std::str::FromStr;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn c<'a>(q: &str, t: i64, id: &'a str, u: &'a str) -> Contribution<'a> {
    Contribution {
        quantity: d(q),
        event_time_ms: t,
        event_id: id,
        unique_value: u,
        provider_cost: Some(d("0.5")),
    }
}

fn key() -> WindowKey {
    WindowKey::new(0, 0, "t", std::iter::empty())
}

#[test]
fn packed_keys_are_unambiguous() {
    let a = WindowKey::new(1, 5, "a:b", ["1:c", ""].into_iter());
    assert_eq!(a.tenant(), "a:b");
    assert_eq!(a.dims().collect::<Vec<_>>(), vec!["1:c", ""]);
    assert!(a.matches(1, 5, "a:b", &["1:c", ""]));
    assert!(!a.matches(1, 5, "a:b", &["1:c"]));
    assert!(!a.matches(1, 5, "a", &["b", "1:c", ""]));
    assert_ne!(WindowKey::new(0, 0, "ab", ["c"].into_iter()), WindowKey::new(0, 0, "a", ["bc"].into_iter()));
    let long = "x".repeat(1234);
    let k = WindowKey::new(0, 0, &long, ["é"].into_iter());
    assert_eq!(k.tenant(), long);
    assert_eq!(k.dims().next(), Some("é"));
    let inline = WindowKey::new(0, 0, "tenant", ["m"].into_iter());
    assert!(matches!(inline.text, KeyText::Inline { .. }));
    assert!(matches!(k.text, KeyText::Heap(_)));
    assert_eq!(inline, WindowKey::new(0, 0, "tenant", ["m"].into_iter()));
    assert_ne!(inline, WindowKey::new(0, 1, "tenant", ["m"].into_iter()));
}

#[test]
fn exact_add_refuses_rounding() {
    assert_eq!(exact_add(d("1.5"), d("1")), Some(d("2.5")));
    assert_eq!(exact_add(d("100000000000000000000"), d("0.000000001")), None);
    assert_eq!(exact_add(Decimal::MAX, Decimal::ONE), None);
    // Zero operands: exact although the result has a lower scale (found by proptest).
    assert_eq!(exact_add(d("0.0"), d("-3")), Some(d("-3")));
    assert_eq!(exact_add(d("-3"), d("0.00")), Some(d("-3")));
    assert_eq!(exact_add(d("0.5"), d("-0.5")).map(|r| r.is_zero()), Some(true));
}

#[test]
fn every_aggregation() {
    let evs = [c("3", 5, "b", "u1"), c("1.5", 9, "a", "u2"), c("7", 9, "c", "u1"), c("-2", 1, "z", "")];
    let expect = [
        (Aggregation::Sum, "9.5"),
        (Aggregation::Count, "4"),
        (Aggregation::Min, "-2"),
        (Aggregation::Max, "7"),
        (Aggregation::Avg, "2.375"),
        (Aggregation::UniqueCount, "3"),
        (Aggregation::Latest, "7"),
    ];
    for (agg, want) in expect {
        let mut w = Window::new(key(), 0, 0, agg, &evs[0]);
        for e in &evs[1..] {
            w.try_apply(e).unwrap();
        }
        assert_eq!(w.value(agg), d(want), "{agg:?}");
        assert_eq!(w.event_count, 4);
        assert_eq!(w.provider_cost, d("2"));
    }
    // avg rounds half to even at 9 digits.
    let mut w = Window::new(key(), 0, 0, Aggregation::Avg, &c("0.000000001", 0, "a", ""));
    w.try_apply(&c("0", 0, "b", "")).unwrap();
    assert_eq!(w.value(Aggregation::Avg), d("0"));
    w.try_apply(&c("0.000000002", 0, "c", "")).unwrap();
    assert_eq!(w.value(Aggregation::Avg), d("0.000000001"));
}

#[test]
fn overflow_is_all_or_nothing() {
    let mut w = Window::new(key(), 0, 0, Aggregation::Sum, &c("79228162514264337593543950335", 0, "a", ""));
    let before = w.acc.clone();
    assert_eq!(w.try_apply(&c("1", 0, "b", "")), Err(Overflow::Quantity));
    assert_eq!(w.acc, before);
    assert_eq!(w.event_count, 1);
    assert_eq!(w.provider_cost, d("0.5"));
}

#[test]
fn canonical_values() {
    assert_eq!(canonical(d("-0.000")).to_string(), "0");
    assert_eq!(canonical(d("1.500")).to_string(), "1.5");
}
