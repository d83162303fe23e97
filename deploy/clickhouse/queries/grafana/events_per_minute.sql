-- grafana: panel 4 (Events per minute), target A
SELECT
    toDateTime(intDiv(ts_ms, 60000) * 60) AS time,
    model_id AS series,
    uniqExact(event_id) AS events
FROM predictions
WHERE $__timeFilter(ts)
  AND model_id IN (${model:singlequote})
GROUP BY time, series
ORDER BY time
