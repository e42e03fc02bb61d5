//! Authenticated records: a keyed MAC that meterflow's own services put on the records they
//! write to Kafka, so that anyone else with write access to a topic cannot forge them.
//!
//! Why a MAC and not signatures: every meterflow service of a deployment is equally trusted
//! and shares one secret key (`--record-key` / `METERFLOW_RECORD_KEY`, or the `record_keys`
//! table that `meterflow-admin migrate` fills), and a MAC is ~1 µs per record. Producers of
//! usage events never see the key: they cannot make an aggregate, an idle tick or a rerate
//! request the services will trust.
//!
//! The tag is HMAC-SHA256 truncated to [`TAG_LEN`] bytes (128 bits, NIST SP 800-107 allows
//! truncation to >= 64 bits for authentication), computed over the length-prefixed `parts`
//! (so `["ab", "c"]` and `["a", "bc"]` differ). The first part should name the purpose
//! ([`PURPOSE_AGGREGATE`], ...) so a tag made for one kind of record is never valid for
//! another. Verification compares in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Error;

/// Kafka header carrying the tag of a record.
pub const HEADER: &str = "meterflow-auth";
/// Kafka header of a rerate request (`meterflow-admin rerate`): the tag of its payload (the
/// parked aggregate's original bytes) under [`PURPOSE_RERATE`].
pub const RERATE_HEADER: &str = "meterflow-rerate";
/// Bytes of a tag (truncated HMAC-SHA256).
pub const TAG_LEN: usize = 16;
/// Shortest accepted key: 128 bits.
pub const MIN_KEY_LEN: usize = 16;
/// Length of the keys meterflow generates (256 bits).
pub const GENERATED_KEY_LEN: usize = 32;

/// Purpose of an aggregate written by the aggregator to the aggregates topic.
pub const PURPOSE_AGGREGATE: &[u8] = b"meterflow.aggregate.v1";
/// Purpose of a rerate request (`meterflow-admin rerate`) on the aggregates topic.
pub const PURPOSE_RERATE: &[u8] = b"meterflow.rerate.v1";
/// An idle tick the aggregator writes into a usage partition (tagged over topic, partition
/// and payload, so a tick cannot be replayed into another partition).
pub const PURPOSE_TICK: &[u8] = b"meterflow.tick.v1";
/// A provisional total the aggregator writes to the provisional topic: untagged ones could
/// inflate (or hide) a tenant's pending spend, so the rater ignores them.
pub const PURPOSE_PROVISIONAL: &[u8] = b"meterflow.provisional.v1";

type HmacSha256 = Hmac<Sha256>;

/// The deployment's record key. `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct RecordKey(Vec<u8>);

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordKey({} bytes)", self.0.len())
    }
}

impl RecordKey {
    /// A key from raw bytes (at least [`MIN_KEY_LEN`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(Error::Config(format!(
                "record key has {} bytes; at least {MIN_KEY_LEN} are required",
                bytes.len()
            )));
        }
        Ok(Self(bytes.to_vec()))
    }

    /// A key from hex (what `--record-key` and the `record_keys` table hold).
    pub fn from_hex(text: &str) -> Result<Self, Error> {
        let bytes = hex::decode(text.trim())
            .map_err(|e| Error::Config(format!("record key is not hex: {e}")))?;
        Self::from_bytes(&bytes)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        #[allow(clippy::expect_used, reason = "HMAC takes keys of any length: new_from_slice never fails for it")]
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        for p in parts {
            mac.update(&(p.len() as u64).to_le_bytes());
            mac.update(p);
        }
        mac
    }
}

/// The tag of `parts` under `key`.
pub fn sign(key: &RecordKey, parts: &[&[u8]]) -> [u8; TAG_LEN] {
    let full = key.mac(parts).finalize().into_bytes();
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&full[..TAG_LEN]);
    tag
}

/// Whether `tag` is the tag of `parts` under `key` (constant time; a tag of the wrong length
/// is simply invalid).
pub fn verify(key: &RecordKey, parts: &[&[u8]], tag: &[u8]) -> bool {
    tag.len() == TAG_LEN && key.mac(parts).verify_truncated_left(tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RecordKey {
        RecordKey::from_hex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f").unwrap()
    }

    #[test]
    fn matches_rfc4231_test_case_2_truncated() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?". Our framing
        // length-prefixes parts, so check the primitive on the raw MAC instead.
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let out = mac.finalize().into_bytes();
        assert_eq!(hex::encode(&out[..TAG_LEN]), "5bdcc146bf60754e6a042426089575c7");
    }

    #[test]
    fn sign_verify_and_tamper() {
        let k = key();
        let tag = sign(&k, &[PURPOSE_AGGREGATE, b"payload"]);
        assert!(verify(&k, &[PURPOSE_AGGREGATE, b"payload"], &tag));
        assert!(!verify(&k, &[PURPOSE_AGGREGATE, b"payloae"], &tag));
        assert!(!verify(&k, &[PURPOSE_RERATE, b"payload"], &tag), "purposes are separated");
        assert!(!verify(&k, &[PURPOSE_AGGREGATE, b"payload"], &tag[..8]), "short tags are invalid");
        assert!(!verify(&k, &[PURPOSE_AGGREGATE, b"payload"], &[]));
        let other = RecordKey::from_bytes(&[7u8; 32]).unwrap();
        assert!(!verify(&other, &[PURPOSE_AGGREGATE, b"payload"], &tag));
        let mut bad = tag;
        bad[TAG_LEN - 1] ^= 1;
        assert!(!verify(&k, &[PURPOSE_AGGREGATE, b"payload"], &bad));
    }

    #[test]
    fn parts_are_length_prefixed() {
        let k = key();
        assert_ne!(sign(&k, &[b"ab", b"c"]), sign(&k, &[b"a", b"bc"]));
        assert_eq!(sign(&k, &[b"ab", b"c"]), sign(&k, &[b"ab", b"c"]));
    }

    #[test]
    fn keys_parse_and_do_not_print() {
        assert!(RecordKey::from_hex("00ff").is_err(), "too short");
        assert!(RecordKey::from_hex("zz").is_err());
        let k = key();
        assert_eq!(RecordKey::from_hex(&k.to_hex()).unwrap(), k);
        assert!(!format!("{k:?}").contains("0001"));
    }
}
