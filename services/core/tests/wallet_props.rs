//! Credit grants and the ASC 606 ledger: burn order, expiry, refunds, and the identities
//! finance relies on, for any order of top-ups, charges, refunds, debits and expiries.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions: a failed unwrap is a failed run

use std::str::FromStr;

use meterflow_core::rating::{
    AdjustmentOutcome, CreditKind, LedgerEntry, Wallets, MOVE_ARREARS, MOVE_DEBIT, MOVE_DRAWDOWN, MOVE_EXPIRY,
    MOVE_GRANT, MOVE_REFUND,
};
use meterflow_core::records::{Charge, WalletAdjustment};
use proptest::prelude::*;
use rust_decimal::Decimal;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn adj(key: &str, kind: &str, amount: Decimal, priority: i32, expires_at: Option<i64>, at: i64) -> WalletAdjustment {
    WalletAdjustment {
        idempotency_key: key.into(),
        tenant: "t".into(),
        currency: "USD".into(),
        amount,
        kind: kind.into(),
        reason: String::new(),
        created_at: at,
        expires_at,
        priority,
    }
}

/// A charge as wallets see it (the rest is the rater's business).
fn charge(id: &str, amount: Decimal) -> Charge {
    Charge { charge_id: id.into(), kind: "usage".into(), tenant: "t".into(), currency: "USD".into(), window_end: 60_000, amount, margin: amount, ..Charge::default() }
}

fn sum(entries: &[LedgerEntry], movement: &str, kind: Option<&str>) -> Decimal {
    entries
        .iter()
        .filter(|e| e.movement == movement && kind.is_none_or(|k| e.credit_kind == k))
        .map(|e| e.amount)
        .sum()
}

#[test]
fn burn_order_is_priority_then_expiry_then_age() {
    let mut w = Wallets::default();
    w.apply_adjustment(&adj("old-never", "paid", d("10"), 0, None, 1)).unwrap();
    w.apply_adjustment(&adj("late-expiry", "paid", d("10"), 0, Some(5_000_000), 2)).unwrap();
    w.apply_adjustment(&adj("early-expiry", "promotional", d("10"), 0, Some(4_000_000), 3)).unwrap();
    w.apply_adjustment(&adj("urgent", "manual", d("10"), 5, None, 4)).unwrap();
    w.take_ledger();
    w.apply_charge_at(&charge("c1", d("35")), Some(1_000));
    let draws: Vec<(String, Decimal)> =
        w.take_ledger().into_iter().filter(|e| e.movement == MOVE_DRAWDOWN).map(|e| (e.grant_key, e.amount)).collect();
    assert_eq!(
        draws,
        vec![
            ("urgent".into(), d("10")),
            ("early-expiry".into(), d("10")),
            ("late-expiry".into(), d("10")),
            ("old-never".into(), d("5")),
        ]
    );
    assert_eq!(w.balance("t", "USD"), d("5"));
}

#[test]
fn breakage_promotions_refunds_and_arrears() {
    let mut w = Wallets::default();
    w.apply_adjustment(&adj("pay", "paid", d("100"), 0, Some(10_000), 0)).unwrap();
    w.apply_adjustment(&adj("promo", "promotional", d("20"), 1, None, 0)).unwrap();
    // Promotional credit burns first (priority 1): consuming it is not revenue.
    w.apply_charge_at(&charge("c1", d("30")), Some(1_000));
    // A refund of 50 of the remaining 90 paid.
    w.apply_adjustment(&adj("ref", "refund", d("-50"), 0, None, 2_000)).unwrap();
    // The watermark passes the paid grant's expiry: its 40 left are breakage.
    w.expire(9_999);
    assert_eq!(w.account_of("t", "USD").unwrap().unused(CreditKind::Paid), d("40"), "not expired before its time");
    w.expire(10_000);
    assert_eq!(w.account_of("t", "USD").unwrap().unused(CreditKind::Paid), Decimal::ZERO);
    // Nothing left: the next charge is arrears.
    w.apply_charge_at(&charge("c2", d("7")), Some(11_000));
    let l = w.take_ledger();
    assert_eq!(sum(&l, MOVE_GRANT, Some("paid")), d("100"));
    assert_eq!(sum(&l, MOVE_DRAWDOWN, Some("promotional")), d("20"));
    assert_eq!(sum(&l, MOVE_DRAWDOWN, Some("paid")), d("10"), "recognised revenue");
    assert_eq!(sum(&l, MOVE_REFUND, None), d("50"));
    assert_eq!(sum(&l, MOVE_EXPIRY, Some("paid")), d("40"), "breakage");
    assert_eq!(sum(&l, MOVE_ARREARS, None), d("7"));
    let expiry = l.iter().find(|e| e.movement == MOVE_EXPIRY).unwrap();
    assert_eq!(expiry.at_ms, 10_000, "dated at the grant's expiry, not when noticed");
    assert_eq!(w.balance("t", "USD"), d("-7"));
    assert_eq!(w.account_of("t", "USD").unwrap().arrears, d("7"));
    // A refund must be negative; an unknown kind is refused; neither changes anything.
    let before = w.clone();
    assert!(w.apply_adjustment(&adj("r2", "refund", d("5"), 0, None, 0)).is_err());
    assert!(w.apply_adjustment(&adj("r3", "gift", d("5"), 0, None, 0)).is_err());
    assert_eq!(w, before);
}

#[test]
fn a_credit_note_reduces_arrears_then_refills_then_leaves_a_credit() {
    let mut w = Wallets::default();
    w.apply_adjustment(&adj("pay", "paid", d("10"), 0, None, 0)).unwrap();
    w.apply_charge_at(&charge("c1", d("13")), Some(1)); // 10 drawn, 3 arrears
    w.apply_charge_at(&charge("c2", d("-8")), Some(2)); // 3 arrears back, 5 refilled
    assert_eq!(w.account_of("t", "USD").unwrap().arrears, Decimal::ZERO);
    assert_eq!(w.account_of("t", "USD").unwrap().unused(CreditKind::Paid), d("5"));
    w.apply_charge_at(&charge("c3", d("-20")), Some(3)); // 5 refilled, 15 credit balance
    let acc = w.account_of("t", "USD").unwrap();
    assert_eq!(acc.unused(CreditKind::Paid), d("10"));
    assert_eq!(acc.arrears, d("-15"));
    assert_eq!(w.balance("t", "USD"), d("25"));
    // The credit balance is used before the grants.
    w.apply_charge_at(&charge("c4", d("16")), Some(4));
    let acc = w.account_of("t", "USD").unwrap();
    assert_eq!((acc.arrears, acc.unused(CreditKind::Paid)), (Decimal::ZERO, d("9")));
    let l = w.take_ledger();
    assert_eq!(sum(&l, MOVE_DRAWDOWN, None) + sum(&l, MOVE_ARREARS, None), d("13") - d("8") - d("20") + d("16"));
}

#[test]
fn grants_already_expired_on_arrival_are_breakage_at_once() {
    let mut w = Wallets::default();
    w.expire(50_000);
    w.apply_adjustment(&adj("late", "paid", d("3"), 0, Some(40_000), 60_000)).unwrap();
    let l = w.take_ledger();
    assert_eq!(sum(&l, MOVE_EXPIRY, Some("paid")), d("3"));
    assert_eq!(w.balance("t", "USD"), Decimal::ZERO);
}

#[derive(Debug, Clone)]
enum Op {
    Grant { kind: &'static str, amount: Decimal, priority: i32, expires: Option<i64> },
    Refund(Decimal),
    Debit(Decimal),
    Charge(Decimal),
    Advance(i64),
    Retry(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let amount = (1i64..100_000, 0..=4u32).prop_map(|(m, s)| Decimal::new(m, s));
    prop_oneof![
        4 => (prop::sample::select(vec!["paid", "promotional", "manual", "top_up"]), amount.clone(), -2..3i32,
              prop::option::of(0i64..2_000))
            .prop_map(|(kind, amount, priority, expires)| Op::Grant { kind, amount, priority, expires }),
        1 => amount.clone().prop_map(Op::Refund),
        1 => amount.clone().prop_map(Op::Debit),
        6 => (-20_000i64..100_000, 0..=4u32).prop_map(|(m, s)| Op::Charge(Decimal::new(m, s))),
        2 => (0i64..100).prop_map(Op::Advance),
        1 => (0usize..64).prop_map(Op::Retry),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// After every step, from the ledger alone:
    /// * deferred revenue roll-forward: Σ paid grants - Σ paid drawdowns - Σ refunds - Σ paid
    ///   expiries = the unused paid credit the state holds (so opening + top-ups - recognised
    ///   - refunds - breakage = closing for every span of steps);
    /// * the same for non-revenue (promotional and manual) credit, with debits;
    /// * Σ drawdowns + Σ arrears = Σ charges, and arrears entries + uncovered debits = arrears;
    /// * balance = Σ adjustments - Σ charges - Σ expiries = unused credit - arrears.
    ///
    /// And a restore from a snapshot at any point changes nothing.
    #[test]
    fn ledger_identities_hold_for_any_order(ops in prop::collection::vec(op(), 0..80), cut in any::<prop::sample::Index>()) {
        let cut = cut.index(ops.len() + 1);
        let mut w = Wallets::default();
        w.expire(0);
        let mut ledger: Vec<LedgerEntry> = Vec::new();
        let mut applied: Vec<WalletAdjustment> = Vec::new();
        let (mut charges, mut adjustments, mut clock) = (Decimal::ZERO, Decimal::ZERO, 0i64);
        for (i, op) in ops.iter().enumerate() {
            if i == cut {
                w = postcard::from_bytes(&postcard::to_allocvec(&w).unwrap()).unwrap();
            }
            let opening_paid = w.account_of("t", "USD").map_or(Decimal::ZERO, |a| a.unused(CreditKind::Paid));
            let mut step = Vec::new();
            match op {
                Op::Grant { kind, amount, priority, expires } => {
                    let a = adj(&format!("g{i}"), kind, *amount, *priority, expires.map(|e| e * 10), clock);
                    let applied_ok = matches!(w.apply_adjustment(&a).unwrap(), AdjustmentOutcome::Applied { .. });
                    prop_assert!(applied_ok);
                    adjustments += *amount;
                    applied.push(a);
                }
                Op::Refund(x) | Op::Debit(x) => {
                    let kind = if matches!(op, Op::Refund(_)) { "refund" } else { "manual" };
                    let a = adj(&format!("r{i}"), kind, -*x, 0, None, clock);
                    w.apply_adjustment(&a).unwrap();
                    adjustments -= *x;
                    applied.push(a);
                }
                Op::Charge(x) => {
                    w.apply_charge_at(&charge(&format!("c{i}"), *x), Some(clock));
                    charges += *x;
                }
                Op::Advance(dt) => {
                    clock += dt * 10;
                    w.expire(clock);
                }
                Op::Retry(j) => {
                    if let Some(a) = applied.get(*j) {
                        let is_dup = matches!(w.apply_adjustment(a).unwrap(), AdjustmentOutcome::Duplicate { .. });
                        prop_assert!(is_dup);
                    }
                }
            }
            step.extend(w.take_ledger());
            // Roll-forward of this step.
            let closing_paid = w.account_of("t", "USD").map_or(Decimal::ZERO, |a| a.unused(CreditKind::Paid));
            prop_assert_eq!(
                opening_paid + sum(&step, MOVE_GRANT, Some("paid")) - sum(&step, MOVE_DRAWDOWN, Some("paid"))
                    - sum(&step, MOVE_REFUND, None) - sum(&step, MOVE_EXPIRY, Some("paid")),
                closing_paid
            );
            ledger.extend(step);
            for e in &ledger {
                prop_assert!(e.at_ms <= clock.max(0) || e.movement == MOVE_EXPIRY);
            }
        }
        let acc = w.account_of("t", "USD").cloned().unwrap_or_default();
        let paid = acc.unused(CreditKind::Paid);
        let non_paid = acc.unused(CreditKind::Promotional) + acc.unused(CreditKind::Manual);
        prop_assert_eq!(
            sum(&ledger, MOVE_GRANT, Some("paid")) - sum(&ledger, MOVE_DRAWDOWN, Some("paid"))
                - sum(&ledger, MOVE_REFUND, None) - sum(&ledger, MOVE_EXPIRY, Some("paid")),
            paid
        );
        let np = |m: &str| sum(&ledger, m, Some("promotional")) + sum(&ledger, m, Some("manual"));
        prop_assert_eq!(np(MOVE_GRANT) - np(MOVE_DRAWDOWN) - np(MOVE_EXPIRY) - np(MOVE_DEBIT), non_paid);
        let drawdowns = sum(&ledger, MOVE_DRAWDOWN, None);
        let arrears = sum(&ledger, MOVE_ARREARS, None);
        prop_assert_eq!(drawdowns + arrears, charges);
        prop_assert_eq!(arrears + sum(&ledger, MOVE_DEBIT, Some("")), acc.arrears);
        let expired = sum(&ledger, MOVE_EXPIRY, None);
        prop_assert_eq!(w.balance("t", "USD"), adjustments - charges - expired);
        prop_assert_eq!(w.balance("t", "USD"), paid + non_paid - acc.arrears);
        for g in &acc.grants {
            prop_assert!(g.remaining >= Decimal::ZERO);
            prop_assert!(g.expires_at.is_none_or(|e| e > clock), "a grant past the watermark was not expired");
        }
        let ids: std::collections::BTreeSet<&str> = ledger.iter().map(|e| e.entry_id.as_str()).collect();
        prop_assert_eq!(ids.len(), ledger.len(), "ledger entry ids are unique");
    }

    /// Burn order against a reference: with grants and positive charges only, each charge
    /// takes from the grant a naive re-sort names first.
    #[test]
    fn drawdown_follows_the_reference_burn_order(
        grants in prop::collection::vec((1i64..1_000, -2..3i32, prop::option::of(1i64..5)), 1..8),
        charges in prop::collection::vec(1i64..800, 1..10),
    ) {
        let mut w = Wallets::default();
        let mut reference: Vec<(i32, i64, usize, Decimal)> = Vec::new();
        for (i, (amount, priority, expires)) in grants.iter().enumerate() {
            let expires = expires.map(|e| e * 1_000_000);
            w.apply_adjustment(&adj(&format!("g{i}"), "paid", Decimal::from(*amount), *priority, expires, 0)).unwrap();
            reference.push((*priority, expires.unwrap_or(i64::MAX), i, Decimal::from(*amount)));
        }
        w.take_ledger();
        for (n, c) in charges.iter().enumerate() {
            w.apply_charge_at(&charge(&format!("c{n}"), Decimal::from(*c)), Some(0));
            let mut left = Decimal::from(*c);
            let mut want = Vec::new();
            while left > Decimal::ZERO {
                let Some(best) = reference.iter_mut().filter(|r| r.3 > Decimal::ZERO)
                    .min_by(|a, b| (-a.0, a.1, a.2).cmp(&(-b.0, b.1, b.2))) else { break };
                let take = left.min(best.3);
                best.3 -= take;
                left -= take;
                want.push((format!("g{}", best.2), take));
            }
            let got: Vec<(String, Decimal)> = w.take_ledger().into_iter()
                .filter(|e| e.movement == MOVE_DRAWDOWN).map(|e| (e.grant_key, e.amount)).collect();
            prop_assert_eq!(got, want);
        }
    }
}
