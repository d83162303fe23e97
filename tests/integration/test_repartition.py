"""Windows stay whole across two workers when the producer partitions at random (streams/repartition.py).

Three models' events are published to random partitions of a 4-partition topic (no key:
the way a producer with another partitioner, or none, spreads them), event time = wall
time, 50 events/s per model for 12 s. Two workers share the consumer group and one
ClickHouse server. Every 4-s window (2-s step) must be tested once, by one worker, with
all its events: ``n_window`` of its drift row equals the events published in its span
(without the forwarding each worker would test the part of the window it consumed).
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from schemas import encode_batch
from streams.stack import LocalStack
from tests.reliability.synthetic import make_batch, producer, query, scalar
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration]

_run = itertools.count()
MODELS = ("cnn", "mlp", "resnet")  # murmur2 homes 0, 0, 2 of 4; librdkafka's default puts them on 1, 2, 3
SIZE_MS, STEP_MS, PARTITIONS = 4000, 2000, 4


def _metric(url: str, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_random_partitioner_two_workers_every_window_in_one_drift_row(broker, clickhouse_server, tmp_path) -> None:
    prefix = f"repart{next(_run)}."
    topic = prefix + "predictions"
    url_store = clickhouse_server.url_for(f"layerwatch_repart_{next(_run)}_{int(time.time())}")
    rng = np.random.default_rng(16)
    sent: dict[str, list[int]] = {m: [] for m in MODELS}
    with LocalStack(state_dir=tmp_path / "stack", clickhouse_url=url_store, bootstrap=broker) as stack:
        stack.env = {
            "LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"layerwatch-{prefix}", "LW_TOPIC_PARTITIONS": str(PARTITIONS),
            "LW_WINDOW_SIZE_S": str(SIZE_MS / 1000), "LW_WINDOW_STEP_S": str(STEP_MS / 1000),
            "LW_WINDOW_MAX_SAMPLES": "256", "LW_WINDOW_MIN_SAMPLES": "50", "LW_MMD_PERMUTATIONS": "50",
            "LW_DETECTION_REPEATS": "10", "LW_DETECTION_M": "50", "LW_AGENTS": "sink,drift",
            # a forwarded record reaches its home a step or two after its neighbours (up to ~1-2 s on this
            # loaded machine): the windows wait that long past their end (docs/scale-out.md)
            "LW_WINDOW_LATENESS_S": "4",
        }
        _, url = stack.start_worker(name="worker0", timeout=180)
        _, url1 = stack.start_worker(name="worker1", timeout=180)
        p = producer(broker)
        now = int(time.time() * 1000)
        for m in MODELS:
            ids = [f"{m}-ref-{i}" for i in range(200)]
            p.send(topic, partition=int(rng.integers(PARTITIONS)),
                   value=encode_batch(make_batch(ids, np.full(200, now, np.int64), rng, role="reference", model_id=m)))
        p.flush()
        wait_until(lambda: scalar(url, "SELECT count() FROM reference_embeddings FINAL") == 600, timeout=120,
                   message="the references in ClickHouse")
        for step in range(60):  # 12 s at 50 events/s per model, each batch to a random partition
            t0 = int(time.time() * 1000)
            for m in MODELS:
                ts = t0 + np.arange(10, dtype=np.int64) * 20
                ids = [f"{m}-{step:03d}-{i}" for i in range(10)]
                p.send(topic, partition=int(rng.integers(PARTITIONS)),
                       value=encode_batch(make_batch(ids, ts, rng, model_id=m)))
                sent[m] += ts.tolist()
            p.flush()
            time.sleep(max(0.0, 0.2 - (time.time() * 1000 - t0) / 1000))
        last = max(max(v) for v in sent.values())
        for m in MODELS:  # far ahead in event time: closes every window of the run
            p.send(topic, partition=int(rng.integers(PARTITIONS)), value=encode_batch(
                make_batch([f"{m}-closer"], np.array([last + 3 * SIZE_MS]), rng, model_id=m)))
        p.flush()
        p.close()

        expected = {}
        for m, ts in sent.items():
            ts = np.array(ts)
            for start in range((int(ts.min()) // STEP_MS + 1) * STEP_MS, int(ts.max()) - SIZE_MS + 1, STEP_MS):
                expected[(m, start)] = int(((ts >= start) & (ts < start + SIZE_MS)).sum())
        assert len(expected) >= 3 * 3

        def rows() -> list[list]:
            return query(url, "SELECT model_id, window_start_ms, window_end_ms, n_window FROM drift_windows FINAL "
                              "WHERE layer = '__combined__' ORDER BY model_id, window_start_ms")

        def all_tested() -> bool:
            starts = {(r[0], int(r[1])) for r in rows()}
            return all(k in starts for k in expected)

        wait_until(all_tested, timeout=180, message="every window tested")
        got = rows()
        forwarded = sum(_metric(u, "layerwatch_records_forwarded_total") for u in (url, url1))
        assert forwarded > 0  # records did arrive off their model's home partition, and were moved
        by_window = {}
        for model, start, end, n_window in got:
            by_window.setdefault((model, int(start)), []).append((int(end), int(n_window)))
        late = sum(_metric(u, "layerwatch_events_late_total") for u in (url, url1))
        wrong = {(m, start - min(s for _, s in expected)): (by_window.get((m, start)), n)
                 for (m, start), n in expected.items() if by_window.get((m, start)) != [(start + SIZE_MS, n)]}
        assert not wrong, f"{len(wrong)} of {len(expected)} windows differ (late events: {late}): {wrong}"
        events = scalar(url, "SELECT uniqExact(event_id) FROM predictions")
        assert events == 600 + 3 * 600 + 3
