-- Detection rate per model and layer, by minute of window end.
-- One row per (model_id, layer, minute); minute = intDiv(window_end_ms, 60000).
-- Runs on ClickHouse 18.16 and chDB 26 (no toStartOfInterval, no window functions).
-- @param since_ms = 0
-- @param until_ms = 18446744073709551615
-- @param model_id = ''
SELECT
    model_id,
    layer,
    intDiv(window_end_ms, 60000) AS minute,
    toDateTime(intDiv(window_end_ms, 60000) * 60) AS minute_ts,
    uniqExact(window_id) AS windows,
    avg(detection_rate) AS avg_detection_rate,
    max(detection_rate) AS max_detection_rate,
    min(p_value) AS min_p_value,
    max(mmd2) AS max_mmd2
FROM drift_windows FINAL
WHERE window_end_ms >= {since_ms}
  AND window_end_ms < {until_ms}
  AND ({model_id} = '' OR model_id = {model_id})
GROUP BY model_id, layer, minute
ORDER BY model_id, layer, minute
