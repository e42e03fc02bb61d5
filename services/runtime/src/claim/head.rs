//! What a takeover continues from: the newest chain of each assigned partition, read from the
//! store and decoded. Partitions assigned together load concurrently, one task each over a
//! clone of the store, so that a restart waits for the slowest load instead of their sum (at
//! 10M events a base is ~36 MiB to read, check and copy).

use anyhow::Context as _;
use metrics::counter;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::chain::{contiguous, follows_older_base, ChainState, StoredDelta};
use crate::checkpoint::{Checkpoint, CheckpointKey, Envelope};
use crate::retry::{until_ok, Backoff};
use crate::store::CheckpointStorage;

/// What a claim continues from.
#[derive(Debug, Default)]
pub(crate) struct Head {
    /// The newest checkpoint: the chain's last version and offset (the state is the base's,
    /// in `envelope`).
    pub checkpoint: Option<Checkpoint>,
    /// The base's envelope with the last checkpoint's meta.
    pub envelope: Option<Envelope>,
    /// The states of the deltas after the base, in order.
    pub deltas: Vec<Vec<u8>>,
    /// The chain as stored, for a claim that continues it (`None`: nothing stored, or an
    /// operator's decision).
    pub chain: Option<ChainState>,
}

/// The heads of `keys` (one service, group and topic), in their order, loaded concurrently;
/// `None`: shutdown came first. Store errors are retried (`errors` counts them); a damaged
/// chain is an error.
pub(crate) async fn load_all<St: CheckpointStorage>(
    store: &St,
    keys: &[CheckpointKey],
    errors: &'static str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Vec<Head>>> {
    let Some(k0) = keys.first() else { return Ok(Some(Vec::new())) };
    // The highest versions, read first: they say which chain is each partition's newest.
    let on_error = |_: &crate::Error| counter!(errors, "sink" => "checkpoint").increment(1);
    let tops = until_ok("read checkpoint versions", &Backoff::default(), shutdown, on_error, || {
        store.max_versions(&k0.service, &k0.consumer_group, &k0.topic)
    })
    .await;
    let Some(tops) = tops else { return Ok(None) };
    let mut tasks = JoinSet::new();
    for (i, key) in keys.iter().enumerate() {
        let (store, key, shutdown) = (store.clone(), key.clone(), shutdown.clone());
        let top = tops.get(&key.partition).copied();
        tasks.spawn(async move { (i, load(&store, &key, top, errors, &shutdown).await) });
    }
    let mut heads = Vec::with_capacity(keys.len());
    // An early return drops the set, which aborts the loads still running.
    while let Some(joined) = tasks.join_next().await {
        let (i, head) = joined.context("a checkpoint load failed")?;
        let Some(head) = head? else { return Ok(None) };
        heads.push((i, head));
    }
    heads.sort_unstable_by_key(|(i, _)| *i);
    Ok(Some(heads.into_iter().map(|(_, h)| h).collect()))
}

/// A base, its envelope and its deltas on the path to the chain's head.
type Chain = (Option<Checkpoint>, Option<Envelope>, Vec<StoredDelta>);

/// The chain of `key`'s highest version `top` (see [`chain_head`]): normally the newest
/// base's; `None`: shutdown came first.
async fn load<St: CheckpointStorage>(
    store: &St,
    key: &CheckpointKey,
    top: Option<u64>,
    errors: &'static str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Head>> {
    let on_error = |_: &crate::Error| counter!(errors, "sink" => "checkpoint").increment(1);
    let Some(newest) = until_ok("load checkpoint", &Backoff::default(), shutdown, on_error, || store.load(key)).await else {
        return Ok(None);
    };
    let Some(mut chain) = read_chain(store, key, newest, errors, shutdown).await? else { return Ok(None) };
    let head = chain.2.last().map(|d| d.checkpoint.version).or(chain.0.as_ref().map(|c| c.version)).unwrap_or(0);
    if let Some(top) = top.filter(|&t| follows_older_base(t, head)) {
        tracing::warn!(
            partition = key.partition,
            top,
            newest_base = head,
            "the newest checkpoint continues an older base (a fenced instance wrote a base after the last claim loaded): \
             restoring that chain"
        );
        let base = until_ok("load checkpoint", &Backoff::default(), shutdown, on_error, || store.load_base_of(key, top)).await;
        let Some(base) = base else { return Ok(None) };
        match base {
            Some(base) => {
                let Some(c) = read_chain(store, key, Some(base), errors, shutdown).await? else { return Ok(None) };
                chain = c;
            }
            // A damaged (truncated) table: the checks after the load judge the newest base's
            // chain against the committed offsets and the outputs, as without claims' deltas.
            None => tracing::error!(partition = key.partition, top, "the newest checkpoint delta's base is not stored"),
        }
    }
    let (loaded, envelope, deltas) = chain;
    let head = chain_head(loaded, envelope, deltas)
        .with_context(|| format!("checkpoint deltas of {} partition {}", key.topic, key.partition))?;
    Ok(Some(head))
}

/// `base` decoded, with its deltas on the path to their head; `None`: shutdown came first.
async fn read_chain<St: CheckpointStorage>(
    store: &St,
    key: &CheckpointKey,
    base: Option<Checkpoint>,
    errors: &'static str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Chain>> {
    let on_error = |_: &crate::Error| counter!(errors, "sink" => "checkpoint").increment(1);
    let envelope = match &base {
        Some(cp) => Some(Envelope::decode(&cp.state).with_context(|| {
            format!("checkpoint of {} partition {} (version {})", key.topic, key.partition, cp.version)
        })?),
        None => None,
    };
    let deltas = match (&base, &envelope) {
        (Some(cp), Some(env)) if env.meta.operator.is_none() => {
            let rows = until_ok("load checkpoint deltas", &Backoff::default(), shutdown, on_error, || {
                store.load_deltas(key, cp.version)
            })
            .await;
            let Some(rows) = rows else { return Ok(None) };
            contiguous(cp.version, rows).with_context(|| format!("{} partition {}: refusing to start", key.topic, key.partition))?
        }
        _ => Vec::new(),
    };
    Ok(Some((base, envelope, deltas)))
}

/// The newest base and its deltas as what the claim continues from: the last delta's version,
/// offsets and meta (they describe the state after it), the base's state, and the deltas'
/// states in order. Every delta must have been written under the base's configuration (a
/// switch writes a base).
fn chain_head(loaded: Option<Checkpoint>, envelope: Option<Envelope>, deltas: Vec<StoredDelta>) -> anyhow::Result<Head> {
    let (Some(mut cp), Some(mut env)) = (loaded, envelope) else {
        return Ok(Head::default());
    };
    // The base's stored bytes, as the claim that wrote it counted them.
    let (base, base_bytes) = (cp.version, cp.state.len());
    let mut states = Vec::with_capacity(deltas.len());
    for d in deltas {
        let de = Envelope::decode(&d.checkpoint.state).with_context(|| format!("delta version {}", d.checkpoint.version))?;
        anyhow::ensure!(
            de.meta.config_hash == env.meta.config_hash && de.meta.operator.is_none(),
            "delta version {} was written under another configuration than its base {}",
            d.checkpoint.version,
            d.link.base_version
        );
        cp = Checkpoint { version: d.checkpoint.version, next_offset: d.checkpoint.next_offset, state: Vec::new() };
        env.meta = de.meta;
        states.push(de.state);
    }
    let chain = env.meta.operator.is_none().then(|| ChainState::loaded(base, base_bytes, cp.version, states.iter().map(Vec::len)));
    Ok(Head { checkpoint: Some(cp), envelope: Some(env), deltas: states, chain })
}
