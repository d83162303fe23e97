"""The probing stage scores every model of an ingest step in one detector, keeping models apart."""

from __future__ import annotations

import numpy as np

from schemas.batch import PENULTIMATE, PredictionBatch
from streams.metrics import Metrics
from streams.stages.probing import ProbingStage
from workers.probing import ProbingDetector


def _stage() -> ProbingStage:
    stage = ProbingStage.__new__(ProbingStage)  # only the scoring half: no runtime, no Kafka
    stage.detector = ProbingDetector(min_queries=20)
    stage.metrics = Metrics()
    return stage


def _batch(model: str, dim: int, emb: np.ndarray, client: str, t0: int) -> PredictionBatch:
    n = len(emb)
    return PredictionBatch.build(model, [f"{model}-{t0}-{i}" for i in range(n)], outputs=np.full((n, 3), 1 / 3),
                                 layers={PENULTIMATE: emb.astype(np.float16)}, client_ids=[client] * n,
                                 ts_ms=t0 + np.arange(n))


def test_one_client_probing_two_models_is_counted_per_model() -> None:
    rng = np.random.default_rng(0)
    stage = _stage()
    base_a, base_b = rng.normal(size=512), rng.normal(size=64)
    # 15 near-duplicates on each model (different widths) from one client: 30 in all, but 15 per model
    step = [_batch("a", 512, base_a + 0.01 * rng.normal(size=(15, 512)), "mallory", 0),
            _batch("b", 64, base_b + 0.01 * rng.normal(size=(15, 64)), "mallory", 0)]
    assert stage._update(step) == []
    more = [_batch("b", 64, base_b + 0.01 * rng.normal(size=(10, 64)), "mallory", 100),
            _batch("a", 512, rng.normal(size=(10, 512)), "mallory", 100)]
    found = stage._update(more)
    assert [(model, hit.client_id, hit.count) for model, hit in found] == [("b", "mallory", 20)]
