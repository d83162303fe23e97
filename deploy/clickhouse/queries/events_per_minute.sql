-- Live predictions per minute per model (distinct event ids, so replays do not count twice).
-- Reference batches (`layerwatch reference`) share the predictions table; their events are
-- in reference_embeddings and are not traffic, so they are left out.
-- @param since_ms = 0
-- @param until_ms = 18446744073709551615
-- @param model_id = ''
SELECT
    model_id,
    intDiv(ts_ms, 60000) AS minute,
    toDateTime(intDiv(ts_ms, 60000) * 60) AS minute_ts,
    uniqExact(event_id) AS events,
    uniqExact(client_id) AS clients
FROM predictions
WHERE ts_ms >= {since_ms}
  AND ts_ms < {until_ms}
  AND ({model_id} = '' OR model_id = {model_id})
  AND event_id NOT IN (SELECT event_id FROM reference_embeddings)
GROUP BY model_id, minute
ORDER BY model_id, minute
