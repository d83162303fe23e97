"""Checks on decoded prediction batches that need memory of earlier batches (pure, no I/O).

Two things a single client must not be able to do to the monitor:

- **Blind a model with a timestamp.** A model's windows close on its watermark (the largest
  event time seen, ``workers.windows.WindowManager``): one event dated a day ahead would make
  every later event of the model late, and its windows would stop. An event may be ahead of
  its Kafka record's timestamp by at most ``max_skew_s`` (clock differences between
  hosts); past that its time is *clamped* to the record's timestamp, itself capped by the
  worker's clock. A clamped event then moves the watermark no further than an honest event
  sent at the same moment. It is clamped rather than dead-lettered so that stamping
  adversarial inputs with a forged time cannot hide them from the drift test: they are
  tested in the window of their arrival. The record timestamp (not the worker's clock alone)
  is the reference so that a replay after an outage clamps exactly as the first pass did,
  and a backlog of old events is never squeezed into "now". Events in the past are never
  clamped: they cannot move a watermark forward, and a window that already closed counts
  them as late.
- **Crash the drift stage with a new shape.** All batches of one model version must carry
  the same layers with the same widths (the windows stack them, the reference is compared
  with them). A batch whose layer width differs from the first one seen for its model
  version is refused with a reason naming the layer and both widths, and goes to the
  dead-letter topic; a live batch whose set of layers differs is refused the same way.
  Memory: one small entry per model version, the least recently seen evicted past
  ``max_models``; the widths are learned again after a restart.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from typing import Callable

import numpy as np

from schemas.batch import PredictionBatch
from schemas.codec import CodecError


def record_time_ms(timestamp: float | int | None, *, seconds: bool = False) -> int | None:
    """A Kafka record timestamp in epoch ms (``seconds``: Faust gives float seconds), None when unset."""
    if timestamp is None or timestamp <= 0:
        return None
    return int(timestamp * 1000) if seconds else int(timestamp)


@dataclasses.dataclass
class _Shape:
    dims: dict[str, int]
    live_layers: frozenset[str] | None = None


class EventGuard:
    """Clamps future event times and refuses layer-shape changes within a model version.

    ``on_clamped(model_id, n)`` is called for every batch with clamped events (for metrics).

    Example:
        >>> g = EventGuard(max_skew_s=5)
        >>> b = PredictionBatch.build("cnn", ["a", "b"], np.eye(2, dtype=np.float32),
        ...                           {"penultimate": np.ones((2, 4), np.float32)},
        ...                           ts_ms=np.array([1_000, 86_400_000], np.int64))
        >>> g.check(b, record_ms=2_000, now_ms=3_000).ts_ms.tolist()
        [1000, 2000]
        >>> wide = PredictionBatch.build("cnn", ["c"], np.eye(2, dtype=np.float32)[:1],
        ...                              {"penultimate": np.ones((1, 8), np.float32)})
        >>> g.check(wide, record_ms=2_000, now_ms=3_000)
        Traceback (most recent call last):
        ...
        schemas.codec.CodecError: layers: layer penultimate has dim 8, model cnn@1 has 4; publish a new model_version
    """

    def __init__(self, max_skew_s: float = 5.0, *, max_models: int = 10_000,
                 on_clamped: Callable[[str, int], None] | None = None) -> None:
        if max_skew_s < 0:
            raise ValueError(f"max_skew_s must be >= 0, got {max_skew_s}")
        self.max_skew_ms = int(round(max_skew_s * 1000))
        self.max_models = int(max_models)
        self.on_clamped = on_clamped
        self.clamped: dict[str, int] = {}
        self._shapes: OrderedDict[tuple[str, str], _Shape] = OrderedDict()

    def check(self, batch: PredictionBatch, record_ms: int | None = None, now_ms: int | None = None) -> PredictionBatch:
        """The batch with future times clamped; CodecError when its layer shapes break its model version's."""
        self._check_shape(batch)
        return self._clamp(batch, record_ms, now_ms)

    # -- event time
    def _clamp(self, batch: PredictionBatch, record_ms: int | None, now_ms: int | None) -> PredictionBatch:
        now = int(time.time() * 1000) if now_ms is None else int(now_ms)
        reference = now if record_ms is None or record_ms <= 0 else min(int(record_ms), now)
        ahead = batch.ts_ms > reference + self.max_skew_ms
        n = int(np.count_nonzero(ahead))
        if not n:
            return batch
        ts = np.where(ahead, np.int64(reference), batch.ts_ms).astype(np.int64)
        self.clamped[batch.model_id] = self.clamped.get(batch.model_id, 0) + n
        if self.on_clamped is not None:
            self.on_clamped(batch.model_id, n)
        return dataclasses.replace(batch, ts_ms=ts)

    # -- layer shapes
    def _check_shape(self, batch: PredictionBatch) -> None:
        key = (batch.model_id, batch.model_version)
        dims = {name: int(np.asarray(m).reshape(batch.n, -1).shape[1]) if batch.n else 0
                for name, m in batch.layers.items()}
        live = frozenset(dims) if batch.role == "live" else None
        shape = self._shapes.get(key)
        if shape is None:
            self._remember(key, _Shape(dict(dims), live))
            return
        self._shapes.move_to_end(key)
        model = f"{batch.model_id}@{batch.model_version}"
        for name, dim in dims.items():
            known = shape.dims.get(name)
            if known is not None and known != dim:
                raise CodecError("layers", f"layer {name} has dim {dim}, model {model} has {known}; "
                                           "publish a new model_version")
        if live is not None and shape.live_layers is not None and live != shape.live_layers:
            raise CodecError("layers", f"layers {', '.join(sorted(live))} differ from "
                                       f"{', '.join(sorted(shape.live_layers))} of model {model}; "
                                       "publish a new model_version")
        shape.dims.update(dims)
        if live is not None and shape.live_layers is None:
            shape.live_layers = live

    def _remember(self, key: tuple[str, str], shape: _Shape) -> None:
        self._shapes[key] = shape
        while len(self._shapes) > self.max_models:
            self._shapes.popitem(last=False)
