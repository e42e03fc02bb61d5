//! One aggregates-topic partition of the rater, as a sans-I/O state machine.
//!
//! The rater service owns one [`RaterPartition`] per partition N it holds: partition N of the
//! aggregates topic and partition N of the wallet topic share it, because a tenant's usage and
//! its wallet must be decided in one order. The service hands it plain records
//! ([`on_aggregate`](RaterPartition::on_aggregate), [`on_adjustment`](RaterPartition::on_adjustment))
//! and writes what they return ([`Emitted`]); it checkpoints [`snapshot`](RaterPartition::snapshot)
//! next to the offsets the snapshot covers. Everything here is a function of the records and
//! their offsets (periods close on the aggregates' own event-time watermark, never the wall
//! clock), so a restored partition re-fed the same records emits the same outputs, byte for
//! byte: that is what makes the rater's outputs exactly-once with idempotent sinks.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{Admission, AdjustmentOutcome, Alert, LedgerEntry, ParkReason, RateOutcome, RatingConfig, RatingState, RerateOutcome, WalletConfig, Wallets};
use crate::auth::{self, RecordKey};
use crate::pricing::Catalog;
use crate::records::{AvroRecord, Charge, DeadLetter, MeterAggregate, WalletAdjustment};
use crate::Error;

mod state;
pub use state::{SNAPSHOT_MAGIC, SNAPSHOT_VERSION};

/// How often (in event time) periods are closed and credit expires: closing walks every
/// tenant, so doing it on every aggregate would make rating quadratic in tenants.
pub const TICK_MS: i64 = 60_000;

/// What a partition needs besides its state; not checkpointed (it comes from the service's
/// configuration at every start).
#[derive(Debug, Clone)]
pub struct PartitionConfig {
    pub partition: i32,
    /// Dead letters name the topic they came from.
    pub aggregates_topic: String,
    pub wallet_topic: String,
    /// Aggregates and rerate requests must be tagged with it.
    pub record_key: RecordKey,
    pub admission: Admission,
    /// Used for a fresh partition only: a restored one keeps the configuration it was
    /// checkpointed with (see [`RatingConfig`]).
    pub rating: RatingConfig,
    pub wallets: WalletConfig,
}

/// One record of the aggregates topic, as the service read it.
#[derive(Debug, Clone, Copy)]
pub struct AggregateRecord<'a> {
    pub offset: i64,
    pub payload: &'a [u8],
    /// The broker's timestamp: the reference time of admission (how far ahead a window may be).
    pub broker_ms: Option<i64>,
    /// The [`auth::HEADER`] tag of an aggregate.
    pub tag: Option<&'a [u8]>,
    /// The [`auth::RERATE_HEADER`] tag: the record is a rerate request (wins over `tag`).
    pub rerate_tag: Option<&'a [u8]>,
}

/// Revenue, cost and margin rated so far for one label set (exported as gauges).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub revenue: Decimal,
    pub cost: Decimal,
    pub margin: Decimal,
}

/// The label set of [`Totals`]: bounded by the catalog (currencies, meters, plans).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TotalsKey {
    pub currency: String,
    /// The meter, or the charge kind for charges without one (true-ups).
    pub meter: String,
    pub plan: String,
}

/// A wallet adjustment applied from wallet-topic `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedAdjustment {
    pub adjustment: WalletAdjustment,
    pub offset: i64,
}

/// A state change of a parked aggregate, decided by the record at aggregates `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedChange {
    pub aggregate: MeterAggregate,
    pub offset: i64,
    /// `parked`, `rerated` or `rejected`.
    pub state: &'static str,
    /// A [`ParkReason`] name, `unrateable`, or empty.
    pub reason: &'static str,
    pub detail: String,
    pub payload: Vec<u8>,
}

/// What the service writes after one call, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Emitted {
    pub charges: Vec<Charge>,
    /// Alerts with the (event) time they were raised at.
    pub alerts: Vec<(Alert, i64)>,
    pub adjustments: Vec<AppliedAdjustment>,
    pub ledger: Vec<LedgerEntry>,
    pub dead_letters: Vec<DeadLetter>,
    pub parked: Vec<ParkedChange>,
}

impl Emitted {
    /// Appends `other` (the outputs of a later call).
    pub fn append(&mut self, mut other: Emitted) {
        self.charges.append(&mut other.charges);
        self.alerts.append(&mut other.alerts);
        self.adjustments.append(&mut other.adjustments);
        self.ledger.append(&mut other.ledger);
        self.dead_letters.append(&mut other.dead_letters);
        self.parked.append(&mut other.parked);
    }

    pub fn is_empty(&self) -> bool {
        self.charges.is_empty()
            && self.alerts.is_empty()
            && self.adjustments.is_empty()
            && self.ledger.is_empty()
            && self.dead_letters.is_empty()
            && self.parked.is_empty()
    }
}

/// What one record did (the service's metrics; the outputs are in [`Step::out`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Below the partition's position: already reflected in the state. Nothing happened.
    Replayed,
    Adjustment(AdjustmentVerdict),
    /// Dead-lettered with this reason before (or instead of) rating.
    Refused(&'static str),
    Charged,
    /// A re-delivery of a rated `seq` (see [`RateOutcome::Skipped`]).
    Skipped,
    /// Rated but not rateable (see [`RateOutcome::Rejected`]): dead-lettered `unrateable`.
    Rejected,
    Parked(ParkReason),
    Rerate(RerateVerdict),
}

impl Verdict {
    /// Whether the rating state decided about the record (rated it in any way, or acted on a
    /// parked aggregate), as opposed to it being refused, replayed, an adjustment or a rerate
    /// of nothing parked.
    pub fn rated(self) -> bool {
        match self {
            Self::Charged | Self::Skipped | Self::Rejected | Self::Parked(_) => true,
            Self::Rerate(r) => r != RerateVerdict::NotParked,
            Self::Replayed | Self::Adjustment(_) | Self::Refused(_) => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdjustmentVerdict {
    Applied,
    Duplicate,
    Invalid,
}

impl AdjustmentVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::Invalid => "invalid",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RerateVerdict {
    NotParked,
    Charged,
    StillParked,
    /// Can never be rated; also dead-lettered as `unrateable`.
    Rejected,
}

impl RerateVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotParked => "not_parked",
            Self::Charged => "charged",
            Self::StillParked => "still_parked",
            Self::Rejected => "rejected",
        }
    }
}

/// The result of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub verdict: Verdict,
    /// The high water the aggregate's `seq` skipped past by more than one (a gap upstream:
    /// worth a warning, not a refusal).
    pub seq_gap: Option<i64>,
    /// The tenant whose settled state (balances, usage) changed.
    pub touched: Option<String>,
    /// The aggregate that settled (rated in any way): its pending spend is no longer pending.
    pub settled: Option<MeterAggregate>,
    pub out: Emitted,
}

impl Step {
    fn new(verdict: Verdict) -> Self {
        Self { verdict, seq_gap: None, touched: None, settled: None, out: Emitted::default() }
    }
}

/// Where a partition's outputs already written end: see [`RaterPartition::has_passed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputMark {
    pub max_charge_seq: i64,
    pub max_aggregates_offset: i64,
    pub max_wallet_offset: i64,
}

/// The state of one rater partition. See the module docs.
#[derive(Debug, Clone)]
pub struct RaterPartition {
    config: PartitionConfig,
    state: state::State,
}

impl RaterPartition {
    pub fn new(config: PartitionConfig) -> Self {
        let state = state::State::fresh(&config);
        Self { config, state }
    }

    /// A fresh partition that resumes consuming at the given offsets (an operator's decision
    /// to replay or reset).
    pub fn starting_at(config: PartitionConfig, aggregates_next: i64, wallet_next: i64) -> Self {
        let mut p = Self::new(config);
        p.state.aggregates_next = aggregates_next;
        p.state.wallet_next = wallet_next;
        p
    }

    /// A partition restored from [`snapshot`](Self::snapshot) bytes (or a checkpoint of the
    /// JSON format written before them).
    pub fn restore(config: PartitionConfig, bytes: &[u8]) -> Result<Self, Error> {
        Ok(Self { state: state::State::decode(bytes)?, config })
    }

    /// The partition's state as deterministic bytes (the same state, the same bytes).
    pub fn snapshot(&self) -> Vec<u8> {
        self.state.encode()
    }

    pub fn partition(&self) -> i32 {
        self.config.partition
    }

    /// First aggregates offset not yet reflected in the state.
    pub fn aggregates_next(&self) -> i64 {
        self.state.aggregates_next
    }

    /// First wallet offset not yet reflected in the state.
    pub fn wallet_next(&self) -> i64 {
        self.state.wallet_next
    }

    pub fn rating(&self) -> &RatingState {
        &self.state.rating
    }

    pub fn wallets(&self) -> &Wallets {
        &self.state.wallets
    }

    /// The event time of the last tick (see [`on_tick`](Self::on_tick)).
    pub fn last_tick(&self) -> Option<i64> {
        Some(self.state.advanced_to).filter(|&t| t != i64::MIN)
    }

    pub fn totals(&self) -> &BTreeMap<TotalsKey, Totals> {
        &self.state.totals
    }

    /// Whether everything up to `mark` has been derived again (after a restore from an older
    /// checkpoint), so that switching catalogs now cannot emit a charge id twice with
    /// different content.
    pub fn has_passed(&self, mark: &OutputMark) -> bool {
        self.state.rating.charges_emitted() >= mark.max_charge_seq
            && self.state.aggregates_next > mark.max_aggregates_offset
            && self.state.wallet_next > mark.max_wallet_offset
    }

    /// Applies one record of the wallet topic (a top-up or adjustment).
    pub fn on_adjustment(&mut self, offset: i64, payload: &[u8]) -> Step {
        let s = &mut self.state;
        if offset < s.wallet_next {
            return Step::new(Verdict::Replayed);
        }
        s.wallet_next = offset + 1;
        let applied = WalletAdjustment::from_avro(payload)
            .map_err(|e| e.to_string())
            .and_then(|adj| s.wallets.apply_adjustment(&adj).map(|o| (adj, o)).map_err(|e| e.to_string()));
        match applied {
            Ok((adj, AdjustmentOutcome::Applied { alerts, .. })) => {
                let mut step = Step::new(Verdict::Adjustment(AdjustmentVerdict::Applied));
                step.touched = Some(adj.tenant.clone());
                step.out.alerts.extend(alerts.into_iter().map(|a| (a, adj.created_at)));
                step.out.ledger = s.wallets.take_ledger();
                step.out.adjustments.push(AppliedAdjustment { adjustment: adj, offset });
                step
            }
            Ok((_, AdjustmentOutcome::Duplicate { .. })) => Step::new(Verdict::Adjustment(AdjustmentVerdict::Duplicate)),
            Err(detail) => {
                let mut step = Step::new(Verdict::Adjustment(AdjustmentVerdict::Invalid));
                let topic = &self.config.wallet_topic;
                step.out.dead_letters.push(dead_letter(topic, self.config.partition, offset, "invalid_adjustment", detail, payload));
                step
            }
        }
    }

    /// Rates one record of the aggregates topic: an aggregate or a rerate request. Errors only
    /// on a broken invariant of the rating state (the service stops rather than guess).
    pub fn on_aggregate(&mut self, catalog: &Catalog, rec: AggregateRecord<'_>) -> Result<Step, Error> {
        if rec.offset < self.state.aggregates_next {
            return Ok(Step::new(Verdict::Replayed));
        }
        self.state.aggregates_next = rec.offset + 1;
        let (rerate, tag) = match (rec.rerate_tag, rec.tag) {
            (Some(t), _) => (true, Some(t)),
            (None, t) => (false, t),
        };
        let purpose = if rerate { auth::PURPOSE_RERATE } else { auth::PURPOSE_AGGREGATE };
        if !tag.is_some_and(|t| auth::verify(&self.config.record_key, &[purpose, rec.payload], t)) {
            let what = if rerate { "rerate request" } else { "aggregate" };
            let detail = match tag {
                None => format!("{what} without a {} header: not written by meterflow", auth::HEADER),
                Some(_) => format!("{what} with an invalid tag: forged, altered, or written with another record key"),
            };
            return Ok(self.refused(&rec, "unauthenticated", detail));
        }
        let agg = match MeterAggregate::from_avro(rec.payload) {
            Ok(a) => a,
            Err(e) => return Ok(self.refused(&rec, "undecodable", e.to_string())),
        };
        if rerate {
            return Ok(self.rerate(catalog, &rec, agg));
        }
        if let Err((reason, detail)) = self.state.rating.screen(&agg, rec.broker_ms, &self.config.admission) {
            return Ok(self.refused(&rec, reason, detail));
        }
        let seq_gap = self.state.rating.high_water(agg.source_partition).filter(|&hw| agg.seq > hw + 1);
        let outcome = self.state.rating.rate(catalog, &agg)?;
        let (verdict, charges, out) = match outcome {
            RateOutcome::Charged(c) => (Verdict::Charged, c, Emitted::default()),
            RateOutcome::Skipped { .. } => (Verdict::Skipped, Vec::new(), Emitted::default()),
            RateOutcome::Rejected(e) => {
                (Verdict::Rejected, Vec::new(), self.refused(&rec, "unrateable", e.to_string()).out)
            }
            RateOutcome::Parked { reason, error } => {
                let detail = format!("parked: {error} (meterflow-admin rerate re-rates it after a catalog fix)");
                let mut out = Emitted::default();
                out.parked.push(parked(&agg, &rec, "parked", reason.as_str(), error.to_string()));
                out.dead_letters.push(self.dead_letter(&rec, reason.as_str(), detail));
                (Verdict::Parked(reason), Vec::new(), out)
            }
        };
        // Whatever the outcome, this revision of the window exists: it is no longer pending.
        // (A skipped one matters after a double restart: the aggregator replays, re-publishes
        // totals of windows the restarted rater has no tombstone for, then re-emits their close.)
        let mut step = Step { verdict, seq_gap, touched: Some(agg.tenant.clone()), settled: None, out };
        self.settle(catalog, charges, agg.emitted_at, true, &mut step.out);
        step.settled = Some(agg);
        Ok(step)
    }

    /// Moves the partition's event-time clock to `watermark_ms`: when [`TICK_MS`] passed since
    /// the last tick, closes the billing periods due (their true-ups) and expires credit.
    /// [`on_aggregate`](Self::on_aggregate) ticks on each aggregate's `emitted_at`, which keeps
    /// replays deterministic; a service may also tick on an idle partition's watermark.
    pub fn on_tick(&mut self, catalog: &Catalog, watermark_ms: i64) -> Emitted {
        let mut out = Emitted::default();
        self.settle(catalog, Vec::new(), watermark_ms, true, &mut out);
        out
    }

    fn rerate(&mut self, catalog: &Catalog, rec: &AggregateRecord<'_>, agg: MeterAggregate) -> Step {
        let offset = rec.offset;
        let (verdict, state, reason, detail, charges) = match self.state.rating.rerate(catalog, &agg) {
            RerateOutcome::NotParked => return Step::new(Verdict::Rerate(RerateVerdict::NotParked)),
            RerateOutcome::Charged(c) => {
                (RerateVerdict::Charged, "rerated", "", format!("charged by the rerate request at offset {offset}"), c)
            }
            RerateOutcome::StillParked { reason, error } => {
                (RerateVerdict::StillParked, "parked", reason.as_str(), error.to_string(), Vec::new())
            }
            RerateOutcome::Rejected(e) => (RerateVerdict::Rejected, "rejected", "unrateable", e.to_string(), Vec::new()),
        };
        let mut step = Step::new(Verdict::Rerate(verdict));
        if verdict == RerateVerdict::Rejected {
            step.out.dead_letters.push(self.dead_letter(rec, "unrateable", detail.clone()));
        }
        if verdict == RerateVerdict::Charged {
            step.touched = Some(agg.tenant.clone());
        }
        step.out.parked.push(parked(&agg, rec, state, reason, detail));
        // A rerate request is no watermark: it carries an old aggregate's `emitted_at`.
        self.settle(catalog, charges, agg.emitted_at, false, &mut step.out);
        step
    }

    /// Ticks (when `tick`), then books `charges` and the tick's true-ups into the totals and
    /// wallets at event time `at_ms`. The order is the checkpointed protocol: credit expires at
    /// `at_ms` before the charges rated with it draw the wallet down.
    fn settle(&mut self, catalog: &Catalog, mut charges: Vec<Charge>, at_ms: i64, tick: bool, out: &mut Emitted) {
        let s = &mut self.state;
        if tick && at_ms >= s.advanced_to.saturating_add(TICK_MS) {
            s.advanced_to = at_ms;
            charges.extend(s.rating.advance(catalog, at_ms));
            // Credit expires on the same event-time watermark, never on the wall clock.
            out.alerts.extend(s.wallets.expire(at_ms).into_iter().map(|a| (a, at_ms)));
        }
        for c in charges {
            let key = TotalsKey {
                currency: c.currency.clone(),
                meter: if c.meter.is_empty() { c.kind.clone() } else { c.meter.clone() },
                plan: c.plan.clone(),
            };
            let t = s.totals.entry(key).or_default();
            t.revenue += c.amount;
            t.cost += c.provider_cost;
            t.margin += c.margin;
            out.alerts.extend(s.wallets.apply_charge_at(&c, Some(at_ms)).into_iter().map(|a| (a, at_ms)));
            out.charges.push(c);
        }
        out.ledger.extend(s.wallets.take_ledger());
    }

    fn refused(&self, rec: &AggregateRecord<'_>, reason: &'static str, detail: String) -> Step {
        let mut step = Step::new(Verdict::Refused(reason));
        step.out.dead_letters.push(self.dead_letter(rec, reason, detail));
        step
    }

    fn dead_letter(&self, rec: &AggregateRecord<'_>, reason: &str, detail: String) -> DeadLetter {
        dead_letter(&self.config.aggregates_topic, self.config.partition, rec.offset, reason, detail, rec.payload)
    }
}

fn parked(agg: &MeterAggregate, rec: &AggregateRecord<'_>, state: &'static str, reason: &'static str, detail: String) -> ParkedChange {
    ParkedChange { aggregate: agg.clone(), offset: rec.offset, state, reason, detail, payload: rec.payload.to_vec() }
}

fn dead_letter(topic: &str, partition: i32, offset: i64, reason: &str, detail: String, payload: &[u8]) -> DeadLetter {
    DeadLetter {
        source_topic: topic.to_owned(),
        source_partition: partition,
        source_offset: offset,
        reason: reason.to_owned(),
        detail,
        tenant: None,
        event_id: None,
        payload: payload.to_vec(),
    }
}
