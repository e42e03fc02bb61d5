-- Usage rollups per UTC hour and day, for the usage API (GET /v1/usage, docs/api.md): a month of
-- one tenant's meter reads ~30 rows per dimension set instead of every window or event.
--
-- Only `sum` and `count` meters roll up: every window revision adds `value - previous_value`
-- (revision 0 carries previous_value 0), so the rolled-up sum of a bucket is the sum of the
-- latest values of its windows, whatever the restatements. min/max/latest/avg/unique_count do
-- not combine from deltas; the API answers them from the windows' latest revisions
-- (meter_aggregates) instead. Event counts do not roll up: a revision carries no previous
-- event count, so its delta is not known here.
--
-- A replay that re-inserts a revision (an aggregator restarting before its checkpoint) folds in
-- meter_aggregates but adds its delta here a second time; so does a revision inserted while this
-- migration runs (between the back-fill and the view). `meterflow-admin rollups` compares the
-- rollups with the windows' latest values and `--repair` inserts the correcting difference.
--
-- bucket_ms is the bucket's start in Unix ms (UTC), not a DateTime: toStartOfHour/toStartOfDay
-- follow the server's time zone, integer division does not. Small index granules: a query reads
-- one tenant's and meter's rows, not 8192 rows of its neighbours.
CREATE TABLE IF NOT EXISTS usage_rollup_hour
(
    tenant         String,
    meter          String,
    dimensions_key String,
    bucket_ms      Int64,
    aggregation    String,
    dim_keys       Array(String),
    dim_values     Array(String),
    value          Decimal(38, 9)
)
ENGINE = SummingMergeTree((value))
PARTITION BY intDiv(bucket_ms, 2592000000)
ORDER BY (tenant, meter, dimensions_key, bucket_ms)
SETTINGS index_granularity = 256;

CREATE TABLE IF NOT EXISTS usage_rollup_day
(
    tenant         String,
    meter          String,
    dimensions_key String,
    bucket_ms      Int64,
    aggregation    String,
    dim_keys       Array(String),
    dim_values     Array(String),
    value          Decimal(38, 9)
)
ENGINE = SummingMergeTree((value))
PARTITION BY intDiv(bucket_ms, 31536000000)
ORDER BY (tenant, meter, dimensions_key, bucket_ms)
SETTINGS index_granularity = 256;

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_rollup_hour_mv TO usage_rollup_hour AS
SELECT tenant, meter, dimensions_key, intDiv(window_start_ms, 3600000) * 3600000 AS bucket_ms,
       aggregation, dim_keys, dim_values, value - previous_value AS value
FROM meter_aggregates
WHERE aggregation IN ('sum', 'count');

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_rollup_day_mv TO usage_rollup_day AS
SELECT tenant, meter, dimensions_key, intDiv(window_start_ms, 86400000) * 86400000 AS bucket_ms,
       aggregation, dim_keys, dim_values, value - previous_value AS value
FROM meter_aggregates
WHERE aggregation IN ('sum', 'count');

-- Back-fill from what an existing database holds: the latest revision of each window (older
-- revisions may already be merged away, so their deltas cannot be summed).
INSERT INTO usage_rollup_hour
SELECT tenant, meter, dimensions_key, intDiv(window_start_ms, 3600000) * 3600000 AS bucket_ms,
       any(agg), any(keys), any(vals), sum(latest)
FROM
(
    SELECT tenant, meter, dimensions_key, window_start_ms, any(aggregation) AS agg,
           any(dim_keys) AS keys, any(dim_values) AS vals, argMax(value, revision) AS latest
    FROM meter_aggregates
    WHERE aggregation IN ('sum', 'count')
    GROUP BY tenant, meter, dimensions_key, window_start_ms
)
GROUP BY tenant, meter, dimensions_key, bucket_ms;

INSERT INTO usage_rollup_day
SELECT tenant, meter, dimensions_key, intDiv(window_start_ms, 86400000) * 86400000 AS bucket_ms,
       any(agg), any(keys), any(vals), sum(latest)
FROM
(
    SELECT tenant, meter, dimensions_key, window_start_ms, any(aggregation) AS agg,
           any(dim_keys) AS keys, any(dim_values) AS vals, argMax(value, revision) AS latest
    FROM meter_aggregates
    WHERE aggregation IN ('sum', 'count')
    GROUP BY tenant, meter, dimensions_key, window_start_ms
)
GROUP BY tenant, meter, dimensions_key, bucket_ms;
