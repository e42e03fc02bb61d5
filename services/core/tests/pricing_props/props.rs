//! Properties (256 cases each) for the invariants the bill depends on.

use super::*;
use crate::wallets::{adj, charge};

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

/// A decimal below `max` with exactly `scale` fractional digits (before normalizing).
fn fixed(max: i64, scale: u32) -> impl Strategy<Value = Decimal> {
    (0..max * 10i64.pow(scale)).prop_map(move |m| Decimal::new(m, scale).normalize())
}

/// A decimal below `max` with 0..=`max_scale` fractional digits: short values hit tier
/// boundaries and rounding ties, long ones exercise the 12-digit prices.
fn dec(max: i64, max_scale: u32) -> impl Strategy<Value = Decimal> {
    (0..=max_scale).prop_flat_map(move |s| fixed(max, s))
}

fn price_str(p: Decimal) -> String {
    p.normalize().to_string()
}

/// A price model (TOML body of a `[[plan.price]]`), any model, with or without a free
/// allowance.
fn price_body() -> impl Strategy<Value = String> {
    let free = prop_oneof![Just(None), dec(5_000, 3).prop_map(Some)];
    let tiers = (prop::collection::vec((dec(3_000, 2), dec(10, 12), dec(30, 1)), 1..4), any::<bool>());
    let model = prop_oneof![
        dec(10, 12).prop_map(|p| format!("model = \"per_unit\"\nunit_price = \"{}\"", price_str(p))),
        tiers.prop_map(|(tiers, graduated)| {
            let mut bound = Decimal::ZERO;
            let n = tiers.len();
            let parts: Vec<String> = tiers
                .into_iter()
                .enumerate()
                .map(|(i, (step, unit, flat))| {
                    bound += step + Decimal::ONE;
                    let up = if i + 1 == n { String::new() } else { format!("up_to = \"{}\", ", price_str(bound)) };
                    format!("{{ {up}unit_price = \"{}\", flat_fee = \"{}\" }}", price_str(unit), price_str(flat))
                })
                .collect();
            format!("model = \"{}\"\ntiers = [ {} ]", if graduated { "graduated" } else { "volume" }, parts.join(", "))
        }),
        (dec(50, 3), dec(100, 12)).prop_map(|(size, price)| format!(
            "model = \"package\"\npackage_size = \"{}\"\npackage_price = \"{}\"",
            price_str(size + Decimal::new(1, 3)),
            price_str(price)
        )),
    ];
    (model, free).prop_map(|(m, f)| match f {
        Some(f) => format!("{m}\nfree_units = \"{}\"", price_str(f)),
        None => m,
    })
}

/// Windows of one month, each with 1..4 revisions of its value (up to 9 fractional digits).
fn windows() -> impl Strategy<Value = Vec<(i64, Vec<Decimal>)>> {
    let value = prop_oneof![fixed(3_000, 0), dec(3_000, 9), fixed(2, 9)];
    prop::collection::vec((0..43_000i64, prop::collection::vec(value, 1..4)), 1..12).prop_map(|ws| {
        // Distinct window starts.
        let mut seen = BTreeSet::new();
        ws.into_iter().filter(|(w, _)| seen.insert(*w)).collect()
    })
}

/// One delivery: (index into the aggregate list) — replays repeat an earlier index.
#[derive(Debug, Clone)]
struct Stream {
    aggs: Vec<MeterAggregate>,
    /// Delivery order as indices into `aggs`; an index may appear again later (a replay).
    deliveries: Vec<usize>,
    /// Sum of each window's last revision.
    total: Decimal,
}

/// Any split (windows and revisions), any arrival order (a permutation of all revisions,
/// interleaving source partitions), seqs increasing per source partition in arrival order
/// with gaps, and replays of already delivered aggregates.
fn stream(tenant: &'static str, meter: &'static str, ws: Vec<(i64, Vec<Decimal>)>) -> impl Strategy<Value = Stream> {
    let mut revs = Vec::new();
    let mut total = Decimal::ZERO;
    for (w, values) in &ws {
        let mut prev = Decimal::ZERO;
        for (r, v) in values.iter().enumerate() {
            revs.push((*w, r as i32, *v, prev));
            prev = *v;
        }
        total += prev;
    }
    let n = revs.len();
    (
        Just(revs).prop_shuffle(),
        prop::collection::vec((0..3i32, 1..4i64), n),
        prop::collection::vec((0..=n, any::<prop::sample::Index>()), 0..6),
    )
        .prop_map(move |(revs, sp_gaps, replays)| {
            let mut next: BTreeMap<i32, i64> = BTreeMap::new();
            let aggs: Vec<MeterAggregate> = revs
                .iter()
                .zip(&sp_gaps)
                .map(|(&(w, r, v, p), &(sp, gap))| {
                    let seq = *next.entry(sp).and_modify(|s| *s += gap).or_insert(gap);
                    agg(tenant, meter, &[], nov() + w * MINUTE, r, v, p, sp, seq)
                })
                .collect();
            let mut deliveries = Vec::new();
            for i in 0..=aggs.len() {
                for (at, pick) in &replays {
                    if *at == i && i > 0 {
                        deliveries.push(pick.index(i));
                    }
                }
                if i < aggs.len() {
                    deliveries.push(i);
                }
            }
            Stream { aggs, deliveries, total }
        })
}

fn price_and_stream() -> impl Strategy<Value = (String, Stream)> {
    (price_body(), windows()).prop_flat_map(|(body, ws)| (Just(body), stream("t", "m", ws)))
}

fn run(state: &mut RatingState, catalog: &Catalog, s: &Stream, range: std::ops::Range<usize>) -> (Vec<Charge>, usize) {
    let mut out = Vec::new();
    let mut skipped = 0;
    for &i in &s.deliveries[range] {
        match state.rate(catalog, &s.aggs[i]).unwrap() {
            RateOutcome::Charged(c) => out.extend(c),
            RateOutcome::Skipped { .. } => skipped += 1,
            RateOutcome::Rejected(e) => panic!("rejected: {e}"),
            RateOutcome::Parked { error, .. } => panic!("parked: {error}"),
        }
    }
    (out, skipped)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Charges of any split, order, restatement and replay sum to the rounded price of the
    /// total quantity, exactly; replays add nothing.
    #[test]
    fn charges_sum_to_price_of_total((body, s) in price_and_stream()) {
        let c = single_price_catalog(&body, "0");
        let price = c.plan("p").unwrap().price("m").unwrap().clone();
        let mut state = RatingState::new(0, RatingConfig::default());
        let (charges, skipped) = run(&mut state, &c, &s, 0..s.deliveries.len());
        prop_assert_eq!(charges.len(), s.aggs.len());
        prop_assert_eq!(skipped, s.deliveries.len() - s.aggs.len());
        let total: Decimal = charges.iter().map(|c| c.amount).sum();
        let expected = price.price(s.total).unwrap();
        prop_assert_eq!(total, expected, "body:\n{}\ntotal quantity {}", body, s.total);
        prop_assert!(charges.iter().all(|c| c.amount.scale() <= 9));
        let quantity: Decimal = charges.iter().map(|c| c.quantity).sum();
        prop_assert_eq!(quantity, s.total);
        prop_assert_eq!(state.cumulative("t", nov(), "p", "m"), s.total);
        let ids: BTreeSet<&String> = charges.iter().map(|c| &c.charge_id).collect();
        prop_assert_eq!(ids.len(), charges.len());
        // A full replay of everything changes nothing.
        let before = bytes(&state);
        let (again, _) = run(&mut state, &c, &s, 0..s.deliveries.len());
        prop_assert!(again.is_empty());
        prop_assert_eq!(bytes(&state), before);
    }

    /// Snapshot -> restore -> continue equals the uninterrupted run (charges, ids, seqs and
    /// final state), including true-ups from watermark advances.
    #[test]
    fn snapshot_restore_continue_equals_uninterrupted(
        (body, s) in price_and_stream(),
        cut in any::<prop::sample::Index>(),
        minimum in dec(10_000, 2),
        advance_at in any::<prop::sample::Index>(),
    ) {
        let c = single_price_catalog(&body, &price_str(minimum));
        let n = s.deliveries.len();
        let cut = cut.index(n + 1);
        let adv = advance_at.index(n + 1);
        let wm = ts("2026-12-01T02:00:00Z");
        let drive = |state: &mut RatingState, range: std::ops::Range<usize>| -> Vec<Charge> {
            let mut out = Vec::new();
            for i in range {
                if i == adv {
                    out.extend(state.advance(&c, wm));
                }
                if i < n {
                    out.extend(run(state, &c, &s, i..i + 1).0);
                }
            }
            out
        };
        let mut straight = RatingState::new(2, RatingConfig::default());
        let all = drive(&mut straight, 0..n + 1);
        let mut first = RatingState::new(2, RatingConfig::default());
        let mut resumed_out = drive(&mut first, 0..cut);
        let mut resumed = round_trip(&first);
        prop_assert_eq!(&resumed, &first);
        resumed_out.extend(drive(&mut resumed, cut..n + 1));
        prop_assert_eq!(&resumed_out, &all);
        prop_assert_eq!(bytes(&resumed), bytes(&straight));
        // Usage plus true-ups equal max(minimum, usage) once the period is closed.
        let usage = sum(&all, KIND_USAGE);
        let true_ups = sum(&all, KIND_TRUE_UP);
        prop_assert_eq!(usage + true_ups, usage.max(minimum));
    }

    /// Whatever arrives before or after the period closes (late windows, restatements), the
    /// true-ups keep `usage + true-ups = max(minimum, usage)` exactly, with revisions 0, 1, 2...
    #[test]
    fn true_ups_stay_exact_across_late_restatements(
        (body, s) in price_and_stream(),
        minimum in dec(100_000, 3),
        close_at in any::<prop::sample::Index>(),
    ) {
        let c = single_price_catalog(&body, &price_str(minimum));
        let n = s.deliveries.len();
        let close_at = close_at.index(n + 1);
        let mut state = RatingState::new(0, RatingConfig::default());
        let mut out = run(&mut state, &c, &s, 0..close_at).0;
        out.extend(state.advance(&c, ts("2026-12-01T01:00:00Z")));
        // A tenant not yet seen has nothing to close; its first (late) aggregate closes it.
        prop_assert_eq!(state.is_closed("t", nov()), close_at > 0);
        out.extend(run(&mut state, &c, &s, close_at..n).0);
        prop_assert!(state.is_closed("t", nov()));
        let usage = sum(&out, KIND_USAGE);
        prop_assert_eq!(usage, c.plan("p").unwrap().price("m").unwrap().price(s.total).unwrap());
        prop_assert_eq!(usage + sum(&out, KIND_TRUE_UP), usage.max(minimum));
        let revisions: Vec<i32> = out.iter().filter(|c| c.kind == KIND_TRUE_UP).map(|c| c.revision).collect();
        prop_assert_eq!(revisions.clone(), (0..revisions.len() as i32).collect::<Vec<_>>());
    }

    /// A mid-period plan change: windows before the change are priced on the old plan, the
    /// rest on the new one, each segment telescoping to its own rounded price, in any order.
    #[test]
    fn plan_change_prices_each_segment(
        (a, b, ws) in (price_body(), price_body(), windows()),
        change_day in 1..29i64,
        order in any::<u64>(),
    ) {
        let text = format!(
            "[[plan]]\nid = \"a\"\ncurrency = \"USD\"\n[[plan.price]]\nmeter = \"m\"\n{a}\n\
             [[plan]]\nid = \"b\"\ncurrency = \"USD\"\n[[plan.price]]\nmeter = \"m\"\n{b}\n\
             [[assignment]]\ntenant = \"t\"\nplan = \"a\"\nfrom = \"2026-10-01T00:00:00Z\"\n\
             [[assignment]]\ntenant = \"t\"\nplan = \"b\"\nfrom = \"2026-11-{:02}T00:00:00Z\"\n",
            change_day + 1
        );
        let c = Catalog::from_toml_str(&text).unwrap();
        let change = nov() + change_day * 86_400_000;
        let (mut qa, mut qb) = (Decimal::ZERO, Decimal::ZERO);
        let mut aggs = Vec::new();
        for (i, (w, values)) in ws.iter().enumerate() {
            let start = nov() + w * MINUTE;
            let last = *values.last().unwrap();
            if start < change { qa += last } else { qb += last }
            let mut prev = Decimal::ZERO;
            for (r, v) in values.iter().enumerate() {
                aggs.push(agg("t", "m", &[], start, r as i32, *v, prev, i as i32, r as i64 + 1));
                prev = *v;
            }
        }
        // A deterministic shuffle that keeps each window's revisions in seq order.
        aggs.sort_by_key(|x| (x.revision, (x.window_start as u64).wrapping_mul(order | 1).rotate_left(17)));
        let mut state = RatingState::new(0, RatingConfig::default());
        let mut charges = Vec::new();
        for x in &aggs {
            charges.extend(charged(state.rate(&c, x).unwrap()));
        }
        let on = |plan: &str| charges.iter().filter(|c| c.plan == plan).map(|c| c.amount).sum::<Decimal>();
        prop_assert_eq!(on("a"), c.plan("a").unwrap().price("m").unwrap().price(qa).unwrap());
        prop_assert_eq!(on("b"), c.plan("b").unwrap().price("m").unwrap().price(qb).unwrap());
    }

    /// Wallet balance = first application of each top-up key - charges, exactly; alerts fire
    /// exactly on downward crossings; snapshot/restore mid-way changes nothing.
    #[test]
    fn wallet_balance_is_deduped_top_ups_minus_charges(
        ops in prop::collection::vec(
            prop_oneof![
                (0..6usize, (-2_000i64..10_000, 0..=3u32)).prop_map(|(k, (m, s))| (Some(k), Decimal::new(m, s))),
                (-500i64..3_000, 0..=2u32).prop_map(|(m, s)| (None, Decimal::new(m, s))),
                (-500_000_000_000i64..3_000_000_000_000).prop_map(|m| (None, Decimal::new(m, 9))),
            ],
            0..60,
        ),
        threshold in dec(5_000, 2),
        cut in any::<prop::sample::Index>(),
    ) {
        let cfg = WalletConfig { low_balance: [("USD".to_string(), threshold)].into(), ..Default::default() };
        let cut = cut.index(ops.len() + 1);
        let mut w = Wallets::new(cfg.clone());
        let mut seen = BTreeMap::new();
        let mut expected = Decimal::ZERO;
        let mut expected_alerts = Vec::new();
        for (i, (key, amount)) in ops.iter().enumerate() {
            if i == cut {
                w = round_trip(&w);
            }
            let before = expected;
            let alerts = match key {
                Some(k) => {
                    let key = format!("pay_{k}");
                    let first = !seen.contains_key(&key);
                    let a = adj(&key, &amount.to_string());
                    match w.apply_adjustment(&a).unwrap() {
                        AdjustmentOutcome::Applied { balance, alerts } => {
                            prop_assert!(first);
                            seen.insert(key, *amount);
                            expected += *amount;
                            prop_assert_eq!(balance, expected);
                            alerts
                        }
                        AdjustmentOutcome::Duplicate { conflicting, .. } => {
                            prop_assert!(!first);
                            prop_assert_eq!(conflicting, seen[&key] != *amount);
                            Vec::new()
                        }
                    }
                }
                None => {
                    expected -= *amount;
                    w.apply_charge(&charge(&format!("c{i}"), &amount.to_string()))
                }
            };
            let after = expected;
            if before > threshold && after <= threshold { expected_alerts.push(ALERT_LOW_BALANCE) }
            if before > Decimal::ZERO && after <= Decimal::ZERO { expected_alerts.push(ALERT_EXHAUSTED) }
            for a in &alerts {
                prop_assert_eq!(a.balance, after);
            }
            let got: Vec<&str> = alerts.iter().map(|a| a.kind.as_str()).collect();
            let want: Vec<&str> = std::mem::take(&mut expected_alerts);
            prop_assert_eq!(got, want);
        }
        prop_assert_eq!(w.balance("t", "USD"), expected);
        let top_ups: Decimal = seen.values().copied().sum();
        let charges: Decimal = ops.iter().filter(|(k, _)| k.is_none()).map(|(_, a)| *a).sum();
        prop_assert_eq!(w.balance("t", "USD"), top_ups - charges);
    }
}
