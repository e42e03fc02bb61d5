//! Where the partitioned loop's records and partition ownership come from.
//!
//! [`KafkaSource`] is the production one (librdkafka, a consumer group); the in-memory one in
//! `memory` (the `memory` feature) lets the loop's protocol (restore, seek, flush ->
//! checkpoint -> commit, rebalances, fencing) be tested without a broker. The loop runs on one task and calls the
//! synchronous methods between records; the Kafka one blocks in place for its round trips.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::{Ownership, RebalanceLog};
use crate::record::AsRecord;
use crate::Error;

/// How long a broker round trip of the loop may take.
pub(crate) const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// A consumer as the partitioned loop uses it. Errors are the source's own failures (a broker
/// that cannot be reached): the loop retries them, unlike a disagreement it finds.
pub trait Source {
    /// A received record, borrowing the source's buffers.
    type Message<'a>: AsRecord
    where
        Self: 'a;

    /// The next record of an assigned, unpaused partition; pending while there is none.
    fn recv(&self) -> impl Future<Output = Result<Self::Message<'_>, Error>> + Send;

    /// True if ownership changes wait to be drained.
    fn rebalance_pending(&self) -> bool;

    /// Ownership changes since the last call, in order. Newly assigned partitions are paused
    /// (nothing is fetched from a committed offset the checkpoint may disagree with) until
    /// [`Source::resume`].
    fn drain_rebalances(&self) -> Vec<Ownership>;

    /// Partitions currently assigned.
    fn assignment(&self) -> Result<BTreeSet<i32>, Error>;

    /// Starts fetching `partitions` again (after their state was restored and sought).
    fn resume(&self, partitions: &[(String, i32)]) -> Result<(), Error>;

    /// Fetches `topic`/`partition` from `offset` on. Best effort: if it does not take effect,
    /// the loop's contiguity check sees a record at the wrong offset and seeks again.
    fn seek(&self, topic: &str, partition: i32, offset: i64);

    /// The log's (start, end) offsets.
    fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), Error>;

    /// Number of partitions of `topic`.
    fn partition_count(&self, topic: &str) -> Result<i32, Error>;

    /// The group's committed offset, if any.
    fn committed(&self, topic: &str, partition: i32) -> Result<Option<i64>, Error>;

    /// Commits (topic, partition, next offset) without waiting. A failure is harmless: the
    /// checkpoint is the source of truth and the committed offset is only checked against it.
    fn commit(&self, offsets: &[(String, i32, i64)]);
}

/// A librdkafka consumer in a group, created with the context that records its rebalances.
/// It owns the consumer: a source that borrows would make the loop's future `Send` only for
/// one lifetime, which a spawned service cannot use (the records borrow the source).
pub struct KafkaSource {
    consumer: StreamConsumer<RebalanceLog>,
}

impl KafkaSource {
    pub fn new(consumer: StreamConsumer<RebalanceLog>) -> Self {
        Self { consumer }
    }

    pub fn consumer(&self) -> &StreamConsumer<RebalanceLog> {
        &self.consumer
    }

    fn rebalances(&self) -> &RebalanceLog {
        self.consumer.context()
    }
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KafkaSource")
    }
}

impl Source for KafkaSource {
    type Message<'m>
        = BorrowedMessage<'m>
    where
        Self: 'm;

    async fn recv(&self) -> Result<BorrowedMessage<'_>, Error> {
        Ok(self.consumer.recv().await?)
    }

    fn rebalance_pending(&self) -> bool {
        self.rebalances().pending()
    }

    fn drain_rebalances(&self) -> Vec<Ownership> {
        self.rebalances().drain()
    }

    fn assignment(&self) -> Result<BTreeSet<i32>, Error> {
        Ok(self.consumer.assignment()?.elements().iter().map(|e| e.partition()).collect())
    }

    fn resume(&self, partitions: &[(String, i32)]) -> Result<(), Error> {
        let mut tpl = TopicPartitionList::new();
        for (t, p) in partitions {
            tpl.add_partition(t, *p);
        }
        Ok(self.consumer.resume(&tpl)?)
    }

    /// Retries while librdkafka has not started the partition yet; bounded (~2 s: it runs on
    /// the loop's thread).
    fn seek(&self, topic: &str, partition: i32, offset: i64) {
        for attempt in 0..5 {
            let sought = tokio::task::block_in_place(|| {
                self.consumer.seek(topic, partition, Offset::Offset(offset), Duration::from_millis(300))
            });
            match sought {
                Ok(()) => return,
                Err(e) if attempt == 4 => {
                    tracing::warn!(error = %e, topic, partition, offset, "seek failed");
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), Error> {
        Ok(tokio::task::block_in_place(|| self.consumer.fetch_watermarks(topic, partition, KAFKA_TIMEOUT))?)
    }

    fn partition_count(&self, topic: &str) -> Result<i32, Error> {
        let md = tokio::task::block_in_place(|| self.consumer.fetch_metadata(Some(topic), KAFKA_TIMEOUT))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| Error::Other(format!("topic {topic} is not in the broker's metadata")))?;
        Ok(t.partitions().len() as i32)
    }

    fn committed(&self, topic: &str, partition: i32) -> Result<Option<i64>, Error> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let got = tokio::task::block_in_place(|| self.consumer.committed_offsets(tpl, KAFKA_TIMEOUT))?;
        Ok(got.elements().first().and_then(|e| match e.offset() {
            Offset::Offset(o) if o >= 0 => Some(o),
            _ => None,
        }))
    }

    fn commit(&self, offsets: &[(String, i32, i64)]) {
        crate::kafka::commit(&self.consumer, offsets);
    }
}
