//! The ground truth of a generated workload: what the pipeline must end up with.
//!
//! It is computed by the generator with deliberately naive code (a hash map from window key to
//! running sums, fed once per distinct event) and shares nothing with the core's window engine
//! or dedup, so that a bug there cannot hide by being reproduced here. Tests of the aggregator
//! and the rater compare ClickHouse against the JSON file this module writes.
//!
//! Only messages the broker acknowledged are counted: a message that failed to send is not in
//! the topic, so the pipeline never saw it. (`counters.send_errors` says whether that
//! happened; with idempotence a timed-out message may still have been written, so a ground
//! truth with send errors is approximate.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use anyhow::Context as _;
use meterflow_core::decimal;
use meterflow_core::meter::{Aggregation, MeterCatalog, MeterDef};
use meterflow_core::RejectReason;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::producer::Delivery;

/// Version of the JSON layout; bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;

/// Everything a generator run sent, and the totals the pipeline must compute from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroundTruth {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    pub run: RunInfo,
    /// The meters as the generator understood them (from the `--meters` file).
    pub meters: Vec<MeterInfo>,
    pub counters: Counters,
    /// Expected final value of every window, sorted by (tenant, meter, dimensions, window_start).
    pub windows: Vec<WindowTotal>,
    /// Expected totals per tenant and meter over the whole run, sorted by (tenant, meter).
    pub totals: Vec<MeterTotal>,
    /// Every message the pipeline must reject, sorted by (partition, offset).
    pub malformed: Vec<MalformedRecord>,
}

/// How the data was produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    pub topic: String,
    pub seed: u64,
    /// `single-object` or `confluent`.
    pub framing: String,
    /// `real-time` or `simulated`.
    pub event_time_mode: String,
    pub dedup_horizon_ms: i64,
    /// Wall clock at start, Unix ms.
    pub started_at_ms: i64,
    pub elapsed_ms: u64,
    /// Smallest and largest event time among accepted events (None if there are none).
    pub min_event_time_ms: Option<i64>,
    pub max_event_time_ms: Option<i64>,
    /// True if the run stopped early (shutdown) rather than reaching its event count or duration.
    pub interrupted: bool,
}

/// One meter's definition, as far as the expected totals depend on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterInfo {
    pub name: String,
    pub aggregation: String,
    pub group_by: Vec<String>,
    pub window_ms: i64,
    pub allowed_lateness_ms: i64,
}

/// Message counts. Invariant: `sent == unique_accepted + duplicates + malformed`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Messages the broker acknowledged, of every kind.
    pub sent: u64,
    /// Distinct valid events: each is counted in exactly one window.
    pub unique_accepted: u64,
    /// Byte-identical re-sends of accepted events; they must not be counted again.
    pub duplicates: u64,
    /// Accepted events (included in `unique_accepted`) whose event time was moved back into a
    /// window that should already be closed, forcing a restatement.
    pub late: u64,
    /// Messages that must be rejected (including `too_late`).
    pub malformed: u64,
    /// `malformed` split by the reason the pipeline must give ([`RejectReason::as_str`]).
    pub malformed_by_reason: BTreeMap<String, u64>,
    /// Messages that were not acknowledged by the broker (not counted anywhere above).
    pub send_errors: u64,
}

/// The expected final state of one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowTotal {
    pub tenant: String,
    pub meter: String,
    pub aggregation: String,
    /// Only the meter's `group_by` dimensions.
    pub dimensions: BTreeMap<String, String>,
    pub window_start: i64,
    pub window_end: i64,
    /// The meter's aggregation over the window's distinct events, canonical decimal string.
    #[serde(with = "rust_decimal::serde::str")]
    pub value: Decimal,
    pub event_count: u64,
    /// Sum of the events' provider costs (events without one count as 0).
    #[serde(with = "rust_decimal::serde::str")]
    pub provider_cost: Decimal,
    /// What the events without a provider cost contributed (sum: their quantities; count:
    /// their number): the part the rater costs at the rate card.
    #[serde(default, with = "rust_decimal::serde::str")]
    pub uncosted_value: Decimal,
    /// How many of `event_count` were late (informational: a window with late events should
    /// have been restated at least once).
    pub late_events: u64,
}

/// Expected totals of one tenant's meter over the whole run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterTotal {
    pub tenant: String,
    pub meter: String,
    pub aggregation: String,
    /// The aggregation over all the tenant's distinct events of the meter (for sum and count,
    /// the sum of the window values).
    #[serde(with = "rust_decimal::serde::str")]
    pub value: Decimal,
    pub event_count: u64,
    #[serde(with = "rust_decimal::serde::str")]
    pub provider_cost: Decimal,
}

/// A message the pipeline must reject, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MalformedRecord {
    pub partition: i32,
    pub offset: i64,
    /// [`RejectReason::as_str`].
    pub reason: String,
    /// What the generator did to the message (e.g. `truncated`, `quantity_nan`), for debugging.
    pub kind: String,
}

/// Identifies a window: (tenant, meter, group_by dimensions, window_start).
pub type WindowKey = (String, String, BTreeMap<String, String>, i64);

impl GroundTruth {
    pub fn load(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).with_context(|| format!("opening ground truth {}", path.display()))?;
        let gt: Self = serde_json::from_reader(BufReader::new(file))
            .with_context(|| format!("parsing ground truth {}", path.display()))?;
        anyhow::ensure!(gt.version == FORMAT_VERSION, "ground truth {} has format version {}, expected {FORMAT_VERSION}", path.display(), gt.version);
        Ok(gt)
    }

    /// Writes the JSON (pretty-printed: people diff these) through a temporary file and a
    /// rename, so a reader never sees half a file.
    pub fn save(&self, path: impl AsRef<Path>) -> anyhow::Result<()> {
        let path = path.as_ref();
        let tmp = path.with_extension("json.tmp");
        {
            let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let mut w = BufWriter::new(file);
            serde_json::to_writer_pretty(&mut w, self)?;
            w.write_all(b"\n")?;
            w.flush()?;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    }

    /// Windows by key, for comparisons.
    pub fn window_map(&self) -> BTreeMap<WindowKey, &WindowTotal> {
        self.windows
            .iter()
            .map(|w| ((w.tenant.clone(), w.meter.clone(), w.dimensions.clone(), w.window_start), w))
            .collect()
    }

    /// The expected rejection at a position, if the message there is malformed.
    pub fn malformed_at(&self, at: Delivery) -> Option<&MalformedRecord> {
        self.malformed
            .binary_search_by(|m| (m.partition, m.offset).cmp(&(at.partition, at.offset)))
            .ok()
            .map(|i| &self.malformed[i])
    }

    /// Checks the internal invariants (counters add up, windows add up to totals); a failure is
    /// a generator bug, not a pipeline bug.
    pub fn check_consistency(&self) -> anyhow::Result<()> {
        let c = &self.counters;
        anyhow::ensure!(c.sent == c.unique_accepted + c.duplicates + c.malformed, "sent {} != unique {} + duplicates {} + malformed {}", c.sent, c.unique_accepted, c.duplicates, c.malformed);
        anyhow::ensure!(c.malformed == c.malformed_by_reason.values().sum::<u64>(), "malformed_by_reason does not add up");
        anyhow::ensure!(c.malformed == self.malformed.len() as u64, "malformed list has {} entries, counter says {}", self.malformed.len(), c.malformed);
        let events: u64 = self.windows.iter().map(|w| w.event_count).sum();
        anyhow::ensure!(events == c.unique_accepted, "windows hold {events} events, unique_accepted is {}", c.unique_accepted);
        let late: u64 = self.windows.iter().map(|w| w.late_events).sum();
        anyhow::ensure!(late == c.late, "windows hold {late} late events, counter says {}", c.late);
        Ok(())
    }
}

/// A running aggregate, kept naive on purpose: every aggregation is recomputed from plain
/// running values with no incremental cleverness.
#[derive(Debug, Clone)]
struct Acc {
    aggregation: Aggregation,
    sum: Decimal,
    count: u64,
    min: Option<Decimal>,
    max: Option<Decimal>,
    /// (event time, event id, quantity) of the latest event.
    latest: Option<(i64, String, Decimal)>,
    uniques: HashSet<String>,
    provider_cost: Decimal,
    uncosted: Decimal,
    late: u64,
}

impl Acc {
    fn new(aggregation: Aggregation) -> Self {
        Self {
            aggregation,
            sum: Decimal::ZERO,
            count: 0,
            min: None,
            max: None,
            latest: None,
            uniques: HashSet::new(),
            provider_cost: Decimal::ZERO,
            uncosted: Decimal::ZERO,
            late: 0,
        }
    }

    fn add(&mut self, def: &MeterDef, ev: &EventView<'_>, late: bool) {
        let q = ev.quantity;
        self.count += 1;
        self.sum += q;
        self.min = Some(self.min.map_or(q, |m| m.min(q)));
        self.max = Some(self.max.map_or(q, |m| m.max(q)));
        let newer = match &self.latest {
            None => true,
            Some((t, id, _)) => (ev.event_time_ms, ev.event_id) > (*t, id.as_str()),
        };
        if newer {
            self.latest = Some((ev.event_time_ms, ev.event_id.to_owned(), q));
        }
        if let Some(dim) = &def.unique_dimension {
            if let Some(v) = ev.dimension(dim) {
                if !self.uniques.contains(v) {
                    self.uniques.insert(v.to_owned());
                }
            }
        }
        self.provider_cost += ev.provider_cost.unwrap_or(Decimal::ZERO);
        if ev.provider_cost.is_none() {
            self.uncosted += if self.aggregation == Aggregation::Count { Decimal::ONE } else { q };
        }
        self.late += u64::from(late);
    }

    fn value(&self) -> Decimal {
        let v = match self.aggregation {
            Aggregation::Sum => self.sum,
            Aggregation::Count => Decimal::from(self.count),
            Aggregation::Min => self.min.unwrap_or_default(),
            Aggregation::Max => self.max.unwrap_or_default(),
            Aggregation::Avg if self.count == 0 => Decimal::ZERO,
            Aggregation::Avg => decimal::round_amount(self.sum / Decimal::from(self.count)),
            Aggregation::UniqueCount => Decimal::from(self.uniques.len()),
            Aggregation::Latest => self.latest.as_ref().map(|l| l.2).unwrap_or_default(),
        };
        v.normalize()
    }
}

/// What the ground truth needs to know of an accepted event (borrowed, so that the
/// generator's hot loop does not build an owned [`UsageEvent`] per event).
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    pub tenant: &'a str,
    pub meter: &'a str,
    pub event_id: &'a str,
    pub quantity: Decimal,
    pub provider_cost: Option<Decimal>,
    pub event_time_ms: i64,
    /// Sorted by key.
    pub dimensions: &'a [(&'a str, &'a str)],
}

impl EventView<'_> {
    fn dimension(&self, key: &str) -> Option<&str> {
        self.dimensions.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

/// Accumulates the ground truth while the generator runs.
///
/// Windows are looked up by a flat text key built in a reused buffer, so an event of an
/// existing window costs no allocation; the structured key is stored once, with the window.
#[derive(Debug)]
pub(crate) struct TruthBuilder {
    catalog: MeterCatalog,
    windows: HashMap<String, (WindowKey, Acc)>,
    totals: HashMap<String, ((String, String), Acc)>,
    key_buf: String,
    counters: Counters,
    malformed: Vec<MalformedRecord>,
    min_time: Option<i64>,
    max_time: Option<i64>,
}

impl TruthBuilder {
    pub(crate) fn new(catalog: MeterCatalog) -> Self {
        Self {
            catalog,
            windows: HashMap::new(),
            totals: HashMap::new(),
            key_buf: String::with_capacity(128),
            counters: Counters::default(),
            malformed: Vec::new(),
            min_time: None,
            max_time: None,
        }
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// A distinct valid event the broker acknowledged.
    #[allow(clippy::expect_used, reason = "the workload draws its meters from this catalog")]
    pub(crate) fn accepted(&mut self, ev: &EventView<'_>, late: bool) {
        use std::fmt::Write as _;
        let def = self
            .catalog
            .get(ev.meter)
            .expect("the generator only marks events of known meters as accepted");
        let window_start = def.window_start(ev.event_time_ms);
        // Separators that cannot occur in the generator's names keep the flat key unambiguous.
        let key = &mut self.key_buf;
        key.clear();
        let _ = write!(key, "{}\u{1f}{}", ev.tenant, ev.meter);
        let total_len = key.len();
        for k in &def.group_by {
            if let Some(v) = ev.dimension(k) {
                let _ = write!(key, "\u{1f}{k}\u{1e}{v}");
            }
        }
        let _ = write!(key, "\u{1f}{window_start}");
        match self.windows.get_mut(key.as_str()) {
            Some((_, acc)) => acc.add(def, ev, late),
            None => {
                let dims: BTreeMap<String, String> = def
                    .group_by
                    .iter()
                    .filter_map(|k| ev.dimension(k).map(|v| (k.clone(), v.to_owned())))
                    .collect();
                let mut acc = Acc::new(def.aggregation);
                acc.add(def, ev, late);
                let wkey = (ev.tenant.to_owned(), ev.meter.to_owned(), dims, window_start);
                self.windows.insert(key.clone(), (wkey, acc));
            }
        }
        key.truncate(total_len);
        match self.totals.get_mut(key.as_str()) {
            Some((_, acc)) => acc.add(def, ev, late),
            None => {
                let mut acc = Acc::new(def.aggregation);
                acc.add(def, ev, late);
                self.totals.insert(key.clone(), ((ev.tenant.to_owned(), ev.meter.to_owned()), acc));
            }
        }
        self.counters.sent += 1;
        self.counters.unique_accepted += 1;
        self.counters.late += u64::from(late);
        self.min_time = Some(self.min_time.map_or(ev.event_time_ms, |t| t.min(ev.event_time_ms)));
        self.max_time = Some(self.max_time.map_or(ev.event_time_ms, |t| t.max(ev.event_time_ms)));
    }

    pub(crate) fn duplicate(&mut self) {
        self.counters.sent += 1;
        self.counters.duplicates += 1;
    }

    pub(crate) fn rejected(&mut self, at: Delivery, reason: RejectReason, kind: &str) {
        self.counters.sent += 1;
        self.counters.malformed += 1;
        *self.counters.malformed_by_reason.entry(reason.as_str().to_owned()).or_default() += 1;
        self.malformed.push(MalformedRecord {
            partition: at.partition,
            offset: at.offset,
            reason: reason.as_str().to_owned(),
            kind: kind.to_owned(),
        });
    }

    pub(crate) fn send_error(&mut self) {
        self.counters.send_errors += 1;
    }

    pub(crate) fn min_max_time(&self) -> (Option<i64>, Option<i64>) {
        (self.min_time, self.max_time)
    }

    pub(crate) fn finish(self, run: RunInfo) -> GroundTruth {
        let meters = self
            .catalog
            .meters()
            .iter()
            .map(|m| MeterInfo {
                name: m.name.clone(),
                aggregation: m.aggregation.as_str().to_owned(),
                group_by: m.group_by.clone(),
                window_ms: m.window_ms,
                allowed_lateness_ms: m.allowed_lateness_ms,
            })
            .collect();
        let window_ms = |meter: &str| self.catalog.get(meter).map_or(0, |m| m.window_ms);
        let mut windows: Vec<WindowTotal> = self
            .windows
            .values()
            .map(|((tenant, meter, dims, start), acc)| WindowTotal {
                tenant: tenant.clone(),
                meter: meter.clone(),
                aggregation: acc.aggregation.as_str().to_owned(),
                dimensions: dims.clone(),
                window_start: *start,
                window_end: start + window_ms(meter),
                value: acc.value(),
                event_count: acc.count,
                provider_cost: acc.provider_cost.normalize(),
                uncosted_value: acc.uncosted.normalize(),
                late_events: acc.late,
            })
            .collect();
        windows.sort_by(|a, b| {
            (&a.tenant, &a.meter, &a.dimensions, a.window_start).cmp(&(&b.tenant, &b.meter, &b.dimensions, b.window_start))
        });
        let mut totals: Vec<MeterTotal> = self
            .totals
            .values()
            .map(|((tenant, meter), acc)| MeterTotal {
                tenant: tenant.clone(),
                meter: meter.clone(),
                aggregation: acc.aggregation.as_str().to_owned(),
                value: acc.value(),
                event_count: acc.count,
                provider_cost: acc.provider_cost.normalize(),
            })
            .collect();
        totals.sort_by(|a, b| (&a.tenant, &a.meter).cmp(&(&b.tenant, &b.meter)));
        let mut malformed = self.malformed;
        malformed.sort_by_key(|m| (m.partition, m.offset));
        GroundTruth {
            version: FORMAT_VERSION,
            run,
            meters,
            counters: self.counters,
            windows,
            totals,
            malformed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    const METERS: &str = r#"
        [[meter]]
        name = "input_tokens"
        aggregation = "sum"
        group_by = ["model"]
        window = "minute"

        [[meter]]
        name = "requests"
        aggregation = "count"
        window = "minute"

        [[meter]]
        name = "peak"
        aggregation = "max"
        window = "hour"

        [[meter]]
        name = "users"
        aggregation = "unique_count"
        unique_dimension = "user"
        window = "hour"
    "#;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn run_info() -> RunInfo {
        RunInfo {
            topic: "t".into(),
            seed: 1,
            framing: "single-object".into(),
            event_time_mode: "simulated".into(),
            dedup_horizon_ms: 1,
            started_at_ms: 0,
            elapsed_ms: 0,
            min_event_time_ms: None,
            max_event_time_ms: None,
            interrupted: false,
        }
    }

    #[test]
    fn windows_only_group_by_dims_and_json_round_trip() {
        let mut b = TruthBuilder::new(MeterCatalog::from_toml_str(METERS).unwrap());
        let dims_a = [("model", "m1"), ("region", "eu"), ("user", "a")];
        let a = EventView {
            tenant: "acme",
            meter: "input_tokens",
            event_id: "a",
            quantity: d("10"),
            provider_cost: Some(d("0.25")),
            event_time_ms: 1_000,
            dimensions: &dims_a,
        };
        b.accepted(&a, false);
        let mut add = |id: &str, meter: &str, q: &str, t: i64, late: bool| {
            let dims = [("model", "m1"), ("region", "eu"), ("user", id)];
            let ev = EventView {
                tenant: "acme",
                meter,
                event_id: id,
                quantity: d(q),
                provider_cost: None,
                event_time_ms: t,
                dimensions: &dims,
            };
            b.accepted(&ev, late);
        };
        add("b", "input_tokens", "5.5", 59_999, true);
        add("c", "input_tokens", "1", 60_000, false);
        add("d", "requests", "1", 60_000, false);
        add("e", "requests", "1", 61_000, false);
        add("f", "peak", "3", 0, false);
        add("g", "peak", "7", 1, false);
        add("h", "users", "1", 0, false);
        add("h", "users", "1", 0, false);
        add("i", "users", "1", 0, false);
        b.duplicate();
        b.rejected(Delivery { partition: 1, offset: 9 }, RejectReason::BadQuantity, "quantity_nan");
        b.rejected(Delivery { partition: 0, offset: 3 }, RejectReason::Undecodable, "garbage");
        let gt = b.finish(run_info());
        gt.check_consistency().unwrap();
        let w = gt.window_map();
        let dims: BTreeMap<String, String> = [("model".to_string(), "m1".to_string())].into();
        let first = w[&("acme".into(), "input_tokens".into(), dims.clone(), 0)];
        assert_eq!((first.value, first.event_count, first.provider_cost, first.late_events), (d("15.5"), 2, d("0.25"), 1));
        assert_eq!(w[&("acme".into(), "input_tokens".into(), dims, 60_000)].value, d("1"));
        assert_eq!(w[&("acme".into(), "requests".into(), BTreeMap::new(), 60_000)].value, d("2"));
        assert_eq!(w[&("acme".into(), "peak".into(), BTreeMap::new(), 0)].value, d("7"));
        assert_eq!(w[&("acme".into(), "users".into(), BTreeMap::new(), 0)].value, d("2"));
        assert_eq!(gt.malformed[0].offset, 3);
        assert_eq!(gt.malformed_at(Delivery { partition: 1, offset: 9 }).unwrap().reason, "bad_quantity");
        assert!(gt.malformed_at(Delivery { partition: 1, offset: 8 }).is_none());
        let total = gt.totals.iter().find(|t| t.meter == "input_tokens").unwrap();
        assert_eq!((total.value, total.event_count), (d("16.5"), 3));

        let json = serde_json::to_string(&gt).unwrap();
        assert!(json.contains("\"value\":\"15.5\""), "{json}");
        let path = std::env::temp_dir().join(format!("meterflow-gt-{}.json", std::process::id()));
        gt.save(&path).unwrap();
        assert_eq!(GroundTruth::load(&path).unwrap(), gt);
        std::fs::remove_file(&path).unwrap();
    }
}
