-- The most suspicious events of one drift window: its per-sample scores joined
-- with the predictions they came from (best score per event across layers, or
-- over one layer when `layer` is given).
-- @param window_id
-- @param layer = ''
-- @param limit = 20
SELECT
    event_id,
    model_id,
    score,
    rank,
    layer,
    client_id,
    predicted,
    confidence,
    ts_ms,
    attack
FROM
(
    SELECT event_id, any(m) AS model_id, max(sc) AS score, min(rk) AS rank, argMax(l, sc) AS layer
    FROM
    (
        SELECT event_id, model_id AS m, layer AS l, score AS sc, rank AS rk
        FROM sample_scores FINAL
        WHERE window_id = {window_id} AND ({layer} = '' OR layer = {layer})
    )
    GROUP BY event_id
) AS s
ANY LEFT JOIN
(
    SELECT event_id, model_id, client_id, predicted, confidence, ts_ms, attack
    FROM predictions FINAL
    WHERE model_id IN (SELECT model_id FROM sample_scores WHERE window_id = {window_id})
      AND event_id IN (SELECT event_id FROM sample_scores WHERE window_id = {window_id})
) AS p USING (event_id, model_id)
ORDER BY score DESC, event_id
LIMIT {limit}
