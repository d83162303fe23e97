"""Hopping windows, reservoirs and the coalescer (workers/windows.py): pure, fast, seeded."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

import workers.windows as W
from workers.windows import (
    ClosedWindow,
    Coalescer,
    Reservoir,
    WindowManager,
    merge_windows,
    window_id,
    window_starts,
)

KEY = ("cnn", "1")


def _chi2_ok(counts: np.ndarray, expected: float, z: float = 4.0) -> bool:
    """Pearson chi-square goodness of fit to a flat expectation, within z standard deviations."""
    k = counts.size
    stat = float(((counts - expected) ** 2 / expected).sum())
    return abs(stat - (k - 1)) < z * math.sqrt(2 * (k - 1))


def test_doctests() -> None:
    result = doctest.testmod(W)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("size,step", [(10_000, 5_000), (10_000, 3_000), (4_000, 4_000), (3_000, 5_000), (10, 1)])
def test_window_starts_matches_brute_force(size: int, step: int) -> None:
    rng = np.random.default_rng(1)
    ts = rng.integers(-50_000, 50_000, size=300)
    rows, starts = window_starts(ts, size, step)
    got = {(int(r), int(s)) for r, s in zip(rows, starts)}
    want = set()
    for i, t in enumerate(ts.tolist()):
        for k in range(t // step - size // step - 2, t // step + 1):
            if k * step <= t < k * step + size:
                want.add((i, k * step))
    assert got == want
    assert len(got) == rows.size  # no duplicates


def test_window_starts_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        window_starts(np.array([1]), 0, 5)


def test_window_id_is_readable_and_deterministic() -> None:
    assert window_id("cnn", "1", 1732612800000, 1732612810000) == "cnn@1:1732612800000-1732612810000"
    assert window_id("cnn", "1", 1, 2, trigger="count") != window_id("cnn", "1", 1, 2)


# --------------------------------------------------------------------------- reservoir


def _rows(lo: int, hi: int) -> tuple[dict[str, np.ndarray], list[str]]:
    idx = np.arange(lo, hi)
    cols = {"a": np.stack([idx, -idx], axis=1).astype(np.float32), "b": idx.astype(np.int64)}
    return cols, [f"e{i}" for i in idx]


def test_reservoir_keeps_rows_aligned_and_bounded() -> None:
    r = Reservoir(50, np.random.default_rng(0))
    for lo in range(0, 1000, 137):
        r.add(*_rows(lo, min(lo + 137, 1000)))
    cols, ids = r.snapshot()
    assert r.seen == 1000 and len(r) == 50 and ids.shape == (50,)
    assert cols["a"].shape == (50, 2)
    idx = np.array([int(e[1:]) for e in ids])
    assert (cols["b"] == idx).all() and (cols["a"][:, 0] == idx).all() and (cols["a"][:, 1] == -idx).all()
    assert np.unique(idx).size == 50


def test_reservoir_duplicate_slots_last_write_wins() -> None:
    class FixedDraws:
        """Stands in for the generator: the slot draws of a hand-checked sequential run."""

        def integers(self, low: int, high: np.ndarray) -> np.ndarray:
            assert high.tolist() == [3, 4, 5]  # rows 2, 3, 4 draw from [0, i]
            return np.array([0, 0, 1])

    r = Reservoir(2, FixedDraws())  # type: ignore[arg-type]
    r.add(*_rows(0, 5))
    # sequential Algorithm R: row 2 -> slot 0, row 3 -> slot 0 (overwrites), row 4 -> slot 1
    assert r.snapshot()[1].tolist() == ["e3", "e4"]


@pytest.mark.parametrize("batch", [1, 7, 100])
def test_reservoir_sample_is_uniform(batch: int) -> None:
    rng = np.random.default_rng(42)
    n, cap, trials = 100, 10, {1: 400, 7: 1200, 100: 3000}[batch]
    counts = np.zeros(n)
    for _ in range(trials):
        r = Reservoir(cap, rng)
        for lo in range(0, n, batch):
            r.add({"b": np.arange(lo, min(lo + batch, n))}, np.arange(lo, min(lo + batch, n)).astype(str))
        counts[r.snapshot()[0]["b"]] += 1
    assert counts.sum() == trials * cap
    assert _chi2_ok(counts, trials * cap / n)


def test_reservoir_capacity_one_is_uniform_within_one_batch() -> None:
    # every row after the first competes for slot 0: a wrong duplicate rule would favour early rows
    rng = np.random.default_rng(7)
    n, trials = 20, 4000
    counts = np.zeros(n)
    for _ in range(trials):
        r = Reservoir(1, rng)
        r.add({"b": np.arange(n)}, np.arange(n).astype(str))
        counts[r.snapshot()[0]["b"][0]] += 1
    assert _chi2_ok(counts, trials / n)


def test_reservoir_rejects_misaligned_or_changed_columns() -> None:
    r = Reservoir(5)
    with pytest.raises(ValueError, match="rows"):
        r.add({"a": np.zeros(3)}, ["x", "y"])
    r.add({"a": np.zeros(2)}, ["x", "y"])
    with pytest.raises(ValueError, match="differ"):
        r.add({"z": np.zeros(2)}, ["x", "y"])


def test_reservoir_merge_is_weighted_by_seen() -> None:
    rng = np.random.default_rng(3)
    from_a = []
    counts = np.zeros(1000)
    for _ in range(300):
        a, b = Reservoir(100, rng), Reservoir(100, rng)
        a.add({"b": np.arange(900)}, np.arange(900).astype(str))
        b.add({"b": np.arange(900, 1000)}, np.arange(900, 1000).astype(str))
        m = a.merge(b)
        vals = m.snapshot()[0]["b"]
        assert m.seen == 1000 and len(m) == 100
        from_a.append((vals < 900).mean())
        counts[vals] += 1
    assert abs(np.mean(from_a) - 0.9) < 0.01
    # every event of the union equally likely (B's 100 events are not over-represented)
    assert abs(counts[900:].mean() - counts[:900].mean()) < 0.1 * counts.mean()


def test_reservoir_merge_deduplicates_shared_events() -> None:
    a, b = Reservoir(10), Reservoir(10)
    a.add({"b": np.arange(0, 8)}, [f"e{i}" for i in range(0, 8)])
    b.add({"b": np.arange(4, 12)}, [f"e{i}" for i in range(4, 12)])
    m = a.merge(b, capacity=20)
    cols, ids = m.snapshot()
    assert sorted(ids.tolist(), key=lambda s: int(s[1:])) == [f"e{i}" for i in range(12)]
    assert (cols["b"] == np.array([int(s[1:]) for s in ids])).all()


# --------------------------------------------------------------------------- window manager


def _batch(ts: np.ndarray, dims: dict[str, int] | None = None) -> tuple:
    """Event ids, predicted and layers that all encode the event's timestamp, to check alignment."""
    dims = dims or {"pen": 4, "conv": 3}
    ids = [f"ev{t}" for t in ts.tolist()]
    pred = (ts % 10).astype(np.int32)
    layers = {name: np.repeat(ts[:, None].astype(np.float64), d, axis=1) + np.arange(d) for name, d in dims.items()}
    return ids, pred, layers


def _check_aligned(w: ClosedWindow) -> np.ndarray:
    ts = np.array([int(e[2:]) for e in w.event_ids])
    assert (w.predicted == ts % 10).all()
    assert (w.ts_ms == ts).all()
    for mat in w.layers.values():
        assert mat.dtype == np.float32
        assert np.allclose(mat[:, 0], ts) and np.allclose(mat - mat[:, :1], np.arange(mat.shape[1]))
    return ts


def test_windows_contain_exactly_their_events_across_batches() -> None:
    wm = WindowManager(size_s=10, step_s=5, capacity=10_000, min_samples=1, count_trigger=0, lateness_s=1)
    rng = np.random.default_rng(0)
    all_ts = np.sort(rng.choice(np.arange(100_000, 160_000), size=2000, replace=False))
    out: list[ClosedWindow] = []
    for chunk in np.array_split(all_ts, 37):
        chunk = rng.permutation(chunk)  # unordered within a batch
        out += wm.add(KEY, chunk, *_batch(chunk))
    out += wm.close_idle(10**13)
    assert wm.late_events == 0
    starts = [w.start_ms for w in out]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    for w in out:
        ts = _check_aligned(w)
        want = all_ts[(all_ts >= w.start_ms) & (all_ts < w.end_ms)]
        assert sorted(ts.tolist()) == want.tolist() and w.n_events == want.size
        assert w.end_ms - w.start_ms == 10_000 and w.trigger == "time"
        assert w.window_id == window_id("cnn", "1", w.start_ms, w.end_ms)
    # every event is in the two windows that contain it
    assert sum(w.n_events for w in out) == 2 * all_ts.size


def test_windows_close_on_watermark_plus_lateness_only() -> None:
    wm = WindowManager(size_s=10, step_s=5, capacity=100, min_samples=1, count_trigger=0, lateness_s=2)
    assert wm.add(KEY, np.array([1_000]), *_batch(np.array([1_000]))) == []
    assert wm.open_windows(KEY) == [(-5_000, 5_000), (0, 10_000)]
    assert wm.add(KEY, np.array([6_999]), *_batch(np.array([6_999]))) == []  # 5 000 + 2 000 > 6 999
    closed = wm.add(KEY, np.array([7_000]), *_batch(np.array([7_000])))
    assert [(w.start_ms, w.end_ms, w.n_events) for w in closed] == [(-5_000, 5_000, 1)]
    assert wm.watermark(KEY) == 7_000 and wm.open_windows(KEY) == [(0, 10_000), (5_000, 15_000)]


def test_close_idle_uses_the_wall_clock() -> None:
    wm = WindowManager(size_s=10, step_s=5, capacity=100, min_samples=1, count_trigger=0, lateness_s=1)
    ts = np.array([12_000, 13_000])
    wm.add(KEY, ts, *_batch(ts))
    assert wm.close_idle(15_999) == []  # [5000, 15000) closes at 16 000
    assert [w.start_ms for w in wm.close_idle(16_000)] == [5_000]
    assert [w.start_ms for w in wm.close_idle(21_000)] == [10_000]
    assert wm.open_windows(KEY) == []


def test_late_events_are_counted_and_kept_out_of_closed_windows() -> None:
    wm = WindowManager(size_s=10, step_s=5, capacity=100, min_samples=1, count_trigger=0, lateness_s=0)
    ts = np.arange(0, 21_000, 1_000)
    closed = wm.add(KEY, ts, *_batch(ts))
    assert [w.start_ms for w in closed] == [-5_000, 0, 5_000, 10_000]  # watermark 20 000
    late = np.array([2_500, 12_500, 17_500])
    out = wm.add(KEY, late, *_batch(late))
    # 2 500 and 12 500 fall only in closed windows; 17 500 in closed [10000, 20000) and open [15000, 25000)
    assert wm.late_events == 3 and wm.late_by_key() == {KEY: 3}
    assert out == []
    rest = wm.close_idle(10**13)
    w15 = next(w for w in rest if w.start_ms == 15_000)
    assert "ev17500" in w15.event_ids.tolist() and "ev12500" not in w15.event_ids.tolist()
    assert all("ev2500" not in w.event_ids.tolist() for w in rest)


def test_open_windows_and_samples_stay_bounded() -> None:
    wm = WindowManager(size_s=10, step_s=2, capacity=64, min_samples=1, count_trigger=0, lateness_s=1, seed=5)
    bound = math.ceil((10 + 1) / 2) + 1
    t0 = 1_732_612_800_000
    n_closed = 0
    for i in range(200):
        ts = t0 + i * 500 + np.arange(0, 500, 2)  # 500 events/s
        for w in wm.add(KEY, ts, *_batch(ts)):
            assert w.n_samples == 64 and len(set(w.event_ids.tolist())) == 64
            if w.start_ms >= t0:  # windows starting before the traffic are partly empty
                assert w.n_events == 5000
                n_closed += 1
        assert len(wm.open_windows(KEY)) <= bound
    assert n_closed > 40


def test_under_filled_windows_become_count_windows_each_event_once() -> None:
    wm = WindowManager(size_s=10, step_s=5, capacity=500, min_samples=50, count_trigger=40, lateness_s=0)
    ts = np.arange(0, 200_000, 1_000)  # 1 event/s: 10 per window, far below min_samples
    out: list[ClosedWindow] = []
    for chunk in np.array_split(ts, 20):
        out += wm.add(KEY, chunk, *_batch(chunk))
    assert out and all(w.trigger == "count" for w in out)
    seen: list[int] = []
    for w in out:
        got = _check_aligned(w)
        assert w.n_events == w.n_samples >= 40
        assert (w.start_ms, w.end_ms) == (got.min(), got.max())
        assert w.window_id.endswith("#count")
        seen += got.tolist()
    assert len(seen) == len(set(seen))  # overlapping hopping windows do not duplicate events
    assert seen == sorted(seen) and seen[0] == 0


def test_under_filled_windows_are_dropped_without_count_trigger() -> None:
    wm = WindowManager(size_s=10, step_s=5, capacity=100, min_samples=50, count_trigger=0, lateness_s=0)
    ts = np.arange(0, 100_000, 1_000)
    assert wm.add(KEY, ts, *_batch(ts)) == []
    assert wm.dropped_windows > 10


def test_keys_are_independent_and_runs_reproducible() -> None:
    def run(seed: int) -> list[tuple]:
        wm = WindowManager(size_s=4, step_s=2, capacity=16, min_samples=1, count_trigger=0, lateness_s=0, seed=seed)
        out = []
        for i in range(10):
            ts = np.arange(i * 1000, (i + 1) * 1000, 10)
            out += wm.add(("a", "1"), ts, *_batch(ts))
            out += wm.add(("b", "2"), ts + 50_000, *_batch(ts + 50_000))
        return [(w.window_id, tuple(w.event_ids.tolist())) for w in out]

    first = run(0)
    assert first == run(0) and first != run(1)
    assert {wid.split(":")[0] for wid, _ in first} == {"a@1", "b@2"}


def test_layer_set_change_is_rejected() -> None:
    wm = WindowManager(size_s=10, step_s=5, capacity=100, min_samples=1, count_trigger=0)
    ts = np.array([1_000])
    wm.add(KEY, ts, *_batch(ts))
    with pytest.raises(ValueError, match="differ"):
        wm.add(KEY, ts + 1, *_batch(ts + 1, {"other": 2}))


# --------------------------------------------------------------------------- coalescer


def _window(start: int, ids: list[str], n_events: int | None = None, key: tuple[str, str] = KEY) -> ClosedWindow:
    n = len(ids)
    vals = np.array([float(i[1:]) for i in ids], dtype=np.float32)
    return ClosedWindow(
        window_id(key[0], key[1], start, start + 10_000), key[0], key[1], start, start + 10_000,
        n if n_events is None else n_events, np.array(ids, dtype=object), vals.astype(np.int32) % 7,
        {"pen": np.repeat(vals[:, None], 3, axis=1), "conv": vals[:, None] * 2}, "time",
        np.full(n, start, np.int64),
    )


def test_coalescer_merges_pending_windows_of_a_key() -> None:
    c = Coalescer(capacity=50, seed=0)
    assert c.put(_window(0, [f"a{i}" for i in range(40)])) is False
    assert c.put(_window(0, [f"x{i}" for i in range(5)], key=("other", "1"))) is False
    assert c.put(_window(5_000, [f"b{i}" for i in range(40)])) is True
    assert c.put(_window(10_000, [f"c{i}" for i in range(40)])) is True
    assert len(c) == 2 and c.coalesced == {KEY: 2}
    m = c.pop_any()
    assert m is not None and m.key == KEY  # the key that waited longest
    assert (m.start_ms, m.end_ms, m.n_events, m.merged) == (0, 20_000, 120, 3)
    assert m.window_id == "cnn@1:0-20000" and m.n_samples == 50
    vals = m.layers["pen"][:, 0]
    assert np.allclose(m.layers["conv"][:, 0], 2 * vals) and (m.predicted == vals.astype(np.int32) % 7).all()
    assert {e[0] for e in m.event_ids} == {"a", "b", "c"}
    other = c.pop_any()
    assert other is not None and other.key == ("other", "1") and c.pop_any() is None and len(c) == 0


def test_merge_windows_weights_by_n_events() -> None:
    rng = np.random.default_rng(0)
    shares = []
    for _ in range(200):
        big = _window(0, [f"a{i}" for i in range(100)], n_events=900)
        small = _window(5_000, [f"b{i}" for i in range(100)], n_events=100)
        m = merge_windows(big, small, capacity=100, rng=rng)
        shares.append(np.mean([e[0] == "a" for e in m.event_ids]))
    assert abs(np.mean(shares) - 0.9) < 0.01


def test_merge_windows_rejects_other_keys() -> None:
    with pytest.raises(ValueError):
        merge_windows(_window(0, ["a1"]), _window(0, ["b1"], key=("x", "1")))
