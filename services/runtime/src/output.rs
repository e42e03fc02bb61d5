//! Writing outputs that must not be lost: ClickHouse inserts and Kafka produces retried until
//! they succeed (or shutdown). Every meterflow output is deterministic and idempotent by key,
//! so a retry after a partial write cannot double count.

use std::time::{Duration, Instant};

use clickhouse::Client;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use crate::retry::{until_ok, Backoff};

/// Metric names a service reports its writes under.
#[derive(Debug, Clone, Copy)]
pub struct WriteMetrics {
    /// Histogram of insert latency, labelled by `table`.
    pub insert_seconds: &'static str,
    /// Counter of failed attempts, labelled by `sink`.
    pub errors: &'static str,
}

/// Inserts `rows` into `table` in one insert, retried until it succeeds. Returns false only
/// when shutdown interrupted the retries.
pub async fn insert_all<R>(
    client: &Client,
    table: &'static str,
    rows: &[R],
    backoff: &Backoff,
    shutdown: &CancellationToken,
    m: WriteMetrics,
) -> bool
where
    R: clickhouse::RowWrite + for<'a> clickhouse::Row<Value<'a> = R>,
{
    if rows.is_empty() {
        return true;
    }
    retried_insert(table, backoff, shutdown, m, || async {
        let mut insert = client.insert::<R>(table).await?;
        for r in rows {
            insert.write(r).await?;
        }
        insert.end().await
    })
    .await
}

/// Inserts pre-encoded RowBinary rows of `columns` into `table` in one insert, retried until
/// it succeeds (every attempt sends the same bytes). Returns false only when shutdown
/// interrupted the retries.
pub async fn insert_row_binary(
    client: &Client,
    table: &'static str,
    columns: &str,
    data: &[u8],
    backoff: &Backoff,
    shutdown: &CancellationToken,
    m: WriteMetrics,
) -> bool {
    /// Compressed and sent a chunk at a time, so a large batch is never copied whole.
    const CHUNK: usize = 1 << 20;
    if data.is_empty() {
        return true;
    }
    let sql = format!("INSERT INTO {table} ({columns}) FORMAT RowBinary");
    retried_insert(table, backoff, shutdown, m, || async {
        let mut insert = client.insert_formatted_with(sql.clone());
        for chunk in data.chunks(CHUNK) {
            insert.send(bytes::Bytes::copy_from_slice(chunk)).await?;
        }
        insert.end().await
    })
    .await
}

/// One insert into `table`, retried until it succeeds, counted and timed.
async fn retried_insert<F, Fut>(table: &'static str, backoff: &Backoff, shutdown: &CancellationToken, m: WriteMetrics, insert: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = clickhouse::error::Result<()>>,
{
    let started = Instant::now();
    let ok = until_ok(table, backoff, shutdown, |_| metrics::counter!(m.errors, "sink" => table).increment(1), insert)
        .await
        .is_some();
    metrics::histogram!(m.insert_seconds, "table" => table).record(started.elapsed().as_secs_f64());
    ok
}

/// One record to produce: topic, key, payload.
pub type OutRecord<'a> = (&'a str, String, Vec<u8>);

/// Produces all `records` and waits for every ack, retrying the whole set until all are
/// acknowledged. All sends are in flight before the first await; the idempotent producer
/// keeps their order within a partition.
pub async fn produce_all(
    producer: &FutureProducer,
    records: &[OutRecord<'_>],
    backoff: &Backoff,
    shutdown: &CancellationToken,
    m: WriteMetrics,
) -> bool {
    produce_all_with_headers(producer, records, |_| None, backoff, shutdown, m).await
}

/// [`produce_all`] with Kafka headers for some records: `headers(i)` gives those of
/// `records[i]` (for example the `meterflow-auth` tag of an aggregate).
pub async fn produce_all_with_headers(
    producer: &FutureProducer,
    records: &[OutRecord<'_>],
    headers: impl Fn(usize) -> Option<OwnedHeaders>,
    backoff: &Backoff,
    shutdown: &CancellationToken,
    m: WriteMetrics,
) -> bool {
    if records.is_empty() {
        return true;
    }
    until_ok(
        "kafka outputs",
        backoff,
        shutdown,
        |_| metrics::counter!(m.errors, "sink" => "kafka").increment(1),
        || async {
            // `send_result` enqueues now and hands back the delivery future; `send` would do
            // nothing until awaited, i.e. one round trip per record.
            let mut pending = Vec::with_capacity(records.len());
            for (i, (topic, key, payload)) in records.iter().enumerate() {
                let mut rec = FutureRecord::to(topic).key(key.as_str()).payload(payload.as_slice());
                if let Some(h) = headers(i) {
                    rec = rec.headers(h);
                }
                loop {
                    match producer.send_result(rec) {
                        Ok(delivery) => {
                            pending.push(delivery);
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            rec = back;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err((e, _)) => return Err(e),
                    }
                }
            }
            let mut first_err = None;
            for p in pending {
                match p.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => {
                        first_err.get_or_insert(e);
                    }
                    Err(_canceled) => {
                        first_err.get_or_insert(KafkaError::Canceled);
                    }
                }
            }
            first_err.map_or(Ok(()), Err)
        },
    )
    .await
    .is_some()
}
