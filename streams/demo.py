"""`layerwatch demo`: the whole pipeline on this machine, with nothing configured."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
from rich.console import Console

from streams.settings import Settings
from streams.stack import LocalStack, http_json, wait_for

console = Console()


def publish_round_trip(bootstrap: str, topic: str, n_batches: int = 10, batch_size: int = 64, seed: int = 0) -> list[str]:
    """Publish synthetic micro-batches of predictions with kafka-python; returns the event ids sent."""
    from kafka import KafkaProducer

    from schemas import PredictionBatch, encode_batch

    rng = np.random.default_rng(seed)
    producer = KafkaProducer(bootstrap_servers=bootstrap, compression_type="gzip", max_request_size=8 * 1024 * 1024)
    sent: list[str] = []
    for _ in range(n_batches):
        ids = [uuid.uuid4().hex for _ in range(batch_size)]
        logits = rng.normal(size=(batch_size, 10)).astype(np.float32)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        batch = PredictionBatch.build("synthetic", ids, outputs=probs,
                                      layers={"penultimate": rng.normal(size=(batch_size, 32)).astype(np.float16)},
                                      client_ids=[f"client-{i % 4}" for i in range(batch_size)])
        producer.send(topic, key=b"synthetic", value=encode_batch(batch))
        sent.extend(ids)
    producer.flush()
    producer.close()
    return sent


def run_demo(settings: Settings, seconds: float | None = None, summary_path: str | None = None) -> int:
    """Round trip publisher → Kafka → Faust worker → ClickHouse, printing what landed."""
    state_dir = Path(settings.state_dir) / "demo"
    started = time.monotonic()
    with LocalStack(state_dir=state_dir, clickhouse_url=f"chdb://{state_dir / 'store'}") as stack:
        with console.status("starting the embedded broker and the worker"):
            bootstrap = stack.start_broker()
            _, url = stack.start_worker()
        console.print(f"broker at [bold]{bootstrap}[/], worker at [bold]{url}[/]")
        ids = publish_round_trip(bootstrap, settings.topic("predictions"))
        console.print(f"published {len(ids)} predictions in {len(ids) // 64} micro-batches")
        sql = "SELECT uniqExact(event_id) FROM predictions WHERE event_id IN {ids}"

        def landed() -> int:
            status, body = http_json(f"{url}/api/query", {"sql": sql, "params": {"ids": ids}})
            return int(body["rows"][0][0]) if status == 200 else -1

        with console.status("waiting for the rows in ClickHouse"):
            wait_for(lambda: landed() == len(ids), timeout=seconds or 120, message="the rows in ClickHouse")
        _, body = http_json(f"{url}/api/query", {"sql": (
            "SELECT model_id, client_id, count() AS n, round(avg(confidence), 3) AS mean_confidence "
            "FROM predictions GROUP BY model_id, client_id ORDER BY client_id")})
        from streams.query import format_result

        console.print(format_result(body["columns"], body["rows"]))
        elapsed = time.monotonic() - started
        console.print(f"{landed()} of {len(ids)} predictions landed in ClickHouse; {elapsed:.1f} s in all")
        if summary_path:
            Path(summary_path).write_text(json.dumps({
                "events_published": len(ids), "events_stored": landed(), "seconds": round(elapsed, 2),
            }, indent=2))
    return 0
