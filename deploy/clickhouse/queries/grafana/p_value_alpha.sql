-- grafana: panel 2 (p-value per model and layer), target B
SELECT
    toDateTime(intDiv(window_end_ms, 1000)) AS time,
    max(alpha) AS alpha
FROM drift_windows FINAL
WHERE $__timeFilter(ts)
  AND model_id IN (${model:singlequote})
GROUP BY time
ORDER BY time
