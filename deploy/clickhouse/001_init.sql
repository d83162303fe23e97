-- layerwatch schema, migration 001.
--
-- Must run unchanged on ClickHouse server 18.16 (Debian's package, used by the
-- tests) and on chDB 26 (the embedded default). Hence: MergeTree family only,
-- DateTime (seconds) plus an epoch-milliseconds UInt64 instead of DateTime64,
-- no TTL, no window functions, no toStartOfInterval (bucket with intDiv on the
-- epoch). Every CREATE says IF NOT EXISTS: a migration may run again after a
-- crash between its DDL and its schema_migrations record.
--
-- Tables keyed by an id use ReplacingMergeTree so that a batch replayed after a
-- crash (at-least-once delivery) does not double count; queries that count use
-- FINAL or uniqExact(id). Rows of one id are only collapsed within a partition,
-- so the partition key is always derived from a column that a replay repeats
-- exactly (the event's own ts, never the ingestion time).
--
-- The migrator splits statements on ';' outside string literals and comments.

CREATE TABLE IF NOT EXISTS predictions
(
    event_id      String,
    model_id      String,
    model_version String,
    client_id     String,
    ts            DateTime,
    ts_ms         UInt64,
    predicted     Int32,
    confidence    Float32,
    uncertainty   Float32 DEFAULT nan,
    truth         Int32 DEFAULT -1,
    attack        String,
    batch_offset  UInt64,
    ingested_ms   UInt64
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(ts)
ORDER BY (model_id, event_id);

CREATE TABLE IF NOT EXISTS reference_embeddings
(
    model_id      String,
    model_version String,
    layer         String,
    event_id      String,
    ts            DateTime,
    ts_ms         UInt64,
    predicted     Int32,
    vector        Array(Float32)
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(ts)
ORDER BY (model_id, model_version, layer, event_id);

CREATE TABLE IF NOT EXISTS drift_windows
(
    window_id       String,
    model_id        String,
    model_version   String,
    layer           String,
    window_start_ms UInt64,
    window_end_ms   UInt64,
    ts              DateTime,
    n_reference     UInt32,
    n_window        UInt32,
    mmd2            Float64,
    p_value         Float64,
    detection_rate  Float64,
    alpha           Float64,
    bandwidth       Float64,
    n_permutations  UInt32,
    compute_ms      Float64,
    device          String
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(ts)
ORDER BY (model_id, model_version, layer, window_id);

CREATE TABLE IF NOT EXISTS sample_scores
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
ORDER BY (window_id, layer, event_id);

CREATE TABLE IF NOT EXISTS attack_labels
(
    event_id           String,
    model_id           String,
    model_version      String,
    ts                 DateTime,
    ts_ms              UInt64,
    p_adversarial      Float32,
    attack_type        String,
    attack_prob        Float32,
    target_model       String,
    target_prob        Float32,
    classifier_version String
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(ts)
ORDER BY (model_id, event_id, classifier_version);

-- One row per (alert_id, state): the 'open' row and, later, the 'resolved'
-- row of the same alert both survive deduplication.
CREATE TABLE IF NOT EXISTS alerts
(
    alert_id  String,
    ts        DateTime,
    ts_ms     UInt64,
    model_id  String,
    kind      String,
    state     String,
    severity  String,
    window_id String,
    event_ids Array(String),
    client_id String,
    message   String
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(ts)
ORDER BY (alert_id, state);

-- dl_id is 'topic:partition:offset'. raw keeps the record's bytes as they came.
-- The partition key is the tuple (single partition): a record replayed later
-- gets a new ts, yet must still collapse with its first copy.
CREATE TABLE IF NOT EXISTS dead_letters
(
    dl_id     String,
    ts        DateTime,
    ts_ms     UInt64,
    topic     String,
    partition Int32,
    offset    Int64,
    reason    String,
    raw       String
)
ENGINE = ReplacingMergeTree()
PARTITION BY tuple()
ORDER BY dl_id;

CREATE TABLE IF NOT EXISTS predictions_inputs
(
    event_id String,
    model_id String,
    ts       DateTime,
    ts_ms    UInt64,
    input    Array(Float32)
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(ts)
ORDER BY (model_id, event_id);
