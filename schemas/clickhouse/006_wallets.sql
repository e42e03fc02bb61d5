-- Prepaid balances: every adjustment once (by idempotency key), minus every charge once.
CREATE TABLE IF NOT EXISTS wallet_adjustments
(
    idempotency_key  String,
    tenant           String,
    currency         String,
    amount           Decimal(38, 9),
    kind             String,
    reason           String,
    created_at       DateTime,
    source_partition Int32,
    source_offset    Int64
)
ENGINE = ReplacingMergeTree
ORDER BY (tenant, idempotency_key);

CREATE VIEW IF NOT EXISTS wallet_balances AS
SELECT
    tenant,
    currency,
    sum(credit) AS credited,
    sum(debit)  AS charged,
    sum(credit) - sum(debit) AS balance
FROM
(
    SELECT tenant, currency, any(amount) AS credit, toDecimal128(0, 9) AS debit
    FROM wallet_adjustments
    GROUP BY tenant, currency, idempotency_key
    UNION ALL
    SELECT tenant, currency, toDecimal128(0, 9) AS credit, amount AS debit
    FROM charges_dedup
)
GROUP BY tenant, currency;

CREATE TABLE IF NOT EXISTS wallet_alerts
(
    alert_id   String,
    tenant     String,
    kind       String,
    currency   String,
    balance    Decimal(38, 9),
    threshold  Decimal(38, 9),
    at_ms      Int64,
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree
ORDER BY (tenant, alert_id);
