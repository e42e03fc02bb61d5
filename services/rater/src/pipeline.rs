use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use anyhow::Context;
use clickhouse::Client;
use meterflow_core::pricing::Catalog;
use meterflow_core::auth::{self, RecordKey};
use meterflow_core::rating::partition::{
    AggregateRecord, OutputMark, PartitionConfig, RaterPartition, RerateVerdict, Step, Totals, TotalsKey, Verdict,
};
use meterflow_core::rating::{Admission, RatingConfig, WalletConfig};
use meterflow_runtime::checkpoint::Envelope;
use meterflow_runtime::http;
use meterflow_runtime::partitioned::{LoopConfig, Partitioned, ServiceIo};
use meterflow_runtime::record::Record;
use meterflow_runtime::resume::{Configured, Resume};
use metrics::{counter, gauge};
use rust_decimal::prelude::ToPrimitive;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::balances::{self, DeskFeed, SealedFeed, SharedDesk};
use crate::config::Config;
use crate::metrics as m;
use crate::sink::{Outputs, RaterSink};

const SERVICE: &str = "rater";

/// A held partition: its core state machine and the catalog it rates with.
struct HeldPartition {
    part: RaterPartition,
    /// The catalog this partition rates with (the checkpoint's until a switch; the mark is
    /// the highest charge seq, dead-lettered aggregates offset and wallet offset already in
    /// ClickHouse for this partition, from `verify`).
    catalog: Configured<Catalog, OutputMark>,
    /// Partition count of the aggregates topic (which tenants are this partition's).
    partitions: i32,
}

/// Runs until `shutdown`, then flushes and checkpoints.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    http::prometheus(); // the recorder must exist before metrics are described
    m::describe();
    let text = std::fs::read_to_string(&config.catalog)
        .with_context(|| format!("reading catalog {}", config.catalog.display()))?;
    let catalog = Arc::new(Catalog::from_toml_str(&text)?);
    if let Ok(meters) = std::fs::read_to_string(&config.meters) {
        let meters = meterflow_core::meter::MeterCatalog::from_toml_str(&meters)
            .with_context(|| format!("reading meters file {}", config.meters.display()))?;
        catalog.validate_meters(&meters).context("the catalog does not match the meters")?;
    }
    let mut low_balance = BTreeMap::new();
    for kv in &config.low_balance {
        let (cur, amount) = kv
            .split_once('=')
            .with_context(|| format!("low balance threshold {kv:?} is not CURRENCY=AMOUNT"))?;
        let amount = meterflow_core::decimal::parse("low_balance", amount.trim())?;
        low_balance.insert(cur.trim().to_owned(), amount);
    }
    let wallet_config = WalletConfig { low_balance, ..WalletConfig::default() };

    let io = ServiceIo::connect(
        &config.service,
        &config.group,
        &config.membership,
        &[&config.service.conn.topics.aggregates_topic, &config.service.conn.topics.wallet_topic],
        config.http_addr,
        &shutdown,
    )
    .await?;
    let (client, producer, record_key) = (io.client.clone(), io.producer.clone(), io.record_key.clone());
    let mut rater = Rater {
        record_key,
        admission: Admission { max_future_ms: config.max_future_ms, max_seq_gap: config.max_seq_gap },
        rating_config: RatingConfig { grace_ms: config.period_grace_ms, ..RatingConfig::default() },
        wallet_config,
        catalog_text: text.clone(),
        switched: false,
        sink: Arc::new(RaterSink { client: client.clone(), producer, topics: config.service.conn.topics.clone() }),
        client,
        catalog,
        held: BTreeMap::new(),
        outputs: Outputs::default(),
        config,
        gauge_labels: BTreeMap::new(),
        desk: SharedDesk::default(),
        desk_feed: DeskFeed::default(),
        writing_feed: None,
    };
    // Stops with the service, and also when `run` is dropped without a shutdown.
    let balances_stop = shutdown.child_token();
    let publishing = balances::Publishing {
        kafka: rater.config.service.conn.kafka.clone(),
        topics: rater.config.service.conn.topics.clone(),
        record_key: rater.record_key.clone(),
        producer: rater.sink.producer.clone(),
        client: rater.client.clone(),
        catalog: rater.catalog.clone(),
    };
    tokio::spawn(balances::run(publishing, rater.desk.clone(), balances_stop.clone()));
    let _balances_guard = balances_stop.drop_guard();
    let loop_config = LoopConfig {
        flush_interval: Duration::from_millis(rater.config.flush_interval_ms as u64),
        checkpoint_interval: Duration::from_millis(rater.config.checkpoint_interval_ms as u64),
        max_buffered_rows: rater.config.max_buffered_rows,
        max_buffered_bytes: rater.config.max_buffered_bytes,
        // The rater's state is small: every checkpoint is a full one.
        deltas: meterflow_runtime::chain::DeltaPolicy::default(),
        metrics: m::RUNTIME,
    };
    io.serve(&mut rater, &loop_config, &shutdown).await
}

struct Rater {
    config: Config,
    record_key: RecordKey,
    admission: Admission,
    rating_config: RatingConfig,
    wallet_config: WalletConfig,
    catalog: Arc<Catalog>,
    client: Client,
    sink: Arc<RaterSink>,
    /// The current catalog (config/catalog.toml).
    catalog_text: String,
    /// A partition switched catalog since the last snapshot (checkpoint it at once).
    switched: bool,
    held: BTreeMap<i32, HeldPartition>,
    outputs: Outputs,
    /// Label sets exported last time, so a revoked shard's series drop to what remains.
    gauge_labels: BTreeMap<TotalsKey, ()>,
    /// Pending spend and settled state for real-time balances (see `balances`).
    desk: SharedDesk,
    desk_feed: DeskFeed,
    /// The feed of the batch being written, handed to the desk when it is.
    writing_feed: Option<SealedFeed>,
}

impl Rater {
    /// What this partition already wrote to ClickHouse: the charges of its tenants (the
    /// aggregates of a tenant are on partition `partition_for(tenant)`), its dead-lettered
    /// aggregates and its applied wallet adjustments.
    async fn find_switch_point(&mut self, partition: i32) -> anyhow::Result<()> {
        #[derive(Debug, clickhouse::Row, Deserialize)]
        struct TenantSeq {
            tenant: String,
            seq: i64,
        }
        let n = self.held.get(&partition).map_or(1, |o| o.partitions);
        let rows: Vec<TenantSeq> =
            self.client.query("SELECT tenant, max(seq) AS seq FROM charges GROUP BY tenant").fetch_all().await?;
        let max_charge_seq = rows
            .iter()
            .filter(|r| meterflow_core::partitioning::partition_for(r.tenant.as_bytes(), n) == partition)
            .map(|r| r.seq)
            .max()
            .unwrap_or(0);
        let max_aggregates_offset: i64 = self
            .client
            .query("SELECT if(count() = 0, -1, max(source_offset)) FROM dead_letters WHERE source_topic = ? AND source_partition = ?")
            .bind(&self.config.service.conn.topics.aggregates_topic)
            .bind(partition)
            .fetch_one()
            .await?;
        let max_wallet_offset: i64 = self
            .client
            .query("SELECT if(count() = 0, -1, max(source_offset)) FROM wallet_adjustments WHERE source_partition = ?")
            .bind(partition)
            .fetch_one()
            .await?;
        if let Some(sw) = self.held.get_mut(&partition).and_then(|o| o.catalog.switch.as_mut()) {
            sw.after = OutputMark { max_charge_seq, max_aggregates_offset, max_wallet_offset };
            tracing::info!(partition, max_charge_seq, max_aggregates_offset, max_wallet_offset, "catalog switch after these outputs");
        }
        Ok(())
    }

    fn partition_config(&self, partition: i32) -> PartitionConfig {
        PartitionConfig {
            partition,
            aggregates_topic: self.config.service.conn.topics.aggregates_topic.clone(),
            wallet_topic: self.config.service.conn.topics.wallet_topic.clone(),
            record_key: self.record_key.clone(),
            admission: self.admission,
            rating: self.rating_config.clone(),
            wallets: self.wallet_config.clone(),
        }
    }

    async fn handle_record(&mut self, msg: &Record<'_>) -> anyhow::Result<()> {
        let (partition, offset, payload) = (msg.partition, msg.offset, msg.payload);
        let Some(owned) = self.held.get_mut(&partition) else {
            return Ok(()); // not held (the loop only hands over records of held partitions)
        };
        let step = if msg.topic == self.config.service.conn.topics.wallet_topic {
            owned.part.on_adjustment(offset, payload)
        } else {
            let broker_ms = msg.timestamp.to_millis();
            let rec = AggregateRecord {
                offset,
                payload,
                broker_ms,
                tag: msg.header(auth::HEADER),
                rerate_tag: msg.header(auth::RERATE_HEADER),
            };
            let step = owned.part.on_aggregate(&owned.catalog.config, rec).with_context(|| format!("rating aggregate at offset {offset}"))?;
            if step.verdict != Verdict::Replayed {
                counter!(m::AGGREGATES_IN).increment(1);
                if let Some(ts) = broker_ms {
                    gauge!(m::RATING_LAG).set((wall_ms() - ts).max(0) as f64 / 1000.0);
                }
            }
            step
        };
        count(partition, offset, &step);
        let Step { verdict, touched, settled, out, .. } = step;
        self.desk_feed.touched.extend(touched);
        self.desk_feed.settled.extend(settled);
        self.outputs.push(out, partition)?;
        if verdict.rated() && owned.catalog.switch.is_some() {
            self.switched |= try_switch(partition, owned);
        }
        Ok(())
    }

    /// Freezes the balances desk's feed with the batch being taken (see [`SealedFeed`]).
    fn seal_feed(&mut self) {
        let held = &self.held;
        self.writing_feed = Some(self.desk_feed.seal(|tenant| {
            let n = held.values().next()?.partitions;
            let o = held.get(&meterflow_core::partitioning::partition_for(tenant.as_bytes(), n))?;
            Some(balances::settled_of(o.part.rating(), o.part.wallets(), tenant))
        }));
    }

    fn export_gauges(&mut self) {
        let parked: usize = self.held.values().map(|o| o.part.rating().parked_count()).sum();
        gauge!(m::PARKED_NOW).set(parked as f64);
        let mut sums: BTreeMap<TotalsKey, Totals> = BTreeMap::new();
        for o in self.held.values() {
            for (k, t) in o.part.totals() {
                let s = sums.entry(k.clone()).or_default();
                s.revenue += t.revenue;
                s.cost += t.cost;
                s.margin += t.margin;
            }
        }
        for k in self.gauge_labels.keys() {
            sums.entry(k.clone()).or_default();
        }
        for (key, t) in &sums {
            let labels = [("currency", key.currency.clone()), ("meter", key.meter.clone()), ("plan", key.plan.clone())];
            gauge!(m::REVENUE, &labels).set(t.revenue.to_f64().unwrap_or(0.0));
            gauge!(m::COST, &labels).set(t.cost.to_f64().unwrap_or(0.0));
            gauge!(m::MARGIN, &labels).set(t.margin.to_f64().unwrap_or(0.0));
            self.gauge_labels.insert(key.clone(), ());
        }
        if self.config.wallet_gauges {
            for o in self.held.values() {
                for (tenant, by_cur) in o.part.wallets().balances() {
                    if !o.part.wallets().has_wallet(tenant) {
                        continue; // postpaid: no wallet to watch, and no unbounded series
                    }
                    for (cur, bal) in by_cur {
                        gauge!(m::WALLET_BALANCE, "tenant" => tenant.clone(), "currency" => cur.clone())
                            .set(bal.to_f64().unwrap_or(0.0));
                    }
                }
            }
        }
    }
}

impl Partitioned for Rater {
    type Batch = Outputs;

    fn service(&self) -> &'static str {
        SERVICE
    }

    fn group(&self) -> &str {
        &self.config.group
    }

    /// Partition N of the aggregates and of the wallet topic share one state.
    fn topics(&self) -> Vec<String> {
        vec![self.config.service.conn.topics.aggregates_topic.clone(), self.config.service.conn.topics.wallet_topic.clone()]
    }

    fn config_text(&self, partition: i32) -> String {
        self.held.get(&partition).map_or_else(|| self.catalog_text.clone(), |o| o.catalog.text.clone())
    }

    fn wants_checkpoint(&self) -> bool {
        self.switched
    }

    fn restore(
        &mut self,
        partition: i32,
        from: Option<&Envelope>,
        partition_counts: &BTreeMap<String, i32>,
    ) -> anyhow::Result<()> {
        let config = self.partition_config(partition);
        let resume = Resume::of(from, &self.catalog_text);
        let parse = |text: &str| Ok(Catalog::from_toml_str(text)?);
        let unknown = OutputMark { max_charge_seq: i64::MAX, max_aggregates_offset: i64::MAX, max_wallet_offset: i64::MAX };
        let catalog = Configured::resume(&resume, partition, (&self.catalog, &self.catalog_text), parse, unknown)?;
        let part = match resume {
            Resume::Checkpoint { state, .. } => {
                let part = RaterPartition::restore(config, state).context("decoding the rater state")?;
                tracing::info!(partition, aggregates_next = part.aggregates_next(), wallet_next = part.wallet_next(), "restored checkpoint");
                part
            }
            Resume::Operator { offsets, .. } => {
                let topics = &self.config.service.conn.topics;
                let aggregates_next = offsets.get(&topics.aggregates_topic).copied().unwrap_or(0);
                let wallet_next = offsets.get(&topics.wallet_topic).copied().unwrap_or(0);
                tracing::warn!(partition, aggregates_next, wallet_next, "fresh state by operator decision");
                RaterPartition::starting_at(config, aggregates_next, wallet_next)
            }
            Resume::Fresh => RaterPartition::new(config),
        };
        let partitions = partition_counts.get(&self.config.service.conn.topics.aggregates_topic).copied().unwrap_or(1);
        // Its tenants' balances are published from the restored state on the next flush.
        self.desk_feed.touched.extend(part.rating().tenants().cloned());
        self.desk_feed.touched.extend(part.wallets().balances().keys().cloned());
        self.desk.lock().unwrap_or_else(PoisonError::into_inner).own(partition, partitions);
        self.held.insert(partition, HeldPartition { part, catalog, partitions });
        Ok(())
    }

    async fn verify(&mut self, partition: i32, from: Option<&Envelope>) -> anyhow::Result<()> {
        if self.held.get(&partition).is_some_and(|o| o.catalog.switch.is_some()) {
            self.find_switch_point(partition).await?;
            let o = self.held.get_mut(&partition).context("restored above")?;
            self.switched |= try_switch(partition, o);
        }
        if from.is_none() {
            let n: u64 = self
                .client
                .query("SELECT count() FROM wallet_adjustments WHERE source_partition = ?")
                .bind(partition)
                .fetch_one()
                .await?;
            anyhow::ensure!(
                n == 0,
                "no checkpoint, but ClickHouse already holds {n} wallet adjustments applied from this partition: \
                 starting fresh would lose the wallets' state"
            );
        }
        Ok(())
    }

    fn position(&self, topic: &str, partition: i32) -> Option<i64> {
        let p = &self.held.get(&partition)?.part;
        Some(if topic == self.config.service.conn.topics.wallet_topic { p.wallet_next() } else { p.aggregates_next() })
    }

    fn release(&mut self, partition: i32) {
        self.held.remove(&partition);
        self.desk.lock().unwrap_or_else(PoisonError::into_inner).disown(partition);
    }

    fn snapshot(&mut self, partition: i32) -> anyhow::Result<Vec<u8>> {
        let o = self.held.get(&partition).context("snapshot of a partition not held")?;
        if o.catalog.switch.is_none() {
            self.switched = false;
        }
        Ok(o.part.snapshot())
    }

    async fn handle(&mut self, record: &Record<'_>, _shutdown: &CancellationToken) -> anyhow::Result<()> {
        self.handle_record(record).await
    }

    fn buffered_rows(&self) -> usize {
        self.outputs.rows()
    }

    /// Rater rows are small (a charge, an alert, a ledger line; a dead letter carries an
    /// aggregate of a few hundred bytes): a per-row estimate keeps this O(1) per record.
    fn buffered_bytes(&self) -> usize {
        self.outputs.rows() * 512
    }

    fn take_batch(&mut self) -> Outputs {
        self.seal_feed();
        std::mem::take(&mut self.outputs)
    }

    fn write_batch(&self, batch: Outputs, stop: CancellationToken) -> impl Future<Output = bool> + Send + 'static {
        self.sink.clone().write(batch, stop)
    }

    fn batch_written(&mut self) {
        self.export_gauges();
        if let Some(feed) = self.writing_feed.take() {
            feed.hand_over(&self.desk);
        }
    }
}

/// Switches `o` to the new catalog once everything already written has been re-derived;
/// true if it switched.
fn try_switch(partition: i32, o: &mut HeldPartition) -> bool {
    let part = &o.part;
    if o.catalog.switch_if(|after| part.has_passed(after)).is_none() {
        return false;
    }
    tracing::warn!(
        partition,
        aggregates_next = o.part.aggregates_next(),
        charges = o.part.rating().charges_emitted(),
        "switched to the new catalog"
    );
    true
}

/// The metrics of one record.
fn count(partition: i32, offset: i64, step: &Step) {
    match step.verdict {
        Verdict::Replayed | Verdict::Charged => {}
        Verdict::Adjustment(v) => counter!(m::WALLET_ADJUSTMENTS, "outcome" => v.as_str()).increment(1),
        Verdict::Refused(reason) => counter!(m::REJECTED, "reason" => reason).increment(1),
        Verdict::Rejected => counter!(m::REJECTED, "reason" => "unrateable").increment(1),
        Verdict::Skipped => counter!(m::SKIPPED).increment(1),
        Verdict::Parked(reason) => counter!(m::PARKED, "reason" => reason.as_str()).increment(1),
        Verdict::Rerate(v) => {
            counter!(m::RERATES, "outcome" => v.as_str()).increment(1);
            if v == RerateVerdict::Rejected {
                counter!(m::REJECTED, "reason" => "unrateable").increment(1);
            }
        }
    }
    if let (Some(high_water), Some(agg)) = (step.seq_gap, &step.settled) {
        counter!(m::SEQ_GAPS).increment(1);
        tracing::warn!(partition, offset, source_partition = agg.source_partition, seq = agg.seq, high_water, "aggregate seq skips past high water + 1");
    }
    for c in &step.out.charges {
        counter!(m::CHARGES, "kind" => c.kind.clone()).increment(1);
    }
    for (a, _) in &step.out.alerts {
        counter!(m::ALERTS, "kind" => a.kind.clone()).increment(1);
    }
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
