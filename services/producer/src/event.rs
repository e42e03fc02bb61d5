//! Conveniences for building events: the core's [`UsageEvent::new`] wants every field, while a
//! caller metering one request usually has only tenant, meter and quantity at hand.

use meterflow_core::UsageEvent;
use rand::Rng;
use rust_decimal::Decimal;

/// A fresh event id: 128 random bits formatted like a UUID v4. Random rather than sequential
/// because ids must be unique per tenant across every producer process, with no coordination.
pub fn random_event_id() -> String {
    event_id_from(&mut rand::rng())
}

/// Like [`random_event_id`] from a caller's generator, so seeded runs produce the same ids.
pub fn event_id_from<R: Rng + ?Sized>(rng: &mut R) -> String {
    let mut v: u128 = rng.random();
    // Version 4, RFC 4122 variant: tools that validate UUIDs accept it.
    v = (v & !(0xF << 76)) | (0x4 << 76);
    v = (v & !(0x3 << 62)) | (0x2 << 62);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(36);
    for i in 0..32 {
        if matches!(i, 8 | 12 | 16 | 20) {
            id.push('-');
        }
        id.push(HEX[((v >> (124 - 4 * i)) & 0xF) as usize] as char);
    }
    id
}

/// An event with a random id and the current wall-clock time; add dimensions, provider cost
/// and source with the core's builder methods (`.with_dimension(..)` and friends).
///
/// A retried send must reuse the returned event (same id, same time): that is what lets the
/// aggregator drop the retry as a duplicate.
pub fn usage_event(tenant: impl Into<String>, meter: impl Into<String>, quantity: Decimal) -> UsageEvent {
    UsageEvent::new(random_event_id(), tenant, meter, quantity, crate::time::now_ms())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn ids_look_like_uuids_and_are_seedable() {
        let id = random_event_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
        let a = event_id_from(&mut rand::rngs::StdRng::seed_from_u64(7));
        let b = event_id_from(&mut rand::rngs::StdRng::seed_from_u64(7));
        assert_eq!(a, b);
        let mut v: u128 = rand::rngs::StdRng::seed_from_u64(7).random();
        v = (v & !(0xF << 76)) | (0x4 << 76);
        v = (v & !(0x3 << 62)) | (0x2 << 62);
        assert_eq!(a.replace('-', ""), format!("{v:032x}"));
        assert_ne!(random_event_id(), random_event_id());
    }

    #[test]
    fn usage_event_is_now() {
        let before = crate::time::now_ms();
        let ev = usage_event("acme", "requests", Decimal::ONE).with_dimension("model", "gpt-4o");
        assert!(ev.event_time_ms >= before && ev.event_time_ms <= crate::time::now_ms());
        assert_eq!(ev.dimensions["model"], "gpt-4o");
    }
}
