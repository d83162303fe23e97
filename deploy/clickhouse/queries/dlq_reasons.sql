-- Dead letters by topic and reason (distinct records, first and last seen).
-- @param since_ms = 0
-- @param until_ms = 18446744073709551615
SELECT
    topic,
    reason,
    uniqExact(dl_id) AS records,
    min(ts_ms) AS first_ms,
    max(ts_ms) AS last_ms
FROM dead_letters
WHERE ts_ms >= {since_ms}
  AND ts_ms < {until_ms}
GROUP BY topic, reason
ORDER BY records DESC, topic, reason
