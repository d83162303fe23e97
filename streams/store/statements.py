"""Every SQL statement layerwatch itself sends, in one place (the user-facing ones are under deploy/clickhouse/queries/).

Placeholders ``{name}`` are rendered client-side by streams/store/sql.py (values quoted,
lists as arrays). Readable by ClickHouse 18.16: no window functions, DateTime64 or
toStartOfInterval; ReplacingMergeTree tables are read with FINAL or counted with uniqExact.
"""

from streams.store.queries import shipped_queries

# ------------------------------------------------------------------- drift stage, recovery

REFERENCE_IDS = (
    "SELECT event_id FROM reference_embeddings WHERE model_id = {model_id} AND model_version = {model_version} "
    "GROUP BY event_id ORDER BY cityHash64(event_id) LIMIT {limit}"
)
REFERENCE_ROWS = (
    "SELECT event_id, layer, any(predicted), any(vector) FROM reference_embeddings "
    "WHERE model_id = {model_id} AND model_version = {model_version} AND has({ids}, event_id) "
    "GROUP BY event_id, layer"
)
# `layerwatch classifier fit`: the versions of a model that have a reference, the latest first
REFERENCE_VERSIONS = (
    "SELECT model_version, uniqExact(event_id) AS events, max(ts_ms) AS last_ms FROM reference_embeddings "
    "WHERE model_id = {model_id} GROUP BY model_version ORDER BY last_ms DESC, model_version"
)
# test workers: the model versions whose references they load on partition assignment
REFERENCE_KEYS = "SELECT DISTINCT model_id, model_version FROM reference_embeddings"
STORED_WINDOW_IDS = "SELECT DISTINCT window_id FROM drift_windows WHERE window_id IN {ids}"
OPEN_ALERTS = (
    "SELECT alert_id, ts_ms, model_id, kind, severity, window_id, event_ids, client_id, message "
    "FROM alerts FINAL WHERE state = 'open' AND alert_id NOT IN "
    "(SELECT alert_id FROM alerts FINAL WHERE state = 'resolved') ORDER BY ts_ms"
)

# ------------------------------------------------------------------- demo (through /api/query)

# The demo's statements cover its own run only ({since}: the run's start, epoch ms), so a
# store that holds earlier runs (or another process's data) does not leak into its answers.
DEMO_RECENT_WINDOWS = (
    "SELECT model_id, window_end_ms, n_window, detection_rate, p_value FROM drift_windows FINAL "
    "WHERE layer = 'penultimate' AND window_end_ms >= {since} ORDER BY window_end_ms DESC, model_id LIMIT 8"
)
DEMO_LABEL_MIX = (
    "SELECT model_id, score_kind, attack_type, count() AS n, any(target_model) FROM attack_labels FINAL "
    "WHERE ts_ms >= {since} GROUP BY model_id, score_kind, attack_type ORDER BY model_id, score_kind, n DESC"
)
DEMO_OPEN_ALERTS = (
    "SELECT kind, model_id, client_id, min(ts_ms) FROM alerts FINAL WHERE ts_ms >= {since} "
    "GROUP BY alert_id, kind, model_id, client_id HAVING countIf(state = 'resolved') = 0 ORDER BY min(ts_ms)"
)
DEMO_REFERENCE_ROWS = "SELECT uniqExact(event_id) FROM reference_embeddings WHERE ts_ms >= {since}"
DEMO_LAST_WINDOW_END = "SELECT max(window_end_ms) FROM drift_windows WHERE window_end_ms >= {since}"
DEMO_WINDOWS = (
    "SELECT model_id, window_start_ms, window_end_ms, detection_rate FROM drift_windows FINAL "
    "WHERE layer = 'penultimate' AND window_end_ms > {since} AND window_start_ms < {until} "
    "AND model_id IN {models} ORDER BY window_end_ms"
)
DEMO_ALERTS = (
    "SELECT kind, model_id, client_id, minIf(ts_ms, state = 'open') AS opened, maxIf(ts_ms, state = 'resolved'), "
    "anyIf(window_id, state = 'open') FROM alerts FINAL WHERE ts_ms >= {since} "
    "GROUP BY alert_id, kind, model_id, client_id HAVING opened >= {since} ORDER BY opened"
)
DEMO_EVENTS_SINCE = (
    "SELECT uniqExact(event_id) FROM predictions WHERE ts_ms >= {since} AND ts_ms <= {until} "
    "AND model_id IN {models} AND event_id NOT IN (SELECT event_id FROM reference_embeddings WHERE ts_ms >= {since})"
)

# ------------------------------------------------------------------- dashboard
# Time filters repeat the bound on the DateTime column `ts` (``since_s``): MergeTree keeps
# its min/max per part (it is the partition key's column), so parts older than the range
# are skipped unread. Joins are ANY LEFT JOIN (...) AS alias USING (...).
# Placeholders are rendered client-side by streams/store/sql.py. Time filters repeat the
# bound on the DateTime column `ts` (``since_s``): MergeTree keeps its min/max per part (it
# is the partition key's column), so parts older than the range are skipped unread. No window functions,
# DateTime64 or toStartOfInterval (ClickHouse 18.16); ReplacingMergeTree tables are read
# with FINAL or counted with uniqExact; joins are ANY LEFT JOIN (...) AS alias USING (...).

MODEL_LAYERS_SQL = """
SELECT model_id, layer, uniqExact(window_id) AS windows, max(window_end_ms) AS last_ms,
       argMax(detection_rate, window_end_ms) AS last_detection_rate
FROM drift_windows
WHERE ts >= toDateTime({since_s}) AND window_end_ms >= {since_ms}
GROUP BY model_id, layer
ORDER BY model_id, layer
LIMIT {limit}
"""

MODEL_EVENTS_SQL = """
SELECT model_id, uniqExact(event_id) AS events, max(ts_ms) AS last_ms
FROM predictions
WHERE ts >= toDateTime({since_s}) AND ts_ms >= {since_ms}
GROUP BY model_id
ORDER BY model_id
LIMIT {limit}
"""

# The time span of the stored data (the dashboard's default range): one row per source,
# with its row count, since min()/max() of an empty table are 0, not NULL.
DATA_SPAN_SQL = """
SELECT 'drift' AS source, count() AS n, min(window_start_ms) AS first_ms, max(window_end_ms) AS last_ms
FROM drift_windows
WHERE ts >= toDateTime({since_s})
UNION ALL
SELECT 'predictions' AS source, count() AS n, min(ts_ms) AS first_ms, max(ts_ms) AS last_ms
FROM predictions
WHERE ts >= toDateTime({since_s})
LIMIT 2
"""

MODEL_REFERENCE_SQL = """
SELECT model_id, uniqExact(event_id) AS reference_events
FROM reference_embeddings
GROUP BY model_id
ORDER BY model_id
LIMIT {limit}
"""

DRIFT_SQL = """
SELECT model_id, layer, window_id, model_version, window_start_ms, window_end_ms,
       detection_rate, p_value, mmd2, n_window, n_reference
FROM drift_windows FINAL
WHERE ts >= toDateTime({since_s}) AND window_end_ms >= {since_ms}
  AND ({model_id} = '' OR model_id = {model_id})
  AND ({layer} = '' OR layer = {layer})
ORDER BY window_end_ms DESC, model_id, layer
LIMIT {limit}
"""

# Both rows (open, resolved) of every distribution_shift alert that is still open or
# touched the time range; bands are paired up in Python (alert_bands).
ALERT_BANDS_SQL = """
SELECT alert_id, model_id, state, ts_ms, severity, window_id
FROM alerts FINAL
WHERE kind = 'distribution_shift'
  AND ({model_id} = '' OR model_id = {model_id})
  AND alert_id IN
  (
      SELECT alert_id FROM alerts
      WHERE kind = 'distribution_shift'
      GROUP BY alert_id
      HAVING countIf(state = 'resolved') = 0 OR max(ts_ms) >= {since_ms}
  )
ORDER BY ts_ms, alert_id, state
LIMIT {limit}
"""

# score_kind: which score labelled the event (supervised detector of that model version,
# unsupervised score of the model's own reference, or the output-only forest: 'classifier')
LABEL_MIX_SQL = """
SELECT intDiv(ts_ms, {bucket_ms}) * {bucket_ms} AS bucket_start_ms, score_kind, attack_type,
       uniqExact(event_id) AS events
FROM attack_labels
WHERE ts >= toDateTime({since_s}) AND ts_ms >= {since_ms}
  AND ({model_id} = '' OR model_id = {model_id})
GROUP BY bucket_start_ms, score_kind, attack_type
ORDER BY bucket_start_ms, score_kind, attack_type
LIMIT {limit}
"""

# One row per alert pairing its open and resolved rows: every open alert, whatever its
# age, and every alert that opened or resolved in the range; open ones first.
ALERTS_SQL = """
SELECT
    alert_id,
    any(m) AS model_id,
    any(k) AS kind,
    if(countIf(st = 'resolved') > 0, 'resolved', 'open') AS status,
    if(countIf(st = 'open') > 0, anyIf(sev, st = 'open'), any(sev)) AS severity,
    if(countIf(st = 'open') > 0, minIf(t, st = 'open'), min(t)) AS opened_ms,
    maxIf(t, st = 'resolved') AS resolved_ms,
    if(countIf(st = 'open') > 0, anyIf(w, st = 'open'), any(w)) AS window_id,
    max(ne) AS n_events,
    anyIf(c, st = 'open') AS client_id,
    if(countIf(st = 'open') > 0, anyIf(msg, st = 'open'), any(msg)) AS message,
    anyIf(msg, st = 'resolved') AS resolution
FROM
(
    SELECT alert_id, model_id AS m, kind AS k, state AS st, severity AS sev, ts_ms AS t,
           window_id AS w, length(event_ids) AS ne, client_id AS c, message AS msg
    FROM alerts FINAL
    WHERE ({model_id} = '' OR model_id = {model_id})
)
GROUP BY alert_id
HAVING status = 'open' OR opened_ms >= {since_ms} OR resolved_ms >= {since_ms}
ORDER BY status = 'open' DESC, opened_ms DESC, alert_id
LIMIT {limit}
"""

WINDOW_SQL = """
SELECT layer, model_id, model_version, window_start_ms, window_end_ms, detection_rate, p_value,
       mmd2, n_window, n_reference
FROM drift_windows FINAL
WHERE window_id = {window_id}
ORDER BY layer
LIMIT 100
"""

# The window's top events (best score per event over the chosen layer, or all layers)
# joined with the predictions they came from: the shipped query `layerwatch query` runs too.
WINDOW_EVENTS_SQL = shipped_queries()["top_suspicious_events"]

WINDOW_LABELS_SQL = """
SELECT event_id, argMax(attack_type, ts_ms) AS attack_type, argMax(attack_prob, ts_ms) AS attack_prob,
       argMax(p_adversarial, ts_ms) AS p_adversarial, argMax(target_model, ts_ms) AS target_model,
       argMax(score_kind, ts_ms) AS score_kind, argMax(family, ts_ms) AS family
FROM attack_labels
WHERE model_id = {model_id} AND event_id IN {ids}
GROUP BY event_id
LIMIT {limit}
"""

WINDOW_INPUTS_SQL = """
SELECT event_id, any(input) AS input
FROM predictions_inputs
WHERE model_id = {model_id} AND event_id IN {ids}
GROUP BY event_id
LIMIT {limit}
"""

DASHBOARD_QUERIES = {
    "model_layers": MODEL_LAYERS_SQL, "model_events": MODEL_EVENTS_SQL, "model_reference": MODEL_REFERENCE_SQL,
    "data_span": DATA_SPAN_SQL, "drift": DRIFT_SQL,
    "alert_bands": ALERT_BANDS_SQL, "label_mix": LABEL_MIX_SQL, "alerts": ALERTS_SQL, "window": WINDOW_SQL,
    "window_events": WINDOW_EVENTS_SQL, "window_labels": WINDOW_LABELS_SQL, "window_inputs": WINDOW_INPUTS_SQL,
}


# ------------------------------------------------------------------- models overview (`layerwatch models`, /api/models)
# Full-table aggregates, approximate where exactness costs a FINAL over everything (uniq).
# Reference events are stored in `predictions` too; publishers mark them client_id 'reference'.

MODELS_EVENTS = (
    "SELECT model_id, model_version, uniq(event_id) AS events, uniqIf(event_id, ts_ms >= {since_ms}) AS recent, "
    "min(ts_ms), max(ts_ms) FROM predictions WHERE client_id != 'reference' "
    "GROUP BY model_id, model_version ORDER BY model_id, model_version"
)
MODELS_REFERENCES = (
    "SELECT model_id, model_version, layer, uniqExact(event_id) AS rows, any(length(vector)) AS dim, "
    "min(ts_ms), max(ts_ms) FROM reference_embeddings GROUP BY model_id, model_version, layer "
    "ORDER BY model_id, model_version, layer"
)
MODELS_WINDOWS = (
    "SELECT model_id, model_version, layer, uniqExact(window_id) AS windows, max(window_end_ms) AS last_ms, "
    "argMax(detection_rate, window_end_ms), argMax(window_id, window_end_ms) FROM drift_windows "
    "GROUP BY model_id, model_version, layer ORDER BY model_id, model_version, layer"
)
MODELS_OPEN_ALERTS = (
    "SELECT model_id, count() FROM (SELECT alert_id, any(model_id) AS model_id FROM alerts FINAL "
    "GROUP BY alert_id HAVING countIf(state = 'resolved') = 0) GROUP BY model_id"
)
MODELS_REFERENCE_SOURCES = (
    "SELECT model_id, model_version, source, rows, from_ms, to_ms FROM reference_sources FINAL "
    "ORDER BY model_id, model_version"
)
