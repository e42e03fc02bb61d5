//! What the partitioned loop needs of a checkpoint store: the ClickHouse tables in production
//! ([`CheckpointStore`]: `checkpoints` for bases, `checkpoint_deltas` for deltas), a map in
//! `memory` (the `memory` feature) for tests of the protocol.

use std::collections::BTreeMap;
use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::chain::{contiguous, follows_older_base, DeltaLink, StoredDelta};
use crate::checkpoint::{Checkpoint, CheckpointKey, CheckpointStore};
use crate::Error;

/// Checkpoints of partitions, versioned (the highest version of a key wins; see
/// [`crate::checkpoint`] for fencing). Cloned into the task that saves a batch's checkpoints.
pub trait CheckpointStorage: Clone + Send + Sync + 'static {
    /// The newest checkpoint of `key`, if any.
    fn load(&self, key: &CheckpointKey) -> impl Future<Output = Result<Option<Checkpoint>, Error>> + Send;

    /// The newest stored version of every partition of (service, group, topic), bases and
    /// deltas: the fencing check before a checkpoint is written, and the epoch a claim beats.
    fn max_versions(
        &self,
        service: &str,
        group: &str,
        topic: &str,
    ) -> impl Future<Output = Result<BTreeMap<i32, u64>, Error>> + Send;

    /// Stores `items` together (all or, on an error, possibly some: each is a complete
    /// checkpoint, so a partial save is an older position, never a wrong one).
    fn save_all(&self, items: &[(CheckpointKey, Checkpoint)]) -> impl Future<Output = Result<(), Error>> + Send;

    /// The stored deltas of `key` that name `base_version` as their base, in version order
    /// (checked by [`crate::chain::contiguous`]).
    fn load_deltas(&self, key: &CheckpointKey, base_version: u64) -> impl Future<Output = Result<Vec<StoredDelta>, Error>> + Send;

    /// The base that the delta `version` of `key` builds on; `None` if there is no such delta
    /// or its base is gone. (The head of a chain that crossed epochs, when a fenced instance
    /// wrote a newer base meanwhile: see [`crate::chain`].)
    fn load_base_of(&self, key: &CheckpointKey, version: u64) -> impl Future<Output = Result<Option<Checkpoint>, Error>> + Send;

    /// Stores deltas together.
    fn save_deltas(&self, items: &[(CheckpointKey, StoredDelta)]) -> impl Future<Output = Result<(), Error>> + Send;

    /// Deletes the deltas below the given version of each partition (`bases`: partition ->
    /// the base of the chain a new base replaced) of (service, group, topic).
    fn drop_superseded(
        &self,
        service: &str,
        group: &str,
        topic: &str,
        bases: &BTreeMap<i32, u64>,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// The chain of `key`'s highest version (normally the newest base's, see
    /// [`crate::chain`]), checked contiguous: what a restart restores (for tools and tests; the
    /// claim retries each read separately).
    fn load_chain(
        &self,
        key: &CheckpointKey,
    ) -> impl Future<Output = Result<Option<(Checkpoint, Vec<StoredDelta>)>, Error>> + Send {
        async move {
            let Some(mut base) = self.load(key).await? else { return Ok(None) };
            let mut deltas = contiguous(base.version, self.load_deltas(key, base.version).await?)?;
            let head = deltas.last().map_or(base.version, |d| d.checkpoint.version);
            let top = self.max_versions(&key.service, &key.consumer_group, &key.topic).await?.get(&key.partition).copied();
            if let Some(older) = top.filter(|&t| follows_older_base(t, head)) {
                if let Some(b) = self.load_base_of(key, older).await? {
                    deltas = contiguous(b.version, self.load_deltas(key, b.version).await?)?;
                    base = b;
                }
            }
            Ok(Some((base, deltas)))
        }
    }
}

#[derive(Debug, clickhouse::Row, Serialize)]
struct CheckpointRow<'a> {
    service: &'a str,
    consumer_group: &'a str,
    topic: &'a str,
    partition: i32,
    version: u64,
    next_offset: i64,
    #[serde(with = "serde_bytes")]
    state: &'a [u8],
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct LoadedRow {
    version: u64,
    next_offset: i64,
    #[serde(with = "serde_bytes")]
    state: Vec<u8>,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct MaxRow {
    partition: i32,
    version: u64,
}

#[derive(Debug, clickhouse::Row, Serialize)]
struct DeltaRow<'a> {
    service: &'a str,
    consumer_group: &'a str,
    topic: &'a str,
    partition: i32,
    base_version: u64,
    prev_version: u64,
    version: u64,
    next_offset: i64,
    #[serde(with = "serde_bytes")]
    state: &'a [u8],
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct LoadedDelta {
    base_version: u64,
    prev_version: u64,
    version: u64,
    next_offset: i64,
    #[serde(with = "serde_bytes")]
    state: Vec<u8>,
}

/// Binds the four columns that name a partition's checkpoints, in key order.
fn bind_key(q: clickhouse::query::Query, key: &CheckpointKey) -> clickhouse::query::Query {
    q.bind(&key.service).bind(&key.consumer_group).bind(&key.topic).bind(key.partition)
}

/// One insert into `table` of a row per item (none for no items).
async fn insert_each<T: clickhouse::RowWrite, I>(
    client: &clickhouse::Client,
    table: &str,
    items: &[I],
    row: impl for<'i> Fn(&'i I) -> T::Value<'i>,
) -> Result<(), Error> {
    if items.is_empty() {
        return Ok(());
    }
    let mut insert = client.insert::<T>(table).await?;
    for item in items {
        insert.write(&row(item)).await?;
    }
    insert.end().await?;
    Ok(())
}

impl CheckpointStorage for CheckpointStore {
    async fn load(&self, key: &CheckpointKey) -> Result<Option<Checkpoint>, Error> {
        // The newest version first, then only its row: until ReplacingMergeTree merges, every
        // older state (tens of MiB each) is still stored, and ORDER BY .. LIMIT 1 would read
        // all of them.
        let q = self.client().query(
            "SELECT version, next_offset, state FROM checkpoints \
             WHERE service = ? AND consumer_group = ? AND topic = ? AND partition = ? \
             AND version = (SELECT max(version) FROM checkpoints \
             WHERE service = ? AND consumer_group = ? AND topic = ? AND partition = ?) \
             LIMIT 1",
        );
        let rows = bind_key(bind_key(q, key), key).fetch_all::<LoadedRow>().await?;
        Ok(rows.into_iter().next().map(|r| Checkpoint {
            version: r.version,
            next_offset: r.next_offset,
            state: r.state,
        }))
    }

    async fn max_versions(&self, service: &str, group: &str, topic: &str) -> Result<BTreeMap<i32, u64>, Error> {
        let rows = self
            .client()
            .query(
                "SELECT partition, max(version) AS version FROM (\
                 SELECT partition, version FROM checkpoints WHERE service = ? AND consumer_group = ? AND topic = ? \
                 UNION ALL \
                 SELECT partition, version FROM checkpoint_deltas WHERE service = ? AND consumer_group = ? AND topic = ?\
                 ) GROUP BY partition",
            )
            .bind(service)
            .bind(group)
            .bind(topic)
            .bind(service)
            .bind(group)
            .bind(topic)
            .fetch_all::<MaxRow>()
            .await?;
        Ok(rows.into_iter().map(|r| (r.partition, r.version)).collect())
    }

    /// One insert (one row per partition a service owns).
    async fn save_all(&self, items: &[(CheckpointKey, Checkpoint)]) -> Result<(), Error> {
        insert_each::<CheckpointRow<'_>, _>(self.client(), "checkpoints", items, |(k, c)| CheckpointRow {
            service: &k.service,
            consumer_group: &k.consumer_group,
            topic: &k.topic,
            partition: k.partition,
            version: c.version,
            next_offset: c.next_offset,
            state: &c.state,
        })
        .await
    }

    async fn load_deltas(&self, key: &CheckpointKey, base_version: u64) -> Result<Vec<StoredDelta>, Error> {
        let q = self.client().query(
            "SELECT base_version, prev_version, version, next_offset, state FROM checkpoint_deltas \
             WHERE service = ? AND consumer_group = ? AND topic = ? AND partition = ? AND base_version = ? \
             ORDER BY version",
        );
        let rows = bind_key(q, key).bind(base_version).fetch_all::<LoadedDelta>().await?;
        let rows = rows
            .into_iter()
            .map(|r| StoredDelta {
                link: DeltaLink { base_version: r.base_version, prev_version: r.prev_version },
                checkpoint: Checkpoint { version: r.version, next_offset: r.next_offset, state: r.state },
            })
            .collect();
        Ok(rows)
    }

    async fn load_base_of(&self, key: &CheckpointKey, version: u64) -> Result<Option<Checkpoint>, Error> {
        let q = self.client().query(
            "SELECT version, next_offset, state FROM checkpoints \
             WHERE service = ? AND consumer_group = ? AND topic = ? AND partition = ? \
             AND version IN (SELECT base_version FROM checkpoint_deltas \
             WHERE service = ? AND consumer_group = ? AND topic = ? AND partition = ? AND version = ?) \
             LIMIT 1",
        );
        let rows = bind_key(bind_key(q, key), key).bind(version).fetch_all::<LoadedRow>().await?;
        Ok(rows.into_iter().next().map(|r| Checkpoint { version: r.version, next_offset: r.next_offset, state: r.state }))
    }

    /// One insert.
    async fn save_deltas(&self, items: &[(CheckpointKey, StoredDelta)]) -> Result<(), Error> {
        insert_each::<DeltaRow<'_>, _>(self.client(), "checkpoint_deltas", items, |(k, d)| DeltaRow {
            service: &k.service,
            consumer_group: &k.consumer_group,
            topic: &k.topic,
            partition: k.partition,
            base_version: d.link.base_version,
            prev_version: d.link.prev_version,
            version: d.checkpoint.version,
            next_offset: d.checkpoint.next_offset,
            state: &d.checkpoint.state,
        })
        .await
    }

    /// One mutation.
    async fn drop_superseded(&self, service: &str, group: &str, topic: &str, bases: &BTreeMap<i32, u64>) -> Result<(), Error> {
        if bases.is_empty() {
            return Ok(());
        }
        // Integers only: formatted into the statement, the strings are bound.
        let per_partition: Vec<String> =
            bases.iter().map(|(p, v)| format!("(partition = {p} AND version < {v})")).collect();
        let sql = format!(
            "ALTER TABLE checkpoint_deltas DELETE WHERE service = ? AND consumer_group = ? AND topic = ? AND ({})",
            per_partition.join(" OR ")
        );
        self.client().query(&sql).bind(service).bind(group).bind(topic).execute().await?;
        Ok(())
    }
}
