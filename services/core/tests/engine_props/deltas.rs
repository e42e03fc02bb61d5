//! Incremental checkpoints: a base snapshot plus the deltas taken after it rebuild exactly the
//! state of the engine that wrote them, and a broken chain is refused.

use super::*;

/// Where a run took its checkpoints: the base, then (delta, snapshot at that delta) pairs.
struct Chain {
    base: Vec<u8>,
    deltas: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Drives `s` with a marked base at `base_at` and a delta at every cut (offsets, ascending).
fn chained(
    s: &Scenario,
    cfg: &EngineConfig,
    base_at: usize,
    cuts: &[usize],
    store: &mut MemoryStore,
) -> (PartitionEngine, Chain, Vec<Kind>, Vec<MeterAggregate>) {
    let bytes = encode(&s.items);
    let mut e = PartitionEngine::with_dedup_key(catalog(), cfg.clone(), 3, 0xfeed).unwrap();
    let (mut kinds, mut out) = (Vec::new(), Vec::new());
    drive(&mut e, store, &s.items, &bytes, 0..base_at, &mut kinds, &mut out);
    let base = e.snapshot_marked();
    let mut at = base_at;
    let mut deltas = Vec::new();
    for &c in cuts {
        drive(&mut e, store, &s.items, &bytes, at..c, &mut kinds, &mut out);
        at = c;
        deltas.push((e.checkpoint_delta().unwrap(), e.snapshot()));
    }
    (e, Chain { base, deltas }, kinds, out)
}

fn cut_points(n: usize, fractions: &[f64], base: f64) -> (usize, Vec<usize>) {
    let base_at = ((n as f64) * base) as usize;
    let mut cuts: Vec<usize> = fractions.iter().map(|f| base_at + (((n - base_at) as f64) * f) as usize).collect();
    cuts.sort_unstable();
    (base_at, cuts)
}

proptest! {
    #![proptest_config(config())]

    /// restore(base) + every delta in order is byte-identical to the engine that ran straight
    /// through, at every delta; continuing from the rebuilt engine writes the same deltas and
    /// the same output as the original; tight budgets (evictions to the cold tiers between
    /// deltas) included.
    #[test]
    fn base_plus_deltas_is_the_straight_run(
        s in scenario(),
        tight in any::<bool>(),
        fractions in prop::collection::vec(0.0f64..1.0, 1..6),
        base in 0.0f64..0.7,
    ) {
        let cfg = if tight { EngineConfig { hot_max_ids: 2, retain_closed_ms: 0, ..s.cfg.clone() } } else { s.cfg.clone() };
        let n = s.items.len();
        let (base_at, cuts) = cut_points(n, &fractions, base);
        let cat = catalog();
        let mut store = MemoryStore::new(&cat);
        let (mut e, chain, kinds, out) = chained(&s, &cfg, base_at, &cuts, &mut store);

        let mut r = PartitionEngine::restore(&chain.base, cat.clone(), cfg.clone()).unwrap();
        for (delta, snap) in &chain.deltas {
            r.apply_delta(delta).unwrap();
            prop_assert_eq!(&r.snapshot(), snap);
        }
        // Both continue: same outcomes, output, next delta and final state.
        let bytes = encode(&s.items);
        let from = *cuts.last().unwrap();
        let (mut k1, mut o1, mut k2, mut o2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut store2 = store.clone();
        drive(&mut e, &mut store, &s.items, &bytes, from..n, &mut k1, &mut o1);
        drive(&mut r, &mut store2, &s.items, &bytes, from..n, &mut k2, &mut o2);
        prop_assert_eq!(&k1, &k2);
        prop_assert_eq!(bytes_of(&o1), bytes_of(&o2));
        finish(&mut e, &mut store, n, &mut o1);
        finish(&mut r, &mut store2, n, &mut o2);
        prop_assert_eq!(bytes_of(&o1), bytes_of(&o2));
        let (d1, d2) = (e.checkpoint_delta().unwrap(), r.checkpoint_delta().unwrap());
        prop_assert_eq!(&d1, &d2);
        prop_assert_eq!(e.snapshot(), r.snapshot());
        // And the whole thing is the uninterrupted run.
        let whole = run(&s, &cfg);
        prop_assert_eq!(e.snapshot(), whole.engine.snapshot());
        let mut all_kinds = kinds;
        all_kinds.extend(k1);
        prop_assert_eq!(&all_kinds, &whole.kinds);
        let mut all_out = out;
        all_out.extend(o1);
        prop_assert_eq!(bytes_of(&all_out), bytes_of(&whole.out));
    }

    /// A delta applied to another base, twice, out of order or corrupted is an error, never a
    /// different state.
    #[test]
    fn a_broken_chain_is_refused(
        s in scenario(),
        fractions in prop::collection::vec(0.0f64..1.0, 2..5),
        base in 0.0f64..0.5,
        flip in any::<prop::sample::Index>(),
    ) {
        let n = s.items.len();
        let (base_at, cuts) = cut_points(n, &fractions, base);
        let cat = catalog();
        let (_, chain, _, _) = chained(&s, &s.cfg, base_at, &cuts, &mut MemoryStore::new(&cat));
        let restore = || PartitionEngine::restore(&chain.base, cat.clone(), s.cfg.clone()).unwrap();
        let (d0, d1) = (&chain.deltas[0].0, &chain.deltas[1].0);
        // Out of order: the second delta on the base.
        prop_assert!(matches!(restore().apply_delta(d1), Err(Error::Snapshot(_))));
        // Twice.
        let mut e = restore();
        e.apply_delta(d0).unwrap();
        prop_assert!(matches!(e.apply_delta(d0), Err(Error::Snapshot(_))));
        // Another base: the state at the last delta, snapshotted in full (checkpoints are
        // named by their content, so only a state that differs from the base is another one).
        let last = &chain.deltas.last().unwrap().1;
        if last != &chain.base {
            let other = PartitionEngine::restore(last, cat.clone(), s.cfg.clone());
            prop_assert!(matches!(other.unwrap().apply_delta(d0), Err(Error::Snapshot(_))));
        }
        // A full snapshot is not a delta and vice versa.
        prop_assert!(matches!(restore().apply_delta(&chain.base), Err(Error::Snapshot(_))));
        prop_assert!(PartitionEngine::restore(d0, cat.clone(), s.cfg.clone()).is_err());
        // Any flipped byte or truncation.
        let mut bad = d0.clone();
        let i = flip.index(bad.len());
        bad[i] ^= 0x5a;
        let mut e = restore();
        prop_assert!(matches!(e.apply_delta(&bad), Err(Error::Snapshot(_))));
        prop_assert!(matches!(e.apply_delta(&d0[..i]), Err(Error::Snapshot(_))));
        // Refusals changed nothing: the right delta still applies.
        e.apply_delta(d0).unwrap();
        prop_assert_eq!(e.snapshot(), chain.deltas[0].1.clone());
    }
}

/// The chain property is not vacuous: between base and deltas, windows are evicted (also ones
/// open at the base), reloaded, and dedup ids compacted and evicted to the cold tier.
#[test]
fn deltas_cover_evictions_and_compactions() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = scenario();
    let (mut evicted, mut loaded, mut compactions, mut cold) = (0, 0, 0, 0);
    for _ in 0..64 {
        let s = strategy.new_tree(&mut runner).unwrap().current();
        let cfg = EngineConfig { hot_max_ids: 2, retain_closed_ms: 0, ..s.cfg.clone() };
        let n = s.items.len();
        let (base_at, cuts) = cut_points(n, &[0.5, 1.0], 0.3);
        let cat = catalog();
        let mut store = MemoryStore::new(&cat);
        let (e, chain, _, _) = chained(&s, &cfg, base_at, &cuts, &mut store);
        let at_base = PartitionEngine::restore(&chain.base, cat, cfg).unwrap();
        let (a, b) = (at_base.stats(), e.stats());
        evicted += b.windows_evicted - a.windows_evicted;
        loaded += b.windows_loaded - a.windows_loaded;
        let (da, db) = (at_base.dedup().stats(), e.dedup().stats());
        compactions += db.compactions - da.compactions;
        cold += db.evicted_ids - da.evicted_ids;
    }
    eprintln!("after the base: {evicted} windows evicted, {loaded} reloaded, {compactions} compactions, {cold} ids evicted");
    assert!(evicted > 100 && loaded > 10 && compactions > 100 && cold > 100);
}
