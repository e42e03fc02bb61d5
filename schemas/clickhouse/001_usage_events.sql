-- Every accepted (deduplicated) usage event, for drill-down from a total to its events, and
-- the aggregator's cold tier: duplicate look-ups and rebuilding days-old windows read it.
-- Replays after a crash re-insert byte-identical rows; ReplacingMergeTree folds them and
-- queries that must be exact use FINAL or GROUP BY event_id (see usage_events_dedup).
CREATE TABLE IF NOT EXISTS usage_events
(
    tenant            String,
    meter             String,
    event_id          String,
    event_time        DateTime,
    event_time_ms     Int64,
    window_start      DateTime,
    quantity          Decimal(38, 9),
    provider_cost     Decimal(38, 9),
    has_provider_cost UInt8,
    dim_keys          Array(String),
    dim_values        Array(String),
    source            String,
    source_partition  Int32,
    source_offset     Int64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, meter, window_start, event_id);

CREATE VIEW IF NOT EXISTS usage_events_dedup AS
SELECT *
FROM usage_events
FINAL;
