//! The checkpointed state of a [`RaterPartition`](super::RaterPartition) and its bytes.
//!
//! Current format: [`crate::checkpoint::StateHeader`] (`MFRATERS`, version) then the state in
//! postcard, which is deterministic (maps are `BTreeMap`s, decimals are strings) and compact.
//! The rater wrote JSON before (`{"version":1,...}`, totals keyed by a `\u{1f}`-joined
//! string); such checkpoints still restore, any other version is refused by name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{PartitionConfig, Totals, TotalsKey};
use crate::checkpoint::StateHeader;
use crate::rating::{RatingState, Wallets};
use crate::Error;

pub const SNAPSHOT_MAGIC: &[u8; 8] = b"MFRATERS";
/// 2: postcard behind a [`StateHeader`]. 1: JSON (no header), still read.
pub const SNAPSHOT_VERSION: u32 = 2;
const HEADER: StateHeader = StateHeader { magic: SNAPSHOT_MAGIC, readable: &[SNAPSHOT_VERSION] };
const JSON_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct State {
    pub aggregates_next: i64,
    pub wallet_next: i64,
    pub rating: RatingState,
    pub wallets: Wallets,
    pub totals: BTreeMap<TotalsKey, Totals>,
    /// The event time of the last tick (`i64::MIN`: none yet).
    pub advanced_to: i64,
}

/// The JSON checkpoint the rater service wrote before this module existed.
#[derive(Deserialize)]
struct JsonState {
    version: u32,
    aggregates_next: i64,
    wallet_next: i64,
    rating: RatingState,
    wallets: Wallets,
    totals: BTreeMap<String, Totals>,
    advanced_to: i64,
}

impl State {
    pub fn fresh(config: &PartitionConfig) -> Self {
        Self {
            aggregates_next: 0,
            wallet_next: 0,
            rating: RatingState::new(config.partition, config.rating.clone()),
            wallets: Wallets::new(config.wallets.clone()),
            totals: BTreeMap::new(),
            advanced_to: i64::MIN,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let out = HEADER.encode(SNAPSHOT_VERSION).to_vec();
        // Plain data with string decimals: postcard cannot fail on it.
        postcard::to_extend(self, out).unwrap_or_else(|_| unreachable!("rater state serializes"))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.first() == Some(&b'{') {
            return Self::decode_json(bytes);
        }
        let (_, body) = HEADER.read(bytes)?;
        postcard::from_bytes(body).map_err(|e| Error::Snapshot(format!("rater state: {e}")))
    }

    fn decode_json(bytes: &[u8]) -> Result<Self, Error> {
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version = serde_json::from_slice(bytes).map_err(|e| Error::Snapshot(format!("rater JSON state: {e}")))?;
        if v.version != JSON_VERSION {
            return Err(Error::Snapshot(format!(
                "rater JSON state version {} is not supported (JSON states are version {JSON_VERSION})",
                v.version
            )));
        }
        let old: JsonState = serde_json::from_slice(bytes).map_err(|e| Error::Snapshot(format!("rater JSON state: {e}")))?;
        debug_assert_eq!(old.version, JSON_VERSION);
        let totals = old
            .totals
            .into_iter()
            .map(|(k, t)| {
                let mut parts = k.splitn(3, '\u{1f}').map(str::to_owned);
                let mut next = || parts.next().unwrap_or_default();
                (TotalsKey { currency: next(), meter: next(), plan: next() }, t)
            })
            .collect();
        Ok(Self {
            aggregates_next: old.aggregates_next,
            wallet_next: old.wallet_next,
            rating: old.rating,
            wallets: old.wallets.adopt_legacy_balances(),
            totals,
            advanced_to: old.advanced_to,
        })
    }
}
