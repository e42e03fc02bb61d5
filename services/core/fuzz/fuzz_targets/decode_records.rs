//! `AvroRecord::from_avro` of the four low-volume records (aggregates, charges, dead letters,
//! wallet adjustments: the rater reads the first and the last from Kafka) on arbitrary bytes:
//! no panic, and whatever is accepted re-encodes with `to_avro` to bytes that decode to the
//! same record.
//!
//! First byte: bits 0-1 pick the record type, bit 2 set = the bytes as they are (framing
//! included), else the record's single-object header is put in front of the rest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meterflow_core::records::{AvroRecord, Charge, DeadLetter, MeterAggregate, WalletAdjustment};

fn check<R: AvroRecord + PartialEq + std::fmt::Debug>(raw: bool, body: &[u8]) {
    let mut framed = Vec::with_capacity(body.len() + 10);
    if !raw {
        framed.extend_from_slice(&[0xC3, 0x01]);
        framed.extend_from_slice(&R::known().fingerprint.to_le_bytes());
    }
    framed.extend_from_slice(body);
    let Ok(record) = R::from_avro(&framed) else { return };
    let bytes = record.to_avro().expect("a decoded record encodes");
    let back = R::from_avro(&bytes).expect("a re-encoded record decodes");
    assert_eq!(back, record);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let raw = mode & 4 != 0;
    match mode & 3 {
        0 => check::<MeterAggregate>(raw, body),
        1 => check::<Charge>(raw, body),
        2 => check::<DeadLetter>(raw, body),
        _ => check::<WalletAdjustment>(raw, body),
    }
});
