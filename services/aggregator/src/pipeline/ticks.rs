//! The control path: the aggregator's own tick records, which move an idle partition's time
//! so that its windows close (written here, verified and applied when read back).

use std::time::{Duration, Instant};

use meterflow_core::auth;
use meterflow_core::RejectReason;
use meterflow_runtime::kafka::CONTROL_HEADER;
use meterflow_runtime::record::Record;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;

use super::events::Ctx;
use super::{Aggregator, HeldPartition};
use crate::record::{retry_sync, tick_tag, wall_ms, TICK};

impl Ctx<'_> {
    /// Applies a tick read back from the usage topic, if it carries this deployment's tag.
    pub(super) async fn on_tick(
        &mut self,
        part: &mut HeldPartition,
        msg: &Record<'_>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let (partition, offset, payload) = (msg.partition, msg.offset, msg.payload);
        let topic = self.config.service.conn.topics.usage_topic.as_bytes();
        let authentic = tick_tag(msg).is_some_and(|t| {
            auth::verify(&self.sink.record_key, &[auth::PURPOSE_TICK, topic, &partition.to_le_bytes(), payload], t)
        });
        if authentic {
            let wall_ms = payload.try_into().map(i64::from_be_bytes).unwrap_or(0);
            let mut stores = self.stores();
            retry_sync(|| part.engine.on_tick(offset, wall_ms, &mut stores), shutdown).await?;
        } else {
            // Anyone who can produce to the topic could otherwise move the partition's time
            // (and close or expire everything): a tick must carry the deployment's tag.
            let reason = RejectReason::Unauthenticated;
            part.engine.on_rejected(offset, reason);
            let detail = "control record (tick) without a valid meterflow-auth tag: not written by this deployment's aggregator".to_owned();
            self.dead_letter((partition, offset), reason, detail, None, payload);
        }
        Ok(())
    }
}

impl Aggregator {
    /// Writes a tick into each partition that has been idle for `idle_timeout` and may still
    /// hold windows to close or restatements to emit.
    pub(super) fn send_ticks(&mut self) {
        let idle = Duration::from_millis(self.config.idle_timeout_ms as u64);
        let now_ms = wall_ms();
        let mut due = Vec::new();
        // A window due to close by the wall clock gets a tick as soon as input pauses briefly,
        // so that it is queryable within ~1 s of its close, not only after idle_timeout.
        let brief = idle.min(Duration::from_millis(500));
        for (p, part) in self.partitions.iter_mut() {
            let waiting = part.engine.open_windows() > 0 || part.input_since_tick;
            let idle_due = part.last_input.elapsed() >= idle && part.last_tick.elapsed() >= idle && waiting;
            let close_due = part.engine.next_close_at().is_some_and(|c| c <= now_ms)
                && part.last_input.elapsed() >= brief
                && part.last_tick.elapsed() >= brief;
            if !idle_due && !close_due {
                continue;
            }
            part.last_tick = Instant::now();
            part.input_since_tick = false;
            due.push(*p);
        }
        let payload = now_ms.to_be_bytes();
        let topic = self.config.service.conn.topics.usage_topic.as_bytes();
        for p in due {
            let tag = auth::sign(&self.sink.record_key, &[auth::PURPOSE_TICK, topic, &p.to_le_bytes(), &payload]);
            let headers = OwnedHeaders::new()
                .insert(Header { key: CONTROL_HEADER, value: Some(TICK) })
                .insert(Header { key: auth::HEADER, value: Some(&tag[..]) });
            let rec = FutureRecord::<[u8], [u8]>::to(&self.config.service.conn.topics.usage_topic)
                .partition(p)
                .payload(&payload[..])
                .headers(headers);
            // Not awaited here: a slow ack would stall the consume loop (and with it the
            // provisional totals of real-time balances). librdkafka keeps the partition's
            // order; a lost tick only delays a close until the next one.
            match self.producer.send_result(rec) {
                Ok(delivery) => {
                    tokio::spawn(async move {
                        if !matches!(delivery.await, Ok(Ok(_))) {
                            tracing::warn!(partition = p, "could not write idle tick");
                        }
                    });
                }
                Err((e, _)) => tracing::warn!(error = %e, partition = p, "could not queue idle tick"),
            }
        }
    }
}
