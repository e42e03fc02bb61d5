//! Prepaid wallets: balances drawn down by charges as they are produced.
//!
//! * Balances are per tenant and currency. A charge in a currency the tenant has never
//!   topped up still draws it down (the balance goes negative: usage is owed either way), but
//!   raises no alert, because alerts fire only on a *crossing*.
//! * Adjustments ([`WalletAdjustment`]: top-ups, refunds, corrections; any sign) are applied
//!   once per `(tenant, idempotency_key)`: the producer of adjustments retries, and a retried
//!   top-up must not credit twice. A duplicate is reported, and flagged `conflicting` when it
//!   carries a different currency or amount than the original (a client bug worth an alert).
//! * Charges are not deduplicated here: [`super::RatingState`] emits each charge once and the
//!   rater checkpoints both structures together.
//! * Alerts are edge-triggered: `low_balance` when the balance goes from above the tenant's
//!   (or the currency's) threshold to at or below it, `exhausted` when it goes from above zero
//!   to at or below zero. Going back above re-arms them. Their ids are a hash of (tenant,
//!   currency, kind, the id of the charge or adjustment that crossed), so a replay of the same
//!   input produces the same ids.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{from_snapshot, stable_id, to_snapshot};
use crate::records::{Charge, WalletAdjustment};
use crate::Error;

pub const ALERT_LOW_BALANCE: &str = "low_balance";
pub const ALERT_EXHAUSTED: &str = "exhausted";

/// Largest adjustment magnitude accepted; keeps balances far from `Decimal`'s limits.
const MAX_ADJUSTMENT: i64 = 1_000_000_000_000_000_000; // 1e18

/// Alert thresholds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletConfig {
    /// Per currency: `low_balance` fires when a balance falls to or below this.
    #[serde(default)]
    pub low_balance: BTreeMap<String, Decimal>,
    /// Per tenant, per currency: overrides `low_balance`.
    #[serde(default)]
    pub tenant_low_balance: BTreeMap<String, BTreeMap<String, Decimal>>,
}

impl WalletConfig {
    fn low_threshold(&self, tenant: &str, currency: &str) -> Option<Decimal> {
        self.tenant_low_balance
            .get(tenant)
            .and_then(|m| m.get(currency))
            .or_else(|| self.low_balance.get(currency))
            .copied()
    }
}

/// A balance crossing a threshold downward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub alert_id: String,
    pub tenant: String,
    pub currency: String,
    /// [`ALERT_LOW_BALANCE`] or [`ALERT_EXHAUSTED`].
    pub kind: String,
    /// Balance right after the crossing.
    pub balance: Decimal,
    pub threshold: Decimal,
    /// The charge id or idempotency key that caused the crossing.
    pub trigger: String,
}

/// What applying an adjustment did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdjustmentOutcome {
    Applied { balance: Decimal, alerts: Vec<Alert> },
    /// Already applied; ignored.
    Duplicate { idempotency_key: String, conflicting: bool },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    currency: String,
    amount: Decimal,
}

/// All wallets of one rater partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wallets {
    config: WalletConfig,
    /// tenant -> currency -> balance.
    balances: BTreeMap<String, BTreeMap<String, Decimal>>,
    /// tenant -> idempotency key -> what it applied.
    seen: BTreeMap<String, BTreeMap<String, Seen>>,
    duplicates: u64,
}

impl Wallets {
    pub fn new(config: WalletConfig) -> Self {
        Self { config, ..Self::default() }
    }

    pub fn config(&self) -> &WalletConfig {
        &self.config
    }

    /// Balance of a tenant in a currency (zero when never touched).
    pub fn balance(&self, tenant: &str, currency: &str) -> Decimal {
        self.balances
            .get(tenant)
            .and_then(|m| m.get(currency))
            .copied()
            .unwrap_or_default()
    }

    /// All balances: tenant -> currency -> balance.
    pub fn balances(&self) -> &BTreeMap<String, BTreeMap<String, Decimal>> {
        &self.balances
    }

    /// Number of duplicate adjustments ignored so far.
    /// Whether the tenant ever had an adjustment (a prepaid wallet), as opposed to a postpaid
    /// tenant whose balance is only the negative sum of its charges.
    pub fn has_wallet(&self, tenant: &str) -> bool {
        self.seen.contains_key(tenant)
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Applies an adjustment once per `(tenant, idempotency_key)`. Errors (state untouched)
    /// on an empty tenant, key or currency, or an amount beyond 1e18.
    pub fn apply_adjustment(&mut self, adj: &WalletAdjustment) -> Result<AdjustmentOutcome, Error> {
        let bad = |reason: &str| Error::Config(format!("wallet adjustment {:?}: {reason}", adj.idempotency_key));
        if adj.tenant.is_empty() || adj.idempotency_key.is_empty() || adj.currency.is_empty() {
            return Err(bad("tenant, idempotency_key and currency must be non-empty"));
        }
        if adj.amount.abs() > Decimal::from(MAX_ADJUSTMENT) {
            return Err(bad("amount beyond 1e18"));
        }
        let seen = self.seen.entry(adj.tenant.clone()).or_default();
        if let Some(first) = seen.get(&adj.idempotency_key) {
            self.duplicates += 1;
            return Ok(AdjustmentOutcome::Duplicate {
                idempotency_key: adj.idempotency_key.clone(),
                conflicting: first.currency != adj.currency || first.amount != adj.amount,
            });
        }
        seen.insert(adj.idempotency_key.clone(), Seen { currency: adj.currency.clone(), amount: adj.amount });
        let (balance, alerts) = self.add(&adj.tenant, &adj.currency, adj.amount, &adj.idempotency_key);
        Ok(AdjustmentOutcome::Applied { balance, alerts })
    }

    /// Draws a charge's amount from its tenant's balance in its currency (a negative amount,
    /// a credit, adds to it). Returns the alerts it triggered. Saturates at `Decimal`'s
    /// limits instead of panicking (unreachable with bounded adjustments and rated charges).
    pub fn apply_charge(&mut self, charge: &Charge) -> Vec<Alert> {
        self.add(&charge.tenant, &charge.currency, -charge.amount, &charge.charge_id).1
    }

    fn add(&mut self, tenant: &str, currency: &str, amount: Decimal, trigger: &str) -> (Decimal, Vec<Alert>) {
        let slot = self
            .balances
            .entry(tenant.to_owned())
            .or_default()
            .entry(currency.to_owned())
            .or_default();
        let before = *slot;
        let after = before.saturating_add(amount);
        *slot = after;
        let mut alerts = Vec::new();
        let mut check = |kind: &str, threshold: Decimal| {
            if before > threshold && after <= threshold {
                alerts.push(Alert {
                    alert_id: stable_id(&[b"alert", tenant.as_bytes(), currency.as_bytes(), kind.as_bytes(), trigger.as_bytes()]),
                    tenant: tenant.to_owned(),
                    currency: currency.to_owned(),
                    kind: kind.to_owned(),
                    balance: after,
                    threshold,
                    trigger: trigger.to_owned(),
                });
            }
        };
        if let Some(t) = self.config.low_threshold(tenant, currency) {
            check(ALERT_LOW_BALANCE, t);
        }
        check(ALERT_EXHAUSTED, Decimal::ZERO);
        (after, alerts)
    }

    /// Versioned JSON bytes of the wallets (config, balances, seen keys).
    pub fn snapshot(&self) -> Vec<u8> {
        to_snapshot("meterflow.wallets", self)
    }

    pub fn restore(bytes: &[u8]) -> Result<Self, Error> {
        from_snapshot("meterflow.wallets", bytes)
    }
}
