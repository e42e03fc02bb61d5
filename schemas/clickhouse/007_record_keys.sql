-- The deployment's record key (meterflow_core::auth): the aggregator tags every aggregate it
-- writes with an HMAC under it, and the rater charges only what carries a valid tag.
-- `meterflow-admin migrate` inserts a random 256-bit key (hex) when the table is empty; the
-- services read the oldest one unless given --record-key. Only the services' database user
-- should be able to read this table (ClickHouse users.xml / GRANT): whoever reads the key can
-- forge aggregates.
CREATE TABLE IF NOT EXISTS record_keys
(
    key_hex    String,
    created_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree
ORDER BY key_hex;
