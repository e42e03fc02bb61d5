//! `UsageEventCodec::decode` on arbitrary bytes: it must never panic, never allocate more than
//! the input justifies, and whatever it accepts must survive a re-encode unchanged and convert
//! to an owned event (decimal validation) without panicking.
//!
//! The first byte picks the framing put in front of the rest, so the fuzzer spends its time in
//! the record body instead of guessing 8-byte fingerprints: 0 = none (the bytes as they are,
//! framing included), 1 = single-object v2, 2 = single-object v1, 3 = Confluent id 2 (v2),
//! 4 = Confluent id 1 (v1).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meterflow_core::codec::{Framing, UsageEventCodec, WriterVersion};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let codec = UsageEventCodec::new();
    let mut framed = Vec::with_capacity(body.len() + 10);
    match mode % 5 {
        1 | 2 => {
            let v = if mode % 5 == 1 { WriterVersion::V2 } else { WriterVersion::V1 };
            framed.extend_from_slice(&[0xC3, 0x01]);
            framed.extend_from_slice(&codec.fingerprint(v).to_le_bytes());
        }
        3 => framed.extend_from_slice(&[0, 0, 0, 0, 2]),
        4 => framed.extend_from_slice(&[0, 0, 0, 0, 1]),
        _ => {}
    }
    framed.extend_from_slice(body);

    let Ok(ev) = codec.decode(&framed) else { return };
    let (version, _) = codec.unframe(&framed).expect("decode succeeded, so the framing is known");
    // Round trip: what was accepted re-encodes (single-object, same writer version) to bytes
    // that decode to the same event.
    let mut again = Vec::new();
    codec.encode_ref(&ev, version, Framing::SingleObject, &mut again);
    let back = codec.decode(&again).expect("re-encoded event decodes");
    assert_eq!(back, ev);
    // Dimension count is bounded by the input (each entry takes at least two bytes).
    assert!(ev.dimensions.len() <= framed.len() / 2);
    // Decimal validation must reject or accept, never panic.
    if let Ok(owned) = ev.to_owned_event() {
        assert_eq!(owned.event_id, ev.event_id);
        // An accepted quantity prints back to a decimal that parses to the same value.
        let q = meterflow_core::decimal::format(&owned.quantity);
        assert_eq!(meterflow_core::decimal::parse("quantity", &q).ok(), Some(owned.quantity));
    }
});
