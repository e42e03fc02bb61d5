use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clickhouse::Client;
use meterflow_core::pricing::Catalog;
use meterflow_core::auth::{self, RecordKey};
use meterflow_core::rating::{
    Admission, AdjustmentOutcome, RateOutcome, RatingConfig, RatingState, RerateOutcome, WalletConfig, Wallets,
};
use meterflow_core::records::{AvroRecord, Charge, DeadLetter, MeterAggregate, WalletAdjustment};
use meterflow_runtime::checkpoint::Envelope;
use meterflow_runtime::http;
use meterflow_runtime::partitioned::{LoopConfig, Partitioned, ServiceIo};
use metrics::{counter, gauge};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::Message;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::balances::{self, DeskFeed, SealedFeed, SharedDesk};
use crate::config::Config;
use crate::metrics as m;
use crate::rows::{AdjustmentRow, LedgerRow, ParkedRow};
use crate::sink::{Outputs, RaterSink};

const SERVICE: &str = "rater";
const STATE_VERSION: u32 = 1;

/// Revenue, cost and margin rated so far, exported as gauges (exact here, f64 at export).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Totals {
    revenue: Decimal,
    cost: Decimal,
    margin: Decimal,
}

/// Everything one aggregates partition needs, checkpointed as one blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Shard {
    version: u32,
    aggregates_next: i64,
    wallet_next: i64,
    rating: RatingState,
    wallets: Wallets,
    /// Totals by [`TotalsKey`] (JSON maps need string keys).
    totals: BTreeMap<String, Totals>,
    /// The watermark last given to `RatingState::advance`.
    advanced_to: i64,
}

struct Owned {
    shard: Shard,
    /// The catalog this partition rates with (the checkpoint's until a switch).
    catalog: Arc<Catalog>,
    catalog_text: String,
    switch: Option<Switch>,
    /// Partition count of the aggregates topic (which tenants are this partition's).
    partitions: i32,
}

/// A partition restored from a checkpoint written under another catalog keeps it until it has
/// re-derived every charge already written (so no charge id is ever emitted with other
/// content), then switches to the current catalog. See docs/operations.md.
struct Switch {
    catalog: Arc<Catalog>,
    text: String,
    /// Highest charge seq, dead-lettered aggregates offset and wallet offset already in
    /// ClickHouse for this partition (from `verify`).
    max_charge_seq: i64,
    max_aggregates_offset: i64,
    max_wallet_offset: i64,
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
        &config.kafka,
        &config.clickhouse,
        &config.group,
        &config.membership,
        &[&config.topics.aggregates_topic, &config.topics.wallet_topic],
        config.http_addr,
        &shutdown,
    )
    .await?;
    let (client, producer) = (io.client.clone(), io.producer.clone());
    let record_key = meterflow_runtime::record_key::resolve(&config.auth, &client).await?;
    let mut rater = Rater {
        record_key,
        admission: Admission { max_future_ms: config.max_future_ms, max_seq_gap: config.max_seq_gap },
        rating_config: RatingConfig { grace_ms: config.period_grace_ms, ..RatingConfig::default() },
        wallet_config,
        catalog_text: text.clone(),
        switched: false,
        sink: Arc::new(RaterSink { client: client.clone(), producer, topics: config.topics.clone() }),
        client,
        catalog,
        shards: BTreeMap::new(),
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
        kafka: rater.config.kafka.clone(),
        topics: rater.config.topics.clone(),
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
        checkpoint_seconds: m::CHECKPOINT_SECONDS,
        errors: m::FLUSH_ERRORS,
        fenced: m::FENCED,
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
    shards: BTreeMap<i32, Owned>,
    outputs: Outputs,
    /// Label sets exported last time, so a revoked shard's series drop to what remains.
    gauge_labels: BTreeMap<String, ()>,
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
        let n = self.shards.get(&partition).map_or(1, |o| o.partitions);
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
            .bind(&self.config.topics.aggregates_topic)
            .bind(partition)
            .fetch_one()
            .await?;
        let max_wallet_offset: i64 = self
            .client
            .query("SELECT if(count() = 0, -1, max(source_offset)) FROM wallet_adjustments WHERE source_partition = ?")
            .bind(partition)
            .fetch_one()
            .await?;
        if let Some(sw) = self.shards.get_mut(&partition).and_then(|o| o.switch.as_mut()) {
            sw.max_charge_seq = max_charge_seq;
            sw.max_aggregates_offset = max_aggregates_offset;
            sw.max_wallet_offset = max_wallet_offset;
            tracing::info!(partition, max_charge_seq, max_aggregates_offset, max_wallet_offset, "catalog switch after these outputs");
        }
        Ok(())
    }

    fn fresh_shard(&self, partition: i32) -> Shard {
        Shard {
            version: STATE_VERSION,
            aggregates_next: 0,
            wallet_next: 0,
            rating: RatingState::new(partition, self.rating_config.clone()),
            wallets: Wallets::new(self.wallet_config.clone()),
            totals: BTreeMap::new(),
            advanced_to: i64::MIN,
        }
    }

    async fn handle_record(&mut self, msg: &BorrowedMessage<'_>, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let _ = shutdown;
        let partition = msg.partition();
        let offset = msg.offset();
        let payload = msg.payload().unwrap_or_default();
        let is_wallet = msg.topic() == self.config.topics.wallet_topic;
        let Self { shards, outputs, config, switched, record_key, admission, desk_feed, .. } = self;
        let Some(owned) = shards.get_mut(&partition) else {
            return Ok(()); // not held (the loop only hands over records of held partitions)
        };
        let catalog = &owned.catalog;
        let shard = &mut owned.shard;
        if is_wallet {
            if offset < shard.wallet_next {
                return Ok(());
            }
            shard.wallet_next = offset + 1;
            match WalletAdjustment::from_avro(payload).map_err(|e| e.to_string()).and_then(|adj| {
                shard.wallets.apply_adjustment(&adj).map(|o| (adj, o)).map_err(|e| e.to_string())
            }) {
                Ok((adj, AdjustmentOutcome::Applied { alerts, .. })) => {
                    counter!(m::WALLET_ADJUSTMENTS, "outcome" => "applied").increment(1);
                    desk_feed.touched.insert(adj.tenant.clone());
                    for a in &alerts {
                        counter!(m::ALERTS, "kind" => a.kind.clone()).increment(1);
                    }
                    outputs.adjustments.push(AdjustmentRow::new(&adj, partition, offset)?);
                    outputs.alerts.extend(alerts.into_iter().map(|a| (a, adj.created_at)));
                    for e in shard.wallets.take_ledger() {
            outputs.ledger.push(LedgerRow::new(&e, partition)?);
        }
                }
                Ok((_, AdjustmentOutcome::Duplicate { .. })) => {
                    counter!(m::WALLET_ADJUSTMENTS, "outcome" => "duplicate").increment(1);
                }
                Err(detail) => {
                    counter!(m::WALLET_ADJUSTMENTS, "outcome" => "invalid").increment(1);
                    outputs.dead_letters.push(dead_letter(&config.topics.wallet_topic, partition, offset, "invalid_adjustment", detail, payload));
                }
            }
            return Ok(());
        }
        if offset < shard.aggregates_next {
            return Ok(());
        }
        shard.aggregates_next = offset + 1;
        counter!(m::AGGREGATES_IN).increment(1);
        let broker_ms = msg.timestamp().to_millis();
        if let Some(ts) = broker_ms {
            gauge!(m::RATING_LAG).set((wall_ms() - ts).max(0) as f64 / 1000.0);
        }
        let topic = config.topics.aggregates_topic.as_str();
        let refuse = |outputs: &mut Outputs, reason: &'static str, detail: String| {
            counter!(m::REJECTED, "reason" => reason).increment(1);
            outputs.dead_letters.push(dead_letter(topic, partition, offset, reason, detail, payload));
        };
        let (rerate, tag) = match (header(msg, auth::RERATE_HEADER), header(msg, auth::HEADER)) {
            (Some(t), _) => (true, Some(t)),
            (None, t) => (false, t),
        };
        let purpose = if rerate { auth::PURPOSE_RERATE } else { auth::PURPOSE_AGGREGATE };
        if !tag.is_some_and(|t| auth::verify(record_key, &[purpose, payload], t)) {
            let what = if rerate { "rerate request" } else { "aggregate" };
            let detail = match tag {
                None => format!("{what} without a {} header: not written by meterflow", auth::HEADER),
                Some(_) => format!("{what} with an invalid tag: forged, altered, or written with another record key"),
            };
            refuse(outputs, "unauthenticated", detail);
            return Ok(());
        }
        let agg = match MeterAggregate::from_avro(payload) {
            Ok(a) => a,
            Err(e) => {
                refuse(outputs, "undecodable", e.to_string());
                return Ok(());
            }
        };
        let mut charges = if rerate {
            let (state, reason, detail, charges) = match shard.rating.rerate(catalog, &agg) {
                RerateOutcome::NotParked => {
                    counter!(m::RERATES, "outcome" => "not_parked").increment(1);
                    return Ok(());
                }
                RerateOutcome::Charged(c) => {
                    counter!(m::RERATES, "outcome" => "charged").increment(1);
                    desk_feed.touched.insert(agg.tenant.clone());
                    ("rerated", "", format!("charged by the rerate request at offset {offset}"), c)
                }
                RerateOutcome::StillParked { reason, error } => {
                    counter!(m::RERATES, "outcome" => "still_parked").increment(1);
                    ("parked", reason.as_str(), error.to_string(), Vec::new())
                }
                RerateOutcome::Rejected(e) => {
                    counter!(m::RERATES, "outcome" => "rejected").increment(1);
                    refuse(outputs, "unrateable", e.to_string());
                    ("rejected", "unrateable", e.to_string(), Vec::new())
                }
            };
            outputs.parked.push(ParkedRow::new(&agg, partition, offset, state, reason, detail, payload));
            charges
        } else {
            if let Err((reason, detail)) = shard.rating.screen(&agg, broker_ms, admission) {
                refuse(outputs, reason, detail);
                return Ok(());
            }
            if shard.rating.high_water(agg.source_partition).is_some_and(|hw| agg.seq > hw + 1) {
                counter!(m::SEQ_GAPS).increment(1);
                tracing::warn!(
                    partition,
                    offset,
                    source_partition = agg.source_partition,
                    seq = agg.seq,
                    high_water = shard.rating.high_water(agg.source_partition),
                    "aggregate seq skips past high water + 1"
                );
            }
            // Never an `Err` any more: what cannot be priced is parked.
            let outcome = shard.rating.rate(catalog, &agg).with_context(|| format!("rating aggregate at offset {offset}"))?;
            // Charged, parked, rejected or a re-delivery (skipped): whatever the outcome, this
            // revision of the window exists, so the window is no longer pending. (A skipped one
            // matters after a double restart: the aggregator replays, re-publishes totals of
            // windows the restarted rater has no tombstone for, and then re-emits their close.)
            desk_feed.touched.insert(agg.tenant.clone());
            desk_feed.settled.push(agg.clone());
            let mut charges = match outcome {
                RateOutcome::Charged(c) => c,
                RateOutcome::Skipped { .. } => {
                    counter!(m::SKIPPED).increment(1);
                    Vec::new()
                }
                RateOutcome::Rejected(e) => {
                    refuse(outputs, "unrateable", e.to_string());
                    Vec::new()
                }
                RateOutcome::Parked { reason, error } => {
                    counter!(m::PARKED, "reason" => reason.as_str()).increment(1);
                    let detail = format!("parked: {error} (meterflow-admin rerate re-rates it after a catalog fix)");
                    outputs.parked.push(ParkedRow::new(&agg, partition, offset, "parked", reason.as_str(), error.to_string(), payload));
                    outputs.dead_letters.push(dead_letter(topic, partition, offset, reason.as_str(), detail, payload));
                    Vec::new()
                }
            };
            // Periods close on the aggregates' own (event-time) watermark: deterministic in replay.
            if agg.emitted_at >= shard.advanced_to.saturating_add(60_000) {
                shard.advanced_to = agg.emitted_at;
                charges.extend(shard.rating.advance(catalog, agg.emitted_at));
                // Credit expires on the same event-time watermark, never on the wall clock.
                for a in shard.wallets.expire(agg.emitted_at) {
                    counter!(m::ALERTS, "kind" => a.kind.clone()).increment(1);
                    outputs.alerts.push((a, agg.emitted_at));
                }
            }
            charges
        };
        for c in charges.drain(..) {
            let t = shard.totals.entry(totals_key(&c.currency, &label_meter(&c), &c.plan)).or_default();
            t.revenue += c.amount;
            t.cost += c.provider_cost;
            t.margin += c.margin;
            counter!(m::CHARGES, "kind" => c.kind.clone()).increment(1);
            for a in shard.wallets.apply_charge_at(&c, Some(agg.emitted_at)) {
                counter!(m::ALERTS, "kind" => a.kind.clone()).increment(1);
                outputs.alerts.push((a, agg.emitted_at));
            }
            outputs.charges.push(c);
        }
        for e in shard.wallets.take_ledger() {
            outputs.ledger.push(LedgerRow::new(&e, partition)?);
        }
        if owned.switch.is_some() {
            *switched |= try_switch(partition, owned);
        }
        Ok(())
    }

    /// Freezes the balances desk's feed with the batch being taken (see [`SealedFeed`]).
    fn seal_feed(&mut self) {
        let shards = &self.shards;
        self.writing_feed = Some(self.desk_feed.seal(|tenant| {
            let n = shards.values().next()?.partitions;
            let o = shards.get(&meterflow_core::partitioning::partition_for(tenant.as_bytes(), n))?;
            Some(balances::settled_of(&o.shard.rating, &o.shard.wallets, tenant))
        }));
    }

    fn export_gauges(&mut self) {
        let parked: usize = self.shards.values().map(|o| o.shard.rating.parked_count()).sum();
        gauge!(m::PARKED_NOW).set(parked as f64);
        let mut sums: BTreeMap<String, Totals> = BTreeMap::new();
        for o in self.shards.values() {
            for (k, t) in &o.shard.totals {
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
            let mut parts = key.splitn(3, '\u{1f}');
            let (currency, meter, plan) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let labels = [("currency", currency.to_owned()), ("meter", meter.to_owned()), ("plan", plan.to_owned())];
            gauge!(m::REVENUE, &labels).set(t.revenue.to_f64().unwrap_or(0.0));
            gauge!(m::COST, &labels).set(t.cost.to_f64().unwrap_or(0.0));
            gauge!(m::MARGIN, &labels).set(t.margin.to_f64().unwrap_or(0.0));
            self.gauge_labels.insert(key.clone(), ());
        }
        if self.config.wallet_gauges {
            for o in self.shards.values() {
                for (tenant, by_cur) in o.shard.wallets.balances() {
                    if !o.shard.wallets.has_wallet(tenant) {
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
        vec![self.config.topics.aggregates_topic.clone(), self.config.topics.wallet_topic.clone()]
    }

    fn config_text(&self, partition: i32) -> String {
        self.shards.get(&partition).map_or_else(|| self.catalog_text.clone(), |o| o.catalog_text.clone())
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
        let mut switch = None;
        let (mut catalog, mut catalog_text) = (self.catalog.clone(), self.catalog_text.clone());
        let shard = match from {
            Some(env) if env.meta.operator.is_none() => {
                let shard: Shard = serde_json::from_slice(&env.state).context("decoding the rater state")?;
                anyhow::ensure!(shard.version == STATE_VERSION, "checkpoint version {} is not {STATE_VERSION}", shard.version);
                tracing::info!(partition, aggregates_next = shard.aggregates_next, wallet_next = shard.wallet_next, "restored checkpoint");
                if !env.meta.config_text.is_empty() && env.meta.config_text != self.catalog_text {
                    let old = Catalog::from_toml_str(&env.meta.config_text).context("the catalog recorded in the checkpoint")?;
                    tracing::warn!(
                        partition,
                        "catalog changed since the checkpoint: re-rating what was already charged with the recorded \
                         one, then switching"
                    );
                    switch = Some(Switch {
                        catalog: self.catalog.clone(),
                        text: self.catalog_text.clone(),
                        max_charge_seq: i64::MAX,
                        max_aggregates_offset: i64::MAX,
                        max_wallet_offset: i64::MAX,
                    });
                    catalog = Arc::new(old);
                    catalog_text = env.meta.config_text.clone();
                }
                shard
            }
            Some(env) => {
                let mut shard = self.fresh_shard(partition);
                let topics = &self.config.topics;
                shard.aggregates_next = env.meta.offsets.get(&topics.aggregates_topic).copied().unwrap_or(0);
                shard.wallet_next = env.meta.offsets.get(&topics.wallet_topic).copied().unwrap_or(0);
                tracing::warn!(partition, aggregates_next = shard.aggregates_next, wallet_next = shard.wallet_next, "fresh state by operator decision");
                shard
            }
            None => self.fresh_shard(partition),
        };
        let partitions = partition_counts.get(&self.config.topics.aggregates_topic).copied().unwrap_or(1);
        // Its tenants' balances are published from the restored state on the next flush.
        self.desk_feed.touched.extend(shard.rating.tenants().cloned());
        self.desk_feed.touched.extend(shard.wallets.balances().keys().cloned());
        self.desk.lock().expect("desk lock").own(partition, partitions);
        self.shards.insert(partition, Owned { shard, catalog, catalog_text, switch, partitions });
        Ok(())
    }

    async fn verify(&mut self, partition: i32, from: Option<&Envelope>) -> anyhow::Result<()> {
        if self.shards.get(&partition).is_some_and(|o| o.switch.is_some()) {
            self.find_switch_point(partition).await?;
            let o = self.shards.get_mut(&partition).context("restored above")?;
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
        let s = &self.shards.get(&partition)?.shard;
        Some(if topic == self.config.topics.wallet_topic { s.wallet_next } else { s.aggregates_next })
    }

    fn release(&mut self, partition: i32) {
        self.shards.remove(&partition);
        self.desk.lock().expect("desk lock").disown(partition);
    }

    fn snapshot(&mut self, partition: i32) -> anyhow::Result<Vec<u8>> {
        let o = self.shards.get(&partition).context("snapshot of a partition not held")?;
        if o.switch.is_none() {
            self.switched = false;
        }
        Ok(serde_json::to_vec(&o.shard)?)
    }

    async fn handle(&mut self, msg: &BorrowedMessage<'_>, shutdown: &CancellationToken) -> anyhow::Result<()> {
        self.handle_record(msg, shutdown).await
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
fn try_switch(partition: i32, o: &mut Owned) -> bool {
    let Some(sw) = &o.switch else { return false };
    let s = &o.shard;
    if s.rating.charges_emitted() < sw.max_charge_seq
        || s.aggregates_next <= sw.max_aggregates_offset
        || s.wallet_next <= sw.max_wallet_offset
    {
        return false;
    }
    let sw = o.switch.take().expect("checked above");
    o.catalog = sw.catalog;
    o.catalog_text = sw.text;
    tracing::warn!(
        partition,
        aggregates_next = o.shard.aggregates_next,
        charges = o.shard.rating.charges_emitted(),
        "switched to the new catalog"
    );
    true
}

fn totals_key(currency: &str, meter: &str, plan: &str) -> String {
    format!("{currency}\u{1f}{meter}\u{1f}{plan}")
}

fn label_meter(c: &Charge) -> String {
    if c.meter.is_empty() {
        c.kind.clone()
    } else {
        c.meter.clone()
    }
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

/// The value of the first header named `name`.
fn header<'a>(msg: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a [u8]> {
    msg.headers()?.iter().find(|h| h.key == name)?.value
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
