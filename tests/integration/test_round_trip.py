"""Publisher → Tansu → Faust worker → ClickHouse, on each store backend, with one malformed record."""

from __future__ import annotations

import pytest
from kafka import KafkaProducer

from streams.demo import publish_round_trip
from streams.client import http_json
from streams.stack import LocalStack
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def test_micro_batches_land_once_and_bad_record_is_dead_lettered(broker, store_url, tmp_path) -> None:
    topic = "lw.predictions"
    with LocalStack(state_dir=tmp_path / "stack", clickhouse_url=store_url, bootstrap=broker) as stack:
        prefix = f"rt{abs(hash(store_url)) % 10_000}."
        stack.env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"layerwatch-{prefix}"}
        _, url = stack.start_worker()
        first = publish_round_trip(broker, prefix + "predictions", n_batches=5, seed=1)
        producer = KafkaProducer(bootstrap_servers=broker)
        producer.send(prefix + "predictions", key=b"synthetic", value=b"\x00\x00\x00\x00\x01not-avro-at-all").get(timeout=10)
        producer.close()
        second = publish_round_trip(broker, prefix + "predictions", n_batches=5, seed=2)
        sent = first + second
        assert len(sent) == 640 and topic

        def count(sql: str, params: dict | None = None) -> int:
            status, body = http_json(f"{url}/api/query", {"sql": sql, "params": params or {}})
            return int(body["rows"][0][0]) if status == 200 else -1

        wait_until(lambda: count("SELECT uniqExact(event_id) FROM predictions WHERE event_id IN {ids}", {"ids": sent}) == 640,
                   timeout=90, message="640 predictions in ClickHouse")
        wait_until(lambda: count("SELECT count() FROM dead_letters FINAL") == 1, timeout=30, message="the dead letter")
        assert count("SELECT count() FROM predictions FINAL") == 640
        status, body = http_json(f"{url}/api/query", {"sql": "SELECT reason, topic, raw FROM dead_letters FINAL"})
        assert status == 200
        reason, dl_topic, raw = body["rows"][0]
        assert "malformed Avro body" in reason and dl_topic == prefix + "predictions"
        assert "not-avro-at-all" in raw
        status, metrics = 0, ""
        import urllib.request

        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        assert 'layerwatch_events_total{model_id="synthetic",role="live"} 640.0' in metrics
        assert "layerwatch_dead_letters_total" in metrics
