-- Input meterflow could not count, with the original bytes and where they came from.
CREATE TABLE IF NOT EXISTS dead_letters
(
    source_topic     String,
    source_partition Int32,
    source_offset    Int64,
    reason           String,
    detail           String,
    tenant           String,
    event_id         String,
    payload          String,
    dead_lettered_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(dead_lettered_at)
ORDER BY (source_topic, source_partition, source_offset);
