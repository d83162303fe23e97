-- Where a model version's reference came from, when it was not published by
-- `layerwatch reference` / Monitor.publish_reference (those have no row here):
-- 'bootstrap' = sampled from the model's first LW_REFERENCE_BOOTSTRAP live events,
-- from_ms..to_ms being the event time range it covers.
CREATE TABLE IF NOT EXISTS reference_sources
(
    model_id      String,
    model_version String,
    source        String,
    rows          UInt64,
    from_ms       UInt64,
    to_ms         UInt64,
    created_ms    UInt64,
    ts            DateTime
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(ts)
ORDER BY (model_id, model_version);
