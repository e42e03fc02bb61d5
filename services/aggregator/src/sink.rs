//! Buffered outputs and their flush. Everything is retried until written: outputs are
//! deterministic and the tables fold identical rows, so a retry after a partial write, or a
//! replay after a crash, cannot double count.

use clickhouse::Client;
use meterflow_core::records::{AvroRecord, DeadLetter, MeterAggregate};
use meterflow_core::auth::{self, RecordKey};
use meterflow_runtime::output::{insert_all, produce_all_with_headers, WriteMetrics};
use meterflow_runtime::retry::Backoff;
use metrics::gauge;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::rows::{AggregateRow, DeadLetterRow, LedgerRow, UncostedRow, UsageRow};

const WRITE_METRICS: WriteMetrics = WriteMetrics { insert_seconds: m::INSERT_SECONDS, errors: m::FLUSH_ERRORS };

/// What processing produced since the last flush.
#[derive(Debug, Default)]
pub struct Outputs {
    pub usage: Vec<UsageRow>,
    pub aggregates: Vec<MeterAggregate>,
    pub dead_letters: Vec<DeadLetter>,
    /// Ingest-ledger entries (no Kafka record; not counted as buffered rows: at most one per
    /// partition and flush).
    pub ledger: Vec<LedgerRow>,
}

impl Outputs {
    pub fn rows(&self) -> usize {
        self.usage.len() + self.aggregates.len() + self.dead_letters.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows() == 0 && self.ledger.is_empty()
    }
}

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
    /// Writes and clears `out`. Returns false if shutdown interrupted the retries (then
    /// nothing may be checkpointed past what was flushed).
    pub async fn flush(&self, out: &mut Outputs, shutdown: &CancellationToken) -> bool {
        gauge!(m::BUFFERED_ROWS).set(out.rows() as f64);
        if out.is_empty() {
            return true;
        }
        let started = std::time::Instant::now();
        let rows = out.rows();
        let c = &self.client;
        if !insert_all(c, "usage_events", &out.usage, &self.backoff, shutdown, WRITE_METRICS).await {
            return false;
        }
        out.usage.clear();
        let aggs: Vec<AggregateRow> = match out.aggregates.iter().map(AggregateRow::try_from).collect() {
            Ok(rows) => rows,
            Err(e) => {
                // Unreachable (engine values have at most 9 fractional digits); never store a
                // rounded value: fail the flush, loudly.
                tracing::error!(error = %e, "an aggregate cannot be stored exactly");
                return false;
            }
        };
        if !insert_all(c, "meter_aggregates", &aggs, &self.backoff, shutdown, WRITE_METRICS).await {
            return false;
        }
        let uncosted: Vec<UncostedRow> = match out.aggregates.iter().map(UncostedRow::of).collect::<Result<Vec<_>, _>>() {
            Ok(rows) => rows.into_iter().flatten().collect(),
            Err(e) => {
                tracing::error!(error = %e, "an uncosted quantity cannot be stored exactly");
                return false;
            }
        };
        if !insert_all(c, "aggregate_uncosted", &uncosted, &self.backoff, shutdown, WRITE_METRICS).await {
            return false;
        }
        let dls: Vec<DeadLetterRow> = out.dead_letters.iter().map(DeadLetterRow::from).collect();
        if !insert_all(c, "dead_letters", &dls, &self.backoff, shutdown, WRITE_METRICS).await {
            return false;
        }
        if !insert_all(c, "ingest_ledger", &out.ledger, &self.backoff, shutdown, WRITE_METRICS).await {
            return false;
        }
        out.ledger.clear();
        let mut records = Vec::with_capacity(out.aggregates.len() + out.dead_letters.len());
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
        // Aggregates come first in `records`: record i < tags.len() is aggregate i.
        let headers = |i: usize| {
            tags.get(i).map(|t| OwnedHeaders::new().insert(Header { key: auth::HEADER, value: Some(&t[..]) }))
        };
        if !produce_all_with_headers(&self.producer, &records, headers, &self.backoff, shutdown, WRITE_METRICS).await {
            return false;
        }
        out.aggregates.clear();
        out.dead_letters.clear();
        tracing::debug!(rows, ms = started.elapsed().as_millis() as u64, "flushed");
        gauge!(m::BUFFERED_ROWS).set(0.0);
        true
    }
}

pub(crate) fn encode<R: AvroRecord>(r: &R) -> Vec<u8> {
    // Our own records always match their schemas; a failure here is a bug worth crashing on
    // rather than writing something else.
    r.to_avro().expect("meterflow record encodes with its own schema")
}
