//! The one checkpoint format of meterflow's partitioned services (aggregator and rater).
//!
//! A checkpoint is an [`Envelope`]: what the runtime needs to resume and fence a partition
//! ([`Meta`]: offsets, partition counts, configuration, an operator's decision) around the
//! service's state. The state starts with a [`StateHeader`] (whose state it is, which version),
//! so a checkpoint restored by the wrong service or written by a newer release is refused by
//! name instead of misread.
//!
//! Envelope layout (version 2): `MFCP | 2u8 | meta length u32 LE | meta (postcard) | state |
//! CRC-32 LE of everything before it`. Version 1 had the meta in JSON and is still read; bytes
//! without the magic are a checkpoint from before envelopes (the bare state, no meta).
//! postcard because it is deterministic (the same meta, the same bytes: the golden fixtures
//! pin them) and compact; CRC-32 because it is fast and catches truncation and bit rot, and
//! the fencing protocol, not the checksum, protects against malice.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Error;

const MAGIC: &[u8; 4] = b"MFCP";
/// Version written. 1: meta as JSON (read, never written).
const VERSION: u8 = 2;
const JSON_META: u8 = 1;
/// Magic, version byte, meta length.
const HEAD: usize = 9;

/// What a checkpoint was computed against, next to the service's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Next offset per input topic (partition N of each).
    #[serde(default)]
    pub offsets: BTreeMap<String, i64>,
    /// Partition count of each input topic when the state was written: records are routed by
    /// tenant, so a changed count moves tenants between states.
    #[serde(default)]
    pub partition_counts: BTreeMap<String, i32>,
    /// Hash of the configuration the state depends on (meters, catalog).
    #[serde(default)]
    pub config_hash: String,
    /// That configuration itself, so that a restart with a changed one can first replay what
    /// was already output under the old one (docs/operations.md, "Changing configuration").
    #[serde(default)]
    pub config_text: String,
    /// Set by `meterflow-admin checkpoint replay|reset`: an operator's decision, which the
    /// service follows instead of refusing to start.
    #[serde(default)]
    pub operator: Option<OperatorDecision>,
}

/// An operator's explicit decision about a partition whose checkpoint and outputs disagree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorDecision {
    /// `replay` (fresh state from the given offsets) or `reset` (fresh state from the
    /// beginning of the topics).
    pub action: String,
    /// The `seq` the first aggregate emitted after the decision gets (the aggregator), so
    /// that consumers that already rated lower ones do not skip new output.
    #[serde(default)]
    pub next_seq: Option<i64>,
    #[serde(default)]
    pub note: String,
}

/// The hash recorded for a configuration text.
pub fn config_hash(text: &str) -> String {
    format!("{:08x}", crc32fast::hash(text.as_bytes()))
}

/// A decoded checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    pub meta: Meta,
    /// The service's state: a [`StateHeader`] and its body (empty for an operator's decision).
    pub state: Vec<u8>,
}

fn bad(what: &str) -> Error {
    Error::Snapshot(format!("checkpoint envelope: {what}"))
}

impl Envelope {
    /// The checkpoint's bytes (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        // Strings, integers and maps: postcard cannot fail on them.
        let meta = postcard::to_allocvec(&self.meta).unwrap_or_else(|_| unreachable!("meta serializes"));
        let mut out = Vec::with_capacity(HEAD + meta.len() + self.state.len() + 4);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&self.state);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes an envelope of any version this release reads.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        if !bytes.starts_with(MAGIC) {
            return Ok(Self { meta: Meta::default(), state: bytes.to_vec() });
        }
        if bytes.len() < HEAD + 4 {
            return Err(bad("truncated"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err(bad("checksum mismatch (corrupted checkpoint)"));
        }
        let version = body[4];
        if version != VERSION && version != JSON_META {
            return Err(bad(&format!(
                "version {version} is not supported (this release reads {JSON_META} and {VERSION}); \
                 was it written by a newer release?"
            )));
        }
        let len = u32::from_le_bytes([body[5], body[6], body[7], body[8]]) as usize;
        let meta_bytes = HEAD.checked_add(len).and_then(|end| body.get(HEAD..end)).ok_or_else(|| bad("meta length beyond the end"))?;
        let meta: Meta = if version == JSON_META {
            serde_json::from_slice(meta_bytes).map_err(|e| bad(&format!("meta: {e}")))?
        } else {
            postcard::from_bytes(meta_bytes).map_err(|e| bad(&format!("meta: {e}")))?
        };
        Ok(Self { meta, state: body[HEAD + len..].to_vec() })
    }
}

/// The start of a service state: 8 bytes naming the format, then its version (u32 LE).
#[derive(Debug, Clone, Copy)]
pub struct StateHeader {
    pub magic: &'static [u8; 8],
    /// Versions this release restores; the first is written.
    pub readable: &'static [u32],
}

impl StateHeader {
    pub const LEN: usize = 12;

    /// The header of `version`, for the body to follow.
    pub fn encode(&self, version: u32) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(self.magic);
        out[8..].copy_from_slice(&version.to_le_bytes());
        out
    }

    /// The version and the body after the header; refuses another format or a version this
    /// release does not read, naming it.
    pub fn read<'a>(&self, bytes: &'a [u8]) -> Result<(u32, &'a [u8]), Error> {
        let name = String::from_utf8_lossy(self.magic);
        if bytes.len() < Self::LEN || &bytes[..8] != self.magic {
            let got = String::from_utf8_lossy(&bytes[..bytes.len().min(8)]).into_owned();
            return Err(Error::Snapshot(format!("not a {name} state (starts with {got:?})")));
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if !self.readable.contains(&version) {
            return Err(Error::Snapshot(format!(
                "unsupported snapshot version {version} of {name} (this release reads {:?})",
                self.readable
            )));
        }
        Ok((version, &bytes[Self::LEN..]))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any meta and state round-trip, and encoding is a function of the value (the golden
        /// fixtures rely on it).
        #[test]
        fn any_envelope_round_trips(
            offsets in prop::collection::btree_map("[a-z.]{0,12}", any::<i64>(), 0..4),
            counts in prop::collection::btree_map("[a-z.]{0,12}", any::<i32>(), 0..4),
            text in ".{0,200}",
            operator in prop::option::of(("[a-z]{0,8}", prop::option::of(any::<i64>()), ".{0,20}")),
            state in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            let e = Envelope {
                meta: Meta {
                    offsets,
                    partition_counts: counts,
                    config_hash: config_hash(&text),
                    config_text: text,
                    operator: operator.map(|(action, next_seq, note)| OperatorDecision { action, next_seq, note }),
                },
                state,
            };
            let bytes = e.encode();
            prop_assert_eq!(Envelope::decode(&bytes).unwrap(), e.clone());
            prop_assert_eq!(e.clone().encode(), bytes);
        }
    }

    fn sample() -> Envelope {
        Envelope {
            meta: Meta {
                offsets: [("t".to_string(), 42)].into(),
                partition_counts: [("t".to_string(), 2)].into(),
                config_hash: "abc".into(),
                config_text: "x = 1".into(),
                operator: Some(OperatorDecision { action: "replay".into(), next_seq: Some(7), note: "n".into() }),
            },
            state: b"state bytes".to_vec(),
        }
    }

    #[test]
    fn round_trip_and_every_corruption_is_refused() {
        let e = sample();
        let bytes = e.encode();
        assert_eq!(bytes[4], VERSION);
        assert_eq!(Envelope::decode(&bytes).unwrap(), e);
        // (A flipped magic byte reads as a pre-envelope bare state, which the service's own
        // state header then refuses.)
        for i in MAGIC.len()..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(Envelope::decode(&bad).is_err(), "flip at {i} accepted");
        }
        for cut in 4..bytes.len() {
            assert!(Envelope::decode(&bytes[..cut]).is_err(), "truncation at {cut} accepted");
        }
    }

    /// The layout runtime 1 wrote: JSON meta (optional fields left out when empty).
    #[test]
    fn version_1_json_meta_is_still_read() {
        let e = sample();
        let meta = serde_json::to_vec(&e.meta).unwrap();
        let mut v1 = MAGIC.to_vec();
        v1.push(1);
        v1.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        v1.extend_from_slice(&meta);
        v1.extend_from_slice(&e.state);
        v1.extend_from_slice(&crc32fast::hash(&v1).to_le_bytes());
        assert_eq!(Envelope::decode(&v1).unwrap(), e);

        let sparse = br#"{"offsets":{"t":3},"partition_counts":{},"config_hash":""}"#;
        let mut v1 = MAGIC.to_vec();
        v1.push(1);
        v1.extend_from_slice(&(sparse.len() as u32).to_le_bytes());
        v1.extend_from_slice(sparse);
        v1.extend_from_slice(&crc32fast::hash(&v1).to_le_bytes());
        let got = Envelope::decode(&v1).unwrap();
        assert_eq!(got.meta.offsets["t"], 3);
        assert_eq!(got.meta.operator, None);
        assert!(got.state.is_empty());
    }

    #[test]
    fn an_unknown_version_is_refused_by_number() {
        let mut bytes = sample().encode();
        bytes[4] = 9;
        let n = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..n]).to_le_bytes();
        bytes[n..].copy_from_slice(&crc);
        let err = Envelope::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("version 9 is not supported"), "{err}");
    }

    #[test]
    fn bytes_from_before_envelopes_are_the_bare_state() {
        let legacy = Envelope::decode(b"{\"version\":1}").unwrap();
        assert_eq!(legacy.state, b"{\"version\":1}");
        assert_eq!(legacy.meta, Meta::default());
    }

    #[test]
    fn state_header_names_what_it_refuses() {
        const H: StateHeader = StateHeader { magic: b"MFTESTST", readable: &[3, 1] };
        let mut bytes = H.encode(3).to_vec();
        bytes.extend_from_slice(b"body");
        assert_eq!(H.read(&bytes).unwrap(), (3, &b"body"[..]));
        let mut v2 = H.encode(2).to_vec();
        v2.extend_from_slice(b"body");
        let err = H.read(&v2).unwrap_err().to_string();
        assert!(err.contains("unsupported snapshot version 2 of MFTESTST"), "{err}");
        let err = H.read(b"MFOTHER!\x03\0\0\0").unwrap_err().to_string();
        assert!(err.contains("not a MFTESTST state"), "{err}");
        assert!(H.read(b"MFTE").is_err());
    }
}
