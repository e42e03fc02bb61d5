//! meterflow-rater: meter aggregates in, charges out, effectively once.
//!
//! Same protocol as the aggregator (see its crate docs): per aggregates partition a core
//! `rating::partition::RaterPartition` (rating state, the prepaid wallets of the tenants on
//! that partition, revenue totals; all decisions are made there, this crate only does the I/O);
//! outputs are written (by a task, while the next batch fills), then the state is checkpointed
//! with the offsets it covers, then offsets are committed. Re-delivered aggregates (after an
//! aggregator restart) are recognised by their per-source-partition `seq` and skipped; charge
//! ids are deterministic, so a replay after a rater restart re-inserts identical rows that
//! `charges_dedup` folds.
//!
//! Wallet adjustments come on their own topic, partitioned like the aggregates (both keyed by
//! tenant, same partition count), so partition N of both belongs to one member and one
//! state. Balances are sums, so they do not depend on how the two streams interleave.

pub mod balances;
pub mod config;
pub mod metrics;
pub mod rows;

mod pipeline;
mod sink;

pub use config::Config;
pub use pipeline::run;
