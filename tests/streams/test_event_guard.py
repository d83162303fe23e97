"""The event guard (pure): future event times clamped to the record's time, layer-shape changes refused.

The windows test replays the issue's scenario without services: two identical streams, one
with an event dated a day ahead; with the guard both models get the same windows, without
it the poisoned one stops (which is what the guard is for).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from schemas import PredictionBatch, encode_batch
from schemas.codec import CodecError, Limits
from streams.event_guard import EventGuard, record_time_ms
from streams.ingest import decode_records
from workers.windows import WindowManager

DAY_MS = 86_400_000


def batch(model: str = "cnn", ts: list[int] | np.ndarray = (1_000,), dim: int = 4, role: str = "live",
          version: str = "1", layers: tuple[str, ...] = ("penultimate",)) -> PredictionBatch:
    ts = np.asarray(ts, np.int64)
    n = ts.size
    return PredictionBatch.build(model, [f"{model}-{t}-{i}" for i, t in enumerate(ts)],
                                 np.full((n, 3), 1 / 3, np.float32),
                                 {name: np.ones((n, dim), np.float32) for name in layers},
                                 ts_ms=ts, role=role, model_version=version)


def test_future_times_are_clamped_to_the_record_time_capped_by_the_clock() -> None:
    seen: list[tuple[str, int]] = []
    g = EventGuard(max_skew_s=5, on_clamped=lambda m, n: seen.append((m, n)))
    b = batch(ts=[10_000, 14_000, 15_000, 15_001, 10_000 + DAY_MS, 1])
    out = g.check(b, record_ms=10_000, now_ms=20_000)
    assert out.ts_ms.tolist() == [10_000, 14_000, 15_000, 10_000, 10_000, 1]  # past times are never touched
    assert b.ts_ms[3] == 15_001 and out is not b  # the decoded batch is not mutated
    assert seen == [("cnn", 2)] and g.clamped == {"cnn": 2}
    # a record stamped in the future is capped by the worker's clock; no record time: the clock
    assert g.check(batch(ts=[DAY_MS]), record_ms=2 * DAY_MS, now_ms=50_000).ts_ms.tolist() == [50_000]
    assert g.check(batch(ts=[DAY_MS]), record_ms=None, now_ms=50_000).ts_ms.tolist() == [50_000]
    assert g.check(batch(ts=[DAY_MS]), record_ms=-1, now_ms=50_000).ts_ms.tolist() == [50_000]
    untouched = batch(ts=[10_000, 12_000])
    assert g.check(untouched, record_ms=10_000, now_ms=20_000) is untouched
    assert record_time_ms(1.5, seconds=True) == 1500 and record_time_ms(-1) is None and record_time_ms(None) is None


def test_a_layer_width_change_within_a_model_version_is_refused_with_the_reason() -> None:
    g = EventGuard()
    g.check(batch(dim=16), now_ms=1_000)
    with pytest.raises(CodecError, match=r"^layers: layer penultimate has dim 32, model cnn@1 has 16; "
                                         r"publish a new model_version$"):
        g.check(batch(dim=32), now_ms=1_000)
    with pytest.raises(CodecError, match="has dim 32"):
        g.check(batch(dim=32, role="reference"), now_ms=1_000)
    g.check(batch(dim=32, version="2"), now_ms=1_000)  # a new version may change shape
    g.check(batch(model="other", dim=32), now_ms=1_000)
    g.check(batch(dim=16), now_ms=1_000)  # the old shape still passes
    with pytest.raises(CodecError, match=r"layers conv1, penultimate differ from penultimate of model cnn@1"):
        g.check(batch(dim=16, layers=("penultimate", "conv1")), now_ms=1_000)


def test_model_versions_past_the_bound_are_forgotten_oldest_first() -> None:
    g = EventGuard(max_models=2)
    for model in ("a", "b", "c"):
        g.check(batch(model=model, dim=4), now_ms=1)
    g.check(batch(model="a", dim=8), now_ms=1)  # "a" was evicted: its width is learned again
    with pytest.raises(CodecError):
        g.check(batch(model="c", dim=8), now_ms=1)


def test_decode_records_dead_letters_a_shape_change_and_clamps_times() -> None:
    g = EventGuard(max_skew_s=5)
    now = int(time.time() * 1000) - 60_000  # record timestamps a minute old: the worker's clock is later
    records = [(encode_batch(batch(ts=[now - 10], dim=16)), "t", 0, 0, now),
               (encode_batch(batch(ts=[now + DAY_MS], dim=16)), "t", 0, 1, now),
               (encode_batch(batch(ts=[now], dim=32)), "t", 0, 2, now),
               (encode_batch(batch(ts=[now + DAY_MS], dim=16)), "t", 0, 3)]  # no record timestamp: the clock
    good, dead = decode_records(records, Limits(), None, g)
    assert [d.offset for d in good] == [0, 1, 3] and good[1].batch.ts_ms.tolist() == [now]
    assert now + 60_000 <= good[2].batch.ts_ms[0] < now + 2 * 60_000
    assert [(d["offset"], d["reason"]) for d in dead] == [
        (2, "layers: layer penultimate has dim 32, model cnn@1 has 16; publish a new model_version")]
    assert decode_records(records[:1], Limits())[0][0].batch.ts_ms.tolist() == [now - 10]  # no guard: as before


def _windows_per_model(guard: EventGuard | None) -> dict[str, list[str]]:
    """Two identical real-time streams (a record per 200 ms of events), one event a day ahead on 'a'."""
    wm = WindowManager(size_s=2, step_s=1, capacity=64, min_samples=10, count_trigger=0)
    tested: dict[str, list[str]] = {"a": [], "b": []}
    t0 = 1_800_000_000_000
    for i in range(60):
        ts = t0 + i * 200 + np.arange(10) * 20
        record_ms = int(ts.max())
        for model in ("a", "b"):
            items = [batch(model=model, ts=ts)]
            if model == "a" and i == 20:
                items.append(batch(model="a", ts=[record_ms + DAY_MS]))
            for b in items:
                if guard is not None:
                    b = guard.check(b, record_ms=record_ms, now_ms=record_ms + 50)
                for w in wm.add((b.model_id, "1"), b.ts_ms, b.event_ids, b.predicted, b.layers):
                    tested[model].append(w.window_id.split("@", 1)[1])
    return tested


def test_an_event_a_day_ahead_leaves_every_window_of_its_model() -> None:
    guarded = _windows_per_model(EventGuard(max_skew_s=5))
    assert len(guarded["b"]) >= 9 and guarded["a"] == guarded["b"]
    blind = _windows_per_model(None)
    assert blind["b"] == guarded["b"] and len(blind["a"]) < len(blind["b"]) - 3  # what the guard prevents
