//! Incremental checkpoints on the in-memory driver: a restart restores the newest base and
//! applies its deltas, compaction writes bases and drops the deltas they supersede, and a
//! chain with a hole refuses to start instead of resuming from a wrong state.

use super::*;
use crate::chain::DeltaPolicy;
use crate::checkpoint::epoch_of;
use crate::store::CheckpointStorage;

fn with_deltas(full_every: u32) -> LoopConfig {
    LoopConfig { deltas: DeltaPolicy { full_every, max_ratio: 1e9 }, ..config() }
}

fn summer(w: &World) -> Summer {
    let mut svc = Summer::new(w.sink.clone());
    svc.deltas = true;
    svc
}

/// Runs a first instance over four rounds of input (a checkpoint after each) and shuts it
/// down; returns the sum it consumed.
async fn first_run(w: &World, cfg: LoopConfig) -> i64 {
    let mut svc = summer(w);
    let mut total = 0;
    w.drive_with(&mut svc, cfg, async {
        w.source.assign(&[(TOPIC, 0)]);
        for round in 0..4i64 {
            total += w.produce(0, (1..=10).map(|v| v + round * 10));
            let end = (round + 1) * 10;
            until("the round is committed", || w.source.committed_offset(TOPIC, 0) == Some(end)).await;
        }
    })
    .await
    .unwrap();
    total
}

#[tokio::test]
async fn a_restart_restores_the_base_and_applies_its_deltas() {
    let w = World::new(1);
    let first = first_run(&w, with_deltas(1000)).await;
    let key = World::key(0);
    let base = w.store.load(&key).await.unwrap().expect("the claim wrote a base");
    let deltas = w.store.deltas(&key);
    assert!(deltas.len() >= 3, "the checkpoints after the claim are deltas: {deltas:?}");
    assert!(deltas.iter().all(|d| d.link.base_version == base.version), "one chain, on the claim's base");

    let second = w.produce(0, 41..=50);
    let mut svc = summer(&w);
    let seen = svc.seen();
    w.drive_with(&mut svc, with_deltas(1000), async {
        w.source.assign(&[(TOPIC, 0)]);
        until("the new input is committed", || w.source.committed_offset(TOPIC, 0) == Some(50)).await;
    })
    .await
    .unwrap();

    let seen = seen.lock().unwrap();
    assert_eq!(seen.applied, deltas.len(), "every stored delta was applied");
    assert_eq!(
        seen.restored.last(),
        Some(&(0, Sum { next: 40, total: first })),
        "base + deltas is the state the first instance checkpointed last"
    );
    assert_eq!(seen.sums[&0], Sum { next: 50, total: first + second });
    let handled: Vec<i64> = seen.handled.iter().map(|(_, o)| *o).collect();
    assert_eq!(handled, (40..50).collect::<Vec<_>>(), "the second instance re-read nothing the chain covers");
}

#[tokio::test]
async fn compaction_writes_a_base_and_drops_the_deltas_it_supersedes() {
    let w = World::new(1);
    let first = first_run(&w, with_deltas(2)).await;
    let key = World::key(0);
    let base = w.store.load(&key).await.unwrap().expect("a base");
    assert!(base.version & 0xFFFF_FFFF > 0, "a compaction base after the claim's (version {:#x})", base.version);
    let deltas = w.store.deltas(&key);
    assert!(deltas.len() <= 2, "at most full_every deltas after a base: {deltas:?}");
    assert!(
        deltas.iter().all(|d| d.link.base_version == base.version),
        "the deltas of older bases were dropped: {deltas:?}"
    );

    let mut svc = summer(&w);
    let seen = svc.seen();
    w.drive_with(&mut svc, with_deltas(2), async {
        w.source.assign(&[(TOPIC, 0)]);
        until("restored", || seen.lock().unwrap().sums.contains_key(&0)).await;
    })
    .await
    .unwrap();
    assert_eq!(seen.lock().unwrap().sums[&0], Sum { next: 40, total: first });
}

#[tokio::test]
async fn a_hole_in_the_chain_refuses_to_start() {
    let w = World::new(1);
    first_run(&w, with_deltas(1000)).await;
    let key = World::key(0);
    let deltas = w.store.deltas(&key);
    assert!(deltas.len() >= 2, "{deltas:?}");
    w.store.remove_delta(&key, deltas[0].checkpoint.version);
    let epochs_before = epoch_of(w.store.max_versions("summer", "g", TOPIC).await.unwrap()[&0]);

    let mut svc = summer(&w);
    let seen = svc.seen();
    let result = w
        .drive_with(&mut svc, with_deltas(1000), async {
            w.source.assign(&[(TOPIC, 0)]);
            tokio::time::sleep(Duration::from_millis(300)).await;
        })
        .await;
    let err = format!("{:#}", result.expect_err("a broken chain must not start"));
    assert!(err.contains("chain"), "the error names the broken chain: {err}");
    assert!(seen.lock().unwrap().handled.is_empty(), "nothing was processed");
    let epochs_after = epoch_of(w.store.max_versions("summer", "g", TOPIC).await.unwrap()[&0]);
    assert_eq!(epochs_after, epochs_before, "no claim was written over the damaged chain");
}
