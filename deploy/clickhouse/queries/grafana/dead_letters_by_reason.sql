-- grafana: panel 8 (Dead letters by reason), target A
SELECT
    topic,
    reason,
    uniqExact(dl_id) AS records,
    min(ts) AS first_seen,
    max(ts) AS last_seen,
    argMax(dl_id, ts_ms) AS last_record
FROM dead_letters
WHERE $__timeFilter(ts)
GROUP BY topic, reason
ORDER BY last_seen DESC
LIMIT 100
