//! meterflow's core: everything that decides a bill, with no I/O.
//!
//! Services feed this crate bytes and time; it answers with totals, restatements and
//! charges. Keeping Kafka, ClickHouse and async runtimes out of it is what lets dedup,
//! windows and pricing be property-tested in isolation and benchmarked on one core.

pub mod auth;
pub mod avro_wire;
pub mod checkpoint;
pub mod codec;
pub mod decimal;
#[allow(clippy::expect_used, reason = "group invariants: a compaction merges at least two groups, a snapshot holds n + 1")]
pub mod dedup;
#[allow(clippy::expect_used, reason = "slab invariants: an index, a dirty or a closed list names a live slot")]
pub mod engine;
pub mod error;
pub mod event;
pub mod ingest;
pub mod invoice;
pub mod ledger;
pub mod meter;
pub mod partitioning;
pub mod portal;
pub mod pricing;
pub mod rating;
pub mod records;
pub mod schema;
pub mod time;
pub mod usage;
pub mod window;

pub use error::Error;
pub use event::{RejectReason, UsageEvent, UsageEventRef};

/// Convenience alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
