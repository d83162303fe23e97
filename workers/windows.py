"""Hopping windows of layer activations per (model_id, model_version), each a uniform reservoir sample.

Pure window arithmetic and sampling, no I/O: the drift agent feeds decoded micro-batches in
and gets closed windows out, ready for the MMD engine. Everything works on whole batches
with numpy (boolean masks per window, one vectorised reservoir update per window); the only
Python loops run over the few windows a batch touches.

Why these choices:

- One window per key holds *all* tapped layers of an event together, so a combined
  multi-layer test compares the same events on every layer.
- A reservoir keeps at most ``capacity`` rows per window whatever the traffic, and is a
  uniform sample of the events offered (Algorithm R), so the MMD test sees an unbiased
  sample of the window.
- Windows close on event time (the per-key watermark, the largest ts seen) plus a lateness
  allowance, and on wall-clock time (:meth:`WindowManager.close_idle`) so the last window
  is tested when traffic stops. Faust's own windowed tables are not used: they republish
  the whole value on every update and drop late windows (see docs/architecture.md).
- Slow models that never fill ``min_samples`` in one window are tested on a count window
  once ``count_trigger`` events have accumulated.
- :class:`Coalescer` merges windows waiting for a test when the tests fall behind, so the
  backlog never grows without bound.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

WindowKey = tuple[str, str]
"""(model_id, model_version): every layer of a model version shares one window."""

TRIGGERS = ("time", "count")

_NEVER = -(2**62)  # "before any timestamp" sentinel (plain int, no overflow in arithmetic)
_LAYER = "layer:"  # prefix of layer columns inside a reservoir (keeps them apart from ts_ms, predicted)


# --------------------------------------------------------------------------- arithmetic


def window_starts(ts_ms: np.ndarray | Sequence[int], size_ms: int, step_ms: int) -> tuple[np.ndarray, np.ndarray]:
    """The hopping windows ``[k*step, k*step + size)`` containing each timestamp, as flat pairs.

    Returns ``(rows, starts)``: ``starts[i]`` is the start (ms) of one window containing
    ``ts_ms[rows[i]]``. A timestamp lies in ``ceil(size/step)`` windows when step divides
    size, possibly fewer otherwise (none when ``step > size`` and it falls in a gap). Pairs
    come grouped by row, newest window first. Vectorised: one (n, ceil(size/step)) candidate
    matrix, no loop over events.

    Example:
        >>> rows, starts = window_starts(np.array([0, 7_000, 12_000]), 10_000, 5_000)
        >>> rows.tolist(), starts.tolist()
        ([0, 0, 1, 1, 2, 2], [0, -5000, 5000, 0, 10000, 5000])
    """
    if size_ms <= 0 or step_ms <= 0:
        raise ValueError(f"window size and step must be positive, got size={size_ms} step={step_ms}")
    ts = np.asarray(ts_ms, dtype=np.int64).ravel()
    per_ts = -(-int(size_ms) // int(step_ms))
    newest = (ts // step_ms) * step_ms  # floor division: also right for negative timestamps
    starts = newest[:, None] - np.arange(per_ts, dtype=np.int64)[None, :] * step_ms
    inside = starts + size_ms > ts[:, None]
    rows = np.broadcast_to(np.arange(ts.size, dtype=np.int64)[:, None], starts.shape)
    return rows[inside], starts[inside]


def window_id(model_id: str, model_version: str, start_ms: int, end_ms: int, trigger: str = "time") -> str:
    """A deterministic, readable window id: ``model@version:start-end`` (epoch ms).

    The same window gets the same id after a replay, so the idempotent ClickHouse tables
    collapse the duplicate results. Count windows get a ``#count`` suffix so they never
    collide with a time window of the same span.

    Example:
        >>> window_id("cnn", "1", 1732612800000, 1732612810000)
        'cnn@1:1732612800000-1732612810000'
        >>> window_id("cnn", "1", 5, 90, trigger="count")
        'cnn@1:5-90#count'
    """
    base = f"{model_id}@{model_version}:{int(start_ms)}-{int(end_ms)}"
    return base if trigger == "time" else f"{base}#{trigger}"


# --------------------------------------------------------------------------- reservoir


class Reservoir:
    """A uniform sample (Algorithm R) of at most ``capacity`` rows of several aligned arrays.

    Columns are any arrays with the rows on axis 0 (layer matrices, predicted class, ts);
    event ids travel alongside. :meth:`add` takes a whole batch at once: rows that fit are
    copied into free slots, every later row ``i`` (0-based over all rows offered) draws its
    slot ``j ~ U{0..i}`` in one vectorised call on the injected generator and replaces slot
    ``j`` when ``j < capacity``. When several rows of a batch draw the same slot the last
    one wins, exactly as in the sequential algorithm (done explicitly, not by relying on
    numpy's unspecified order of duplicate fancy-index writes).

    Example:
        >>> r = Reservoir(3, np.random.default_rng(0))
        >>> r.add({"x": np.arange(10.0)[:, None]}, [f"e{i}" for i in range(10)])
        >>> r.seen, len(r)
        (10, 3)
        >>> cols, ids = r.snapshot()
        >>> cols["x"].shape, ids.shape
        ((3, 1), (3,))
    """

    def __init__(self, capacity: int, rng: np.random.Generator | None = None,
                 dtypes: Mapping[str, np.dtype] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.dtypes = dict(dtypes or {})  # storage dtype per column (default: the first batch's dtype)
        self._seen = 0
        self._size = 0
        self._cols: dict[str, np.ndarray] | None = None
        self._ids = np.empty(self.capacity, dtype=object)

    @property
    def seen(self) -> int:
        """How many rows were offered (the population the sample is uniform over)."""
        return self._seen

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the stored columns (empty before the first add)."""
        return tuple(self._cols) if self._cols is not None else ()

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        """Bytes of the sample's arrays (allocated at capacity on the first add)."""
        return sum(v.nbytes for v in (self._cols or {}).values()) + self._ids.nbytes

    def _check(self, columns: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        cols = {name: np.asarray(v) for name, v in columns.items()}
        for name, v in cols.items():
            if v.shape[0] != n:
                raise ValueError(f"column {name!r} has {v.shape[0]} rows, event_ids has {n}")
        if self._cols is None:
            self._cols = {name: np.empty((self.capacity,) + v.shape[1:], dtype=self.dtypes.get(name, v.dtype))
                          for name, v in cols.items()}
        elif set(cols) != set(self._cols):
            raise ValueError(f"columns {sorted(cols)} differ from the reservoir's {sorted(self._cols)}")
        return cols

    def add(self, columns: Mapping[str, np.ndarray], event_ids: Sequence[str] | np.ndarray,
            rows: np.ndarray | None = None) -> None:
        """Offer a batch of rows; afterwards the sample is uniform over all rows ever offered.

        ``rows`` (indices into the columns) offers only those rows, in that order. Only
        the rows that land in the sample are copied (and converted to the storage dtype):
        once the reservoir is full that is a handful per batch, not the whole batch.
        """
        ids = np.asarray(event_ids, dtype=object).ravel()
        cols = self._check(columns, ids.shape[0])
        src = None if rows is None else np.asarray(rows, dtype=np.int64).ravel()
        n = ids.shape[0] if src is None else src.shape[0]
        if n == 0:
            return
        assert self._cols is not None
        cap, seen = self.capacity, self._seen
        fill = max(0, min(n, cap - seen))  # rows that go straight into free slots
        if fill:
            dst = slice(seen, seen + fill)
            take = slice(0, fill) if src is None else src[:fill]
            for name, v in cols.items():
                self._cols[name][dst] = v[take]
            self._ids[dst] = ids[take]
        if fill < n:
            # row i (global index seen+i) draws j in [0, seen+i]; j < cap replaces slot j
            highs = seen + np.arange(fill, n, dtype=np.int64) + 1
            slots = self.rng.integers(0, highs)
            picked = np.flatnonzero(slots < cap) + fill
            slots = slots[picked - fill]
            if picked.size:
                # last write wins on a shared slot, as in the sequential algorithm
                _, last = np.unique(slots[::-1], return_index=True)
                pick = picked.size - 1 - last
                picked, slots = picked[pick], slots[pick]
                take = picked if src is None else src[picked]
                for name, v in cols.items():
                    self._cols[name][slots] = v[take]
                self._ids[slots] = ids[take]
        self._seen = seen + n
        self._size = min(cap, self._seen)

    def snapshot(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Copies of the sampled rows: ``(columns, event_ids)`` (event ids as an object array)."""
        k = self._size
        cols = {name: v[:k].copy() for name, v in (self._cols or {}).items()}
        return cols, self._ids[:k].copy()

    @classmethod
    def from_sample(
        cls,
        columns: Mapping[str, np.ndarray],
        event_ids: Sequence[str] | np.ndarray,
        seen: int,
        capacity: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> "Reservoir":
        """Wrap an existing uniform sample of ``seen`` events (e.g. a closed window) as a reservoir.

        A sample smaller than ``min(seen, capacity)`` cannot grow into a larger uniform
        sample, so the capacity then shrinks to the sample's size.
        """
        ids = np.asarray(event_ids, dtype=object).ravel()
        k = ids.shape[0]
        if seen < k:
            raise ValueError(f"a sample of {k} rows cannot come from {seen} events")
        cap = max(1, capacity if capacity is not None else k)
        if k < min(seen, cap):
            cap = max(1, k)
        if k > cap:
            raise ValueError(f"sample of {k} rows exceeds capacity {cap}")
        r = cls(cap, rng)
        r._check(columns, k)
        assert r._cols is not None
        for name, v in columns.items():
            r._cols[name][:k] = np.asarray(v)
        r._ids[:k] = ids
        r._seen, r._size = int(seen), k
        return r

    def merge(self, other: "Reservoir", capacity: int | None = None) -> "Reservoir":
        """A reservoir that is a uniform sample of the union of both populations.

        Each side contributes in proportion to its ``seen``: the count taken from ``self``
        is hypergeometric (exactly how many of a uniform k-subset of the union would come
        from it), then rows are drawn without replacement on each side. Events present in
        both samples (overlapping hopping windows) are kept once, and the gap is topped up
        with other rows; ``seen`` of the result counts offers, so such an event counts twice.
        The result uses ``self.rng`` and ``capacity`` (default: the larger capacity).
        """
        k = int(capacity if capacity is not None else max(self.capacity, other.capacity))
        if self._cols is not None and other._cols is not None and set(self._cols) != set(other._cols):
            raise ValueError(f"cannot merge reservoirs with columns {sorted(self._cols)} and {sorted(other._cols)}")
        ca_cols, a_ids = self.snapshot()
        cb_cols, b_ids = other.snapshot()
        la, lb = a_ids.size, b_ids.size
        na, nb = self._seen, other._seen
        if la + lb == 0:
            out = Reservoir(k, self.rng)
            out._seen = na + nb
            return out
        names = list(ca_cols or cb_cols)
        take = min(k, na + nb)
        ca = int(self.rng.hypergeometric(na, nb, take)) if na and nb else (take if na else 0)
        ca = min(ca, la)
        cb = min(take - ca, lb)
        ca = min(la, take - cb)  # give a short side's slots back to the other side
        pa, pb = self.rng.permutation(la), la + self.rng.permutation(lb)
        rest = self.rng.permutation(np.concatenate([pa[ca:], pb[cb:]]))
        order = np.concatenate([pa[:ca], pb[:cb], rest]).astype(np.int64)
        all_ids = np.concatenate([a_ids, b_ids])
        _, first = np.unique(all_ids[order].astype(str), return_index=True)
        keep = order[np.sort(first)][: ca + cb]
        merged = {n: np.concatenate([c[n] for c in (ca_cols, cb_cols) if n in c])[keep] for n in names}
        return Reservoir.from_sample(merged, all_ids[keep], seen=na + nb, capacity=k, rng=self.rng)


# --------------------------------------------------------------------------- closed windows


@dataclass
class ClosedWindow:
    """A window ready for a two-sample test: a uniform sample of its events, all layers aligned.

    ``n_events`` counts the events offered to the window; the arrays hold the sample
    (at most the reservoir capacity rows). ``trigger`` is ``"time"`` for a hopping window
    closed by the watermark or the wall clock, ``"count"`` for a count window of a slow
    model. ``merged`` is how many windows a :class:`Coalescer` folded into this one.
    """

    window_id: str
    model_id: str
    model_version: str
    start_ms: int
    end_ms: int
    n_events: int
    event_ids: np.ndarray
    predicted: np.ndarray
    layers: dict[str, np.ndarray]
    trigger: str = "time"
    ts_ms: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    merged: int = 1
    client_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))

    @property
    def key(self) -> WindowKey:
        return (self.model_id, self.model_version)

    @property
    def n_samples(self) -> int:
        """Rows in the sample (<= n_events)."""
        return int(len(self.event_ids))


def _window_from(key: WindowKey, start: int, end: int, res: Reservoir, trigger: str, merged: int = 1) -> ClosedWindow:
    cols, ids = res.snapshot()
    layers = {n[len(_LAYER):]: v.astype(np.float32, copy=False) for n, v in cols.items() if n.startswith(_LAYER)}
    return ClosedWindow(
        window_id=window_id(key[0], key[1], start, end, trigger),
        model_id=key[0],
        model_version=key[1],
        start_ms=int(start),
        end_ms=int(end),
        n_events=res.seen,
        event_ids=ids,
        predicted=cols.get("predicted", np.empty(0, np.int32)).astype(np.int32, copy=False),
        layers=layers,
        trigger=trigger,
        ts_ms=cols.get("ts_ms", np.empty(0, np.int64)).astype(np.int64, copy=False),
        merged=merged,
        client_ids=cols.get("client_id", np.empty(0, dtype=object)),
    )


def _reservoir_of(w: ClosedWindow, capacity: int | None, rng: np.random.Generator) -> Reservoir:
    cols: dict[str, np.ndarray] = {"ts_ms": w.ts_ms if len(w.ts_ms) == w.n_samples else np.zeros(w.n_samples, np.int64),
                                   "predicted": w.predicted}
    cols.update({_LAYER + n: v for n, v in w.layers.items()})
    if len(w.client_ids) == w.n_samples:
        cols["client_id"] = w.client_ids
    return Reservoir.from_sample(cols, w.event_ids, seen=max(w.n_events, w.n_samples), capacity=capacity, rng=rng)


def merge_windows(a: ClosedWindow, b: ClosedWindow, capacity: int | None = None,
                  rng: np.random.Generator | None = None) -> ClosedWindow:
    """One window spanning both: a uniform sample of their union weighted by ``n_events``.

    Only the layers both windows carry are kept (a key's layers normally never change).
    The id is derived from the merged span, so it is as deterministic as the inputs.

    Example:
        >>> from workers.windows import ClosedWindow, merge_windows
        >>> def w(s, ids):
        ...     n = len(ids)
        ...     return ClosedWindow(window_id("m", "1", s, s + 10), "m", "1", s, s + 10, n, np.array(ids, object),
        ...                         np.zeros(n, np.int32), {"pen": np.ones((n, 2), np.float32)})
        >>> m = merge_windows(w(0, ["a", "b"]), w(5, ["b", "c"]), capacity=10)
        >>> m.window_id, sorted(m.event_ids.tolist()), m.merged
        ('m@1:0-15', ['a', 'b', 'c'], 2)
    """
    if a.key != b.key:
        raise ValueError(f"cannot merge windows of {a.key} and {b.key}")
    rng = rng if rng is not None else np.random.default_rng(0)
    shared = [n for n in a.layers if n in b.layers]
    a = _restrict(a, shared)
    b = _restrict(b, shared)
    cap = capacity if capacity is not None else max(a.n_samples, b.n_samples, 1)
    res = _reservoir_of(a, None, rng).merge(_reservoir_of(b, None, rng), capacity=cap)
    start, end = min(a.start_ms, b.start_ms), max(a.end_ms, b.end_ms)
    trigger = a.trigger if a.trigger == b.trigger else "time"
    out = _window_from(a.key, start, end, res, trigger, merged=a.merged + b.merged)
    out.n_events = a.n_events + b.n_events
    return out


def _restrict(w: ClosedWindow, layers: list[str]) -> ClosedWindow:
    if list(w.layers) == layers:
        return w
    return ClosedWindow(**{**w.__dict__, "layers": {n: w.layers[n] for n in layers}})


# --------------------------------------------------------------------------- window manager


@dataclass
class _KeyState:
    watermark: int = _NEVER
    closed_upto: int = _NEVER  # every window with start <= closed_upto is closed
    open: dict[int, Reservoir] = field(default_factory=dict)
    carry: Reservoir | None = None  # events of under-filled windows, for the count trigger
    carry_first: int = _NEVER
    carry_last: int = _NEVER
    carry_cursor: int = _NEVER  # events before this ts were already handed on (tested or carried)
    late: int = 0


class WindowManager:
    """Hopping windows per :data:`WindowKey`, each a reservoir of all layers of its events.

    :meth:`add` routes a batch's rows to every open window they fall in (one boolean mask
    and one vectorised reservoir update per window), advances the key's watermark (the
    largest ts seen) and returns the windows whose ``end + lateness <= watermark``.
    :meth:`close_idle` does the same against the wall clock so windows close when traffic
    stops. An event whose window already closed is counted in ``late_events`` and ignored
    by that window (still-open windows it falls in take it).

    A closed window with fewer than ``min_samples`` events is not tested on its own: its
    events (once each, although hopping windows overlap) go to a per-key carry-over buffer
    that is returned as a ``trigger="count"`` window spanning [first ts, last ts] when it
    holds ``count_trigger`` events (``count_trigger=0``: such windows are dropped and
    counted in ``dropped_windows``).

    Memory per key: at most ``ceil((size + lateness) / step) + 1`` open windows in steady
    state (a batch spanning a long stretch of time opens its windows transiently and
    closes them before :meth:`add` returns), each at most ``capacity`` rows, plus one
    carry-over reservoir of ``capacity`` rows.

    Example:
        >>> wm = WindowManager(size_s=10, step_s=5, capacity=100, min_samples=5, count_trigger=0, lateness_s=1)
        >>> ts = np.arange(5_000, 30_000, 100)                  # 10 events/s from t=5 s to 30 s
        >>> ids = [f"e{i}" for i in range(ts.size)]
        >>> out = wm.add(("cnn", "1"), ts, ids, np.zeros(ts.size, np.int32), {"pen": np.ones((ts.size, 4))})
        >>> [(w.start_ms, w.end_ms, w.n_events) for w in out]
        [(0, 10000, 50), (5000, 15000, 100), (10000, 20000, 100), (15000, 25000, 100)]
        >>> out[1].window_id, out[1].trigger, out[1].layers["pen"].shape, out[1].layers["pen"].dtype
        ('cnn@1:5000-15000', 'time', (100, 4), dtype('float32'))
        >>> [w.window_id for w in wm.close_idle(now_ms=36_000)]   # traffic stopped: the wall clock closes the rest
        ['cnn@1:20000-30000', 'cnn@1:25000-35000']
    """

    def __init__(
        self,
        size_s: float,
        step_s: float,
        capacity: int,
        min_samples: int,
        count_trigger: int,
        lateness_s: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.size_ms = int(round(size_s * 1000))
        self.step_ms = int(round(step_s * 1000))
        self.lateness_ms = int(round(lateness_s * 1000))
        if self.size_ms <= 0 or self.step_ms <= 0 or self.lateness_ms < 0:
            raise ValueError("window size and step must be positive and lateness non-negative")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.min_samples = int(min_samples)
        self.count_trigger = int(count_trigger)
        self.rng = np.random.default_rng(seed)
        self._keys: dict[WindowKey, _KeyState] = {}
        self.late_events = 0
        self.dropped_windows = 0

    # -- introspection
    def keys(self) -> list[WindowKey]:
        return list(self._keys)

    def drop(self, key: WindowKey) -> bool:
        """Forget every open window of ``key`` (its events now go to another worker); False when none."""
        return self._keys.pop(key, None) is not None

    def nbytes(self) -> int:
        """Bytes held by every key's open windows and carry-over reservoir."""
        return sum(r.nbytes for st in self._keys.values() for r in (*st.open.values(), st.carry) if r is not None)

    def open_windows(self, key: WindowKey) -> list[tuple[int, int]]:
        """(start_ms, end_ms) of the key's open windows, oldest first."""
        st = self._keys.get(key)
        return [] if st is None else [(s, s + self.size_ms) for s in sorted(st.open)]

    def watermark(self, key: WindowKey) -> int | None:
        st = self._keys.get(key)
        return None if st is None or st.watermark == _NEVER else st.watermark

    def late_by_key(self) -> dict[WindowKey, int]:
        return {k: st.late for k, st in self._keys.items() if st.late}

    # -- feeding
    def add(
        self,
        key: WindowKey,
        ts_ms: np.ndarray,
        event_ids: Sequence[str] | np.ndarray,
        predicted: np.ndarray,
        layers: Mapping[str, np.ndarray],
        client_ids: Sequence[str] | np.ndarray | None = None,
    ) -> list[ClosedWindow]:
        """Route one batch of a key to its windows; return the windows that closed as a result.

        ``client_ids``, when given, travel with the sample (``ClosedWindow.client_ids``);
        give them for every batch of a key or for none.
        """
        ts = np.asarray(ts_ms, dtype=np.int64).ravel()
        n = ts.size
        ids = np.asarray(event_ids, dtype=object).ravel()
        if ids.size != n:
            raise ValueError(f"{ids.size} event ids for {n} timestamps")
        key = (str(key[0]), str(key[1]))
        st = self._keys.setdefault(key, _KeyState())
        if n == 0:
            return []
        cols: dict[str, np.ndarray] = {"ts_ms": ts, "predicted": np.asarray(predicted, dtype=np.int32).ravel()}
        if client_ids is not None:
            cols["client_id"] = np.asarray(client_ids, dtype=object).ravel()
        for name, mat in layers.items():  # kept in their dtype: only the sampled rows are converted to float32
            mat = np.asarray(mat)
            cols[_LAYER + name] = (mat if mat.dtype.kind == "f" else mat.astype(np.float32)).reshape(n, -1)
        dtypes = {c: np.dtype(np.float32) for c in cols if c.startswith(_LAYER)}
        rows, starts = window_starts(ts, self.size_ms, self.step_ms)
        late = starts <= st.closed_upto
        if late.any():
            n_late = int(np.unique(rows[late]).size)
            st.late += n_late
            self.late_events += n_late
        for s in np.unique(starts[~late]).tolist():
            mask = (ts >= s) & (ts < s + self.size_ms)
            res = st.open.get(s)
            if res is None:
                res = st.open[s] = Reservoir(self.capacity, self.rng, dtypes)
            res.add(cols, ids, rows=None if mask.all() else np.flatnonzero(mask))
        st.watermark = max(st.watermark, int(ts.max()))
        # windows past the watermark are closed, whether or not they ever held an event
        horizon = ((st.watermark - self.size_ms - self.lateness_ms) // self.step_ms) * self.step_ms
        out = self._close(key, st, st.watermark)
        st.closed_upto = max(st.closed_upto, horizon)
        return out

    def close_idle(self, now_ms: int) -> list[ClosedWindow]:
        """Close, on every key, the windows whose ``end + lateness <= now_ms`` (wall clock)."""
        out: list[ClosedWindow] = []
        for key, st in self._keys.items():
            out.extend(self._close(key, st, int(now_ms)))
        return out

    # -- closing
    def _close(self, key: WindowKey, st: _KeyState, limit: int) -> list[ClosedWindow]:
        out: list[ClosedWindow] = []
        for s in sorted(st.open):
            if s + self.size_ms + self.lateness_ms > limit:
                break
            res = st.open.pop(s)
            st.closed_upto = max(st.closed_upto, s)
            out.extend(self._emit(key, st, s, res))
        return out

    def _emit(self, key: WindowKey, st: _KeyState, start: int, res: Reservoir) -> list[ClosedWindow]:
        end = start + self.size_ms
        cursor, st.carry_cursor = st.carry_cursor, max(st.carry_cursor, end)
        if res.seen >= self.min_samples:
            return [_window_from(key, start, end, res, "time")]
        if self.count_trigger <= 0:
            self.dropped_windows += 1
            return []
        cols, ids = res.snapshot()
        fresh = cols["ts_ms"] >= cursor  # overlapping windows: take each event once
        if not fresh.any():
            return []
        if st.carry is None:
            st.carry = Reservoir(self.capacity, self.rng)
        taken_ts = cols["ts_ms"][fresh]
        st.carry.add({c: v[fresh] for c, v in cols.items()}, ids[fresh])
        st.carry_first = int(taken_ts.min()) if st.carry_first == _NEVER else min(st.carry_first, int(taken_ts.min()))
        st.carry_last = max(st.carry_last, int(taken_ts.max()))
        if st.carry.seen < self.count_trigger:
            return []
        win = _window_from(key, st.carry_first, st.carry_last, st.carry, "count")
        st.carry, st.carry_first, st.carry_last = None, _NEVER, _NEVER
        return [win]


# --------------------------------------------------------------------------- coalescer


class Coalescer:
    """At most ``max_pending`` windows per key waiting for a test; a newer one merges into the newest.

    When the MMD tests fall behind, windows of a key do not queue up without bound:
    :meth:`put` queues up to ``max_pending`` windows per key (default 1), and merges a
    window arriving past that into the newest one still pending for its key (a uniform
    sample of the union, weighted by ``n_events``, at most ``capacity`` rows, id from the
    merged span) and returns True. A ``max_pending`` above 1 lets a burst of windows
    closed at once (a backlog replayed after a restart) be tested one by one.
    :meth:`pop_any` hands out the oldest window of the key that has waited longest.

    Example:
        >>> def w(s, n):
        ...     return ClosedWindow(window_id("m", "1", s, s + 10), "m", "1", s, s + 10, n,
        ...                         np.array([f"{s}-{i}" for i in range(n)], object),
        ...                         np.zeros(n, np.int32), {"pen": np.zeros((n, 3), np.float32)})
        >>> c = Coalescer(capacity=8, seed=0)
        >>> c.put(w(0, 8)), c.put(w(10, 8)), len(c), c.coalesced
        (False, True, 1, {('m', '1'): 1})
        >>> m = c.pop_any()
        >>> m.window_id, m.n_events, m.n_samples, c.pop_any()
        ('m@1:0-20', 16, 8, None)
        >>> c = Coalescer(capacity=8, max_pending=2)
        >>> c.put(w(0, 8)), c.put(w(10, 8)), c.put(w(20, 8)), [c.pop_any().window_id for _ in range(2)]
        (False, False, True, ['m@1:0-10', 'm@1:10-30'])
    """

    def __init__(self, capacity: int | None = None, seed: int = 0, max_pending: int = 1) -> None:
        self.capacity = capacity
        self.max_pending = max(1, int(max_pending))
        self.rng = np.random.default_rng(seed)
        self._pending: OrderedDict[WindowKey, list[ClosedWindow]] = OrderedDict()
        self.coalesced: dict[WindowKey, int] = {}

    def put(self, window: ClosedWindow) -> bool:
        """Queue a window; True when it was merged into a window already pending for its key."""
        key = window.key
        queue = self._pending.setdefault(key, [])
        if len(queue) < self.max_pending:
            queue.append(window)
            return False
        queue[-1] = merge_windows(queue[-1], window, self.capacity, self.rng)
        self.coalesced[key] = self.coalesced.get(key, 0) + 1
        return True

    def pop_any(self) -> ClosedWindow | None:
        """The oldest pending window of the key that has waited longest, or None."""
        if not self._pending:
            return None
        key, queue = next(iter(self._pending.items()))
        window = queue.pop(0)
        if queue:
            self._pending.move_to_end(key)  # the other keys' turn first
        else:
            del self._pending[key]
        return window

    def __len__(self) -> int:
        return sum(len(q) for q in self._pending.values())
