//! The rater's buffered outputs and how a batch of them is written (by a task of its own,
//! while the loop rates the next aggregates; see `meterflow_runtime::partitioned`).

use std::sync::Arc;

use clickhouse::Client;
use meterflow_core::rating::partition::Emitted;
use meterflow_core::rating::Alert;
use meterflow_core::records::{AlertRecord, AvroRecord, Charge, DeadLetter};
use meterflow_runtime::args::TopicArgs;
use meterflow_runtime::output::{insert_all, produce_all, OutRecord, WriteMetrics};
use meterflow_runtime::retry::Backoff;
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::rows::{AdjustmentRow, AlertRow, ChargeRow, DeadLetterRow, LedgerRow, ParkedRow};

const WRITE_METRICS: WriteMetrics = m::RUNTIME.write();

#[derive(Default)]
pub(crate) struct Outputs {
    pub charges: Vec<Charge>,
    pub alerts: Vec<(Alert, i64)>,
    pub adjustments: Vec<AdjustmentRow>,
    pub dead_letters: Vec<DeadLetter>,
    /// Credit ledger movements (ASC 606), with the partition whose state made them.
    pub ledger: Vec<LedgerRow>,
    pub parked: Vec<ParkedRow>,
    /// The alerts topic's records (crossings and expired credit), keyed by tenant, encoded
    /// here so a record its schema refuses stops the rater like a row would.
    pub announced: Vec<(String, Vec<u8>)>,
}

impl Outputs {
    /// Buffers what partition `partition` emitted. Rows are built here, once, so a value
    /// ClickHouse cannot store exactly stops the rater at the record that produced it.
    pub fn push(&mut self, out: Emitted, partition: i32) -> Result<(), meterflow_core::Error> {
        for a in &out.adjustments {
            self.adjustments.push(AdjustmentRow::new(&a.adjustment, partition, a.offset)?);
        }
        for e in &out.ledger {
            self.ledger.push(LedgerRow::new(e, partition)?);
        }
        let crossings = out.alerts.iter().map(|(a, at)| AlertRecord::crossing(a, *at));
        for a in crossings.chain(out.ledger.iter().filter_map(AlertRecord::expired)) {
            self.announced.push((a.tenant.clone(), a.to_avro()?));
        }
        self.parked.extend(out.parked.iter().map(|p| ParkedRow::new(p, partition)));
        self.charges.extend(out.charges);
        self.alerts.extend(out.alerts);
        self.dead_letters.extend(out.dead_letters);
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.charges.len()
            + self.alerts.len()
            + self.adjustments.len()
            + self.dead_letters.len()
            + self.ledger.len()
            + self.parked.len()
    }
}

/// Where a batch of rater outputs goes; shared with the writer task of each batch.
pub(crate) struct RaterSink {
    pub client: Client,
    pub producer: FutureProducer,
    pub topics: TopicArgs,
}

impl RaterSink {
    /// Writes `out` (ClickHouse rows, then Kafka records), each retried until written. The
    /// rows are built once, so retries send byte-identical blocks. False if `stop` came first.
    pub async fn write(self: Arc<Self>, out: Outputs, stop: CancellationToken) -> bool {
        if out.rows() == 0 {
            return true;
        }
        let b = Backoff::default();
        let c = &self.client;
        let rows = out.charges.iter().map(ChargeRow::try_from).collect::<Result<Vec<_>, _>>().and_then(|c| {
            Ok((c, out.alerts.iter().map(|(a, at)| AlertRow::new(a, *at)).collect::<Result<Vec<_>, _>>()?))
        });
        let (charges, alerts) = match rows {
            Ok(rows) => rows,
            Err(e) => {
                // Never store a rounded amount: fail the write, loudly (see rows.rs).
                tracing::error!(error = %e, "a charge or alert cannot be stored exactly");
                return false;
            }
        };
        let dls: Vec<DeadLetterRow> = out.dead_letters.iter().map(DeadLetterRow::from).collect();
        let stop = &stop;
        let ok = insert_all(c, "charges", &charges, &b, stop, WRITE_METRICS).await
            && insert_all(c, "wallet_adjustments", &out.adjustments, &b, stop, WRITE_METRICS).await
            && insert_all(c, "wallet_alerts", &alerts, &b, stop, WRITE_METRICS).await
            && insert_all(c, "dead_letters", &dls, &b, stop, WRITE_METRICS).await
            && insert_all(c, "wallet_ledger", &out.ledger, &b, stop, WRITE_METRICS).await
            && insert_all(c, "parked_aggregates", &out.parked, &b, stop, WRITE_METRICS).await;
        if !ok {
            return false;
        }
        let records = self.records(&out);
        produce_all(&self.producer, &records, &b, stop, WRITE_METRICS).await
    }

    /// The Kafka records of `out`: charges, alerts, expired credit, dead letters.
    fn records<'a>(&'a self, out: &Outputs) -> Vec<OutRecord<'a>> {
        let topics = &self.topics;
        let mut records: Vec<OutRecord<'_>> = Vec::new();
        for ch in &out.charges {
            records.push((&topics.charges_topic, ch.tenant.clone(), encode(ch)));
        }
        for (tenant, payload) in &out.announced {
            records.push((&topics.alerts_topic, tenant.clone(), payload.clone()));
        }
        for d in &out.dead_letters {
            records.push((&topics.dead_letter_topic, format!("{}/{}/{}", d.source_topic, d.source_partition, d.source_offset), encode(d)));
        }
        records
    }
}

#[allow(clippy::expect_used, reason = "our own records match their own schemas: a failure is a bug, and crashing beats writing something else")]
fn encode<R: AvroRecord>(r: &R) -> Vec<u8> {
    r.to_avro().expect("meterflow record encodes with its own schema")
}
