//! Drives a scenario through the engine and a memory store, as the aggregator does.

use super::*;

/// Encoded form of every item, as the aggregator reads it from Kafka.
pub(super) fn encode(items: &[Item]) -> Vec<Option<Vec<u8>>> {
    let codec = UsageEventCodec::new();
    items
        .iter()
        .map(|it| match it {
            Item::Event(e) => {
                let mut buf = Vec::new();
                codec.encode_ref(&e.r(), WriterVersion::V2, Framing::SingleObject, &mut buf);
                Some(buf)
            }
            Item::Garbage => Some(vec![0xC3, 0x01, 1, 2, 3]),
            Item::Tick(_) => None,
        })
        .collect()
}

/// Feeds `items[range]` (offset = index) to the engine like the aggregator does: decode, call
/// the engine, store accepted raw events and emitted aggregates.
pub(super) fn drive(
    engine: &mut PartitionEngine,
    store: &mut MemoryStore,
    items: &[Item],
    bytes: &[Option<Vec<u8>>],
    range: std::ops::Range<usize>,
    kinds: &mut Vec<Kind>,
    out: &mut Vec<MeterAggregate>,
) {
    let codec = UsageEventCodec::new();
    for i in range {
        let offset = i as i64;
        match (&items[i], &bytes[i]) {
            (Item::Tick(t), _) => {
                engine.on_tick(offset, *t, store).unwrap();
                kinds.push(Kind::Tick);
            }
            (_, Some(b)) => match codec.decode(b) {
                // The service rejects some records before the engine sees them: undecodable
                // ones, and (modelled here on odd offsets) records on the wrong partition.
                Err(_) if offset % 3 == 1 => {
                    assert!(engine.on_rejected(offset, RejectReason::WrongPartition));
                    kinds.push(Kind::Rejected(RejectReason::WrongPartition));
                }
                // ... and (on offsets 2 mod 3) forged control records.
                Err(_) if offset % 3 == 2 => {
                    assert!(engine.on_rejected(offset, RejectReason::Unauthenticated));
                    kinds.push(Kind::Rejected(RejectReason::Unauthenticated));
                }
                Err(_) => {
                    assert!(engine.on_skipped(offset));
                    kinds.push(Kind::Rejected(RejectReason::Undecodable));
                }
                Ok(ev) => {
                    let o = engine.on_event(offset, &ev, store).unwrap();
                    if o == Outcome::Accepted {
                        store.record_accepted(engine.partition(), offset, &ev).unwrap();
                    }
                    kinds.push(kind(&o));
                }
            },
            (_, None) => unreachable!(),
        }
        let new: Vec<MeterAggregate> = engine.drain_output().collect();
        store.record_emitted(&new);
        out.extend(new);
        assert_eq!(engine.next_offset(), offset + 1);
    }
}

/// Closes everything: a tick far beyond every window (at offset `items.len()`).
pub(super) fn finish(engine: &mut PartitionEngine, store: &mut MemoryStore, offset: usize, out: &mut Vec<MeterAggregate>) {
    let t = engine.partition_time().unwrap_or(0) + 10 * 86_400_000;
    engine.on_tick(offset as i64, t, store).unwrap();
    let new: Vec<MeterAggregate> = engine.drain_output().collect();
    store.record_emitted(&new);
    out.extend(new);
}

pub(super) struct Run {
    pub(super) kinds: Vec<Kind>,
    pub(super) out: Vec<MeterAggregate>,
    pub(super) engine: PartitionEngine,
    pub(super) store: MemoryStore,
}

pub(super) fn run(s: &Scenario, cfg: &EngineConfig) -> Run {
    let cat = catalog();
    let mut store = MemoryStore::new(&cat);
    let mut engine = PartitionEngine::with_dedup_key(cat, cfg.clone(), 3, 0xfeed).unwrap();
    let bytes = encode(&s.items);
    let (mut kinds, mut out) = (Vec::new(), Vec::new());
    drive(&mut engine, &mut store, &s.items, &bytes, 0..s.items.len(), &mut kinds, &mut out);
    finish(&mut engine, &mut store, s.items.len(), &mut out);
    Run { kinds, out, engine, store }
}
