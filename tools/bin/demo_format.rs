//! How `meterflow-demo-summary report` prints numbers and its OK/MISMATCH checks.

use rust_decimal::Decimal;

use meterflow_e2e::verify;

/// The summary's checks, printed at the end.
#[derive(Default)]
pub(crate) struct Checks(pub(crate) Vec<(bool, String)>);

impl Checks {
    pub(crate) fn add(&mut self, ok: bool, what: impl Into<String>) {
        self.0.push((ok, what.into()));
    }

    pub(crate) fn report(&mut self, r: &verify::Report, what: &str) {
        if r.ok() {
            self.add(true, format!("{what}: {} checked, all exact", r.checked));
        } else {
            let first = r.problems.first().cloned().unwrap_or_default();
            self.add(false, format!("{what}: {} of {} differ, e.g. {first}", r.problems.len(), r.checked));
        }
    }
}

pub(crate) fn ok_word(ok: bool) -> &'static str {
    if ok {
        "OK"
    } else {
        "MISMATCH"
    }
}

/// 1234567 -> "1,234,567"; keeps a fractional part.
pub(crate) fn group(d: Decimal) -> String {
    let s = d.normalize().to_string();
    let (sign, s) = s.strip_prefix('-').map_or(("", s.as_str()), |r| ("-", r));
    let (int, frac) = s.split_once('.').map_or((s, None), |(i, f)| (i, Some(f)));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{out}.{f}"),
        None => format!("{sign}{out}"),
    }
}

pub(crate) fn usd(d: Decimal) -> String {
    let r = d.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven);
    let mut s = group(r.trunc());
    let cents = (r.fract().abs() * Decimal::from(100)).round().to_string();
    if r.is_sign_negative() && r.trunc().is_zero() && !r.is_zero() {
        s = format!("-{s}");
    }
    format!("{s}.{cents:0>2}")
}

pub(crate) fn qty(d: Decimal) -> String {
    group(d.round_dp(1))
}

pub(crate) fn pct(margin: Decimal, revenue: Decimal) -> String {
    meterflow_core::pricing::margin_percent(revenue, margin).map_or_else(|| "n/a".to_owned(), |p| format!("{}%", p.round_dp(1)))
}

pub(crate) fn count_u64(n: u64) -> String {
    group(Decimal::from(n))
}
