-- grafana: panel 5 (Open and recent alerts), target A
SELECT
    alert_id,
    min(ts) AS opened,
    max(ts) AS last_change,
    argMax(state, ts_ms) AS current_state,
    any(model_id) AS model,
    any(kind) AS alert_kind,
    argMax(severity, ts_ms) AS alert_severity,
    any(window_id) AS drift_window,
    any(client_id) AS client,
    argMax(message, ts_ms) AS last_message
FROM alerts FINAL
WHERE model_id IN (${model:singlequote})
GROUP BY alert_id
HAVING current_state = 'open' OR last_change >= $__fromTime
ORDER BY current_state = 'open' DESC, last_change DESC
LIMIT 200
