-- grafana: panel 3 (Label mix (attack classifier)), target A
SELECT
    toDateTime(intDiv(ts_ms, $__interval_s * 1000) * $__interval_s) AS time,
    attack_type AS series,
    uniqExact(event_id) AS events
FROM attack_labels
WHERE $__timeFilter(ts)
  AND model_id IN (${model:singlequote})
GROUP BY time, series
ORDER BY time
