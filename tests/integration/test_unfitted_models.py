"""Clean models the supervised detector was not fitted for raise no attack_classified alert (issue 19).

Through the real broker and a worker: six non-demo models, each with its own published
reference and clean traffic only, beside the demo model ``cnn`` whose supervised
detector sits in the worker's detectors directory. The worker must label the six with
the unsupervised score of their own reference and open no attack_classified alert for
them. ``cnn``'s attack-like traffic afterwards is the positive control: its alert proves
the rules judged every earlier bucket (one partition per topic keeps them in order),
so "zero alerts" is not read before the verdicts were made.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from schemas import PredictionBatch, encode_batch
from streams.stack import LocalStack
from tests.reliability.synthetic import producer, query, scalar
from tests.waiting import wait_until
from workers.classifier.detector import fit_detector

pytestmark = pytest.mark.integration

DIM, CLASSES = 32, 10
TENANTS = [f"tenant-{i}" for i in range(6)]
REFERENCE, BUCKETS, PER_BUCKET = 200, 4, 40
BUCKET_MS = 2000


def model_events(model: str, n: int, rng: np.random.Generator, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, penultimate) of a model: its own mean, spread and linear head (seeded by its name)."""
    own = np.random.default_rng(sum(map(ord, model)))
    mean = np.zeros(DIM) if model == "cnn" else own.normal(0, 2, DIM)
    spread = np.ones(DIM) if model == "cnn" else own.uniform(0.5, 2.0, DIM)
    head = own.normal(size=(DIM, CLASSES))
    z = rng.normal(size=(n, DIM)) * scale
    logits = z @ head / 2
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32), (mean + spread * z).astype(np.float32)


def send(p, topic: str, model: str, ids: list[str], ts_ms: np.ndarray, rng: np.random.Generator, *,
         role: str = "live", scale: float = 1.0) -> None:
    probs, pen = model_events(model, len(ids), rng, scale)
    batch = PredictionBatch.build(model, ids, probs, {"penultimate": pen}, role=role, ts_ms=ts_ms,
                                  client_ids=[f"c{i % 5}" for i in range(len(ids))])
    p.send(topic, key=model.encode(), value=encode_batch(batch)).get(timeout=30)


def test_clean_models_it_was_not_fitted_for_open_no_attack_alert(broker, chdb_url, tmp_path) -> None:
    rng = np.random.default_rng(0)
    # the demo model's supervised detector: clean = cnn's traffic, adversarial = inflated activations
    clean_p, clean_e = model_events("cnn", 600, rng)
    adv_p, adv_e = model_events("cnn", 600, rng, scale=3.0)
    det = fit_detector({"outputs": clean_p, "embeddings": clean_e}, {"outputs": adv_p, "embeddings": adv_e,
                                                                    "attack": np.full(600, "pgd")},
                       model_id="cnn", model_version="1")
    state = tmp_path / "stack"
    det.save(state / "classifier" / "detectors" / "cnn.skops")
    # the test is only worth running if that head, misapplied, would flag the tenants' clean traffic
    misapplied = [float((det.score(*model_events(m, 200, rng)) >= 0.5).mean()) for m in TENANTS]
    assert min(misapplied) > 0.3, misapplied

    prefix = "unfit."
    topic = prefix + "predictions"
    with LocalStack(state_dir=state, clickhouse_url=chdb_url, bootstrap=broker) as stack:
        stack.env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": "layerwatch-unfit", "LW_TOPIC_PARTITIONS": "1",
                     "LW_AGENTS": "sink,classify,alerts", "LW_ALERT_SINKS": "kafka", "LW_WINDOW_SIZE_S": "2",
                     "LW_WINDOW_STEP_S": "1", "LW_MAX_EVENT_SKEW_S": "3600"}
        _, url = stack.start_worker()
        p = producer(broker)
        now = int(time.time() * 1000)
        for model in TENANTS:
            for start in range(0, REFERENCE, 100):
                send(p, topic, model, [f"{model}-ref-{i}" for i in range(start, start + 100)],
                     np.full(100, now, np.int64), rng, role="reference")
        wait_until(lambda: scalar(url, "SELECT uniqExact(event_id) FROM reference_embeddings") == REFERENCE * 6,
                   timeout=60, message="the six references in the store")

        base = (now // BUCKET_MS - 20) * BUCKET_MS  # event time: whole buckets in the recent past
        live = 0
        for b in range(BUCKETS + 1):  # the last bucket closes the ones before it (the tally judges on a later bucket)
            ts = base + b * BUCKET_MS + np.arange(PER_BUCKET, dtype=np.int64) * (BUCKET_MS // PER_BUCKET)
            for model in TENANTS:
                send(p, topic, model, [f"{model}-live-{b}-{i}" for i in range(PER_BUCKET)], ts, rng)
                live += PER_BUCKET
        for b in range(3):  # positive control: attack-like traffic on cnn, after everything else
            ts = base + b * BUCKET_MS + np.arange(PER_BUCKET, dtype=np.int64) * (BUCKET_MS // PER_BUCKET)
            send(p, topic, "cnn", [f"cnn-live-{b}-{i}" for i in range(PER_BUCKET)], ts, rng, scale=3.0)
        p.close()

        wait_until(lambda: scalar(url, "SELECT count() FROM alerts FINAL WHERE model_id = 'cnn' "
                                       "AND kind = 'attack_classified' AND state = 'open'") >= 1,
                   timeout=60, message="the positive control's attack_classified alert on cnn")
        wait_until(lambda: scalar(url, "SELECT uniqExact(event_id) FROM attack_labels WHERE model_id IN {m}",
                                  m=TENANTS) == live, timeout=30, message="every tenant event labelled")
        kinds = query(url, "SELECT model_id, score_kind, uniqExact(event_id), countIf(p_adversarial >= 0.5) "
                           "FROM attack_labels GROUP BY model_id, score_kind ORDER BY model_id")
        alerts = query(url, "SELECT model_id, count() FROM alerts FINAL WHERE kind = 'attack_classified' "
                            "GROUP BY model_id ORDER BY model_id")
    by_model = {m: (kind, n, flagged) for m, kind, n, flagged in kinds}
    assert {m: by_model[m][0] for m in TENANTS} == dict.fromkeys(TENANTS, "unsupervised"), kinds
    assert all(by_model[m][1] == (BUCKETS + 1) * PER_BUCKET for m in TENANTS), kinds
    assert by_model["cnn"][0] == "supervised" and len([r for r in kinds if r[0] == "cnn"]) == 1, kinds
    assert [m for m, _ in alerts] == ["cnn"], alerts  # none of the six clean tenants
    flagged = [by_model[m][2] / by_model[m][1] for m in TENANTS]
    assert max(flagged) < 0.3, flagged  # the rule's share, with room: each tenant's own reference judges it
