-- grafana: panel 6 (Most suspicious events of recent windows), target A
SELECT
    window_time,
    model,
    layer,
    window_id,
    rank,
    score,
    event_id,
    client_id,
    predicted,
    confidence
FROM
(
    SELECT
        ts AS window_time,
        model_id AS model,
        layer,
        window_id,
        rank,
        score,
        event_id
    FROM sample_scores FINAL
    WHERE $__timeFilter(ts)
      AND model_id IN (${model:singlequote})
    ORDER BY score DESC
    LIMIT 100
) AS top
ANY LEFT JOIN
(
    SELECT event_id, client_id, predicted, confidence
    FROM predictions FINAL
    WHERE ts >= $__fromTime - 3600 AND ts <= $__toTime
      AND model_id IN (${model:singlequote})
) AS req USING (event_id)
ORDER BY score DESC
