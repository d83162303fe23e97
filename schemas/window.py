"""The ``WindowSample`` event: a closed window's sample, from the ingest workers to the test workers.

Layers, predicted classes travel as Matrix bytes like a PredictionBatch. A window whose
record would exceed ``max_bytes`` is sampled down (uniformly, seeded by its window id)
until it fits; the record says from how many rows (``downsampled_from``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from schemas.codec import DEFAULT_LIMITS, CodecError, Limits, decode, encode, from_matrix, matrix


@dataclass(frozen=True)
class WindowSample:
    """The fields of a WindowSample record with numpy arrays."""

    window_id: str
    model_id: str
    model_version: str
    start_ms: int
    end_ms: int
    n_events: int
    event_ids: np.ndarray
    predicted: np.ndarray
    layers: dict[str, np.ndarray]
    client_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))
    trigger: str = "time"
    merged: int = 1
    late_events: int = 0
    downsampled_from: int = 0

    @property
    def n_samples(self) -> int:
        return int(len(self.event_ids))

    @property
    def key(self) -> tuple[str, str]:
        return (self.model_id, self.model_version)

    def take(self, rows: np.ndarray) -> "WindowSample":
        """The same window with only ``rows`` of its sample."""
        client_ids = self.client_ids[rows] if len(self.client_ids) else self.client_ids
        return WindowSample(self.window_id, self.model_id, self.model_version, self.start_ms, self.end_ms,
                            self.n_events, self.event_ids[rows], self.predicted[rows],
                            {k: v[rows] for k, v in self.layers.items()}, client_ids, self.trigger, self.merged,
                            self.late_events, self.downsampled_from or self.n_samples)


def _record(w: WindowSample) -> dict[str, Any]:
    return {
        "window_id": w.window_id, "model_id": w.model_id, "model_version": w.model_version,
        "window_start_ms": int(w.start_ms), "window_end_ms": int(w.end_ms), "n_events": int(w.n_events),
        "trigger": w.trigger, "merged": int(w.merged), "late_events": int(w.late_events),
        "downsampled_from": int(w.downsampled_from), "event_ids": [str(e) for e in w.event_ids],
        "client_ids": [str(c) for c in w.client_ids],
        "predicted": matrix(np.asarray(w.predicted, dtype=np.int32)),
        "layers": [{"name": k, "values": matrix(np.asarray(v, dtype=np.float16 if v.dtype == np.float16 else np.float32))}
                   for k, v in w.layers.items()],
    }


def encode_window(window: WindowSample, max_bytes: int = 8 << 20) -> tuple[bytes, WindowSample]:
    """The record of ``window``, sampled down until it fits ``max_bytes``; and the window it encodes."""
    data = encode("WindowSample", _record(window))
    while len(data) > max_bytes and window.n_samples > 2:
        keep = max(2, int(window.n_samples * max_bytes / len(data) * 0.95))
        rng = np.random.default_rng(zlib.crc32(window.window_id.encode()))
        window = window.take(np.sort(rng.choice(window.n_samples, size=keep, replace=False)))
        data = encode("WindowSample", _record(window))
    return data, window


def decode_window(data: bytes, limits: Limits = DEFAULT_LIMITS) -> WindowSample:
    """Decode and validate one WindowSample record."""
    _, record = decode(data, expect="WindowSample", limits=limits)
    return window_from_record(record, limits)


def window_from_record(record: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> WindowSample:
    n = len(record["event_ids"])
    if n == 0:
        raise CodecError("event_ids", "a window sample with no events")
    client_ids = record.get("client_ids") or []
    if client_ids and len(client_ids) != n:
        raise CodecError("client_ids", f"has {len(client_ids)} entries for {n} events")
    predicted = from_matrix("predicted", record["predicted"], shape=(n,), kinds="i", limits=limits)
    layers = {}
    for layer in record["layers"]:
        layers[layer["name"]] = from_matrix(f"layers[{layer['name']}]", layer["values"], shape=(n, None), kinds="f",
                                            limits=limits)
    if not layers:
        raise CodecError("layers", "a window sample with no layer")
    return WindowSample(
        record["window_id"], record["model_id"], record["model_version"], int(record["window_start_ms"]),
        int(record["window_end_ms"]), int(record["n_events"]), np.asarray(record["event_ids"], dtype=object),
        predicted.astype(np.int64), layers, np.asarray(client_ids, dtype=object), record.get("trigger", "time"),
        int(record.get("merged", 1)), int(record.get("late_events", 0)), int(record.get("downsampled_from", 0)))
