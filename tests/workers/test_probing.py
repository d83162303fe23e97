"""Near-duplicate query detection per client (workers/probing.py) on synthetic embeddings."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import workers.probing as P
from workers.probing import ProbingDetector

DIM = 64


def _probe(rng: np.random.Generator, n: int, noise: float = 0.01) -> np.ndarray:
    """One base input plus tiny perturbations: pairwise cosine ~0.99, never exactly 1."""
    base = rng.normal(size=DIM)
    return base + noise * rng.normal(size=(n, DIM))


def test_doctests() -> None:
    result = doctest.testmod(P)
    assert result.attempted > 0 and result.failed == 0


def test_normal_clients_sending_iid_embeddings_are_never_flagged() -> None:
    rng = np.random.default_rng(0)
    det = ProbingDetector(min_queries=5)  # even a low bar is not reached by unrelated inputs
    clients = np.array([f"c{i}" for i in range(50)])
    for step in range(40):
        n = 256
        ids = rng.choice(clients, size=n)
        ts = step * 500 + np.sort(rng.integers(0, 500, size=n))
        assert det.update(ids, ts, rng.normal(size=(n, DIM))) == []
    assert det.flagged == frozenset() and len(det) == 50


@pytest.mark.parametrize("batch", [1, 8, 100])
def test_probing_client_is_flagged_after_min_queries(batch: int) -> None:
    rng = np.random.default_rng(1)
    det = ProbingDetector(min_queries=20, window_s=30.0)
    emb = _probe(rng, 100)
    ts = 1_000_000 + np.arange(100) * 200  # 5 queries/s
    hits = []
    for lo in range(0, 100, batch):
        hits += det.update(["mallory"] * len(ts[lo : lo + batch]), ts[lo : lo + batch], emb[lo : lo + batch])
    assert len(hits) == 1  # flagged once, not on every later query
    h = hits[0]
    assert h.client_id == "mallory" and h.count == 20
    assert h.ts_ms == ts[20]  # the 21st query has 20 near-duplicate predecessors
    assert 0.98 <= h.mean_similarity < 0.99999
    assert det.flagged == {"mallory"}


def test_probing_client_is_found_among_normal_traffic_in_shuffled_batches() -> None:
    rng = np.random.default_rng(2)
    det = ProbingDetector(min_queries=20)
    probe = _probe(rng, 60)
    hits = []
    for step in range(6):
        normal = rng.normal(size=(200, DIM))
        ids = np.array([f"n{i % 40}" for i in range(200)] + ["eve"] * 10)
        emb = np.vstack([normal, probe[step * 10 : step * 10 + 10]])
        ts = step * 1_000 + np.arange(210)
        perm = rng.permutation(210)
        hits += det.update(ids[perm], ts[perm], emb[perm])
    assert [h.client_id for h in hits] == ["eve"]


def test_exact_repeats_alone_are_not_flagged() -> None:
    rng = np.random.default_rng(3)
    det = ProbingDetector(min_queries=5)
    query = rng.normal(size=DIM)
    assert det.update(["retry"] * 200, np.arange(200) * 10, np.tile(query, (200, 1))) == []
    # scaled copies are identical after L2 normalisation too
    assert det.update(["retry"] * 20, 3_000 + np.arange(20), query * rng.uniform(0.5, 2, size=(20, 1))) == []
    assert det.flagged == frozenset()


@pytest.mark.parametrize("batch", [1, 50])
def test_near_duplicates_spread_beyond_the_window_are_not_flagged(batch: int) -> None:
    rng = np.random.default_rng(4)
    det = ProbingDetector(min_queries=5, window_s=30.0)
    emb = _probe(rng, 50)
    ts = np.arange(50) * 10_000  # one query every 10 s: at most 3 neighbours within 30 s
    for lo in range(0, 50, batch):
        assert det.update(["slow"] * batch, ts[lo : lo + batch], emb[lo : lo + batch]) == []
    assert det.update(["slow"] * 5, ts[-1] + np.arange(1, 6), emb[:5]) != []  # the same queries in a burst: flagged


def test_flag_resets_after_quiet_period_or_clear() -> None:
    rng = np.random.default_rng(5)
    det = ProbingDetector(min_queries=10, window_s=30.0)
    burst1, burst2, burst3 = _probe(rng, 30), _probe(rng, 30), _probe(rng, 30)
    assert len(det.update(["m"] * 30, np.arange(30) * 100, burst1)) == 1
    # still probing 10 s later: no new hit
    assert det.update(["m"] * 30, 10_000 + np.arange(30) * 100, burst1 + 0.001) == []
    # a new burst after more than 30 s without near-duplicates: a new hit
    again = det.update(["m"] * 30, 100_000 + np.arange(30) * 100, burst2)
    assert len(again) == 1 and again[0].ts_ms == 100_000 + 10 * 100
    det.clear("m")
    assert "m" not in det and det.flagged == frozenset()
    third = det.update(["m"] * 30, 101_000 + np.arange(30) * 100, burst3)
    assert len(third) == 1 and third[0].count == 10


def test_least_recently_seen_clients_are_evicted() -> None:
    rng = np.random.default_rng(6)
    det = ProbingDetector(max_clients=5)
    for i in range(5):
        det.update([f"c{i}"], [i], rng.normal(size=(1, DIM)))
    det.update(["c0"], [10], rng.normal(size=(1, DIM)))  # c0 seen again: c1 is now the least recent
    det.update(["c5", "c6"], [11, 12], rng.normal(size=(2, DIM)))
    assert len(det) == 5 and det.evicted == 2
    assert "c1" not in det and "c2" not in det
    assert all(c in det for c in ["c0", "c3", "c4", "c5", "c6"])


def test_rows_without_client_id_are_ignored() -> None:
    rng = np.random.default_rng(7)
    det = ProbingDetector(min_queries=5)
    assert det.update([""] * 50, np.arange(50), _probe(rng, 50)) == []
    assert len(det) == 0


def test_misaligned_batch_is_rejected() -> None:
    with pytest.raises(ValueError, match="misaligned"):
        ProbingDetector().update(["a", "b"], [1], np.zeros((2, DIM)))
    with pytest.raises(ValueError):
        ProbingDetector(similarity=0.99, identical=0.98)


@pytest.fixture(scope="module")
def demo_prober_traffic(demo_state) -> list[tuple[str, list[str], np.ndarray, np.ndarray]]:
    """The demo's traffic (its rate, 4 normal clients, the probing client at a 5 % share), clean phases only:
    (model, client ids, ts_ms, float16 penultimate embeddings) per request, in send order."""
    from streams.demo import DEFAULT_RATE
    from workers.inference.models import MODEL_NAMES, load_demo_models
    from workers.inference.traffic import _plan, parse_phases

    models = load_demo_models(demo_state, progress=False)
    plan = _plan(parse_phases("clean:56"), DEFAULT_RATE, list(MODEL_NAMES), 4, True, 0.05, 4, {}, seed=0)
    embedded = {}
    for name in MODEL_NAMES:  # one forward pass per model, split back into requests
        reqs = [r for r in plan if r.model == name]
        _, layers = models[name].predict(np.concatenate([r.x for r in reqs]))
        cuts = np.cumsum([len(r.truth) for r in reqs])[:-1]
        embedded.update(zip(map(id, reqs), np.split(layers["penultimate"].astype(np.float16), cuts)))
    return [(r.model, [r.client] * len(r.truth), np.full(len(r.truth), 1_700_000_000_000 + int(r.at * 1000)),
             embedded[id(r)]) for r in plan]


@pytest.mark.parametrize("sketch_dim", [64, 32])  # 64: the demo's 64-d embeddings as they are; 32 (default): projected
def test_same_throttle_decisions_as_the_per_client_detector_on_the_demo_prober(demo_prober_traffic,
                                                                               sketch_dim: int) -> None:
    from tests.workers.probing_reference import ProbingDetector as PerClient

    traffic = demo_prober_traffic
    old: dict[str, PerClient] = {}
    new: dict[str, ProbingDetector] = {}
    decisions_old, decisions_new = [], []
    for model, ids, ts, emb in traffic:
        a = old.setdefault(model, PerClient()).update(ids, ts, emb)
        b = new.setdefault(model, ProbingDetector(sketch_dim=sketch_dim)).update(ids, ts, emb)
        decisions_old += [(model, h.client_id, h.ts_ms, h.count) for h in a]
        decisions_new += [(model, h.client_id, h.ts_ms, h.count) for h in b]
    assert decisions_old, "the demo's prober must be throttled at all for the comparison to mean anything"
    assert {c for _, c, _, _ in decisions_old} == {"prober-0"}
    assert decisions_new == decisions_old



def test_read_only_float32_embeddings_of_the_sketch_width_are_accepted() -> None:
    """Decoded batches are read-only views of the record's bytes; at the sketch width they are used as they are."""
    rng = np.random.default_rng(9)
    emb = _probe(rng, 30)[:, :32].astype(np.float32)
    emb.flags.writeable = False
    hits = ProbingDetector(min_queries=20).update(["m"] * 30, np.arange(30), emb)
    assert [(h.client_id, h.count) for h in hits] == [("m", 20)]
