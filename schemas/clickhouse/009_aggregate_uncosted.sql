-- Per-event provider cost (issue 10, item 5): the part of a window's value whose events carry
-- no provider cost, which the rater costs at the rate card (meter_aggregate.v2). The
-- aggregator reads it back when it rebuilds an evicted window for a restatement.
-- has_uncosted = 0: not an additive aggregation, or a row written before this migration.
-- One statement, idempotent (IF NOT EXISTS), so a re-run after a failure is harmless.
ALTER TABLE meter_aggregates
    ADD COLUMN IF NOT EXISTS uncosted_value Decimal(38, 9) DEFAULT toDecimal128(0, 9),
    ADD COLUMN IF NOT EXISTS has_uncosted UInt8 DEFAULT 0;
