//! What ClickHouse already holds of a source partition's outputs, checked when the partition
//! is assigned, before any record is handled.

use clickhouse::Client;

pub(crate) struct Stored<'a> {
    pub client: &'a Client,
    pub partition: i32,
    /// The usage topic: dead letters of other topics are not this partition's.
    pub topic: &'a str,
}

impl Stored<'_> {
    /// No checkpoint: nothing of the partition may be stored yet.
    pub async fn ensure_empty(&self) -> anyhow::Result<()> {
        let usage: u64 = self.number("SELECT count() FROM usage_events WHERE source_partition = ?").await?;
        let aggs: u64 = self.number("SELECT count() FROM meter_aggregates WHERE source_partition = ?").await?;
        let dls: u64 = self.number("SELECT count() FROM dead_letters WHERE source_partition = ? AND source_topic = ?").await?;
        anyhow::ensure!(
            usage + aggs + dls == 0,
            "no checkpoint, but ClickHouse already holds output of this partition ({usage} raw events, \
             {aggs} aggregates, {dls} dead letters): starting fresh would count them again and restart seq at 1"
        );
        Ok(())
    }

    /// The highest `seq` and source offset already output (-1: none), up to which a partition
    /// restored under other meter definitions re-derives with the recorded ones.
    pub async fn last_outputs(&self) -> anyhow::Result<(i64, i64)> {
        let max_seq: i64 = self.number("SELECT max(seq) FROM meter_revisions WHERE source_partition = ?").await?;
        let raw: i64 = self
            .number("SELECT if(count() = 0, -1, max(source_offset)) FROM usage_events WHERE source_partition = ?")
            .await?;
        let dead: i64 = self
            .number("SELECT if(count() = 0, -1, max(source_offset)) FROM dead_letters WHERE source_partition = ? AND source_topic = ?")
            .await?;
        Ok((max_seq, raw.max(dead)))
    }

    /// Every aggregate the checkpoint says was emitted (`seq < next_seq`) is stored.
    pub async fn ensure_covers(&self, next_seq: i64) -> anyhow::Result<()> {
        if next_seq <= 1 {
            return Ok(());
        }
        let max: i64 = self.number("SELECT max(seq) FROM meter_aggregates WHERE source_partition = ?").await?;
        anyhow::ensure!(
            max >= next_seq - 1,
            "the checkpoint has emitted aggregates up to seq {}, but meter_aggregates only holds up to seq {max}: \
             outputs the checkpoint covers are missing (ClickHouse restored from an older backup?)",
            next_seq - 1
        );
        Ok(())
    }

    /// `sql` selects one number; its first `?` is the partition and a second, if any, the topic.
    async fn number<T: clickhouse::RowOwned + clickhouse::RowRead>(&self, sql: &'static str) -> clickhouse::error::Result<T> {
        let q = self.client.query(sql).bind(self.partition);
        let q = if sql.matches('?').count() > 1 { q.bind(self.topic) } else { q };
        q.fetch_one().await
    }
}
