//! meterflow-aggregator: usage events in, exact window totals out, effectively once.
//!
//! ## Protocol (no Kafka transactions)
//! Per usage-events partition the aggregator runs one core `PartitionEngine`. Its outputs
//! (raw events, window aggregates and restatements, dead letters) are a deterministic
//! function of the partition's records, and every aggregate carries a per-partition `seq`.
//! The loop:
//! 1. process records, buffering outputs;
//! 2. flush: insert into ClickHouse (usage_events, meter_aggregates, dead_letters), then
//!    produce aggregates and dead letters to Kafka and wait for the acks, retrying until done;
//! 3. checkpoint: after a flush, every `checkpoint_interval` the engine state and the offset
//!    it covers go to ClickHouse `checkpoints`; then that offset is committed to the group.
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

mod pipeline;

pub use config::Config;
pub use pipeline::run;
