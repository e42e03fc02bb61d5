//! Spend limits per tenant (`[[spend_limit]]` in the catalog).
//!
//! ```toml
//! [[spend_limit]]
//! tenant = "tenant-001"
//! currency = "USD"
//! amount = "250"
//! kind = "hard"        # hard: entitlement checks deny what would pass it; soft: alert only
//! period = "month"     # optional; the calendar-month billing period is the only period
//! ```
//!
//! A limit is about the tenant's usage spend in the current billing period: the settled usage
//! charges of the period plus the pending (provisional, not yet settled) spend. Crossing it
//! upward publishes an alert (`spend_limit_soft` / `spend_limit_hard`) once per period and
//! limit; a hard limit also makes `POST /v1/entitlements/check` deny any request whose price
//! would take the spend past it. True-ups of minimum commitments are not usage spend and do
//! not count.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::fields::{Currency, Period, Quantity, Text};
use crate::records::AlertKind;

/// Alert kinds of a crossed limit.
pub const ALERT_SOFT_LIMIT: &str = AlertKind::SpendLimitSoft.as_str();
pub const ALERT_HARD_LIMIT: &str = AlertKind::SpendLimitHard.as_str();

/// What crossing the limit does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum LimitKind {
    /// Entitlement checks deny; an alert is published when crossed.
    Hard,
    /// Only the alert.
    Soft,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The alert kind published when a limit of this kind is crossed.
    pub fn alert_kind(self) -> &'static str {
        match self {
            Self::Hard => ALERT_HARD_LIMIT,
            Self::Soft => ALERT_SOFT_LIMIT,
        }
    }
}

/// One limit of one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendLimit {
    pub tenant: String,
    pub currency: String,
    /// Usage spend per billing period at which the limit is reached.
    pub amount: Decimal,
    pub kind: LimitKind,
}

/// A limit against the spend so far, as published in a tenant's balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitStatus {
    pub kind: LimitKind,
    pub currency: String,
    /// `month`: the calendar-month billing period is the only period.
    pub period: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// Settled plus pending usage spend of the current period.
    #[serde(with = "rust_decimal::serde::str")]
    pub spent: Decimal,
    /// `amount - spent`, never below zero.
    #[serde(with = "rust_decimal::serde::str")]
    pub remaining: Decimal,
    pub exceeded: bool,
}

impl SpendLimit {
    /// Where `spent` stands against this limit.
    pub fn status(&self, spent: Decimal) -> LimitStatus {
        LimitStatus {
            kind: self.kind,
            currency: self.currency.clone(),
            period: "month".to_owned(),
            amount: self.amount,
            spent,
            remaining: (self.amount - spent).max(Decimal::ZERO),
            exceeded: spent >= self.amount,
        }
    }

    /// Whether moving the spend from `before` to `after` crosses the limit upward (reaching
    /// it counts): the edge that publishes an alert.
    pub fn crossed(&self, before: Decimal, after: Decimal) -> bool {
        before < self.amount && after >= self.amount
    }

    /// Whether a request costing `cost` is allowed under a hard limit with `spent` so far
    /// (a soft limit never denies). Spend may reach the limit exactly.
    pub fn allows(&self, spent: Decimal, cost: Decimal) -> bool {
        self.kind == LimitKind::Soft || spent.checked_add(cost).is_some_and(|s| s <= self.amount)
    }
}

/// `[[spend_limit]]` as written in the catalog.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SpendLimitEntry {
    tenant: Text,
    currency: Currency,
    amount: Quantity,
    kind: LimitKind,
    /// Checked, not kept: the billing period is the only period.
    #[serde(rename = "period")]
    _period: Option<Period>,
}

impl From<SpendLimitEntry> for SpendLimit {
    fn from(e: SpendLimitEntry) -> Self {
        Self { tenant: e.tenant.0, currency: e.currency.0, amount: e.amount.0, kind: e.kind }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::Catalog;

    const BASE: &str = r#"
[[plan]]
id = "p"
currency = "USD"
[[plan.price]]
meter = "m"
model = "per_unit"
unit_price = "1"
"#;

    #[test]
    fn parses_and_validates() {
        let text = format!(
            "{BASE}\n[[spend_limit]]\ntenant = \"a\"\ncurrency = \"USD\"\namount = \"10.5\"\nkind = \"hard\"\nperiod = \"month\"\n\
             [[spend_limit]]\ntenant = \"a\"\ncurrency = \"USD\"\namount = 8\nkind = \"soft\"\n"
        );
        let c = Catalog::from_toml_str(&text).unwrap();
        let l = c.spend_limits("a");
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].kind, l[0].amount), (LimitKind::Hard, Decimal::new(105, 1)));
        assert_eq!((l[1].kind, l[1].amount), (LimitKind::Soft, Decimal::from(8)));
        assert!(c.spend_limits("b").is_empty());
        for bad in [
            "kind = \"firm\"\ntenant = \"a\"\ncurrency = \"USD\"\namount = \"1\"",
            "kind = \"hard\"\ntenant = \"a\"\ncurrency = \"usd\"\namount = \"1\"",
            "kind = \"hard\"\ntenant = \"a\"\ncurrency = \"USD\"\namount = 1.5",
            "kind = \"hard\"\ntenant = \"a\"\ncurrency = \"USD\"\namount = \"1\"\nperiod = \"day\"",
            "kind = \"hard\"\ntenant = \"a\"\ncurrency = \"USD\"\namount = \"1\"\ncolour = \"red\"",
            "kind = \"hard\"\ncurrency = \"USD\"\namount = \"1\"",
        ] {
            let text = format!("{BASE}\n[[spend_limit]]\n{bad}\n");
            assert!(Catalog::from_toml_str(&text).is_err(), "accepted: {bad}");
        }
    }

    #[test]
    fn crossing_and_allowing() {
        let hard = SpendLimit { tenant: "a".into(), currency: "USD".into(), amount: Decimal::from(10), kind: LimitKind::Hard };
        assert!(hard.crossed(Decimal::from(9), Decimal::from(10)));
        assert!(!hard.crossed(Decimal::from(10), Decimal::from(11)), "already reached: no second edge");
        assert!(hard.allows(Decimal::from(9), Decimal::ONE));
        assert!(!hard.allows(Decimal::from(9), Decimal::new(1001, 3)));
        let soft = SpendLimit { kind: LimitKind::Soft, ..hard.clone() };
        assert!(soft.allows(Decimal::from(9), Decimal::from(100)));
        let s = hard.status(Decimal::from(12));
        assert_eq!((s.remaining, s.exceeded), (Decimal::ZERO, true));
    }
}
