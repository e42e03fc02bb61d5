-- The dedup cold tier's index: which (tenant, meter, event_id) were accepted, on which source
-- partition and offset, with what event time. The aggregator asks it only when the id's
-- 32-bit fingerprint matches an id evicted from memory ("was this id accepted on partition P
-- before offset O with an event time still inside the horizon?"). usage_events is sorted by
-- (tenant, meter, window_start, event_id), which cannot serve a look-up by id over the whole
-- 35-day horizon (a retry may be re-stamped into any window), so this narrow copy is sorted
-- by the id; ClickHouse 18.16 has no data-skipping indexes to do it in place.
--
-- Filled by a materialized view on every insert into usage_events (the same INSERT, so a row
-- is in both or the insert failed and is retried), then back-filled with the rows written
-- before this migration. A row that the view and the back-fill both wrote is harmless: the
-- look-up only asks whether one exists, and ReplacingMergeTree folds the copies.
CREATE TABLE IF NOT EXISTS usage_event_ids
(
    tenant           String,
    meter            String,
    event_id         String,
    event_time       DateTime,
    event_time_ms    Int64,
    source_partition Int32,
    source_offset    Int64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, meter, event_id, source_partition, source_offset);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_event_ids_mv TO usage_event_ids AS
SELECT tenant, meter, event_id, event_time, event_time_ms, source_partition, source_offset
FROM usage_events;

INSERT INTO usage_event_ids
SELECT tenant, meter, event_id, event_time, event_time_ms, source_partition, source_offset
FROM usage_events;
