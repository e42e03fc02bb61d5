-- Money owed per aggregate revision (usage) or per period (true_up). charge_id is
-- deterministic, so a replay re-inserts identical rows that charges_dedup folds.
CREATE TABLE IF NOT EXISTS charges
(
    charge_id      String,
    kind           String,
    tenant         String,
    plan           String,
    currency       String,
    meter          String,
    model          String,
    dimensions_key String,
    dim_keys       Array(String),
    dim_values     Array(String),
    period_start   DateTime,
    window_start   DateTime,
    window_end     DateTime,
    revision       UInt32,
    quantity       Decimal(38, 9),
    amount         Decimal(38, 9),
    provider_cost  Decimal(38, 9),
    margin         Decimal(38, 9),
    seq            Int64,
    inserted_at    DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(period_start)
ORDER BY (tenant, charge_id);

-- One row per charge id, whether or not merges have happened.
CREATE VIEW IF NOT EXISTS charges_dedup AS
SELECT
    charge_id,
    any(kind)          AS kind,
    any(tenant)        AS tenant,
    any(plan)          AS plan,
    any(currency)      AS currency,
    any(meter)         AS meter,
    any(model)         AS model,
    any(dimensions_key) AS dimensions_key,
    any(period_start)  AS period_start,
    any(window_start)  AS window_start,
    any(window_end)    AS window_end,
    any(revision)      AS revision,
    any(quantity)      AS quantity,
    any(amount)        AS amount,
    any(provider_cost) AS provider_cost,
    any(margin)        AS margin,
    min(inserted_at)   AS inserted_at
FROM charges
GROUP BY charge_id;

-- Revenue, cost and margin by tenant, meter, model and day.
CREATE VIEW IF NOT EXISTS revenue_daily AS
SELECT
    toDate(window_start) AS day,
    tenant,
    plan,
    currency,
    meter,
    model,
    sum(quantity)      AS quantity,
    sum(amount)        AS revenue,
    sum(provider_cost) AS cost,
    sum(margin)        AS margin
FROM charges_dedup
GROUP BY day, tenant, plan, currency, meter, model;
