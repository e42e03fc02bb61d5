//! Deltas through the loop: the summing service checkpoints "what was added since the last
//! checkpoint" between bases, so a restore that missed or repeated a delta would show in its
//! total.

use super::*;
use crate::chain::{DeltaPolicy, StoredDelta};
use crate::checkpoint::epoch_of;

fn delta_config() -> LoopConfig {
    LoopConfig { deltas: DeltaPolicy { full_every: 3, max_ratio: 1e9 }, ..config() }
}

/// Revokes partition 0 and assigns it again; returns once it is restored and committed to `end`.
async fn reassign(w: &World, seen: &Arc<Mutex<Seen>>, end: i64) {
    let restores = seen.lock().unwrap().restored.len();
    w.source.revoke(&[(TOPIC, 0)]);
    until("released", || seen.lock().unwrap().released.contains(&0)).await;
    w.source.assign(&[(TOPIC, 0)]);
    until("restored again", || seen.lock().unwrap().restored.len() > restores).await;
    until("committed to the end after the restore", || w.source.committed_offset(TOPIC, 0) == Some(end)).await;
}

/// Deltas stored after the newest base of partition 0 (the MemoryStore answers at once).
fn deltas_after_base(w: &World) -> (u64, usize) {
    let key = World::key(0);
    let base = w.store.load(&key).now_or_never().unwrap().unwrap().map_or(0, |b| b.version);
    (base, w.store.load_deltas(&key, base).now_or_never().unwrap().unwrap().len())
}

#[tokio::test]
async fn a_restore_applies_the_deltas_after_the_newest_base() {
    let w = World::new(1);
    let mut svc = Summer::new(w.sink.clone());
    svc.since = Some(BTreeMap::new());
    let seen = svc.seen();
    let (mut total, mut end) = (0, 0);
    let mut stored = (0, 0);
    w.drive_with(&mut svc, delta_config(), async {
        w.source.assign(&[(TOPIC, 0)]);
        // Records trickle in, so that several checkpoints (bases and deltas) cover them, until
        // a base beyond the claim has deltas after it.
        for chunk in 0..40 {
            total += w.produce(0, chunk * 5 + 1..=chunk * 5 + 5);
            end = (chunk + 1) * 5;
            until("committed to the end", || w.source.committed_offset(TOPIC, 0) == Some(end)).await;
            stored = deltas_after_base(&w);
            if stored.0 > version_in(1, 0) && stored.1 > 0 {
                break;
            }
        }
        reassign(&w, &seen, end).await;
    })
    .await
    .unwrap();

    let (base, n_stored) = stored;
    assert!(base > version_in(1, 0), "bases were written after the claim (compaction)");
    assert!((1..=3).contains(&n_stored), "between 1 and full_every deltas after the newest base: {n_stored}");
    let seen = seen.lock().unwrap();
    let want = Sum { next: end, total };
    assert_eq!(seen.applied.last().copied(), Some((0, n_stored, want)), "the restore applied the stored deltas: base + deltas is the state");
    assert_eq!(seen.sums[&0], want);
    assert_protocol_order(&w.journal.events());
}

#[tokio::test]
async fn failed_delta_saves_are_retried_and_the_chain_stays_exact() {
    let w = World::new(1);
    let mut svc = Summer::new(w.sink.clone());
    svc.since = Some(BTreeMap::new());
    let seen = svc.seen();
    let mut total = 0;
    w.drive_with(&mut svc, LoopConfig { deltas: DeltaPolicy { full_every: 1000, max_ratio: 1e9 }, ..config() }, async {
        w.source.assign(&[(TOPIC, 0)]);
        total += w.produce(0, 1..=10);
        until("committed to 10", || w.source.committed_offset(TOPIC, 0) == Some(10)).await;
        // Saves fail while records arrive (every checkpoint after the claim is a delta here):
        // the delta staged meanwhile is retried until saved, and nothing builds on it before.
        w.store.fail_saves(3);
        total += w.produce(0, 11..=30);
        until("the failing saves were tried", || w.store.failing_saves() == 0).await;
        until("committed to 30", || w.source.committed_offset(TOPIC, 0) == Some(30)).await;
        reassign(&w, &seen, 30).await;
    })
    .await
    .unwrap();

    let seen = seen.lock().unwrap();
    let want = Sum { next: 30, total };
    let (_, n, restored) = seen.applied.last().copied().expect("the restore applied deltas");
    assert!(n >= 2, "the chain after the claim: {n} deltas");
    assert_eq!(restored, want, "no delta lost or applied twice");
    assert_eq!(seen.sums[&0], want);
    assert_protocol_order(&w.journal.events());
}

#[tokio::test]
async fn a_hole_in_the_chain_refuses_to_start() {
    let w = World::new(1);
    let mut svc = Summer::new(w.sink.clone());
    svc.since = Some(BTreeMap::new());
    w.drive_with(&mut svc, LoopConfig { deltas: DeltaPolicy { full_every: 1000, max_ratio: 1e9 }, ..config() }, async {
        w.source.assign(&[(TOPIC, 0)]);
        for round in 0..4i64 {
            w.produce(0, (1..=10).map(|v| v + round * 10));
            until("the round is committed", || w.source.committed_offset(TOPIC, 0) == Some((round + 1) * 10)).await;
        }
    })
    .await
    .unwrap();
    let key = World::key(0);
    let deltas = w.store.deltas(&key);
    assert!(deltas.len() >= 2, "a chain of deltas after the claim: {deltas:?}");
    // A damaged table: the first delta of the chain is lost.
    w.store.remove_delta(&key, deltas[0].checkpoint.version);
    let newest = |w: &World| w.store.max_versions("summer", "g", TOPIC).now_or_never().unwrap().unwrap()[&0];
    let before = newest(&w);

    let mut svc = Summer::new(w.sink.clone());
    svc.since = Some(BTreeMap::new());
    let seen = svc.seen();
    w.source.assign(&[(TOPIC, 0)]);
    let err = stops_with_error(&w, &mut svc).await;
    assert!(err.contains("chain"), "the error names the broken chain: {err}");
    let seen = seen.lock().unwrap();
    assert!(seen.handled.is_empty() && seen.applied.is_empty(), "nothing restored from a wrong state or processed");
    assert_eq!(newest(&w), before, "no claim was written over the damaged chain");
}

/// Deltas with a long chain: no compaction while the tests below run.
fn chain_config() -> LoopConfig {
    LoopConfig { deltas: DeltaPolicy { full_every: 1000, max_ratio: 1e9 }, ..config() }
}

/// The state a stored delta carries.
fn delta_sum(d: &StoredDelta) -> Sum {
    Sum::decode(&Envelope::decode(&d.checkpoint.state).unwrap().state).unwrap()
}

/// The claim delta of partition 0 in `epoch`.
/// Values 1..=20 in two rounds of ten, each committed (one checkpoint or more per round).
async fn commit_two_rounds(w: &World) {
    for round in 0..2i64 {
        w.produce(0, (1..=10).map(|v| v + round * 10));
        until("the round is committed", || w.source.committed_offset(TOPIC, 0) == Some((round + 1) * 10)).await;
    }
}

fn claim_delta(w: &World, epoch: u64) -> StoredDelta {
    let found = w.store.deltas(&World::key(0)).into_iter().find(|d| d.checkpoint.version == version_in(epoch, 0));
    found.unwrap_or_else(|| panic!("a claim delta in epoch {epoch}"))
}

/// The state of partition 0 after a straight run over 1..=`n` (no restart).
async fn straight_run(n: i64) -> Sum {
    let w = World::new(1);
    w.produce(0, 1..=n);
    let mut svc = Summer::new(w.sink.clone());
    svc.since = Some(BTreeMap::new());
    let seen = svc.seen();
    w.drive_with(&mut svc, chain_config(), async {
        w.source.assign(&[(TOPIC, 0)]);
        until("committed to the end", || w.source.committed_offset(TOPIC, 0) == Some(n)).await;
    })
    .await
    .unwrap();
    let sum = seen.lock().unwrap().sums[&0];
    sum
}

#[tokio::test]
async fn a_claim_continues_the_chain_and_the_next_restart_reads_it_all() {
    let w = World::new(1);
    let mut svc = Summer::new(w.sink.clone());
    svc.since = Some(BTreeMap::new());
    let seen = svc.seen();
    let key = World::key(0);
    w.drive_with(&mut svc, chain_config(), async {
        w.source.assign(&[(TOPIC, 0)]);
        commit_two_rounds(&w).await;
        let old_head = w.store.deltas(&key).last().map(|d| d.checkpoint.version).expect("deltas in epoch 1");
        reassign(&w, &seen, 20).await;
        // The claim is a delta after the loaded head, in the new epoch: no new base.
        let claim = claim_delta(&w, 2);
        assert_eq!(claim.link, crate::chain::DeltaLink { base_version: version_in(1, 0), prev_version: old_head });
        assert_eq!(delta_sum(&claim), Sum { next: 20, total: 0 }, "nothing changed since the restore");
        w.produce(0, 21..=30);
        until("committed to 30", || w.source.committed_offset(TOPIC, 0) == Some(30)).await;
        reassign(&w, &seen, 30).await;
        w.produce(0, 31..=40);
        until("committed to 40", || w.source.committed_offset(TOPIC, 0) == Some(40)).await;
    })
    .await
    .unwrap();

    let newest_base = w.store.load(&key).now_or_never().unwrap().unwrap().map(|b| b.version);
    assert_eq!(newest_base, Some(version_in(1, 0)), "both claims continued the first chain");
    let chain = crate::chain::contiguous(version_in(1, 0), w.store.deltas(&key)).unwrap();
    let epochs: std::collections::BTreeSet<u64> = chain.iter().map(|d| epoch_of(d.checkpoint.version)).collect();
    assert_eq!(epochs, [1, 2, 3].into(), "one chain across three epochs");
    let straight = straight_run(40).await;
    let seen = seen.lock().unwrap();
    // The second restore read epoch 1's deltas, the claim of epoch 2 and the deltas after it.
    let before_second = chain.iter().filter(|d| d.checkpoint.version < version_in(3, 0)).count();
    assert_eq!(seen.applied.last().map(|a| a.1), Some(before_second));
    assert_eq!(seen.sums[&0].encode(), straight.encode(), "byte-identical to a straight run");
    assert_protocol_order(&w.journal.events());
}

#[tokio::test]
async fn a_fenced_instances_delta_after_the_claim_is_ignored() {
    let w = World::new(1);
    let mut svc = Summer::new(w.sink.clone());
    svc.since = Some(BTreeMap::new());
    let seen = svc.seen();
    let key = World::key(0);
    w.drive_with(&mut svc, chain_config(), async {
        w.source.assign(&[(TOPIC, 0)]);
        w.produce(0, 1..=20);
        until("committed to 20", || w.source.committed_offset(TOPIC, 0) == Some(20)).await;
        reassign(&w, &seen, 20).await;
        // The epoch-1 owner, fenced but not yet aware, lands a delta after what the claim
        // loaded: a fork below the new epoch.
        let link = claim_delta(&w, 2).link;
        let zombie = Sum { next: 25, total: 1_000_000 };
        let envelope = Driver::<MemorySource, MemoryStore>::envelope(
            &Summer::new(Sink::default()),
            0,
            &BTreeMap::from([(TOPIC.to_owned(), 25)]),
            &BTreeMap::from([(TOPIC.to_owned(), 1)]),
            zombie.encode(),
        );
        let checkpoint = Checkpoint { version: link.prev_version + 1, next_offset: 25, state: envelope.encode() };
        w.store.insert_delta(key.clone(), StoredDelta { link, checkpoint });
        w.produce(0, 21..=30);
        until("committed to 30", || w.source.committed_offset(TOPIC, 0) == Some(30)).await;
        reassign(&w, &seen, 30).await;
    })
    .await
    .unwrap();

    let forks = w.store.deltas(&key).iter().filter(|d| delta_sum(d).total == 1_000_000).count();
    assert_eq!(forks, 1, "the fenced instance's delta is stored");
    let seen = seen.lock().unwrap();
    let want = Sum { next: 30, total: (1..=30).sum() };
    assert_eq!(seen.applied.last().map(|a| a.2), Some(want), "restored without the fork");
    assert_eq!(seen.sums[&0], want);
}

#[tokio::test]
async fn a_hole_below_the_claim_refuses_to_start() {
    let w = World::new(1);
    let mut svc = Summer::new(w.sink.clone());
    svc.since = Some(BTreeMap::new());
    let seen = svc.seen();
    let key = World::key(0);
    w.drive_with(&mut svc, chain_config(), async {
        w.source.assign(&[(TOPIC, 0)]);
        commit_two_rounds(&w).await;
        reassign(&w, &seen, 20).await;
        w.produce(0, 21..=30);
        until("committed to 30", || w.source.committed_offset(TOPIC, 0) == Some(30)).await;
    })
    .await
    .unwrap();
    // A damaged table: the first delta of epoch 1, below the claim of epoch 2, is lost.
    let first = w.store.deltas(&key)[0].checkpoint.version;
    assert_eq!(epoch_of(first), 1);
    w.store.remove_delta(&key, first);
    let newest = |w: &World| w.store.max_versions("summer", "g", TOPIC).now_or_never().unwrap().unwrap()[&0];
    let before = newest(&w);

    let mut svc = Summer::new(w.sink.clone());
    svc.since = Some(BTreeMap::new());
    w.source.assign(&[(TOPIC, 0)]);
    let err = stops_with_error(&w, &mut svc).await;
    assert!(err.contains("chain") && err.contains("broken"), "the error names the broken chain: {err}");
    assert!(svc.seen.lock().unwrap().applied.is_empty(), "nothing restored from a wrong state");
    assert_eq!(newest(&w), before, "no claim was written over the damaged chain");
}

#[tokio::test]
async fn partitions_assigned_together_load_concurrently_and_claim_in_one_save() {
    let w = World::new(3);
    let mut totals = [0i64; 3];
    let mut svc = Summer::new(w.sink.clone());
    svc.since = Some(BTreeMap::new());
    let all = [(TOPIC, 0), (TOPIC, 1), (TOPIC, 2)];
    let at_end = |w: &World| (0..3).all(|p| w.source.committed_offset(TOPIC, p) == Some(20));
    w.drive_with(&mut svc, chain_config(), async {
        w.source.assign(&all);
        for (p, total) in (0..3).zip(&mut totals) {
            *total += w.produce(p, (1..=20).map(|v| v * (p as i64 + 1)));
        }
        until("all committed to 20", || at_end(&w)).await;
    })
    .await
    .unwrap();

    // A restart: the three heads load together, and the three claims are one insert.
    let mut svc = Summer::new(w.sink.clone());
    svc.since = Some(BTreeMap::new());
    let seen = svc.seen();
    w.store.gate_loads(3);
    let saves = w.store.save_calls();
    w.drive_with(&mut svc, chain_config(), async {
        w.source.assign(&all);
        until("all three restored", || seen.lock().unwrap().restored.len() == 3).await;
        until("all three claimed", || (0..3).all(|p| w.store.deltas(&World::key(p)).iter().any(|d| epoch_of(d.checkpoint.version) == 2))).await;
        assert_eq!(w.store.save_calls() - saves, 1, "the three claim deltas were one save");
        for (p, total) in (0..3).zip(&mut totals) {
            *total += w.produce(p, 21..=30);
        }
        until("all committed to 30", || (0..3).all(|p| w.source.committed_offset(TOPIC, p) == Some(30))).await;
    })
    .await
    .unwrap();
    assert_eq!(w.store.loads_met(), 3, "the three loads were in flight together");
    let seen = seen.lock().unwrap();
    for (p, total) in (0..3).zip(totals) {
        assert_eq!(seen.sums[&p], Sum { next: 30, total });
    }
    assert_protocol_order(&w.journal.events());
}

/// The envelope bytes of a state of partition 0 at `next` (as a fenced instance writes it).
fn stale_envelope(sum: Sum) -> Vec<u8> {
    let offsets = BTreeMap::from([(TOPIC.to_owned(), sum.next)]);
    let counts = BTreeMap::from([(TOPIC.to_owned(), 1)]);
    Driver::<MemorySource, MemoryStore>::envelope(&Summer::new(Sink::default()), 0, &offsets, &counts, sum.encode()).encode()
}

#[tokio::test]
async fn a_fenced_instances_base_after_the_claim_does_not_hide_the_chain() {
    let w = World::new(1);
    let mut svc = Summer::new(w.sink.clone());
    svc.since = Some(BTreeMap::new());
    let seen = svc.seen();
    let key = World::key(0);
    let mut stale = 0;
    w.drive_with(&mut svc, chain_config(), async {
        w.source.assign(&[(TOPIC, 0)]);
        w.produce(0, 1..=20);
        until("committed to 20", || w.source.committed_offset(TOPIC, 0) == Some(20)).await;
        reassign(&w, &seen, 20).await;
        // The epoch-1 owner compacts after the claim loaded its chain: a base newer than the
        // one the claim continues, in the old epoch.
        stale = claim_delta(&w, 2).link.prev_version + 1;
        let state = stale_envelope(Sum { next: 25, total: 1_000_000 });
        w.store.insert(key.clone(), Checkpoint { version: stale, next_offset: 25, state });
        w.produce(0, 21..=30);
        until("committed to 30", || w.source.committed_offset(TOPIC, 0) == Some(30)).await;
        reassign(&w, &seen, 30).await;
    })
    .await
    .unwrap();

    assert_eq!(w.store.load(&key).now_or_never().unwrap().unwrap().map(|b| b.version), Some(stale), "the stale base is the newest");
    let seen = seen.lock().unwrap();
    let want = Sum { next: 30, total: (1..=30).sum() };
    assert_eq!(seen.restored.last().map(|r| r.1), Some(Sum::default()), "restored the claimed chain's base (the first claim's)");
    assert_eq!(seen.applied.last().map(|a| a.2), Some(want));
    assert_eq!(seen.sums[&0], want);
}

#[tokio::test]
async fn compaction_keeps_the_chain_it_replaced_until_the_next_base() {
    let w = World::new(1);
    let mut svc = Summer::new(w.sink.clone());
    svc.since = Some(BTreeMap::new());
    let key = World::key(0);
    let mut end = 0;
    w.drive_with(&mut svc, LoopConfig { deltas: DeltaPolicy { full_every: 2, max_ratio: 1e9 }, ..config() }, async {
        w.source.assign(&[(TOPIC, 0)]);
        // Trickle until four bases (the claim and three compactions) are stored.
        while w.store.bases(&key).len() < 4 {
            end += 1;
            w.produce(0, [end]);
            until("committed to the end", || w.source.committed_offset(TOPIC, 0) == Some(end)).await;
        }
    })
    .await
    .unwrap();
    let bases = w.store.bases(&key);
    let n = bases.len();
    let of = |base: u64| w.store.deltas(&key).iter().filter(|d| d.link.base_version == base).count();
    assert_eq!(of(bases[n - 2]), 2, "the chain the newest base replaced is kept: {bases:?}");
    for &older in &bases[..n - 2] {
        assert_eq!(of(older), 0, "chains before it are deleted: {bases:?}");
    }
}
