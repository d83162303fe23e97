-- A re-tested window replaces its top-k: sample_scores is keyed by rank, not by event,
-- so the second test's rank r overwrites the first test's rank r under FINAL.
CREATE TABLE IF NOT EXISTS sample_scores_by_rank
(
    window_id     String,
    model_id      String,
    model_version String,
    layer         String,
    event_id      String,
    rank          UInt32,
    score         Float64,
    ts            DateTime
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(ts)
ORDER BY (window_id, layer, rank);

INSERT INTO sample_scores_by_rank
SELECT window_id, model_id, model_version, layer, event_id, rank, score, ts FROM sample_scores;

DROP TABLE sample_scores;

RENAME TABLE sample_scores_by_rank TO sample_scores;
