-- grafana: panel 1 (Detection rate per model and layer), target A
SELECT
    toDateTime(intDiv(window_end_ms, 1000)) AS time,
    concat(model_id, ' / ', layer) AS series,
    max(detection_rate) AS detection_rate
FROM drift_windows FINAL
WHERE $__timeFilter(ts)
  AND model_id IN (${model:singlequote})
GROUP BY time, series
ORDER BY time
