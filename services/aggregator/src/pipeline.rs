use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clickhouse::Client;
use meterflow_core::codec::UsageEventCodec;
use meterflow_core::engine::{EngineConfig, Outcome, PartitionEngine};
use meterflow_core::event::UsageEventRef;
use meterflow_core::meter::MeterCatalog;
use meterflow_core::records::DeadLetter;
use meterflow_core::RejectReason;
use meterflow_runtime::checkpoint::{Checkpoint, CheckpointKey, CheckpointStore};
use meterflow_runtime::http;
use meterflow_runtime::kafka::{self, Ownership, CONTROL_HEADER};
use meterflow_runtime::partitioned::{load_checkpoint, LoopConfig, Partitioned, PendingCheckpoint, ServiceIo};
use meterflow_runtime::retry::Backoff;
use metrics::{counter, gauge};
use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::cold::ChStores;
use crate::config::Config;
use crate::metrics as m;
use crate::rows::{secs, UsageRow};
use crate::sink::{Outputs, Sink};

const SERVICE: &str = "aggregator";
const TICK: &[u8] = b"tick";

/// Runs until `shutdown`, then flushes and checkpoints what it holds.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    http::prometheus(); // the recorder must exist before metrics are described
    m::describe();
    let meters_text = std::fs::read_to_string(&config.meters)
        .with_context(|| format!("reading meters file {}", config.meters.display()))?;
    let catalog = Arc::new(MeterCatalog::from_toml_str(&meters_text)?);
    let io = ServiceIo::connect(
        &config.kafka,
        &config.clickhouse,
        &config.group,
        &[&config.topics.usage_topic],
        config.http_addr,
        &shutdown,
    )
    .await?;
    let (client, producer) = (io.client.clone(), io.producer.clone());
    let record_key = meterflow_runtime::record_key::resolve(&config.auth, &client).await?;
    let mut agg = Aggregator {
        engine_config: EngineConfig {
            dedup_horizon_ms: config.dedup_horizon_ms,
            hot_max_ids: config.dedup_hot_max_ids,
            retain_closed_ms: config.retain_closed_ms,
            ..EngineConfig::default()
        },
        checkpoints: CheckpointStore::new(client.clone()),
        sink: Sink {
            client: client.clone(),
            producer: producer.clone(),
            aggregates_topic: config.topics.aggregates_topic.clone(),
            dead_letter_topic: config.topics.dead_letter_topic.clone(),
            backoff: Backoff::default(),
            record_key,
        },
        client,
        producer,
        catalog,
        codec: UsageEventCodec::new(),
        partitions: BTreeMap::new(),
        outputs: Outputs::default(),
        config,
        last_progress: Instant::now(),
        progress_records: 0,
        positions: Arc::default(),
    };
    spawn_lag_reporter(&agg.config, agg.positions.clone(), shutdown.clone())?;
    let loop_config = LoopConfig {
        flush_interval: Duration::from_millis(agg.config.flush_interval_ms as u64),
        checkpoint_interval: Duration::from_millis(agg.config.checkpoint_interval_ms as u64),
        max_buffered_rows: agg.config.max_buffered_rows,
        checkpoint_seconds: m::CHECKPOINT_SECONDS,
        errors: m::FLUSH_ERRORS,
    };
    io.serve(&mut agg, &loop_config, &shutdown).await
}

struct Part {
    engine: PartitionEngine,
    /// Last checkpoint version written for this partition.
    version: u64,
    /// Offset covered by the last checkpoint written.
    checkpointed_offset: i64,
    last_input: Instant,
    last_tick: Instant,
    /// Events arrived since the last tick was written (restatements may be pending).
    input_since_tick: bool,
}

struct Aggregator {
    config: Config,
    engine_config: EngineConfig,
    catalog: Arc<MeterCatalog>,
    codec: UsageEventCodec,
    client: Client,
    producer: FutureProducer,
    checkpoints: CheckpointStore,
    sink: Sink,
    partitions: BTreeMap<i32, Part>,
    outputs: Outputs,
    last_progress: Instant,
    /// Offsets covered per owned partition, read by the lag reporter thread.
    positions: Arc<std::sync::Mutex<BTreeMap<i32, i64>>>,
    /// Records handled when progress was last logged.
    progress_records: u64,
}

impl Partitioned for Aggregator {
    fn on_ownership(&mut self, change: &Ownership) {
        let (Ownership::Assigned(list) | Ownership::Revoked(list)) = change;
        for (topic, p) in list {
            if *topic == self.config.topics.usage_topic {
                self.partitions.remove(p);
            }
        }
        gauge!(m::PARTITIONS_OWNED).set(self.partitions.len() as f64);
    }

    async fn handle(&mut self, msg: &BorrowedMessage<'_>, shutdown: &CancellationToken) -> anyhow::Result<()> {
        self.handle_record(msg, shutdown).await
    }

    fn buffered_rows(&self) -> usize {
        self.outputs.rows()
    }

    async fn flush(&mut self, shutdown: &CancellationToken) -> bool {
        self.sink.flush(&mut self.outputs, shutdown).await
    }

    fn checkpoints(&mut self) -> Vec<PendingCheckpoint> {
        let mut out = Vec::new();
        for (p, part) in &self.partitions {
            let next = part.engine.next_offset();
            if next == part.checkpointed_offset {
                continue;
            }
            let key = self.checkpoint_key(*p);
            out.push(PendingCheckpoint {
                commits: vec![(key.topic.clone(), *p, next)],
                key,
                checkpoint: Checkpoint { version: part.version + 1, next_offset: next, state: part.engine.snapshot() },
            });
        }
        out
    }

    fn checkpointed(&mut self, done: &[PendingCheckpoint]) {
        for d in done {
            if let Some(part) = self.partitions.get_mut(&d.key.partition) {
                part.version = d.checkpoint.version;
                part.checkpointed_offset = d.checkpoint.next_offset;
            }
        }
        // Covered offsets for the lag reporter (it does the network round trips elsewhere).
        let positions: BTreeMap<i32, i64> =
            self.partitions.iter().map(|(p, part)| (*p, part.engine.next_offset())).collect();
        *self.positions.lock().unwrap_or_else(|e| e.into_inner()) = positions;
    }

    async fn on_timer(&mut self) {
        self.send_ticks().await;
        if self.last_progress.elapsed() >= Duration::from_secs(10) {
            self.log_progress();
        }
        let now_ms = wall_ms();
        let hot: usize = self.partitions.values().map(|p| p.engine.dedup().hot_ids()).sum();
        gauge!(m::DEDUP_HOT_IDS).set(hot as f64);
        for (p, part) in &self.partitions {
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
    async fn part(&mut self, partition: i32, shutdown: &CancellationToken) -> anyhow::Result<Option<&mut Part>> {
        if !self.partitions.contains_key(&partition) {
            let key = self.checkpoint_key(partition);
            let Some(loaded) = load_checkpoint(&self.checkpoints, &key, m::FLUSH_ERRORS, shutdown).await else {
                return Ok(None);
            };
            let (engine, version, offset) = match loaded {
                Some(cp) => {
                    let engine = PartitionEngine::restore(&cp.state, self.catalog.clone(), self.engine_config.clone())
                        .with_context(|| format!("restoring checkpoint of partition {partition}"))?;
                    tracing::info!(partition, next_offset = cp.next_offset, "restored checkpoint");
                    (engine, cp.version, cp.next_offset)
                }
                None => {
                    tracing::info!(partition, "no checkpoint: starting fresh");
                    (
                        PartitionEngine::new(self.catalog.clone(), self.engine_config.clone(), partition)?,
                        0,
                        0,
                    )
                }
            };
            let now = Instant::now();
            self.partitions.insert(
                partition,
                Part { engine, version, checkpointed_offset: offset, last_input: now, last_tick: now, input_since_tick: true },
            );
            gauge!(m::PARTITIONS_OWNED).set(self.partitions.len() as f64);
        }
        Ok(self.partitions.get_mut(&partition))
    }

    fn checkpoint_key(&self, partition: i32) -> CheckpointKey {
        CheckpointKey {
            service: SERVICE.into(),
            consumer_group: self.config.group.clone(),
            topic: self.config.topics.usage_topic.clone(),
            partition,
        }
    }

    async fn handle_record(&mut self, msg: &BorrowedMessage<'_>, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let partition = msg.partition();
        let offset = msg.offset();
        if self.part(partition, shutdown).await?.is_none() {
            return Ok(());
        }
        let handle = Handle::current();
        // Split borrows: the engine is mutated while the stores read the pending outputs.
        let Self { partitions, outputs, client, codec, config, catalog, .. } = self;
        let part = partitions.get_mut(&partition).expect("loaded above");
        if offset < part.engine.next_offset() {
            return Ok(()); // covered by the checkpoint
        }
        let payload = msg.payload().unwrap_or_default();
        if is_tick(msg) {
            let wall_ms = payload.try_into().map(i64::from_be_bytes).unwrap_or(0);
            let mut stores = ChStores { client, handle: &handle, pending: outputs };
            retry_sync(|| part.engine.on_tick(offset, wall_ms, &mut stores), shutdown).await?;
        } else {
            counter!(m::EVENTS_IN).increment(1);
            part.last_input = Instant::now();
            part.input_since_tick = true;
            match codec.decode(payload) {
                Err(e) => {
                    part.engine.on_skipped(offset);
                    outputs.dead_letters.push(dead_letter(config, partition, offset, RejectReason::Undecodable, e.to_string(), None, payload));
                    counter!(m::DEAD_LETTERS, "reason" => RejectReason::Undecodable.as_str()).increment(1);
                }
                Ok(ev) => {
                    let mut stores = ChStores { client, handle: &handle, pending: outputs };
                    let record_ms = msg.timestamp().to_millis();
                    let outcome =
                        retry_sync(|| part.engine.on_event_at(offset, record_ms, &ev, &mut stores), shutdown).await?;
                    match outcome {
                        Outcome::Accepted => {
                            counter!(m::ACCEPTED).increment(1);
                            outputs.usage.push(usage_row(catalog, &ev, partition, offset));
                        }
                        Outcome::Duplicate => counter!(m::DUPLICATES).increment(1),
                        Outcome::Rejected { reason, detail } => {
                            counter!(m::DEAD_LETTERS, "reason" => reason.as_str()).increment(1);
                            outputs.dead_letters.push(dead_letter(config, partition, offset, reason, detail, Some(&ev), payload));
                        }
                    }
                }
            }
        }
        for a in part.engine.drain_output() {
            if a.revision == 0 {
                counter!(m::WINDOWS_CLOSED).increment(1);
            } else {
                counter!(m::RESTATEMENTS).increment(1);
            }
            outputs.aggregates.push(a);
        }
        Ok(())
    }

    /// Writes a tick into each partition that has been idle for `idle_timeout` and may still
    /// hold windows to close or restatements to emit.
    async fn send_ticks(&mut self) {
        let idle = Duration::from_millis(self.config.idle_timeout_ms as u64);
        let now_ms = wall_ms();
        let mut due = Vec::new();
        for (p, part) in self.partitions.iter_mut() {
            let waiting = part.engine.open_windows() > 0 || part.input_since_tick;
            if part.last_input.elapsed() < idle || part.last_tick.elapsed() < idle || !waiting {
                continue;
            }
            part.last_tick = Instant::now();
            part.input_since_tick = false;
            due.push(*p);
        }
        let payload = now_ms.to_be_bytes();
        for p in due {
            let headers = OwnedHeaders::new().insert(Header { key: CONTROL_HEADER, value: Some(TICK) });
            let rec = FutureRecord::<[u8], [u8]>::to(&self.config.topics.usage_topic)
                .partition(p)
                .payload(&payload[..])
                .headers(headers);
            if let Err((e, _)) = self.producer.send(rec, Duration::from_secs(5)).await {
                tracing::warn!(error = %e, partition = p, "could not write idle tick");
            }
        }
    }
}

/// Every 5 s, the end offset of each owned partition minus what the aggregator covers, from
/// a separate client on a blocking thread.
fn spawn_lag_reporter(
    config: &Config,
    positions: Arc<std::sync::Mutex<BTreeMap<i32, i64>>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client: rdkafka::consumer::BaseConsumer = kafka::base_config(&config.kafka)?.create()?;
    let topic = config.topics.usage_topic.clone();
    tokio::task::spawn_blocking(move || {
        while !shutdown.is_cancelled() {
            let owned = positions.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for (p, next) in owned {
                if let Ok((_, high)) = client.fetch_watermarks(&topic, p, Duration::from_secs(2)) {
                    gauge!(m::CONSUMER_LAG, "partition" => p.to_string()).set((high - next).max(0) as f64);
                }
            }
            for _ in 0..50 {
                if shutdown.is_cancelled() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    Ok(())
}

fn is_tick(msg: &BorrowedMessage<'_>) -> bool {
    msg.headers()
        .map(|h| h.iter().any(|x| x.key == CONTROL_HEADER && x.value == Some(TICK)))
        .unwrap_or(false)
}

/// Retries a synchronous engine call whose cold-store look-up failed (ClickHouse down): the
/// engine leaves its state unchanged on error, so the call can simply be repeated.
async fn retry_sync<T>(
    mut f: impl FnMut() -> Result<T, meterflow_core::Error>,
    shutdown: &CancellationToken,
) -> anyhow::Result<T> {
    let backoff = Backoff::default();
    let mut delay = backoff.min;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(meterflow_core::Error::Store(e)) => {
                counter!(m::FLUSH_ERRORS, "sink" => "cold_store").increment(1);
                tracing::warn!(error = %e, "cold store look-up failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => anyhow::bail!("shutdown during a cold-store retry"),
                }
                delay = (delay * 2).min(backoff.max);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn usage_row(catalog: &MeterCatalog, ev: &UsageEventRef<'_>, partition: i32, offset: i64) -> UsageRow {
    let window_start = catalog.get(ev.meter).map_or(ev.event_time_ms, |m| m.window_start(ev.event_time_ms));
    let parse = |s: &str| meterflow_core::decimal::parse("quantity", s).map(|d| meterflow_core::decimal::to_ch_i128(&d)).unwrap_or(0);
    let mut dims: Vec<(&str, &str)> = ev.dimensions.clone();
    dims.sort_unstable();
    UsageRow {
        tenant: ev.tenant.to_owned(),
        meter: ev.meter.to_owned(),
        event_id: ev.event_id.to_owned(),
        event_time: secs(ev.event_time_ms),
        event_time_ms: ev.event_time_ms,
        window_start: secs(window_start),
        quantity: parse(ev.quantity),
        provider_cost: ev.provider_cost.map_or(0, parse),
        has_provider_cost: u8::from(ev.provider_cost.is_some()),
        dim_keys: dims.iter().map(|(k, _)| (*k).to_owned()).collect(),
        dim_values: dims.iter().map(|(_, v)| (*v).to_owned()).collect(),
        source: ev.source.to_owned(),
        source_partition: partition,
        source_offset: offset,
    }
}

fn dead_letter(
    config: &Config,
    partition: i32,
    offset: i64,
    reason: RejectReason,
    detail: String,
    ev: Option<&UsageEventRef<'_>>,
    payload: &[u8],
) -> DeadLetter {
    let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    DeadLetter {
        source_topic: config.topics.usage_topic.clone(),
        source_partition: partition,
        source_offset: offset,
        reason: reason.as_str().to_owned(),
        detail,
        tenant: ev.and_then(|e| nonempty(e.tenant)),
        event_id: ev.and_then(|e| nonempty(e.event_id)),
        payload: payload.to_vec(),
    }
}
