//! The versioned JSON envelope of the rating and wallet snapshots.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::SNAPSHOT_VERSION;
use crate::Error;

#[derive(Serialize)]
struct SnapshotOut<'a, T> {
    format: &'static str,
    version: u32,
    state: &'a T,
}

#[derive(Deserialize)]
struct SnapshotHeader {
    format: String,
    version: u32,
}

#[derive(Deserialize)]
struct SnapshotIn<T> {
    state: T,
}

/// Why JSON: snapshots are small (per tenant and open period), human-inspectable when a bill
/// is disputed, and decimals survive as strings. The header is checked before the body so a
/// future version can be migrated instead of misread.
pub(super) fn to_snapshot<T: Serialize>(format: &'static str, state: &T) -> Vec<u8> {
    serde_json::to_vec(&SnapshotOut { format, version: SNAPSHOT_VERSION, state })
        .expect("state serializes: string keys and plain values only")
}

pub(super) fn from_snapshot<T: DeserializeOwned>(format: &'static str, bytes: &[u8]) -> Result<T, Error> {
    let header: SnapshotHeader =
        serde_json::from_slice(bytes).map_err(|e| Error::Snapshot(format!("{format}: unreadable header: {e}")))?;
    if header.format != format {
        return Err(Error::Snapshot(format!("expected a {format} snapshot, got {:?}", header.format)));
    }
    if header.version != SNAPSHOT_VERSION {
        return Err(Error::Snapshot(format!(
            "{format}: snapshot version {} is not supported (expected {SNAPSHOT_VERSION})",
            header.version
        )));
    }
    let body: SnapshotIn<T> = serde_json::from_slice(bytes).map_err(|e| Error::Snapshot(format!("{format}: {e}")))?;
    Ok(body.state)
}
