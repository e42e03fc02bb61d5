-- Every emitted window revision, never folded by merges. meter_aggregates is a
-- ReplacingMergeTree(revision) keyed by window, so a merge (or OPTIMIZE ... FINAL) keeps only
-- the newest revision; rebuilding an evicted window after a crash needs the revision emitted
-- *before* the checkpoint's seq, which may be an older one. Keyed by (partition, window, seq):
-- only byte-identical replays of one emission fold. Filled by the view below on every insert
-- into meter_aggregates; the INSERT backfills what an existing database still holds.
CREATE TABLE IF NOT EXISTS meter_revisions
(
    source_partition Int32,
    tenant           String,
    meter            String,
    dimensions_key   String,
    window_start_ms  Int64,
    seq              Int64,
    revision         UInt32,
    value            Decimal(38, 9),
    provider_cost    Decimal(38, 9)
)
ENGINE = ReplacingMergeTree
ORDER BY (source_partition, tenant, meter, dimensions_key, window_start_ms, seq);

CREATE MATERIALIZED VIEW IF NOT EXISTS meter_revisions_mv TO meter_revisions AS
SELECT source_partition, tenant, meter, dimensions_key, window_start_ms, seq, revision, value, provider_cost
FROM meter_aggregates;

INSERT INTO meter_revisions
SELECT source_partition, tenant, meter, dimensions_key, window_start_ms, seq, revision, value, provider_cost
FROM meter_aggregates;
