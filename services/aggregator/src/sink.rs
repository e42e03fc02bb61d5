//! Buffered outputs and how a batch of them is written. Everything is retried until written:
//! outputs are deterministic and the tables fold identical rows, so a retry after a partial
//! write, or a replay after a crash, cannot double count.

use std::sync::Arc;

use clickhouse::Client;
use meterflow_core::auth::{self, RecordKey};
use meterflow_core::records::{AvroRecord, DeadLetter, MeterAggregate};
use meterflow_runtime::output::{insert_all, insert_row_binary, produce_all_with_headers, WriteMetrics};
use meterflow_runtime::retry::Backoff;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::rows::{AggregateRow, DeadLetterRow, LedgerRow, UncostedRow};
use crate::usage_rows::{UsageRows, COLUMNS as USAGE_COLUMNS};

const WRITE_METRICS: WriteMetrics = m::RUNTIME.write();

/// Bytes of a row beyond its strings (numbers, vector headers, allocator overhead): the byte
/// bound is an estimate of memory, it only has to be proportionate.
const ROW_OVERHEAD: usize = 128;

/// A Kafka record that goes out with a batch and nowhere else, e.g. a best-effort
/// notification derived from the state at the moment the batch is taken.
#[derive(Debug, Clone)]
pub struct ExtraRecord {
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
}

/// What processing produced since the last batch was taken.
#[derive(Debug, Default)]
pub struct Outputs {
    /// The raw rows of accepted events ([`UsageRows::push`]).
    pub usage: UsageRows,
    pub aggregates: Vec<MeterAggregate>,
    pub dead_letters: Vec<DeadLetter>,
    /// Ingest-ledger entries (one per partition that moved, taken with the batch).
    pub ledger: Vec<LedgerRow>,
    /// Produced after the aggregates and dead letters of the batch (see [`ExtraRecord`]).
    pub records: Vec<ExtraRecord>,
    bytes: usize,
}

impl Outputs {
    pub fn rows(&self) -> usize {
        self.usage.len() + self.aggregates.len() + self.dead_letters.len() + self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows() == 0 && self.ledger.is_empty()
    }

    /// Estimated memory of the buffered rows.
    pub fn bytes(&self) -> usize {
        self.bytes + self.usage.bytes()
    }

    pub fn push_aggregate(&mut self, a: MeterAggregate) {
        let dims: usize = a.dimensions.iter().map(|(k, v)| k.len() + v.len() + 48).sum();
        self.bytes += 2 * ROW_OVERHEAD + a.tenant.len() + a.meter.len() + dims;
        self.aggregates.push(a);
    }

    pub fn push_dead_letter(&mut self, d: DeadLetter) {
        self.bytes += ROW_OVERHEAD + d.payload.len() + d.detail.len() + d.source_topic.len();
        self.dead_letters.push(d);
    }

    pub fn push_record(&mut self, r: ExtraRecord) {
        self.bytes += ROW_OVERHEAD + r.topic.len() + r.key.len() + r.payload.len();
        self.records.push(r);
    }

    /// Empties the buffers, keeping their capacity (no re-growth for the next batch).
    pub fn clear(&mut self) {
        self.usage.clear();
        self.aggregates.clear();
        self.dead_letters.clear();
        self.records.clear();
        self.ledger.clear();
        self.bytes = 0;
    }
}

/// Where a batch goes. Shared with the writer task of each batch.
pub struct Sink {
    pub client: Client,
    pub producer: FutureProducer,
    pub aggregates_topic: String,
    pub dead_letter_topic: String,
    pub backoff: Backoff,
    /// Tags every aggregate (`meterflow-auth` header): the rater charges nothing untagged.
    pub record_key: RecordKey,
}

impl Sink {
    /// Writes `out`: ClickHouse rows and Kafka records at the same time, each retried until
    /// written. The rows are built once, so every retry sends byte-identical blocks. False
    /// if `stop` interrupted the retries (then nothing may be checkpointed past `out`).
    pub async fn write(self: Arc<Self>, out: Arc<Outputs>, stop: CancellationToken) -> bool {
        if out.is_empty() {
            return true;
        }
        let started = std::time::Instant::now();
        let (clickhouse, kafka) = tokio::join!(self.insert(&out, &stop), self.produce(&out, &stop));
        tracing::debug!(rows = out.rows(), ms = started.elapsed().as_millis() as u64, "batch written");
        clickhouse && kafka
    }

    async fn insert(&self, out: &Outputs, stop: &CancellationToken) -> bool {
        let c = &self.client;
        let b = &self.backoff;
        let aggs: Vec<AggregateRow> = match out.aggregates.iter().map(AggregateRow::try_from).collect() {
            Ok(rows) => rows,
            Err(e) => {
                // Unreachable (engine values have at most 9 fractional digits); never store a
                // rounded value: fail the write, loudly.
                tracing::error!(error = %e, "an aggregate cannot be stored exactly");
                return false;
            }
        };
        let uncosted: Vec<UncostedRow> = match out.aggregates.iter().map(UncostedRow::of).collect::<Result<Vec<_>, _>>() {
            Ok(rows) => rows.into_iter().flatten().collect(),
            Err(e) => {
                tracing::error!(error = %e, "an uncosted quantity cannot be stored exactly");
                return false;
            }
        };
        let dls: Vec<DeadLetterRow> = out.dead_letters.iter().map(DeadLetterRow::from).collect();
        // The raw rows are most of the work: two inserts of a fixed half each (the same halves
        // on every retry) let ClickHouse parse and sort them on two threads, beside the
        // small tables.
        let (first, second) = out.usage.halves();
        let (a, b2, small) = tokio::join!(
            insert_row_binary(c, "usage_events", USAGE_COLUMNS, first, b, stop, WRITE_METRICS),
            insert_row_binary(c, "usage_events", USAGE_COLUMNS, second, b, stop, WRITE_METRICS),
            async {
                insert_all(c, "meter_aggregates", &aggs, b, stop, WRITE_METRICS).await
                    && insert_all(c, "aggregate_uncosted", &uncosted, b, stop, WRITE_METRICS).await
                    && insert_all(c, "dead_letters", &dls, b, stop, WRITE_METRICS).await
                    && insert_all(c, "ingest_ledger", &out.ledger, b, stop, WRITE_METRICS).await
            }
        );
        a && b2 && small
    }

    async fn produce(&self, out: &Outputs, stop: &CancellationToken) -> bool {
        let n = out.aggregates.len() + out.dead_letters.len() + out.records.len();
        if n == 0 {
            return true;
        }
        let mut records = Vec::with_capacity(n);
        let mut tags = Vec::with_capacity(out.aggregates.len());
        for a in &out.aggregates {
            let bytes = encode(a);
            tags.push(auth::sign(&self.record_key, &[auth::PURPOSE_AGGREGATE, &bytes]));
            records.push((self.aggregates_topic.as_str(), a.tenant.clone(), bytes));
        }
        for d in &out.dead_letters {
            let key = format!("{}/{}/{}", d.source_topic, d.source_partition, d.source_offset);
            records.push((self.dead_letter_topic.as_str(), key, encode(d)));
        }
        for r in &out.records {
            records.push((r.topic.as_str(), r.key.clone(), r.payload.clone()));
        }
        // Aggregates come first in `records`: record i < tags.len() is aggregate i.
        let headers = |i: usize| {
            tags.get(i).map(|t| OwnedHeaders::new().insert(Header { key: auth::HEADER, value: Some(&t[..]) }))
        };
        produce_all_with_headers(&self.producer, &records, headers, &self.backoff, stop, WRITE_METRICS).await
    }
}

#[allow(clippy::expect_used, reason = "our own records match their own schemas: a failure is a bug, and crashing beats writing something else")]
pub(crate) fn encode<R: AvroRecord>(r: &R) -> Vec<u8> {
    // Our own records always match their schemas; a failure here is a bug worth crashing on
    // rather than writing something else.
    r.to_avro().expect("meterflow record encodes with its own schema")
}
