-- The most suspicious events of one drift window: its per-sample scores joined
-- with the predictions they came from (best score per event across layers, or
-- over one layer when `layer` is given). rank is the dense rank of that score in the window
-- (1 = most suspicious; equal scores share a rank, the next score gets the next number).
-- @param window_id
-- @param layer = ''
-- @param limit = 20
SELECT
    event_id,
    model_id,
    score,
    indexOf(d.scores, score) AS rank,
    layer,
    client_id,
    predicted,
    confidence,
    ts_ms,
    attack
FROM
(
    SELECT event_id, model_id, score, layer, client_id, predicted, confidence, ts_ms, attack
    FROM
    (
        SELECT event_id, any(m) AS model_id, max(sc) AS score, argMax(l, sc) AS layer
        FROM
        (
            SELECT event_id, model_id AS m, layer AS l, score AS sc
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
) AS e
CROSS JOIN
(
    -- dense ranks: the distinct best scores, highest first; equal scores share a rank
    SELECT arrayReverseSort(groupUniqArray(best)) AS scores
    FROM
    (
        SELECT event_id, max(score) AS best
        FROM sample_scores FINAL
        WHERE window_id = {window_id} AND ({layer} = '' OR layer = {layer})
        GROUP BY event_id
    )
) AS d
ORDER BY score DESC, event_id
LIMIT {limit}
