"""Event time you can trust, with the real broker, worker and store (chDB).

Two identical synthetic models, ``twin-a`` and ``twin-b``, get the same stream; ``twin-a``
also gets one event dated a day ahead in the middle of it. Both must get exactly the
windows a WindowManager computes for the clean stream, and the bad event is counted in
``layerwatch_events_clamped_total``. The stream's event times lie an hour ahead of the wall
clock (tests/reliability/synthetic.py: windows close on the event-time watermark only, so
the result does not depend on timing), hence ``LW_MAX_EVENT_SKEW_S`` = 2 h here; a day is
still far beyond it. Then a ``twin-b`` batch whose layer is 16 wide instead of 32 is
dead-lettered with its reason while the worker stays healthy and keeps ingesting.
"""

from __future__ import annotations

import secrets
import urllib.request

import numpy as np
import pytest

from schemas import encode_batch
from schemas.batch import COMBINED
from workers.windows import WindowManager
from tests.reliability.synthetic import DIM, Plan, future_base, make_batch, producer, query, scalar
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

SIZE_S, STEP_S, MIN_SAMPLES = 2, 1, 20
TWINS = ("twin-a", "twin-b")
DAY_MS = 86_400_000


def _expected_windows(plan: Plan) -> list[str]:
    wm = WindowManager(size_s=SIZE_S, step_s=STEP_S, capacity=64, min_samples=MIN_SAMPLES, count_trigger=0)
    out = []
    for i in range(plan.n_batches):
        n = plan.batch
        out += [w.window_id.split("@", 1)[1] for w in wm.add(("m", "1"), plan.ts(i), plan.ids(i), np.zeros(n, np.int32),
                                                              {"penultimate": np.zeros((n, DIM), np.float32)})]
    return out


def test_a_future_event_does_not_blind_its_model_and_a_shape_change_is_dead_lettered(broker, tmp_path) -> None:
    from streams.stack import LocalStack

    prefix = f"evt{secrets.token_hex(2)}."
    env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"layerwatch-{prefix}", "LW_AGENTS": "sink,drift",
           "LW_WINDOW_SIZE_S": str(SIZE_S), "LW_WINDOW_STEP_S": str(STEP_S), "LW_WINDOW_MIN_SAMPLES": str(MIN_SAMPLES),
           "LW_WINDOW_MAX_SAMPLES": "64", "LW_MMD_PERMUTATIONS": "20", "LW_DETECTION_REPEATS": "5",
           "LW_DETECTION_M": "20", "LW_MAX_EVENT_SKEW_S": "7200"}
    topic = prefix + "predictions"
    plan = Plan(base_ms=future_base(STEP_S * 1000), n_batches=16, batch=20, spacing_ms=50)
    expected = _expected_windows(plan)
    assert len(expected) >= 10
    with LocalStack(state_dir=tmp_path / "stack", clickhouse_url=f"chdb://{tmp_path / 'store'}", bootstrap=broker,
                    env=env) as stack:
        worker, url = stack.start_worker()
        p = producer(broker)
        rng = np.random.default_rng(7)
        for model in TWINS:
            ref = make_batch([f"ref-{i}" for i in range(200)], np.full(200, plan.base_ms - 60_000, np.int64), rng,
                             role="reference", model_id=model)
            p.send(topic, key=model.encode(), value=encode_batch(ref))
        p.flush()
        wait_until(lambda: scalar(url, "SELECT count() FROM reference_embeddings") >= 400, timeout=60,
                   message="both references stored")
        for i in range(plan.n_batches):
            for model in TWINS:
                live = make_batch([f"{model}-{e}" for e in plan.ids(i)], plan.ts(i), np.random.default_rng(i),
                                  model_id=model)
                p.send(topic, key=model.encode(), value=encode_batch(live))
            if i == plan.n_batches // 2:
                bad = make_batch(["twin-a-future"], np.array([plan.ts(i)[-1] + DAY_MS]), rng, model_id="twin-a")
                p.send(topic, key=b"twin-a", value=encode_batch(bad))
        p.flush()

        def tested(model: str) -> list[str]:
            rows = query(url, "SELECT DISTINCT window_id FROM drift_windows WHERE model_id = {m} AND layer = {l} "
                              "ORDER BY window_id", m=model, l=COMBINED)
            return sorted(r[0].split("@", 1)[1] for r in rows)

        wait_until(lambda: tested("twin-b") == sorted(expected), timeout=90, message="every window of twin-b tested",
                   interval=0.5)
        wait_until(lambda: tested("twin-a") == sorted(expected), timeout=30, message="every window of twin-a tested",
                   interval=0.5)
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        assert 'layerwatch_events_clamped_total{model_id="twin-a"} 1.0' in metrics
        assert 'layerwatch_events_clamped_total{model_id="twin-b"}' not in metrics
        stored = query(url, "SELECT ts_ms FROM predictions WHERE event_id = 'twin-a-future'")
        assert stored and stored[0][0] < plan.base_ms  # clamped to its record's time, before the (future) stream

        # -- a layer 16 wide under the 32-wide twin-b@1: dead-lettered, the worker stays healthy
        narrow = make_batch(["narrow-0"], plan.ts(plan.n_batches - 1)[:1], rng, model_id="twin-b")
        narrow.layers["penultimate"] = narrow.layers["penultimate"][:, :16].copy()
        p.send(topic, key=b"twin-b", value=encode_batch(narrow))
        after = make_batch(["after-0", "after-1"], plan.ts(plan.n_batches - 1)[:2], rng, model_id="twin-b")
        p.send(topic, key=b"twin-b", value=encode_batch(after))
        p.flush()
        p.close()
        reason = "layers: layer penultimate has dim 16, model twin-b@1 has 32; publish a new model_version"
        wait_until(lambda: scalar(url, "SELECT count() FROM dead_letters WHERE reason = {r}", r=reason) == 1,
                   timeout=30, message="the narrow batch dead-lettered")
        wait_until(lambda: scalar(url, "SELECT count() FROM predictions WHERE event_id IN ('after-0', 'after-1')") == 2,
                   timeout=30, message="the next batch ingested")
        assert scalar(url, "SELECT count() FROM predictions WHERE event_id = 'narrow-0'") == 0
        from streams.stack import http_json

        status, health = http_json(f"{url}/health")
        assert status == 200 and health["status"] == "ok", health
        worker.check()
