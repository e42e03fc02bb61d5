-- One row per emitted window revision. A restatement is a new row with a higher revision and
-- the full corrected value; ReplacingMergeTree(revision) keeps the latest after merges, and
-- meter_totals gives the corrected totals before merges too (argMax over revision).
CREATE TABLE IF NOT EXISTS meter_aggregates
(
    tenant           String,
    meter            String,
    aggregation      String,
    dimensions_key   String,
    dim_keys         Array(String),
    dim_values       Array(String),
    window_start     DateTime,
    window_end       DateTime,
    window_start_ms  Int64,
    revision         UInt32,
    value            Decimal(38, 9),
    previous_value   Decimal(38, 9),
    event_count      Int64,
    provider_cost    Decimal(38, 9),
    source_partition Int32,
    seq              Int64,
    emitted_at_ms    Int64,
    inserted_at      DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(revision)
PARTITION BY toYYYYMM(window_start)
ORDER BY (tenant, meter, dimensions_key, window_start);

-- Corrected totals, whether or not merges have happened.
CREATE VIEW IF NOT EXISTS meter_totals AS
SELECT
    tenant,
    meter,
    dimensions_key,
    window_start,
    any(window_end)                    AS window_end,
    any(aggregation)                   AS aggregation,
    any(dim_keys)                      AS dim_keys,
    any(dim_values)                    AS dim_values,
    max(revision)                      AS last_revision,
    argMax(value, revision)            AS value,
    argMax(event_count, revision)      AS event_count,
    argMax(provider_cost, revision)    AS provider_cost,
    min(inserted_at)                   AS first_inserted_at
FROM meter_aggregates
GROUP BY tenant, meter, dimensions_key, window_start;
