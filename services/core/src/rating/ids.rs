//! Deterministic charge and alert ids, so sinks can deduplicate what a replay re-emits.

use siphasher::sip128::SipHasher13;

use super::KIND_USAGE;
use crate::records::MeterAggregate;

/// Deterministic id of a usage charge: the same aggregate (same source partition and seq,
/// which the aggregator assigns deterministically) always gets the same id, so a sink can
/// deduplicate charges re-emitted after a crash.
pub(super) fn usage_charge_id(agg: &MeterAggregate) -> String {
    let mut dims = Vec::new();
    for (k, v) in &agg.dimensions {
        for part in [k, v] {
            dims.extend_from_slice(&(part.len() as u64).to_le_bytes());
            dims.extend_from_slice(part.as_bytes());
        }
    }
    stable_id(&[
        KIND_USAGE.as_bytes(),
        agg.tenant.as_bytes(),
        agg.meter.as_bytes(),
        &dims,
        &agg.window_start.to_le_bytes(),
        &agg.revision.to_le_bytes(),
        &agg.source_partition.to_le_bytes(),
        &agg.seq.to_le_bytes(),
    ])
}

/// 128-bit SipHash-1-3 (fixed keys: ids must be stable across processes and releases) of the
/// length-prefixed parts, as 32 hex digits. Length prefixes make the encoding unambiguous.
pub(crate) fn stable_id(parts: &[&[u8]]) -> String {
    const K0: u64 = 0x6d65_7465_7266_6c6f; // "meterflo"
    const K1: u64 = 0x7720_6368_6172_6765; // "w charge"
    let mut buf = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
    for p in parts {
        buf.extend_from_slice(&(p.len() as u64).to_le_bytes());
        buf.extend_from_slice(p);
    }
    format!("{:032x}", SipHasher13::new_with_keys(K0, K1).hash(&buf).as_u128())
}
