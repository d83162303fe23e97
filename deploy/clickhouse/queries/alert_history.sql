-- Alert history: one row per alert pairing its 'open' and 'resolved' rows.
-- status is 'open' and resolved_ms 0 while the alert is still open.
-- @param model_id = ''
-- @param since_ms = 0
-- @param limit = 1000
SELECT
    alert_id,
    any(m) AS model_id,
    any(k) AS kind,
    if(countIf(st = 'resolved') > 0, 'resolved', 'open') AS status,
    anyIf(sev, st = 'open') AS severity,
    if(countIf(st = 'open') > 0, minIf(t, st = 'open'), min(t)) AS opened_ms,
    maxIf(t, st = 'resolved') AS resolved_ms,
    if(resolved_ms > opened_ms, resolved_ms - opened_ms, 0) AS duration_ms,
    anyIf(w, st = 'open') AS window_id,
    anyIf(c, st = 'open') AS client_id,
    anyIf(msg, st = 'open') AS message,
    anyIf(msg, st = 'resolved') AS resolution
FROM
(
    SELECT alert_id, model_id AS m, kind AS k, state AS st, severity AS sev, ts_ms AS t,
           window_id AS w, client_id AS c, message AS msg
    FROM alerts FINAL
    WHERE ({model_id} = '' OR model_id = {model_id})
      AND ts_ms >= {since_ms}
)
GROUP BY alert_id
ORDER BY opened_ms DESC, alert_id
LIMIT {limit}
