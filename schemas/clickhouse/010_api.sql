-- meterflow-api: per-tenant API keys and the results of idempotent wallet adjustments.

-- Only SHA-256 of a key is stored (the key is shown once by `meterflow-admin keys create`).
-- A revocation is a new row with a higher version; readers take the newest row per key_id.
CREATE TABLE IF NOT EXISTS api_keys
(
    key_id     String,
    tenant     String,
    scope      String,
    key_hash   String,
    revoked    UInt8,
    created_at DateTime,
    version    UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY key_id;

-- One row per (tenant, Idempotency-Key) of POST /v1/wallets/{tenant}/adjustments: the hash of
-- the request it was first used with (another body -> 409) and the response to repeat.
CREATE TABLE IF NOT EXISTS api_idempotency
(
    tenant          String,
    idempotency_key String,
    request_hash    String,
    response        String,
    created_at_ms   Int64
)
ENGINE = ReplacingMergeTree
ORDER BY (tenant, idempotency_key);
