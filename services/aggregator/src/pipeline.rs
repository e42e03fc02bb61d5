use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clickhouse::Client;
use meterflow_core::codec::UsageEventCodec;
use meterflow_core::engine::{EngineConfig, PartitionEngine};
use meterflow_core::ledger::LedgerEntry;
use meterflow_core::meter::MeterCatalog;
use meterflow_runtime::checkpoint::Envelope;
use meterflow_runtime::http;
use meterflow_runtime::partitioned::{LoopConfig, Partitioned, ServiceIo};
use meterflow_runtime::record::Record;
use meterflow_runtime::resume::{Configured, Resume};
use meterflow_runtime::retry::Backoff;
use metrics::gauge;
use rdkafka::producer::FutureProducer;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::lag::spawn_lag_reporter;
use crate::metrics as m;
use crate::provisional::Publisher;
use crate::record::wall_ms;
use crate::rows::LedgerRow;
use crate::sink::{Outputs, Sink};
use crate::stored::Stored;

mod events;
mod ticks;

const SERVICE: &str = "aggregator";

/// Runs until `shutdown`, then flushes and checkpoints what it holds.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    http::prometheus(); // the recorder must exist before metrics are described
    m::describe();
    let meters_text = std::fs::read_to_string(&config.meters)
        .with_context(|| format!("reading meters file {}", config.meters.display()))?;
    let catalog = Arc::new(MeterCatalog::from_toml_str(&meters_text)?);
    let io = ServiceIo::connect(
        &config.service,
        &config.group,
        &config.membership,
        &[&config.service.conn.topics.usage_topic],
        config.http_addr,
        &shutdown,
    )
    .await?;
    let (client, producer, record_key) = (io.client.clone(), io.producer.clone(), io.record_key.clone());
    let mut agg = Aggregator {
        engine_config: EngineConfig {
            dedup_horizon_ms: config.dedup_horizon_ms,
            hot_max_ids: config.dedup_hot_max_ids,
            retain_closed_ms: config.retain_closed_ms,
            max_windows: config.max_windows,
            max_open_windows_per_tenant: config.max_open_windows_per_tenant,
            ..EngineConfig::default()
        },
        meters_text: meters_text.clone(),
        switched: false,
        sink: Arc::new(Sink {
            client: client.clone(),
            producer: producer.clone(),
            aggregates_topic: config.service.conn.topics.aggregates_topic.clone(),
            dead_letter_topic: config.service.conn.topics.dead_letter_topic.clone(),
            backoff: Backoff::default(),
            record_key: record_key.clone(),
        }),
        provisional: Publisher {
            producer: producer.clone(),
            topic: config.service.conn.topics.provisional_topic.clone(),
            record_key,
            interval: Duration::from_millis(config.provisional_interval_ms.max(0) as u64),
            last: Instant::now(),
        },
        client,
        producer,
        catalog,
        codec: UsageEventCodec::new(),
        partitions: BTreeMap::new(),
        outputs: Outputs::default(),
        writing: None,
        spare: Outputs::default(),
        counters: m::Counters::register(),
        runtime: Handle::current(),
        now: Instant::now(),
        config,
        last_progress: Instant::now(),
        progress_records: 0,
        warned_create_time: false,
        positions: Arc::default(),
    };
    // Stops with the service, and also when `run` is dropped without a shutdown (a task
    // aborted in-process): its blocking thread would otherwise outlive the service.
    let lag_stop = shutdown.child_token();
    spawn_lag_reporter(&agg.config, agg.positions.clone(), lag_stop.clone())?;
    let _lag_guard = lag_stop.drop_guard();
    let loop_config = LoopConfig {
        flush_interval: Duration::from_millis(agg.config.flush_interval_ms as u64),
        checkpoint_interval: Duration::from_millis(agg.config.checkpoint_interval_ms as u64),
        max_buffered_rows: agg.config.max_buffered_rows,
        max_buffered_bytes: agg.config.max_buffered_bytes,
        deltas: agg.config.delta_policy(),
        metrics: m::RUNTIME,
    };
    io.serve(&mut agg, &loop_config, &shutdown).await
}

/// The highest `seq` and source offset already in ClickHouse for a partition (from `verify`):
/// a partition switches meter definitions once its engine is past both (see [`Configured`]).
#[derive(Debug, Clone, Copy)]
struct Written {
    max_seq: i64,
    max_offset: i64,
}

impl Written {
    /// Before `verify` has looked: nothing passes it.
    const UNKNOWN: Written = Written { max_seq: i64::MAX, max_offset: i64::MAX };
}

/// A held partition: its engine and the meters it runs with.
struct HeldPartition {
    engine: PartitionEngine,
    /// The meters the engine runs with (the checkpoint's until a switch).
    meters: Configured<MeterCatalog, Written>,
    /// Partition count of the usage topic (the partitioning contract's modulus).
    partitions: i32,
    last_input: Instant,
    last_tick: Instant,
    /// Events arrived since the last tick was written (restatements may be pending).
    input_since_tick: bool,
    /// `next_offset` of the last ingest-ledger entry buffered for this partition.
    ledger_at: i64,
    /// The engine was rebuilt since its last checkpoint (a configuration switch), so its
    /// changes are not relative to a stored one: the next checkpoint must be full.
    needs_base: bool,
}

struct Aggregator {
    config: Config,
    engine_config: EngineConfig,
    catalog: Arc<MeterCatalog>,
    codec: UsageEventCodec,
    client: Client,
    producer: FutureProducer,
    /// The current meter definitions (config/meters.toml).
    meters_text: String,
    /// A partition switched configuration since the last snapshot (checkpoint it at once).
    switched: bool,
    sink: Arc<Sink>,
    /// Running totals of open windows, after each written batch and on the timer (best effort).
    provisional: Publisher,
    partitions: BTreeMap<i32, HeldPartition>,
    /// The buffer being filled.
    outputs: Outputs,
    /// The batch being written (cold look-ups consult it until it is in ClickHouse).
    writing: Option<Arc<Outputs>>,
    /// The buffers of the last written batch, emptied, for the next one to fill.
    spare: Outputs,
    counters: m::Counters,
    /// For the cold stores' blocking look-ups (taken once, not per record).
    runtime: Handle,
    /// The clock as of the last timer tick (~100 ms): idle detection needs no finer one, and
    /// reading the clock for every record cost ~3% of the CPU.
    now: Instant,
    last_progress: Instant,
    /// Offsets covered per owned partition, read by the lag reporter thread.
    positions: Arc<std::sync::Mutex<BTreeMap<i32, i64>>>,
    /// Records handled when progress was last logged.
    progress_records: u64,
    /// Warned once that the usage topic carries producer timestamps.
    warned_create_time: bool,
}

impl Partitioned for Aggregator {
    type Batch = Arc<Outputs>;

    fn service(&self) -> &'static str {
        SERVICE
    }

    fn group(&self) -> &str {
        &self.config.group
    }

    fn topics(&self) -> Vec<String> {
        vec![self.config.service.conn.topics.usage_topic.clone()]
    }

    fn config_text(&self, partition: i32) -> String {
        self.partitions.get(&partition).map_or_else(|| self.meters_text.clone(), |p| p.meters.text.clone())
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
        let topic = &self.config.service.conn.topics.usage_topic;
        let partitions = partition_counts.get(topic).copied().unwrap_or(0);
        let resume = Resume::of(from, &self.meters_text);
        let parse = |text: &str| Ok(MeterCatalog::from_toml_str(text)?);
        let meters = Configured::resume(&resume, partition, (&self.catalog, &self.meters_text), parse, Written::UNKNOWN)?;
        let engine = match resume {
            Resume::Checkpoint { state, .. } => {
                let engine = PartitionEngine::restore(state, meters.config.clone(), self.engine_config.clone())?;
                tracing::info!(partition, next_offset = engine.next_offset(), next_seq = engine.next_seq(), "restored checkpoint");
                engine
            }
            Resume::Operator { offsets, decision } => {
                let mut engine = PartitionEngine::new(self.catalog.clone(), self.engine_config.clone(), partition)?;
                let offset = offsets.get(topic).copied().unwrap_or(0);
                let seq = decision.next_seq.unwrap_or(1);
                engine.start_at(offset, seq)?;
                tracing::warn!(partition, next_offset = offset, next_seq = seq, action = %decision.action, "fresh state by operator decision");
                engine
            }
            Resume::Fresh => {
                tracing::info!(partition, "no checkpoint: fresh state");
                PartitionEngine::new(self.catalog.clone(), self.engine_config.clone(), partition)?
            }
        };
        let now = Instant::now();
        self.partitions
            .insert(partition, HeldPartition { engine, meters, partitions, last_input: now, last_tick: now, input_since_tick: true, ledger_at: -1, needs_base: false });
        gauge!(m::PARTITIONS_OWNED).set(self.partitions.len() as f64);
        Ok(())
    }

    async fn verify(&mut self, partition: i32, from: Option<&Envelope>) -> anyhow::Result<()> {
        let Some(part) = self.partitions.get(&partition) else { return Ok(()) };
        let stored = Stored { client: &self.client, partition, topic: &self.config.service.conn.topics.usage_topic };
        if from.is_none() {
            return stored.ensure_empty().await;
        }
        if part.meters.switch.is_some() {
            let (max_seq, max_offset) = stored.last_outputs().await?;
            if let Some(sw) = self.partitions.get_mut(&partition).and_then(|p| p.meters.switch.as_mut()) {
                sw.after = Written { max_seq, max_offset };
                tracing::info!(partition, max_seq, max_offset, "configuration switch after these outputs");
            }
            self.try_switch(partition)?;
        }
        let Some(part) = self.partitions.get(&partition) else { return Ok(()) };
        let stored = Stored { client: &self.client, partition, topic: &self.config.service.conn.topics.usage_topic };
        stored.ensure_covers(part.engine.next_seq()).await
    }

    fn position(&self, _topic: &str, partition: i32) -> Option<i64> {
        self.partitions.get(&partition).map(|p| p.engine.next_offset())
    }

    fn release(&mut self, partition: i32) {
        self.partitions.remove(&partition);
        gauge!(m::OPEN_WINDOWS, "partition" => partition.to_string()).set(0.0);
        gauge!(m::WINDOWS_IN_MEMORY, "partition" => partition.to_string()).set(0.0);
        gauge!(m::PARTITIONS_OWNED).set(self.partitions.len() as f64);
        self.publish_positions();
    }

    fn snapshot(&mut self, partition: i32) -> anyhow::Result<Vec<u8>> {
        let part = self.partitions.get_mut(&partition).context("snapshot of a partition not held")?;
        if part.meters.switch.is_none() {
            self.switched = false;
        }
        part.needs_base = false;
        Ok(part.engine.snapshot_marked())
    }

    fn snapshot_delta(&mut self, partition: i32) -> anyhow::Result<Option<Vec<u8>>> {
        let part = self.partitions.get_mut(&partition).context("snapshot of a partition not held")?;
        if part.needs_base || !part.engine.tracks_deltas() {
            return Ok(None);
        }
        Ok(Some(part.engine.checkpoint_delta()?))
    }

    fn apply_deltas(&mut self, partition: i32, deltas: &[&[u8]]) -> anyhow::Result<()> {
        let part = self.partitions.get_mut(&partition).context("deltas for a partition not held")?;
        for (i, d) in deltas.iter().enumerate() {
            part.engine.apply_delta(d).with_context(|| format!("delta {} of {}", i + 1, deltas.len()))?;
        }
        tracing::info!(
            partition,
            deltas = deltas.len(),
            next_offset = part.engine.next_offset(),
            next_seq = part.engine.next_seq(),
            "applied checkpoint deltas"
        );
        Ok(())
    }

    async fn handle(&mut self, record: &Record<'_>, shutdown: &CancellationToken) -> anyhow::Result<()> {
        self.handle_record(record, shutdown).await
    }

    fn buffered_rows(&self) -> usize {
        self.outputs.rows()
    }

    fn buffered_bytes(&self) -> usize {
        self.outputs.bytes()
    }

    fn take_batch(&mut self) -> Arc<Outputs> {
        // The ledger entries describe the state the checkpoint staged with this batch has.
        self.buffer_ledger();
        let batch = Arc::new(std::mem::replace(&mut self.outputs, std::mem::take(&mut self.spare)));
        self.writing = Some(batch.clone());
        gauge!(m::BUFFERED_ROWS).set((batch.rows()) as f64);
        batch
    }

    fn write_batch(&self, batch: Arc<Outputs>, stop: CancellationToken) -> impl Future<Output = bool> + Send + 'static {
        self.sink.clone().write(batch, stop)
    }

    fn batch_written(&mut self) {
        // The writer has dropped its reference: keep the emptied buffers for the next batch.
        if let Some(Ok(mut done)) = self.writing.take().map(Arc::try_unwrap) {
            done.clear();
            self.spare = done;
        }
        gauge!(m::BUFFERED_ROWS).set(self.outputs.rows() as f64);
        self.publish_positions();
    }

    async fn on_timer(&mut self) {
        if self.provisional.due() {
            self.provisional.publish(self.partitions.values_mut().map(|p| &mut p.engine), wall_ms());
        }
        self.now = Instant::now();
        self.send_ticks();
        if self.last_progress.elapsed() >= Duration::from_secs(10) {
            self.log_progress();
        }
        let now_ms = wall_ms();
        let hot: usize = self.partitions.values().map(|p| p.engine.dedup().hot_ids()).sum();
        gauge!(m::DEDUP_HOT_IDS).set(hot as f64);
        let cold: usize = self.partitions.values().map(|p| p.engine.dedup().cold_ids()).sum();
        gauge!(m::DEDUP_COLD_IDS).set(cold as f64);
        let bytes: usize =
            self.partitions.values().map(|p| p.engine.dedup().hot_bytes() + p.engine.dedup().cold_bytes()).sum();
        gauge!(m::DEDUP_BYTES).set(bytes as f64);
        for (p, part) in &self.partitions {
            gauge!(m::OPEN_WINDOWS, "partition" => p.to_string()).set(part.engine.open_windows() as f64);
            gauge!(m::WINDOWS_IN_MEMORY, "partition" => p.to_string()).set(part.engine.windows_in_memory() as f64);
            if let Some(wm) = part.engine.watermark() {
                gauge!(m::WATERMARK_LAG, "partition" => p.to_string()).set((now_ms - wm) as f64 / 1000.0);
            }
        }
    }
}

impl Aggregator {
    /// One line every 10 s while records flow: what an operator tailing the log wants to know.
    fn log_progress(&mut self) {
        let (mut input, mut accepted, mut duplicates, mut rejected) = (0, 0, 0, 0);
        for part in self.partitions.values() {
            let s = part.engine.stats();
            input += s.input();
            accepted += s.accepted;
            duplicates += s.duplicates;
            rejected += s.rejected_total();
        }
        let secs = self.last_progress.elapsed().as_secs_f64();
        let rate = input.saturating_sub(self.progress_records) as f64 / secs;
        if input != self.progress_records {
            tracing::info!(
                partitions = self.partitions.len(),
                input, accepted, duplicates, rejected,
                rate = format!("{rate:.0}/s"),
                buffered = self.outputs.rows(),
                "progress"
            );
        }
        self.progress_records = input;
        self.last_progress = Instant::now();
    }
    /// Switches `partition` to the current meter definitions once its engine has re-derived
    /// every output already written under the checkpoint's (see [`Configured`]).
    fn try_switch(&mut self, partition: i32) -> anyhow::Result<()> {
        let Some(part) = self.partitions.get_mut(&partition) else { return Ok(()) };
        let engine = &part.engine;
        let passed = |w: &Written| engine.next_seq() > w.max_seq && engine.next_offset() > w.max_offset;
        let Some(catalog) = part.meters.switch_if(passed) else { return Ok(()) };
        let bytes = part.engine.snapshot();
        part.engine = PartitionEngine::restore(&bytes, catalog, self.engine_config.clone()).with_context(|| {
            format!(
                "partition {partition}: the new meter definitions cannot continue this state (a meter's window, \
                 aggregation or group_by changed: define a new meter instead; docs/operations.md)"
            )
        })?;
        part.needs_base = true;
        self.switched = true;
        tracing::warn!(
            partition,
            next_offset = part.engine.next_offset(),
            next_seq = part.engine.next_seq(),
            "switched to the new meter definitions"
        );
        Ok(())
    }

    /// One cumulative ledger entry per partition that moved, written with this flush and so
    /// before the checkpoint that covers the same offsets (see `meterflow_core::ledger`).
    fn buffer_ledger(&mut self) {
        let topic = &self.config.service.conn.topics.usage_topic;
        for (&p, part) in &mut self.partitions {
            let next = part.engine.next_offset();
            if next == part.ledger_at {
                continue;
            }
            if let Some(entry) = LedgerEntry::of(topic, p, part.engine.stats(), next) {
                self.outputs.ledger.push(LedgerRow::from(entry));
            }
            part.ledger_at = next;
        }
    }

    /// Covered offsets for the lag reporter (it does the network round trips elsewhere).
    fn publish_positions(&self) {
        let positions: BTreeMap<i32, i64> =
            self.partitions.iter().map(|(p, part)| (*p, part.engine.next_offset())).collect();
        *self.positions.lock().unwrap_or_else(|e| e.into_inner()) = positions;
    }
}
