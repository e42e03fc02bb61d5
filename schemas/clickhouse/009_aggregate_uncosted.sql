-- Per-event provider cost (issue 10, item 5): for each emitted aggregate of an additive meter
-- (sum, count), the part of its value whose events carry no provider cost, which the rater
-- costs at the rate card (meter_aggregate.v2 `uncosted_value`). The aggregator reads it back
-- with the window's last revision when it rebuilds an evicted window for a restatement.
-- A table of its own rather than a column of meter_aggregates: ClickHouse 18.16 has no
-- `ADD COLUMN IF NOT EXISTS`, and every migration must be safe to re-run.
-- No row for an aggregate: not additive, or emitted before this migration.
CREATE TABLE IF NOT EXISTS aggregate_uncosted
(
    source_partition Int32,
    seq              Int64,
    uncosted_value   Decimal(38, 9),
    inserted_at      DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree
ORDER BY (source_partition, seq);
