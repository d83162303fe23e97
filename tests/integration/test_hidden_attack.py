"""Attacks hidden in clean traffic, end to end: a client sends a minority of crafted events.

Real services: the Tansu broker, the worker as a child process, chDB. A model that is not
a demo model (class-structured Gaussian embeddings) gets a reference; ten clients send
clean traffic, then one client ("mallory") mixes crafted events into it (15% of the
traffic). The window's count test and mallory's own test open hidden_attack alerts (one
naming mallory); the clean phase and the clean clients open none.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from schemas.batch import CLIENT_PREFIX, COUNT
from streams.client import http_json
from streams.stack import LocalStack
from tests.waiting import wait_until
from workers.inference.publisher import Publisher

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_run = itertools.count()
D, CLASSES, RATE = 24, 5, 100  # embedding dim, classes, events per second of event time


def _query(url: str, sql: str, **params) -> list[list]:
    status, body = http_json(f"{url}/api/query", {"sql": sql, "params": params}, timeout=30)
    assert status == 200, body
    return body["rows"]


def _events(rng: np.random.Generator, means: np.ndarray, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(outputs, embeddings) of n events: class mean + unit noise (+ ``shift`` on every dimension)."""
    y = rng.integers(CLASSES, size=n)
    emb = means[y] + rng.normal(size=(n, D)) + shift
    outputs = np.full((n, CLASSES), 0.02, np.float32)
    outputs[np.arange(n), y] = 1.0 - 0.02 * (CLASSES - 1)
    return outputs, emb.astype(np.float32)


def test_a_minority_of_crafted_events_opens_hidden_attack_alerts(broker, chdb_url, tmp_path) -> None:
    prefix = f"hidden{next(_run)}."
    rng = np.random.default_rng(7)
    means = rng.normal(scale=3.0, size=(CLASSES, D))
    with LocalStack(state_dir=tmp_path / "stack", clickhouse_url=chdb_url, bootstrap=broker) as stack:
        stack.env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"layerwatch-{prefix}", "LW_WINDOW_SIZE_S": "4",
                     "LW_WINDOW_STEP_S": "2", "LW_CLIENT_MIN_EVENTS": "10", "LW_AGENTS": "sink,drift,alerts"}
        _, url = stack.start_worker()
        topic = prefix + "predictions"
        with Publisher(broker, "fraud-embed", topic=topic, role="reference") as ref:
            outputs, emb = _events(rng, means, 1000)
            ref.publish(outputs, {"penultimate": emb}, client_ids=["reference"] * 1000)
        wait_until(lambda: _query(url, "SELECT uniqExact(event_id) FROM reference_embeddings")[0][0] == 1000,
                   timeout=60, message="the reference in ClickHouse")

        # 40 s of event time, published at once: 20 s clean, then 20 s where mallory sends 15% of the events
        start_ms = int(time.time() * 1000) - 45_000
        attack_ms = start_ms + 20_000
        clients = np.array([f"client-{i}" for i in range(10)])
        with Publisher(broker, "fraud-embed", topic=topic) as live:
            for second in range(40):
                outputs, emb = _events(rng, means, RATE)
                who = clients[rng.integers(len(clients), size=RATE)]
                if second >= 20:
                    crafted = rng.random(RATE) < 0.15
                    o, e = _events(rng, means, int(crafted.sum()), shift=1.5)
                    outputs[crafted], emb[crafted], who[crafted] = o, e, "mallory"
                ts = start_ms + second * 1000 + np.sort(rng.integers(0, 1000, size=RATE))
                live.publish(outputs, {"penultimate": emb}, client_ids=list(who), ts_ms=ts)

        def alerts() -> list[list]:
            return _query(url, "SELECT alert_id, client_id, ts_ms, window_id FROM alerts FINAL "
                               "WHERE kind = 'hidden_attack' AND state = 'open' ORDER BY ts_ms")

        wait_until(lambda: {a[1] for a in alerts()} >= {"", "mallory"}, timeout=90,
                   message="hidden_attack alerts for the model and for mallory")
        counts = _query(url, "SELECT window_start_ms, window_end_ms, p_value, mmd2, window_id FROM drift_windows FINAL "
                             "WHERE layer = {c} ORDER BY window_end_ms", c=COUNT)
        clean = [r for r in counts if r[1] <= attack_ms]
        mixed = [r for r in counts if r[0] >= attack_ms]
        assert len(clean) >= 5 and len(mixed) >= 5, counts
        assert min(r[2] for r in clean) > 0.001, clean  # the count test holds its level on clean windows
        assert np.mean([r[2] <= 0.001 for r in mixed]) >= 0.9, mixed  # and sees the mixed windows
        for alert_id, client, ts_ms, _ in alerts():
            assert ts_ms > attack_ms, (alert_id, ts_ms)
            assert client in ("", "mallory"), alert_id
        # client rows are written from p <= alpha (0.05, worth a look); only mallory's reach the alert level
        flagged_clients = _query(url, "SELECT DISTINCT layer FROM drift_windows WHERE startsWith(layer, {p}) "
                                      "AND p_value <= 0.001", p=CLIENT_PREFIX)
        assert [r[0] for r in flagged_clients] == [CLIENT_PREFIX + "mallory"]
        # "which requests": the count row's top events are mallory's
        window_id = mixed[0][4]
        owners = _query(url, "SELECT p.client_id FROM (SELECT event_id FROM sample_scores FINAL WHERE window_id = {w} "
                             "AND layer = {c} AND rank <= 10) AS s ANY LEFT JOIN (SELECT event_id, client_id FROM "
                             "predictions) AS p USING (event_id)", w=window_id, c=COUNT)
        assert len(owners) == 10 and sum(r[0] == "mallory" for r in owners) >= 8, owners
