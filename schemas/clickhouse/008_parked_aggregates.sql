-- Aggregates the rater could not price (reason `unpriced`: no plan or no price; `overflow`: a
-- decimal result that does not fit), with their original bytes, and what became of them.
-- One row per state change of (source_partition, seq): `parked` when first rated, then
-- `rerated` (charged) or `rejected` after `meterflow-admin rerate`; a rerate that still cannot
-- price it writes `parked` again. The row with the highest state_version (the aggregates-topic
-- offset of the record that decided it) is the current state: ReplacingMergeTree keeps it
-- after merges, and `parked_current` gives it before merges too.
CREATE TABLE IF NOT EXISTS parked_aggregates
(
    source_partition     Int32,
    seq                  Int64,
    aggregates_partition Int32,
    aggregates_offset    Int64,
    state                String,
    state_version        UInt64,
    reason               String,
    detail               String,
    tenant               String,
    meter                String,
    dimensions_key       String,
    window_start         DateTime,
    revision             UInt32,
    payload              String,
    recorded_at          DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(state_version)
PARTITION BY toYYYYMM(window_start)
ORDER BY (source_partition, seq);

-- The current state of every aggregate ever parked, right before and after merges.
CREATE VIEW IF NOT EXISTS parked_current AS
SELECT
    source_partition,
    seq,
    any(aggregates_partition)             AS aggregates_partition,
    min(aggregates_offset)                AS first_offset,
    argMax(state, state_version)          AS current_state,
    argMax(reason, state_version)         AS current_reason,
    argMax(detail, state_version)         AS current_detail,
    any(tenant)                           AS tenant_id,
    any(meter)                            AS meter_name,
    any(window_start)                     AS window_begin,
    any(revision)                         AS window_revision,
    argMax(payload, state_version)        AS original_payload,
    max(recorded_at)                      AS last_recorded_at
FROM parked_aggregates
GROUP BY source_partition, seq;
