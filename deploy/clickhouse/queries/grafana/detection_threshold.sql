-- grafana: panel 1 (Detection rate per model and layer), target B
SELECT
    arrayJoin([$__fromTime, $__toTime]) AS time,
    toFloat64(${alert_threshold}) AS threshold
ORDER BY time
