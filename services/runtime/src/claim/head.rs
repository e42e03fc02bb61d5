//! What a takeover continues from: the newest chain of each assigned partition, read from the
//! store and decoded. Partitions assigned together load concurrently, one task each over a
//! clone of the store, so that a restart waits for the slowest load instead of their sum (at
//! 10M events a base is ~36 MiB to read, check and copy).

use anyhow::Context as _;
use metrics::counter;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::chain::{contiguous, ChainState, StoredDelta};
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

/// The heads of `keys`, in their order, loaded concurrently; `None`: shutdown came first.
/// Store errors are retried (`errors` counts them); a damaged chain is an error.
pub(crate) async fn load_all<St: CheckpointStorage>(
    store: &St,
    keys: &[CheckpointKey],
    errors: &'static str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Vec<Head>>> {
    let mut tasks = JoinSet::new();
    for (i, key) in keys.iter().enumerate() {
        let (store, key, shutdown) = (store.clone(), key.clone(), shutdown.clone());
        tasks.spawn(async move { (i, load(&store, &key, errors, &shutdown).await) });
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

/// The newest base checkpoint of `key` with its deltas (see [`chain_head`]); `None`:
/// shutdown came first.
async fn load<St: CheckpointStorage>(
    store: &St,
    key: &CheckpointKey,
    errors: &'static str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Head>> {
    let on_error = |_: &crate::Error| counter!(errors, "sink" => "checkpoint").increment(1);
    let Some(loaded) = until_ok("load checkpoint", &Backoff::default(), shutdown, on_error, || store.load(key)).await else {
        return Ok(None);
    };
    let envelope = match &loaded {
        Some(cp) => Some(Envelope::decode(&cp.state).with_context(|| {
            format!("checkpoint of {} partition {} (version {})", key.topic, key.partition, cp.version)
        })?),
        None => None,
    };
    let deltas = match (&loaded, &envelope) {
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
    let head = chain_head(loaded, envelope, deltas)
        .with_context(|| format!("checkpoint deltas of {} partition {}", key.topic, key.partition))?;
    Ok(Some(head))
}

/// The newest base and its deltas as what the claim continues from: the last delta's version,
/// offsets and meta (they describe the state after it), the base's state, and the deltas'
/// states in order. Every delta must have been written under the base's configuration (a
/// switch writes a base).
fn chain_head(loaded: Option<Checkpoint>, envelope: Option<Envelope>, deltas: Vec<StoredDelta>) -> anyhow::Result<Head> {
    let (Some(mut cp), Some(mut env)) = (loaded, envelope) else {
        return Ok(Head::default());
    };
    let (base, base_bytes) = (cp.version, env.state.len());
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
