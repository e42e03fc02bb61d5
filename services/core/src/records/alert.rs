//! The alerts topic's record (`schemas/avro/alert.v1.avsc`): one schema for the wallet's
//! balance crossings, the spend-limit crossings and expired credit, so consumers decode one
//! type with the same codec and checks as every other topic instead of guessing JSON shapes.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::names::check_alert_kind;
use super::AvroRecord;
use crate::decimal::check_storable;
use crate::rating::{Alert, CreditKind, LedgerEntry, MOVE_EXPIRY};
use crate::schema::{self, Known};
use crate::Error;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// Deterministic: a replay publishes the same id (consumers dedupe on it).
    pub alert_id: String,
    /// An [`AlertKind`](super::AlertKind) name (checked on encode and decode).
    pub kind: String,
    pub tenant: String,
    pub currency: String,
    /// Crossings: the balance (limits: the period's spend) right after the crossing.
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub balance: Option<Decimal>,
    /// Crossings: the threshold or limit crossed.
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub threshold: Option<Decimal>,
    /// Expired credit: the unused remainder.
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub amount: Option<Decimal>,
    /// Expired credit: the [`CreditKind`] of the grant.
    #[serde(default)]
    pub credit_kind: Option<String>,
    /// Crossings: the charge id or idempotency key that caused it; expired credit: the grant.
    pub trigger: String,
    /// Event time of a wallet crossing or an expiry; publication time of a limit crossing
    /// (the balance desk has no event time).
    pub at: i64,
}

impl AlertRecord {
    /// A balance or spend-limit crossing at `at_ms`.
    pub fn crossing(a: &Alert, at_ms: i64) -> Self {
        Self {
            alert_id: a.alert_id.clone(),
            kind: a.kind.clone(),
            tenant: a.tenant.clone(),
            currency: a.currency.clone(),
            balance: Some(a.balance),
            threshold: Some(a.threshold),
            amount: None,
            credit_kind: None,
            trigger: a.trigger.clone(),
            at: at_ms,
        }
    }

    /// The announcement of an expiry movement of the credit ledger; `None` for other moves.
    pub fn expired(e: &LedgerEntry) -> Option<Self> {
        (e.movement == MOVE_EXPIRY).then(|| Self {
            alert_id: e.entry_id.clone(),
            kind: super::AlertKind::CreditExpired.as_str().to_owned(),
            tenant: e.tenant.clone(),
            currency: e.currency.clone(),
            balance: None,
            threshold: None,
            amount: Some(e.amount),
            credit_kind: Some(e.credit_kind.clone()),
            trigger: e.grant_key.clone(),
            at: e.at_ms,
        })
    }
}

impl AvroRecord for AlertRecord {
    fn known() -> &'static Known {
        schema::alert_v1()
    }
    fn check_decimals(&self) -> Result<(), Error> {
        for (field, v) in [("balance", &self.balance), ("threshold", &self.threshold), ("amount", &self.amount)] {
            if let Some(v) = v {
                check_storable(field, v)?;
            }
        }
        Ok(())
    }
    fn check_names(&self) -> Result<(), Error> {
        check_alert_kind(&self.kind)?;
        match &self.credit_kind {
            Some(k) if CreditKind::parse(k).is_none() => {
                Err(Error::UnknownName { field: "credit_kind", value: k.clone() })
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::AlertKind;

    fn crossing() -> AlertRecord {
        let a = Alert {
            alert_id: "al-1".into(),
            tenant: "acme".into(),
            currency: "USD".into(),
            kind: AlertKind::LowBalance.as_str().into(),
            balance: Decimal::new(-25, 1),
            threshold: Decimal::from(10),
            trigger: "ch-9".into(),
        };
        AlertRecord::crossing(&a, 1_764_000_000_000)
    }

    #[test]
    fn crossings_and_expiries_round_trip() {
        let c = crossing();
        assert_eq!(AlertRecord::from_avro(&c.to_avro().unwrap()).unwrap(), c);
        let e = LedgerEntry {
            entry_id: "le-1".into(),
            tenant: "acme".into(),
            currency: "USD".into(),
            at_ms: 1_765_000_000_000,
            movement: MOVE_EXPIRY.into(),
            credit_kind: "promotional".into(),
            grant_key: "promo-1".into(),
            source: String::new(),
            amount: Decimal::new(5_000_000_001, 9),
        };
        let x = AlertRecord::expired(&e).unwrap();
        assert_eq!((x.kind.as_str(), x.amount, x.balance, x.at), ("credit_expired", Some(e.amount), None, e.at_ms));
        assert_eq!(AlertRecord::from_avro(&x.to_avro().unwrap()).unwrap(), x);
        assert_eq!(AlertRecord::expired(&LedgerEntry { movement: "grant".into(), ..e }), None);
    }

    #[test]
    fn unknown_kinds_are_refused() {
        let mut c = crossing();
        c.kind = "balance_low".into();
        assert_eq!(c.to_avro(), Err(Error::UnknownName { field: "kind", value: "balance_low".into() }));
        let mut c = crossing();
        c.credit_kind = Some("gift".into());
        assert_eq!(c.to_avro(), Err(Error::UnknownName { field: "credit_kind", value: "gift".into() }));
    }
}
