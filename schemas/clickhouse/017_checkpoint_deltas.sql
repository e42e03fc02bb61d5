-- Incremental checkpoints: the change of a service's state since the checkpoint before it
-- (the base in `checkpoints`, or the previous delta). A restart loads the newest base and
-- the deltas with its version as base_version, contiguous by prev_version (docs/design.md,
-- "Incremental checkpoints"). Plain MergeTree: every delta of a chain must survive merges
-- (in `checkpoints`, ReplacingMergeTree keeps only the newest row per partition). Deltas
-- below a partition's newest base are deleted by the service after each compaction.
CREATE TABLE IF NOT EXISTS checkpoint_deltas
(
    service        String,
    consumer_group String,
    topic          String,
    partition      Int32,
    base_version   UInt64,
    prev_version   UInt64,
    version        UInt64,
    next_offset    Int64,
    state          String,
    written_at     DateTime DEFAULT now()
)
ENGINE = MergeTree
ORDER BY (service, consumer_group, topic, partition, version);
