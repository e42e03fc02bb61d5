use std::collections::BTreeMap;

use proptest::prelude::*;
use rust_decimal::Decimal;

use super::*;
use crate::meter::{Aggregation, MeterDef};

const MIN: i64 = 60_000;
/// 2025-11-01T00:00:00Z.
const NOV: i64 = 1_761_955_200_000;
/// 2025-12-01T00:00:00Z.
const DEC: i64 = 1_764_547_200_000;

fn meter(aggregation: Aggregation, window_ms: i64) -> MeterDef {
    MeterDef {
        name: "m".into(),
        aggregation,
        group_by: vec!["model".into(), "region".into()],
        unique_dimension: None,
        window_ms,
        allowed_lateness_ms: 0,
        max_future_ms: 0,
        allow_negative: false,
        max_quantity: None,
    }
}

fn req(from_ms: i64, to_ms: i64, window_size: WindowSize, group_by: &[&str]) -> UsageRequest {
    UsageRequest {
        tenant: "t".into(),
        meter: "m".into(),
        from_ms,
        to_ms,
        window_size,
        group_by: group_by.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn err(m: &MeterDef, r: &UsageRequest) -> String {
    plan(m, r).unwrap_err().0
}

#[test]
fn calendar_is_utc() {
    assert_eq!(pricing::period_start(NOV + 5 * DAY_MS), NOV);
    assert_eq!(pricing::period_end(NOV), DEC);
    assert_eq!(WindowSize::Month.bucket_end(NOV), DEC);
    assert_eq!(WindowSize::Hour.bucket_start(NOV + HOUR_MS + 5), NOV + HOUR_MS);
}

#[test]
fn chooses_the_coarsest_source_that_tiles_range_and_buckets() {
    let m = meter(Aggregation::Sum, MIN);
    let source = |r: UsageRequest| plan(&m, &r).unwrap().source;
    assert_eq!(source(req(NOV, DEC, WindowSize::Month, &[])), Source::DayRollup);
    assert_eq!(source(req(NOV, DEC, WindowSize::Day, &["model"])), Source::DayRollup);
    assert_eq!(source(req(NOV, DEC, WindowSize::Hour, &[])), Source::HourRollup, "day rows cannot make hours");
    assert_eq!(source(req(NOV + HOUR_MS, DEC, WindowSize::Month, &[])), Source::HourRollup, "range starts mid-day");
    assert_eq!(source(req(NOV + MIN, DEC, WindowSize::Day, &[])), Source::Windows, "range starts mid-hour");
    assert_eq!(source(req(NOV, DEC, WindowSize::Minute, &[])), Source::Windows);
    // A meter with hourly windows cannot be asked for minutes, but rolls up from hours.
    let hourly = meter(Aggregation::Count, HOUR_MS);
    assert_eq!(plan(&hourly, &req(NOV, DEC, WindowSize::Day, &[])).unwrap().source, Source::DayRollup);
    assert!(err(&hourly, &req(NOV, DEC, WindowSize::Minute, &[])).contains("whole number"));
    // Non-additive aggregations never read the rollups.
    let max = meter(Aggregation::Max, MIN);
    let p = plan(&max, &req(NOV, DEC, WindowSize::Month, &["model"])).unwrap();
    assert_eq!((p.source, p.combine), (Source::Windows, Combine::Max));
    assert!(p.sql.contains("max(latest)") && p.sql.contains("FROM meter_aggregates"), "{}", p.sql);
}

#[test]
fn refuses_what_cannot_be_answered_exactly() {
    let m = meter(Aggregation::Sum, MIN);
    assert!(err(&m, &req(DEC, NOV, WindowSize::Day, &[])).contains("before"));
    assert!(err(&m, &req(NOV + 1000, DEC, WindowSize::Day, &[])).contains("window boundaries"));
    assert!(err(&m, &req(NOV, DEC, WindowSize::Day, &["gpu"])).contains("does not group by \"gpu\""));
    assert!(err(&m, &req(NOV, DEC, WindowSize::Day, &["model", "model"])).contains("twice"));
    assert!(err(&m, &req(0, 400 * DAY_MS, WindowSize::Minute, &[])).contains("buckets"));
    let avg = meter(Aggregation::Avg, MIN);
    assert!(err(&avg, &req(NOV, DEC, WindowSize::Hour, &["model", "region"])).contains("do not combine"));
    assert!(err(&avg, &req(NOV, NOV + DAY_MS, WindowSize::Minute, &["model"])).contains("do not combine"));
    let p = plan(&avg, &req(NOV, NOV + DAY_MS, WindowSize::Minute, &["region", "model"])).unwrap();
    assert_eq!((p.source, p.combine), (Source::Windows, Combine::Latest));
    let latest = meter(Aggregation::Latest, MIN);
    assert!(err(&latest, &req(NOV, DEC, WindowSize::Day, &["model"])).contains("latest"));
    assert_eq!(plan(&latest, &req(NOV, DEC, WindowSize::Day, &["model", "region"])).unwrap().combine, Combine::Latest);
}

#[test]
fn binds_follow_the_placeholders_and_carry_every_name() {
    let m = meter(Aggregation::Sum, MIN);
    for r in [req(NOV, DEC, WindowSize::Month, &["region", "model"]), req(NOV + MIN, DEC, WindowSize::Minute, &[])] {
        let p = plan(&m, &r).unwrap();
        assert_eq!(p.sql.matches('?').count(), p.binds.len(), "{}", p.sql);
        let strs: Vec<&str> = p.binds.iter().filter_map(|b| if let Bind::Str(s) = b { Some(s.as_str()) } else { None }).collect();
        let want: Vec<&str> = r.group_by.iter().map(String::as_str).chain(["t", "m"]).collect();
        assert_eq!(strs, want);
        assert!(!p.sql.contains("'t'"), "names are bound, never spliced");
    }
}

#[test]
fn fold_makes_clipped_months_and_combines() {
    let m = meter(Aggregation::Sum, MIN);
    let from = NOV + 10 * DAY_MS;
    let p = plan(&m, &req(from, DEC + 2 * DAY_MS, WindowSize::Month, &["model"])).unwrap();
    let row = |b: i64, model: &str, v: i64| SourceRow { bucket_ms: b, dims: vec![model.into()], value: Decimal::new(v, 3), last_ms: b };
    let out = p.fold(vec![row(from, "a", 1500), row(from + DAY_MS, "a", 250), row(from, "b", 1), row(DEC, "a", 7)]);
    let pt = |s: i64, e: i64, model: &str, v: i64| UsagePoint {
        window_start_ms: s,
        window_end_ms: e,
        dimensions: BTreeMap::from([("model".to_owned(), model.to_owned())]),
        value: Decimal::new(v, 3),
    };
    assert_eq!(out, vec![pt(from, DEC, "a", 1750), pt(from, DEC, "b", 1), pt(DEC, DEC + 2 * DAY_MS, "a", 7)]);
    // latest: the later window wins whatever the row order.
    let lp = plan(&meter(Aggregation::Latest, MIN), &req(NOV, DEC, WindowSize::Month, &["model", "region"])).unwrap();
    let r2 = |b: i64, last: i64, v: i64| SourceRow { bucket_ms: b, dims: vec!["a".into(), "eu".into()], value: Decimal::from(v), last_ms: last };
    let out = lp.fold(vec![r2(NOV + 3 * DAY_MS, NOV + 3 * DAY_MS + 5 * MIN, 9), r2(NOV, NOV + 60 * MIN, 4)]);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].value, Decimal::from(9));
}

/// One window: (start, model, region, latest value).
type Window = (i64, &'static str, &'static str, Decimal);

/// What ClickHouse computes for a plan from the windows' latest values: for a rollup, the
/// migration's views first sum windows into rollup buckets; then the plan's SQL groups rows
/// by its bucket and the requested dimensions.
fn simulate(p: &UsagePlan, windows: &[Window]) -> Vec<SourceRow> {
    let r = &p.request;
    let g = sql_bucket(r);
    let dim = |model: &str, region: &str, d: &String| if d == "model" { model.to_owned() } else { region.to_owned() };
    let rollup_g = match p.source {
        Source::Windows => None,
        Source::HourRollup => Some(HOUR_MS),
        Source::DayRollup => Some(DAY_MS),
    };
    let mut rolled: BTreeMap<(i64, &str, &str), Decimal> = BTreeMap::new();
    for &(ws, model, region, v) in windows {
        let b = rollup_g.map_or(ws, |rg| ws.div_euclid(rg) * rg);
        *rolled.entry((b, model, region)).or_default() += v;
    }
    let mut rows: BTreeMap<(i64, Vec<String>), (Decimal, i64)> = BTreeMap::new();
    for ((b, model, region), v) in rolled {
        if b < r.from_ms || b >= r.to_ms {
            continue;
        }
        let key = (b.div_euclid(g) * g, r.group_by.iter().map(|d| dim(model, region, d)).collect());
        let e = rows.entry(key).or_insert((Decimal::ZERO, i64::MIN));
        e.0 += v;
        e.1 = e.1.max(b);
    }
    rows.into_iter().map(|((bucket_ms, dims), (value, last_ms))| SourceRow { bucket_ms, dims, value, last_ms }).collect()
}

fn arb_window_size() -> impl Strategy<Value = WindowSize> {
    prop_oneof![Just(WindowSize::Minute), Just(WindowSize::Hour), Just(WindowSize::Day), Just(WindowSize::Month)]
}

proptest! {
    /// Whatever source the plan picks, the answer equals the windows summed straight into the
    /// requested buckets (clipped to the range), and the plan's source tiles range and buckets.
    #[test]
    fn every_source_gives_the_windows_total(
        windows in proptest::collection::vec((0i64..90 * 24 * 60, 0usize..3, 0usize..2, -5_000i64..100_000), 0..60),
        from_min in prop_oneof![Just(0i64), 0i64..60 * 24 * 60, (0i64..60).prop_map(|d| d * 24 * 60), (0i64..1440).prop_map(|h| h * 60)],
        len_min in prop_oneof![1i64..20 * 24 * 60, (1i64..40).prop_map(|d| d * 24 * 60)],
        size in arb_window_size(),
        by_model in any::<bool>(),
    ) {
        let m = meter(Aggregation::Sum, MIN);
        let models = ["a", "b", "c"];
        let regions = ["eu", "us"];
        let ws: Vec<Window> = windows.iter().map(|&(t, mi, ri, v)| (NOV + t * MIN, models[mi], regions[ri], Decimal::new(v, 3))).collect();
        let r = req(NOV + from_min * MIN, NOV + (from_min + len_min) * MIN, size, if by_model { &["model"] } else { &[] });
        let p = match plan(&m, &r) {
            Ok(p) => p,
            Err(e) => { prop_assert!(e.0.contains("buckets"), "{}", e.0); return Ok(()); }
        };
        prop_assert_eq!(p.sql.matches('?').count(), p.binds.len());
        let g = match p.source { Source::DayRollup => DAY_MS, Source::HourRollup => HOUR_MS, Source::Windows => MIN };
        prop_assert!(r.from_ms % g == 0 && r.to_ms % g == 0);
        let got = p.fold(simulate(&p, &ws));
        let mut want: BTreeMap<(i64, Vec<String>), Decimal> = BTreeMap::new();
        for &(t, model, _, v) in &ws {
            if t < r.from_ms || t >= r.to_ms { continue; }
            let dims = if by_model { vec![model.to_owned()] } else { vec![] };
            *want.entry((size.bucket_start(t), dims)).or_default() += v;
        }
        prop_assert_eq!(got.len(), want.len());
        for (pt, ((start, dims), v)) in got.iter().zip(want) {
            prop_assert_eq!(pt.window_start_ms, start.max(r.from_ms));
            prop_assert_eq!(pt.window_end_ms, size.bucket_end(start).min(r.to_ms));
            prop_assert!(pt.window_start_ms < pt.window_end_ms);
            prop_assert_eq!(pt.dimensions.values().cloned().collect::<Vec<_>>(), dims);
            prop_assert_eq!(pt.value, v);
        }
    }
}
