-- Since when is each model drifting? Per model (on one layer, '__combined__' by
-- default): the first window whose detection rate reached the threshold in the
-- time range, and the start of the current episode, i.e. the first crossing
-- window after the last window below the threshold (0 when the latest window is
-- below the threshold).
-- @param threshold = 0.5
-- @param layer = '__combined__'
-- @param since_ms = 0
-- @param until_ms = 18446744073709551615
SELECT
    model_id,
    min(end_ms) AS first_crossed_ms,
    toDateTime(intDiv(min(end_ms), 1000)) AS first_crossed,
    argMin(wid, end_ms) AS first_window_id,
    argMin(rate, end_ms) AS first_detection_rate,
    any(below_ms) AS last_below_ms,
    minIf(end_ms, end_ms > below_ms) AS episode_since_ms,
    uniqExact(wid) AS crossing_windows,
    max(rate) AS max_detection_rate
FROM
(
    SELECT model_id, window_id AS wid, window_end_ms AS end_ms, detection_rate AS rate, below_ms
    FROM drift_windows AS w FINAL
    ANY LEFT JOIN
    (
        SELECT model_id, maxIf(window_end_ms, detection_rate < {threshold}) AS below_ms
        FROM drift_windows FINAL
        WHERE layer = {layer} AND window_end_ms >= {since_ms} AND window_end_ms < {until_ms}
        GROUP BY model_id
    ) AS b USING (model_id)
    WHERE layer = {layer}
      AND window_end_ms >= {since_ms} AND window_end_ms < {until_ms}
      AND detection_rate >= {threshold}
)
GROUP BY model_id
ORDER BY first_crossed_ms, model_id
