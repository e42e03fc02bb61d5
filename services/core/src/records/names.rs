//! The closed sets of names that records carry as Avro `string`s: charge kinds, dead-letter
//! reasons, aggregations and alert kinds. The wire type stays `string` (an Avro reader with an `enum`
//! schema cannot resolve data written as `string`, so turning the field into an `enum` would
//! strand every record already on the topics); instead [`AvroRecord`](super::AvroRecord)
//! refuses a name outside these enums when it encodes and when it decodes, so a typo in our
//! code or a foreign writer fails loudly at the boundary instead of becoming a new
//! ClickHouse `kind` nobody sums. docs/design.md "Wire format" records the choice.

use strum::VariantArray;

use crate::event::RejectReason;
use crate::meter::Aggregation;
use crate::Error;

/// What a charge is for: the `kind` of a `Charge` record and of the `charges` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, strum::VariantArray)]
pub enum ChargeKind {
    /// Priced usage of one aggregate revision (a restatement charges the delta).
    Usage,
    /// The difference between a period's minimum commitment and its usage revenue.
    TrueUp,
}

impl ChargeKind {
    /// Every name, in declaration order (as `RejectReason::ALL`), without naming strum.
    pub const ALL: &'static [Self] = Self::VARIANTS;

    /// `const` so the string constants (`rating::KIND_USAGE`) are these names, not copies.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Usage => "usage",
            Self::TrueUp => "true_up",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::VARIANTS.iter().copied().find(|k| k.as_str() == s)
    }
}

/// Why the rater dead-lettered an input record (the aggregator's reasons are
/// [`RejectReason`]). `unpriced` and `overflow` are [`ParkReason`](crate::rating::ParkReason)s,
/// `future_window` and `bad_seq` the admission screen's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, strum::VariantArray)]
pub enum RaterReason {
    /// Not an aggregate in any known schema (or a name outside these enums).
    Undecodable,
    /// Without a valid tag of the deployment's record key: not written by our aggregator.
    Unauthenticated,
    /// A window or watermark too far ahead of the broker's clock.
    FutureWindow,
    /// A `seq` too far past its source partition's high water, or not positive.
    BadSeq,
    /// No plan or price (parked until the catalog has one).
    Unpriced,
    /// A decimal computation that does not fit (parked).
    Overflow,
    /// Cannot be rated at all (finalized period, malformed window).
    Unrateable,
    /// A wallet adjustment the wallets refused.
    InvalidAdjustment,
}

impl RaterReason {
    /// Every name, in declaration order (as `RejectReason::ALL`), without naming strum.
    pub const ALL: &'static [Self] = Self::VARIANTS;

    /// `const` so the string constants (`rating::REASON_BAD_SEQ`) are these names.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Undecodable => "undecodable",
            Self::Unauthenticated => "unauthenticated",
            Self::FutureWindow => "future_window",
            Self::BadSeq => "bad_seq",
            Self::Unpriced => "unpriced",
            Self::Overflow => "overflow",
            Self::Unrateable => "unrateable",
            Self::InvalidAdjustment => "invalid_adjustment",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::VARIANTS.iter().copied().find(|r| r.as_str() == s)
    }
}

/// What an alert on the alerts topic announces (the `kind` of an `Alert` record and of the
/// `wallet_alerts` table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, strum::VariantArray)]
pub enum AlertKind {
    /// A prepaid balance fell to or below its low-balance threshold.
    LowBalance,
    /// A prepaid balance reached zero or below.
    Exhausted,
    /// A period's spend crossed a soft limit (alert only).
    SpendLimitSoft,
    /// A period's spend crossed a hard limit (entitlement checks deny).
    SpendLimitHard,
    /// Credit expired unused (breakage).
    CreditExpired,
}

impl AlertKind {
    /// Every name, in declaration order, without naming strum.
    pub const ALL: &'static [Self] = Self::VARIANTS;

    /// `const` so the string constants (`rating::ALERT_LOW_BALANCE`) are these names.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::LowBalance => "low_balance",
            Self::Exhausted => "exhausted",
            Self::SpendLimitSoft => "spend_limit_soft",
            Self::SpendLimitHard => "spend_limit_hard",
            Self::CreditExpired => "credit_expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::VARIANTS.iter().copied().find(|k| k.as_str() == s)
    }
}

/// The `reason` of a dead letter: one of the aggregator's or one of the rater's (both write
/// the same `DeadLetter` record; `undecodable` and `unauthenticated` are in both sets and
/// mean the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    Aggregator(RejectReason),
    Rater(RaterReason),
}

impl DeadLetterReason {
    pub fn parse(s: &str) -> Option<Self> {
        RejectReason::parse(s).map(Self::Aggregator).or_else(|| RaterReason::parse(s).map(Self::Rater))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aggregator(r) => r.as_str(),
            Self::Rater(r) => r.as_str(),
        }
    }
}

/// Fails with [`Error::UnknownName`] unless `value` is one of the names `parse` knows.
pub(crate) fn check_name<T>(field: &'static str, value: &str, parse: impl Fn(&str) -> Option<T>) -> Result<(), Error> {
    match parse(value) {
        Some(_) => Ok(()),
        None => Err(Error::UnknownName { field, value: value.to_owned() }),
    }
}

pub(crate) fn check_charge_kind(kind: &str) -> Result<(), Error> {
    check_name("kind", kind, ChargeKind::parse)
}

pub(crate) fn check_alert_kind(kind: &str) -> Result<(), Error> {
    check_name("kind", kind, AlertKind::parse)
}

pub(crate) fn check_reason(reason: &str) -> Result<(), Error> {
    check_name("reason", reason, DeadLetterReason::parse)
}

pub(crate) fn check_aggregation(aggregation: &str) -> Result<(), Error> {
    check_name("aggregation", aggregation, Aggregation::parse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::limits::{ALERT_HARD_LIMIT, ALERT_SOFT_LIMIT};
    use crate::rating::{
        ParkReason, ALERT_EXHAUSTED, ALERT_LOW_BALANCE, KIND_TRUE_UP, KIND_USAGE, REASON_BAD_SEQ, REASON_FUTURE_WINDOW,
    };

    /// The names are stored (charges.kind, dead_letters.reason) and are metric labels:
    /// pinned against a rename of a variant.
    #[test]
    fn wire_names_are_stable() {
        let kinds: Vec<&str> = ChargeKind::VARIANTS.iter().map(|k| k.as_str()).collect();
        assert_eq!(kinds, ["usage", "true_up"]);
        assert_eq!((KIND_USAGE, KIND_TRUE_UP), ("usage", "true_up"));
        let reasons: Vec<&str> = RaterReason::VARIANTS.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "undecodable", "unauthenticated", "future_window", "bad_seq", "unpriced", "overflow", "unrateable",
                "invalid_adjustment"
            ]
        );
        assert_eq!((REASON_FUTURE_WINDOW, REASON_BAD_SEQ), ("future_window", "bad_seq"));
        let alerts: Vec<&str> = AlertKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(alerts, ["low_balance", "exhausted", "spend_limit_soft", "spend_limit_hard", "credit_expired"]);
        assert_eq!(
            [ALERT_LOW_BALANCE, ALERT_EXHAUSTED, ALERT_SOFT_LIMIT, ALERT_HARD_LIMIT],
            ["low_balance", "exhausted", "spend_limit_soft", "spend_limit_hard"]
        );
        for p in ParkReason::ALL {
            assert_eq!(RaterReason::parse(p.as_str()).map(RaterReason::as_str), Some(p.as_str()));
        }
    }

    #[test]
    fn every_reason_of_either_service_parses_and_nothing_else() {
        for r in RejectReason::ALL {
            assert_eq!(DeadLetterReason::parse(r.as_str()), Some(DeadLetterReason::Aggregator(r)));
        }
        for r in RaterReason::VARIANTS {
            assert_eq!(DeadLetterReason::parse(r.as_str()).map(DeadLetterReason::as_str), Some(r.as_str()));
        }
        for bad in ["", "Usage", "TOO_LATE", "too late", "unknown"] {
            assert_eq!(DeadLetterReason::parse(bad), None, "{bad}");
            assert_eq!(ChargeKind::parse(bad), None, "{bad}");
        }
        assert_eq!(check_reason("nope"), Err(Error::UnknownName { field: "reason", value: "nope".into() }));
        assert_eq!(check_aggregation("median"), Err(Error::UnknownName { field: "aggregation", value: "median".into() }));
    }
}
