//! The event path: one usage record from the topic to the engine and the buffered outputs.

use clickhouse::Client;
use meterflow_core::codec::UsageEventCodec;
use meterflow_core::engine::Outcome;
use meterflow_core::event::UsageEventRef;
use meterflow_core::partitioning::partition_for;
use meterflow_core::RejectReason;
use meterflow_runtime::record::{Record, Timestamp};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use super::{Aggregator, HeldPartition};
use crate::cold::ChStores;
use crate::config::Config;
use crate::metrics as m;
use crate::record::{dead_letter, is_tick, retry_sync};
use crate::sink::{Outputs, Sink};

/// What handling one record borrows from the aggregator besides the partition's engine:
/// split borrows, because the engine is mutated while the cold stores read the pending outputs.
pub(super) struct Ctx<'a> {
    pub client: &'a Client,
    pub runtime: &'a Handle,
    pub config: &'a Config,
    pub sink: &'a Sink,
    pub counters: &'a m::Counters,
    pub outputs: &'a mut Outputs,
    /// The batch being written (cold look-ups consult it until it is in ClickHouse).
    pub writing: Option<&'a Outputs>,
}

impl Ctx<'_> {
    pub fn stores(&self) -> ChStores<'_> {
        ChStores { client: self.client, handle: self.runtime, pending: self.outputs, writing: self.writing }
    }

    /// Counts and buffers a dead letter for the record at `offset`.
    pub fn dead_letter(
        &mut self,
        (partition, offset): (i32, i64),
        reason: RejectReason,
        detail: String,
        event: Option<&UsageEventRef<'_>>,
        payload: &[u8],
    ) {
        self.counters.dead_letter(reason);
        self.outputs.push_dead_letter(dead_letter(self.config, partition, offset, reason, detail, event, payload));
    }
}

impl Aggregator {
    pub(super) async fn handle_record(&mut self, msg: &Record<'_>, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let partition = msg.partition;
        let Self { partitions, outputs, writing, client, codec, config, warned_create_time, sink, counters, runtime, now, .. } = self;
        let Some(part) = partitions.get_mut(&partition) else {
            return Ok(()); // not held (the loop only hands over records of held partitions)
        };
        if msg.offset < part.engine.next_offset() {
            return Ok(()); // covered by the checkpoint
        }
        let mut cx = Ctx { client, runtime, config, sink, counters, outputs, writing: writing.as_deref() };
        if is_tick(msg) {
            cx.on_tick(part, msg, shutdown).await?;
        } else {
            counters.events_in.increment(1);
            part.last_input = *now;
            part.input_since_tick = true;
            let record_ms = event_time_bound(msg.timestamp, config, warned_create_time);
            cx.on_event(part, codec, msg, record_ms, shutdown).await?;
        }
        for a in part.engine.drain_output() {
            if a.revision == 0 {
                counters.windows_closed.increment(1);
            } else {
                counters.restatements.increment(1);
            }
            outputs.push_aggregate(a);
        }
        if part.meters.switch.is_some() {
            self.try_switch(partition)?;
        }
        Ok(())
    }
}

impl Ctx<'_> {
    /// Decodes the event, checks it is on its tenant's partition and hands it to the engine.
    async fn on_event(
        &mut self,
        part: &mut HeldPartition,
        codec: &UsageEventCodec,
        msg: &Record<'_>,
        record_ms: Option<i64>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let (partition, offset, payload) = (msg.partition, msg.offset, msg.payload);
        let mut ev = match codec.decode(payload) {
            Ok(ev) => ev,
            Err(e) => {
                part.engine.on_skipped(offset);
                self.dead_letter((partition, offset), RejectReason::Undecodable, e.to_string(), None, payload);
                return Ok(());
            }
        };
        let expected = partition_for(ev.tenant.as_bytes(), part.partitions);
        if !ev.tenant.is_empty() && expected != partition {
            let reason = RejectReason::WrongPartition;
            part.engine.on_rejected(offset, reason);
            let detail = format!(
                "tenant {:?} belongs to partition {expected} of {} (key = tenant, crc32 partitioner), not {partition}",
                ev.tenant.chars().take(64).collect::<String>(),
                part.partitions
            );
            self.dead_letter((partition, offset), reason, detail, Some(&ev), payload);
            return Ok(());
        }
        let mut stores = self.stores();
        let outcome = retry_sync(|| part.engine.on_event_at(offset, record_ms, &ev, &mut stores), shutdown).await?;
        match outcome {
            Outcome::Accepted => {
                self.counters.accepted.increment(1);
                // The raw row keeps dimensions sorted by key (in place: no copy).
                ev.dimensions.sort_unstable();
                self.outputs.usage.push(part.engine.accepted(), &ev, partition, offset)?;
            }
            Outcome::Duplicate => self.counters.duplicates.increment(1),
            Outcome::Rejected { reason, detail } => self.dead_letter((partition, offset), reason, detail, Some(&ev), payload),
        }
        Ok(())
    }
}

/// The record time that bounds event time. Only the broker's clock does; a producer's
/// CreateTime is trusted only on topics not created by meterflow-admin (warned once).
fn event_time_bound(timestamp: Timestamp, config: &Config, warned_create_time: &mut bool) -> Option<i64> {
    match timestamp {
        Timestamp::LogAppendTime(t) => Some(t),
        Timestamp::CreateTime(t) => {
            if !*warned_create_time {
                *warned_create_time = true;
                tracing::warn!(
                    topic = %config.service.conn.topics.usage_topic,
                    "records carry producer CreateTime: a producer with a wrong or hostile clock can move \
                     event time. Create the usage topic with message.timestamp.type=LogAppendTime \
                     (meterflow-admin topics does)"
                );
            }
            Some(t)
        }
        Timestamp::NotAvailable => None,
    }
}
