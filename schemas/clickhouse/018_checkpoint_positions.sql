-- Every checkpoint's position, full ones and deltas alike, without the state: where each
-- partition of each service stands is the row with the highest version (argMax(next_offset,
-- version) per partition). Since incremental checkpoints (017) the newest position is
-- usually a delta, so dashboards, the admin tool and checks read this instead of
-- `checkpoints`.
CREATE VIEW IF NOT EXISTS checkpoint_positions AS
SELECT service, consumer_group, topic, partition, version, next_offset, written_at, 'full' AS kind
FROM checkpoints
UNION ALL
SELECT service, consumer_group, topic, partition, version, next_offset, written_at, 'delta' AS kind
FROM checkpoint_deltas;
