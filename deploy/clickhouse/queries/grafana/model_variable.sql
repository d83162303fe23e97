-- grafana: variable model
SELECT DISTINCT model_id
FROM predictions
WHERE $__timeFilter(ts)
ORDER BY model_id
