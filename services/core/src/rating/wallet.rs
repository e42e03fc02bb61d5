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
//! * **Credit grants** (see [`CreditKind`]): every positive adjustment is a *grant* of a kind
//!   (`paid`, `promotional`, `manual`), with an optional expiry and a priority. Charges draw
//!   grants down in burn order: highest priority first, then earliest expiry (never-expiring
//!   last), then oldest. What no grant covers is *arrears* (owed, invoiced in arrears; the
//!   balance goes negative). A negative charge (a credit) first reduces arrears, then refills
//!   the grants it drew from in reverse burn order, and any rest is a credit balance
//!   (negative arrears) that the next charges use first. Grants expire on the rater's event-time watermark ([`Wallets::expire`]), never
//!   on the wall clock, so a replay expires the same grants at the same point.
//! * **Ledger.** Every movement of credit is a [`LedgerEntry`] (taken with
//!   [`Wallets::take_ledger`]): under ASC 606 / IFRS 15 paid credit is deferred revenue until
//!   drawn (recognised) or expired (breakage) or refunded; promotional and manual credit is
//!   not revenue. Per tenant and currency, always:
//!   `Σ paid grants - Σ paid drawdowns - Σ refunds - Σ paid expiries = unused paid credit`, and
//!   `Σ drawdowns + Σ arrears = Σ charges`.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::stable_id;
use crate::records::{AlertKind, Charge, WalletAdjustment};
use crate::Error;

pub const ALERT_LOW_BALANCE: &str = AlertKind::LowBalance.as_str();
/// Ledger movements ([`LedgerEntry::movement`]).
pub const MOVE_GRANT: &str = "grant";
pub const MOVE_DRAWDOWN: &str = "drawdown";
pub const MOVE_REFUND: &str = "refund";
pub const MOVE_EXPIRY: &str = "expiry";
pub const MOVE_ARREARS: &str = "arrears";
pub const MOVE_DEBIT: &str = "debit";
pub const ALERT_EXHAUSTED: &str = AlertKind::Exhausted.as_str();

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

impl Account {
    fn insert(&mut self, g: Grant) {
        let at = self.grants.partition_point(|x| x.burn_key() <= g.burn_key());
        self.grants.insert(at, g);
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

/// What an adjustment is, for revenue recognition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CreditKind {
    /// Bought credit: deferred revenue until consumed, refunded or expired (breakage).
    Paid,
    /// Given away: never revenue, its consumption is a discount.
    Promotional,
    /// Returns unused paid credit (amount negative).
    Refund,
    /// An operator's correction; positive is non-revenue credit, negative a debit of
    /// non-paid credit (then arrears).
    Manual,
}

impl CreditKind {
    /// The kind of an adjustment's `kind` field; `top_up` and `adjustment` are the v1 names.
    pub fn parse(kind: &str) -> Option<Self> {
        match kind {
            "paid" | "top_up" => Some(Self::Paid),
            "promotional" => Some(Self::Promotional),
            "refund" => Some(Self::Refund),
            "manual" | "adjustment" => Some(Self::Manual),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Paid => "paid",
            Self::Promotional => "promotional",
            Self::Refund => "refund",
            Self::Manual => "manual",
        }
    }
}

/// One grant of credit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The adjustment's idempotency key.
    pub key: String,
    pub kind: CreditKind,
    pub granted: Decimal,
    pub remaining: Decimal,
    /// Net amount charges drew from it (what a credit may refill).
    pub drawn: Decimal,
    pub priority: i32,
    pub expires_at: Option<i64>,
    /// Arrival order, the last tie-breaker.
    pub seq: u64,
}

impl Grant {
    fn burn_key(&self) -> (i32, i64, u64) {
        (-self.priority, self.expires_at.unwrap_or(i64::MAX), self.seq)
    }
}

/// Grants and arrears of one tenant in one currency.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// In burn order.
    pub grants: Vec<Grant>,
    /// Owed: charges and debits no grant covered.
    pub arrears: Decimal,
}

impl Account {
    /// Unused credit of a kind.
    pub fn unused(&self, kind: CreditKind) -> Decimal {
        self.grants.iter().filter(|g| g.kind == kind).map(|g| g.remaining).sum()
    }
}

/// One movement of credit; see the module docs. Amounts are positive in the direction the
/// movement names (a drawdown or arrears entry of a credit note is negative).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub entry_id: String,
    pub tenant: String,
    pub currency: String,
    /// Event time of the movement (adjustment `created_at`, the rater's watermark for a
    /// charge, the grant's expiry for an expiry).
    pub at_ms: i64,
    /// One of the `MOVE_*` constants.
    pub movement: String,
    /// Kind of the grant moved (`paid`, `promotional`, `manual`); empty for arrears.
    pub credit_kind: String,
    pub grant_key: String,
    /// The charge id or idempotency key that caused it (empty for an expiry).
    pub source: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
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
    /// tenant -> currency -> grants and arrears.
    #[serde(default)]
    accounts: BTreeMap<String, BTreeMap<String, Account>>,
    #[serde(default)]
    grant_seq: u64,
    /// Grants expiring at or before this have been expired.
    #[serde(default)]
    expired_to: Option<i64>,
    /// Movements not yet taken (output, not state: the rater takes them after every call).
    #[serde(skip)]
    ledger: Pending,
}

/// Output waiting to be taken: not part of the state, so not snapshotted and not compared
/// (a restored state equals the one it was taken from).
#[derive(Debug, Clone, Default)]
struct Pending(Vec<LedgerEntry>);

impl PartialEq for Pending {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Pending {}

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
    /// on an empty tenant, key or currency, an amount beyond 1e18, an unknown kind, or a
    /// `refund` that is not negative.
    ///
    /// A positive amount is a grant of its kind; a negative `paid`/`refund` returns paid
    /// credit (burn order, then other credit, then arrears); any other negative amount is a
    /// debit of non-paid credit first, then arrears. Paid credit is only ever moved by grants,
    /// charges, refunds and expiry, which is what keeps the deferred-revenue roll-forward exact.
    pub fn apply_adjustment(&mut self, adj: &WalletAdjustment) -> Result<AdjustmentOutcome, Error> {
        let bad = |reason: &str| Error::Config(format!("wallet adjustment {:?}: {reason}", adj.idempotency_key));
        if adj.tenant.is_empty() || adj.idempotency_key.is_empty() || adj.currency.is_empty() {
            return Err(bad("tenant, idempotency_key and currency must be non-empty"));
        }
        if adj.amount.abs() > Decimal::from(MAX_ADJUSTMENT) {
            return Err(bad("amount beyond 1e18"));
        }
        let Some(kind) = CreditKind::parse(&adj.kind) else {
            return Err(bad("kind must be paid, promotional, refund or manual (or v1's top_up, adjustment)"));
        };
        if kind == CreditKind::Refund && adj.amount >= Decimal::ZERO {
            return Err(bad("a refund's amount must be negative"));
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
        let mut alerts = self.add(&adj.tenant, &adj.currency, adj.amount, &adj.idempotency_key).1;
        let at = adj.created_at;
        let key = adj.idempotency_key.as_str();
        if adj.amount > Decimal::ZERO {
            let seq = self.next_seq();
            let grant = Grant {
                key: key.to_owned(),
                kind,
                granted: adj.amount,
                remaining: adj.amount,
                drawn: Decimal::ZERO,
                priority: adj.priority,
                expires_at: adj.expires_at,
                seq,
            };
            self.entry(&adj.tenant, &adj.currency, at, MOVE_GRANT, kind, key, key, adj.amount);
            self.account(&adj.tenant, &adj.currency).insert(grant);
            // A grant already past its expiry is breakage at once.
            if let Some(wm) = self.expired_to {
                alerts.extend(self.expire_account(&adj.tenant, &adj.currency, wm));
            }
        } else if adj.amount < Decimal::ZERO {
            let refund = matches!(kind, CreditKind::Paid | CreditKind::Refund);
            self.debit(&adj.tenant, &adj.currency, at, -adj.amount, refund, key);
        }
        Ok(AdjustmentOutcome::Applied { balance: self.balance(&adj.tenant, &adj.currency), alerts })
    }

    /// Draws a charge's amount from its tenant's balance in its currency (a negative amount,
    /// a credit, adds to it), without expiring anything. Returns the alerts it triggered.
    pub fn apply_charge(&mut self, charge: &Charge) -> Vec<Alert> {
        self.apply_charge_at(charge, None)
    }

    /// Like [`apply_charge`](Self::apply_charge), first expiring the grants that expire at or
    /// before `at_ms` (the rater's watermark when it rated the charge), so a charge never
    /// draws credit that had expired by then. Saturates at `Decimal`'s limits instead of
    /// panicking (unreachable with bounded adjustments and rated charges).
    pub fn apply_charge_at(&mut self, charge: &Charge, at_ms: Option<i64>) -> Vec<Alert> {
        let mut alerts = match at_ms {
            Some(t) => self.expire(t),
            None => Vec::new(),
        };
        let at = at_ms.or(self.expired_to).unwrap_or(charge.window_end);
        let (tenant, currency, id) = (charge.tenant.as_str(), charge.currency.as_str(), charge.charge_id.as_str());
        alerts.extend(self.add(tenant, currency, -charge.amount, id).1);
        if charge.amount > Decimal::ZERO {
            let mut left = charge.amount;
            let mut moves = Vec::new();
            let acc = self.account(tenant, currency);
            // A credit balance from earlier credit notes is used first.
            let from_credit = left.min((-acc.arrears).max(Decimal::ZERO));
            acc.arrears = crate::decimal::unsigned_zero(acc.arrears + from_credit);
            left -= from_credit;
            for g in acc.grants.iter_mut().filter(|g| g.remaining > Decimal::ZERO) {
                let take = left.min(g.remaining);
                g.remaining -= take;
                g.drawn += take;
                left -= take;
                moves.push((g.kind, g.key.clone(), take));
                if left.is_zero() {
                    break;
                }
            }
            if left > Decimal::ZERO {
                acc.arrears += left;
            }
            if !from_credit.is_zero() {
                self.entry_raw(tenant, currency, at, MOVE_ARREARS, "", "credit", id, from_credit);
            }
            for (kind, key, take) in moves {
                self.entry(tenant, currency, at, MOVE_DRAWDOWN, kind, &key, id, take);
            }
            if left > Decimal::ZERO {
                self.entry_raw(tenant, currency, at, MOVE_ARREARS, "", "", id, left);
            }
        } else if charge.amount < Decimal::ZERO {
            let mut left = -charge.amount;
            let acc = self.account(tenant, currency);
            let from_arrears = left.min(acc.arrears.max(Decimal::ZERO));
            acc.arrears = crate::decimal::unsigned_zero(acc.arrears - from_arrears);
            left -= from_arrears;
            let mut moves = Vec::new();
            for g in acc.grants.iter_mut().rev().filter(|g| g.drawn > Decimal::ZERO) {
                if left.is_zero() {
                    break;
                }
                let back = left.min(g.drawn);
                g.drawn -= back;
                g.remaining += back;
                left -= back;
                moves.push((g.kind, g.key.clone(), back));
            }
            if !from_arrears.is_zero() {
                self.entry_raw(tenant, currency, at, MOVE_ARREARS, "", "", id, -from_arrears);
            }
            for (kind, key, back) in moves {
                self.entry(tenant, currency, at, MOVE_DRAWDOWN, kind, &key, id, -back);
            }
            if left > Decimal::ZERO {
                // More credit than was ever drawn or owed: a credit balance (negative
                // arrears) that the next charges use first.
                self.account(tenant, currency).arrears -= left;
                self.entry_raw(tenant, currency, at, MOVE_ARREARS, "", "credit", id, -left);
            }
        }
        alerts
    }

    /// Expires every grant whose expiry is at or before `watermark_ms` (never moves back):
    /// its remainder leaves the balance as an `expiry` entry dated at the grant's expiry.
    pub fn expire(&mut self, watermark_ms: i64) -> Vec<Alert> {
        let wm = self.expired_to.map_or(watermark_ms, |w| w.max(watermark_ms));
        self.expired_to = Some(wm);
        let due: Vec<(String, String)> = self
            .accounts
            .iter()
            .flat_map(|(t, m)| {
                m.iter()
                    .filter(|(_, a)| a.grants.iter().any(|g| g.expires_at.is_some_and(|e| e <= wm)))
                    .map(move |(c, _)| (t.clone(), c.clone()))
            })
            .collect();
        let mut alerts = Vec::new();
        for (t, c) in due {
            alerts.extend(self.expire_account(&t, &c, wm));
        }
        alerts
    }

    fn expire_account(&mut self, tenant: &str, currency: &str, wm: i64) -> Vec<Alert> {
        let acc = self.account(tenant, currency);
        let mut gone = Vec::new();
        acc.grants.retain(|g| {
            let due = g.expires_at.is_some_and(|e| e <= wm);
            if due && g.remaining > Decimal::ZERO {
                gone.push((g.kind, g.key.clone(), g.remaining, g.expires_at.unwrap_or(wm)));
            }
            !due
        });
        let mut alerts = Vec::new();
        for (kind, key, amount, at) in gone {
            self.entry(tenant, currency, at, MOVE_EXPIRY, kind, &key, "", amount);
            alerts.extend(self.add(tenant, currency, -amount, &format!("expiry:{key}")).1);
        }
        alerts
    }

    /// Removes `amount` (> 0) of credit: a refund takes paid grants first, a debit non-paid
    /// ones; a refund then takes other credit, and what is left is arrears.
    fn debit(&mut self, tenant: &str, currency: &str, at: i64, amount: Decimal, refund: bool, source: &str) {
        let mut left = amount;
        let mut moves = Vec::new();
        let acc = self.account(tenant, currency);
        let passes: &[bool] = if refund { &[true, false] } else { &[false] };
        for &paid_pass in passes {
            for g in acc.grants.iter_mut().filter(|g| (g.kind == CreditKind::Paid) == paid_pass) {
                if left.is_zero() {
                    break;
                }
                let take = left.min(g.remaining);
                if take.is_zero() {
                    continue;
                }
                g.remaining -= take;
                left -= take;
                let movement = if g.kind == CreditKind::Paid { MOVE_REFUND } else { MOVE_DEBIT };
                moves.push((movement, g.kind, g.key.clone(), take));
            }
        }
        if left > Decimal::ZERO {
            acc.arrears += left;
        }
        for (movement, kind, key, take) in moves {
            self.entry(tenant, currency, at, movement, kind, &key, source, take);
        }
        if left > Decimal::ZERO {
            self.entry_raw(tenant, currency, at, MOVE_DEBIT, "", "", source, left);
        }
    }

    /// The ledger entries produced since the last call.
    pub fn take_ledger(&mut self) -> Vec<LedgerEntry> {
        std::mem::take(&mut self.ledger.0)
    }

    /// Grants and arrears of a tenant in a currency.
    pub fn account_of(&self, tenant: &str, currency: &str) -> Option<&Account> {
        self.accounts.get(tenant).and_then(|m| m.get(currency))
    }

    /// All accounts: tenant -> currency -> account.
    pub fn accounts(&self) -> &BTreeMap<String, BTreeMap<String, Account>> {
        &self.accounts
    }

    fn account(&mut self, tenant: &str, currency: &str) -> &mut Account {
        self.accounts.entry(tenant.to_owned()).or_default().entry(currency.to_owned()).or_default()
    }

    fn next_seq(&mut self) -> u64 {
        self.grant_seq += 1;
        self.grant_seq
    }

    #[allow(clippy::too_many_arguments)]
    fn entry(&mut self, tenant: &str, currency: &str, at: i64, movement: &str, kind: CreditKind, key: &str, source: &str, amount: Decimal) {
        self.entry_raw(tenant, currency, at, movement, kind.as_str(), key, source, amount);
    }

    #[allow(clippy::too_many_arguments)]
    fn entry_raw(&mut self, tenant: &str, currency: &str, at: i64, movement: &str, kind: &str, key: &str, source: &str, amount: Decimal) {
        // Unique: a source moves a grant at most once per movement (arrears have no grant).
        let entry_id = stable_id(&[b"ledger", tenant.as_bytes(), currency.as_bytes(), movement.as_bytes(), key.as_bytes(), source.as_bytes()]);
        self.ledger.0.push(LedgerEntry {
            entry_id,
            tenant: tenant.to_owned(),
            currency: currency.to_owned(),
            at_ms: at,
            movement: movement.to_owned(),
            credit_kind: kind.to_owned(),
            grant_key: key.to_owned(),
            source: source.to_owned(),
            amount,
        });
    }

    fn add(&mut self, tenant: &str, currency: &str, amount: Decimal, trigger: &str) -> (Decimal, Vec<Alert>) {
        let slot = self
            .balances
            .entry(tenant.to_owned())
            .or_default()
            .entry(currency.to_owned())
            .or_default();
        let before = *slot;
        let after = crate::decimal::unsigned_zero(before.saturating_add(amount));
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

    /// Wallets checkpointed before credit grants existed (balances but no accounts) get each
    /// positive balance as one non-expiring paid grant and each negative one as arrears, so
    /// balances and the ledger stay consistent. A no-op on wallets with accounts.
    pub(crate) fn adopt_legacy_balances(mut self) -> Self {
        let w = &mut self;
        let legacy: Vec<(String, String, Decimal)> = w
            .balances
            .iter()
            .flat_map(|(t, m)| m.iter().map(move |(c, b)| (t.clone(), c.clone(), *b)))
            .filter(|(t, c, _)| w.account_of(t, c).is_none())
            .collect();
        for (t, c, b) in legacy {
            let seq = w.next_seq();
            let acc = w.account(&t, &c);
            if b > Decimal::ZERO {
                acc.insert(Grant {
                    key: "legacy-balance".into(),
                    kind: CreditKind::Paid,
                    granted: b,
                    remaining: b,
                    drawn: Decimal::ZERO,
                    priority: 0,
                    expires_at: None,
                    seq,
                });
            } else {
                acc.arrears = -b;
            }
        }
        self
    }
}
