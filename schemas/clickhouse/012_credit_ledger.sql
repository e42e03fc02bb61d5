-- Credit grants and the ASC 606 / IFRS 15 ledger (docs/revenue-assurance.md).
-- Every movement of prepaid credit, written by the rater with deterministic entry ids, so a
-- replay re-inserts identical rows that wallet_ledger_dedup folds.
--   movement: grant | drawdown | refund | expiry | arrears | debit
--   credit_kind: paid | promotional | manual ('' for arrears and uncovered debits)
CREATE TABLE IF NOT EXISTS wallet_ledger
(
    entry_id         String,
    tenant           String,
    currency         String,
    at               DateTime,
    movement         String,
    credit_kind      String,
    grant_key        String,
    source           String,
    amount           Decimal(38, 9),
    source_partition Int32,
    inserted_at      DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (tenant, currency, entry_id);

CREATE VIEW IF NOT EXISTS wallet_ledger_dedup AS
SELECT
    entry_id,
    any(tenant)      AS tenant,
    any(currency)    AS currency,
    any(at)          AS at,
    any(movement)    AS movement,
    any(credit_kind) AS credit_kind,
    any(grant_key)   AS grant_key,
    any(source)      AS source,
    any(amount)      AS amount
FROM wallet_ledger
GROUP BY entry_id;

-- Per tenant, currency and day, the deferred-revenue roll-forward:
--   opening_deferred + paid_topups - recognised - refunds - breakage = closing_deferred
-- (paid credit only; promotional and manual credit is not revenue and is tracked in the
-- promotional_* columns; usage no credit covered is billed_in_arrears). Opening and closing
-- are running sums over all earlier days, computed with a join because ClickHouse 18.16 has
-- no window functions.
CREATE VIEW IF NOT EXISTS revenue_recognition_daily AS
SELECT
    tenant,
    currency,
    day,
    opening_deferred,
    paid_topups,
    recognised,
    refunds,
    breakage,
    closing_deferred,
    promotional_granted,
    promotional_consumed,
    promotional_expired,
    promotional_debited,
    billed_in_arrears
FROM
(
    SELECT
        tenant,
        currency,
        day,
        sumIf(l_net, l_day < day)  AS opening_deferred,
        sumIf(l_net, l_day <= day) AS closing_deferred
    FROM
    (
        SELECT DISTINCT tenant, currency, toDate(at) AS day
        FROM wallet_ledger_dedup
    ) AS days
    ALL INNER JOIN
    (
        SELECT
            tenant,
            currency,
            toDate(at) AS l_day,
            if(credit_kind = 'paid',
               if(movement = 'grant', amount,
                  if(movement IN ('drawdown', 'refund', 'expiry'), -amount, toDecimal128(0, 9))),
               toDecimal128(0, 9)) AS l_net
        FROM wallet_ledger_dedup
    ) AS entries USING (tenant, currency)
    GROUP BY tenant, currency, day
) AS balances
ALL INNER JOIN
(
    SELECT
        tenant,
        currency,
        toDate(at) AS day,
        sumIf(amount, movement = 'grant' AND credit_kind = 'paid')     AS paid_topups,
        sumIf(amount, movement = 'drawdown' AND credit_kind = 'paid')  AS recognised,
        sumIf(amount, movement = 'refund')                             AS refunds,
        sumIf(amount, movement = 'expiry' AND credit_kind = 'paid')    AS breakage,
        sumIf(amount, movement = 'grant' AND credit_kind != 'paid')    AS promotional_granted,
        sumIf(amount, movement = 'drawdown' AND credit_kind != 'paid') AS promotional_consumed,
        sumIf(amount, movement = 'expiry' AND credit_kind != 'paid')   AS promotional_expired,
        sumIf(amount, movement = 'debit' AND credit_kind != '')        AS promotional_debited,
        sumIf(amount, movement = 'arrears')                            AS billed_in_arrears
    FROM wallet_ledger_dedup
    GROUP BY tenant, currency, day
) AS flows USING (tenant, currency, day);

-- Balances now also lose expired credit: balance = adjustments - charges - expiries.
DROP TABLE IF EXISTS wallet_balances;

CREATE VIEW IF NOT EXISTS wallet_balances AS
SELECT
    tenant,
    currency,
    sum(credit)  AS credited,
    sum(debit)   AS charged,
    sum(lapsed)  AS expired,
    sum(credit) - sum(debit) - sum(lapsed) AS balance
FROM
(
    SELECT tenant, currency, any(amount) AS credit, toDecimal128(0, 9) AS debit, toDecimal128(0, 9) AS lapsed
    FROM wallet_adjustments
    GROUP BY tenant, currency, idempotency_key
    UNION ALL
    SELECT tenant, currency, toDecimal128(0, 9) AS credit, amount AS debit, toDecimal128(0, 9) AS lapsed
    FROM charges_dedup
    UNION ALL
    SELECT tenant, currency, toDecimal128(0, 9) AS credit, toDecimal128(0, 9) AS debit, amount AS lapsed
    FROM wallet_ledger_dedup
    WHERE movement = 'expiry'
)
GROUP BY tenant, currency;
