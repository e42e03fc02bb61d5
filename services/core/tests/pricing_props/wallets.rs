//! Wallet examples: dedup of adjustments, alerts on edges.

use super::*;

// ---------------------------------------------------------------------------------------------

pub(super) fn adj(key: &str, amount: &str) -> WalletAdjustment {
    WalletAdjustment {
        idempotency_key: key.into(),
        tenant: "t".into(),
        currency: "USD".into(),
        amount: d(amount),
        kind: "top_up".into(),
        reason: "test".into(),
        created_at: 0,
        expires_at: None,
        priority: 0,
    }
}

/// A charge as wallets see it (the rest is the rater's business).
pub(super) fn charge(id: &str, amount: &str) -> Charge {
    Charge {
        charge_id: id.into(),
        kind: KIND_USAGE.into(),
        tenant: "t".into(),
        currency: "USD".into(),
        window_end: MINUTE,
        amount: d(amount),
        margin: d(amount),
        ..Charge::default()
    }
}

#[test]
fn wallets_dedupe_and_alert_on_edges() {
    let cfg = WalletConfig { low_balance: [("USD".to_string(), d("10"))].into(), ..Default::default() };
    let mut w = Wallets::new(cfg);
    assert!(matches!(w.apply_adjustment(&adj("pay_1", "25")).unwrap(), AdjustmentOutcome::Applied { balance, .. } if balance == d("25")));
    assert_eq!(
        w.apply_adjustment(&adj("pay_1", "25")).unwrap(),
        AdjustmentOutcome::Duplicate { idempotency_key: "pay_1".into(), conflicting: false }
    );
    assert_eq!(
        w.apply_adjustment(&adj("pay_1", "30")).unwrap(),
        AdjustmentOutcome::Duplicate { idempotency_key: "pay_1".into(), conflicting: true }
    );
    assert!(w.apply_charge(&charge("c1", "10")).is_empty()); // 15
    let a = w.apply_charge(&charge("c2", "5")); // 10: crosses low_balance
    assert_eq!(a.len(), 1);
    assert_eq!((a[0].kind.as_str(), a[0].balance, a[0].threshold), (ALERT_LOW_BALANCE, d("10"), d("10")));
    assert!(w.apply_charge(&charge("c3", "1")).is_empty()); // 9: still low, no repeat
    let a = w.apply_charge(&charge("c4", "12")); // -3: exhausted
    assert_eq!(a.iter().map(|x| x.kind.as_str()).collect::<Vec<_>>(), vec![ALERT_EXHAUSTED]);
    // Re-armed by a top-up above both thresholds; one charge then crosses both.
    w.apply_adjustment(&adj("pay_2", "20")).unwrap(); // 17
    let a = w.apply_charge(&charge("c5", "17.5")); // -0.5
    assert_eq!(a.iter().map(|x| x.kind.as_str()).collect::<Vec<_>>(), vec![ALERT_LOW_BALANCE, ALERT_EXHAUSTED]);
    assert_ne!(a[0].alert_id, a[1].alert_id);
    assert_eq!(w.balance("t", "USD"), d("-0.5"));
    assert_eq!(w.duplicates(), 2);
    // A tenant that never had a balance raises no alerts when charged.
    let mut other = charge("c6", "3");
    other.tenant = "postpaid".into();
    assert!(w.apply_charge(&other).is_empty());
    assert_eq!(round_trip(&w), w);
}
