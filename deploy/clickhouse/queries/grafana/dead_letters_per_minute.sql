-- grafana: panel 7 (Dead letters per minute), target A
SELECT
    toDateTime(intDiv(ts_ms, 60000) * 60) AS time,
    topic AS series,
    uniqExact(dl_id) AS dead_letters
FROM dead_letters
WHERE $__timeFilter(ts)
GROUP BY time, series
ORDER BY time
