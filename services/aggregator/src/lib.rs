//! meterflow-aggregator: usage events in, exact window totals out, effectively once.
//!
//! ## Protocol (no Kafka transactions)
//! Per usage-events partition the aggregator runs one core `PartitionEngine`. Its outputs
//! (raw events, window aggregates and restatements, dead letters) are a deterministic
//! function of the partition's records, and every aggregate carries a per-partition `seq`.
//! The loop:
//! 1. process records, buffering outputs;
//! 2. write: the buffers are taken as a batch and a task inserts it into ClickHouse
//!    (usage_events, meter_aggregates, dead_letters) and produces its aggregates and dead
//!    letters to Kafka, retrying until done, while the loop fills the next batch (one batch
//!    in flight at most; consumption pauses while the next one is full too);
//! 3. checkpoint: every `checkpoint_interval` the engine state and the offsets it covers are
//!    snapshotted when a batch is taken, saved to ClickHouse `checkpoints` once that batch is
//!    written, and then committed to the group.
//!
//! On (re)assignment a partition's state is the newest checkpoint and records below its
//! offset are skipped. Whatever was flushed after that checkpoint is produced again,
//! byte-identical: ClickHouse tables fold identical rows (ReplacingMergeTree; the views
//! group by key) and the rater skips aggregates whose `seq` it has already rated.
//!
//! Idle partitions: time must move for windows to close without new events, but a wall-clock
//! decision would make a replay differ from the first run. So the aggregator writes a tick
//! (a control record with the wall-clock time) into the idle partition itself; the engine
//! advances when it reads the tick, at the same offset in every replay.

pub mod cold;
pub mod config;
pub mod metrics;
pub mod provisional;
pub mod rows;
pub mod sink;
pub mod usage_rows;

mod lag;
mod pipeline;
mod record;
mod stored;

pub use config::Config;
pub use pipeline::run;
