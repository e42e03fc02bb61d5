-- Revenue assurance: shadow-mode reconciliation results, leakage-audit findings, and the
-- aggregator's per-offset ingest ledger the audit checks (docs/revenue-assurance.md).

-- One row per compared (tenant, price, period, currency) of a `meterflow-admin reconcile`
-- run. difference = external_amount - meterflow_amount: > 0 over-billed, < 0 under-billed.
CREATE TABLE IF NOT EXISTS reconciliation_results
(
    run_id             String,
    run_at             DateTime,
    source             String,
    tenant             String,
    price              String,
    currency           String,
    period_start       DateTime,
    meterflow_amount   Decimal(38, 9),
    external_amount    Decimal(38, 9),
    difference         Decimal(38, 9),
    meterflow_quantity Decimal(38, 9),
    external_quantity  Decimal(38, 9),
    status             String,
    finding            String,
    external_lines     UInt64,
    meterflow_charges  UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(run_at)
ORDER BY (run_at, run_id, tenant, price, period_start);

-- One row per finding of a `meterflow-admin audit` run (a run without findings writes one
-- row with check_name = 'run_ok', so "no findings" is distinguishable from "never ran").
CREATE TABLE IF NOT EXISTS audit_findings
(
    run_id    String,
    run_at    DateTime,
    check_name String,
    tenant    String,
    subject   String,
    expected  Decimal(38, 9),
    actual    Decimal(38, 9),
    detail    String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(run_at)
ORDER BY (run_at, run_id, check_name, tenant, subject);

-- Per source partition and checkpointed offset range, what the aggregator did with every
-- record of the range: accepted + duplicates + dead_lettered + ticks = last - first + 1.
-- Written with the checkpoint (same flush -> checkpoint -> commit protocol), keyed by the
-- range so a replayed range re-inserts an identical row that the view folds.
CREATE TABLE IF NOT EXISTS ingest_ledger
(
    topic           String,
    partition       Int32,
    first_offset    Int64,
    last_offset     Int64,
    accepted        UInt64,
    duplicates      UInt64,
    dead_lettered   UInt64,
    dead_letter_reasons Array(String),
    dead_letter_counts  Array(UInt64),
    ticks           UInt64,
    checkpoint_version UInt64,
    inserted_at     DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree
ORDER BY (topic, partition, first_offset, last_offset);

CREATE VIEW IF NOT EXISTS ingest_ledger_dedup AS
SELECT
    topic,
    partition,
    first_offset,
    last_offset,
    any(accepted)      AS accepted,
    any(duplicates)    AS duplicates,
    any(dead_lettered) AS dead_lettered,
    any(ticks)         AS ticks
FROM ingest_ledger
GROUP BY topic, partition, first_offset, last_offset;
