-- Service state together with the source offsets it covers. Written after the outputs it
-- covers are flushed; a restarted or rebalanced instance resumes from the newest one, so
-- state survives the loss of the process's disk.
CREATE TABLE IF NOT EXISTS checkpoints
(
    service        String,
    consumer_group String,
    topic          String,
    partition      Int32,
    version        UInt64,
    next_offset    Int64,
    state          String,
    written_at     DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (service, consumer_group, topic, partition);
