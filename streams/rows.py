"""Pure conversions from decoded events to column-wise table rows (numpy arrays, no per-event objects).

Every function here takes decoded records and returns ``{column: array}`` ready for
``Store.insert``; none touches Kafka or ClickHouse, so all are unit-testable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import chain
from typing import Any, Iterable, Sequence

import numpy as np

from schemas.batch import LabelBatch, PredictionBatch

Columns = dict[str, Any]


@dataclass(frozen=True)
class Delivered:
    """A decoded PredictionBatch and where it came from in Kafka."""

    batch: PredictionBatch
    topic: str
    partition: int
    offset: int


def now_ms() -> int:
    return int(time.time() * 1000)


def _flat(lists: Iterable[Sequence[Any]]) -> list:
    """One list of the items of several lists, concatenated in C (no per-item Python bytecode;
    a repeated value such as a batch's model id is shared, not copied per row)."""
    return list(chain.from_iterable(lists))


def _seconds(ts_ms: np.ndarray) -> np.ndarray:
    return (np.asarray(ts_ms, dtype=np.int64) // 1000).astype(np.uint32)


def prediction_rows(items: Sequence[Delivered]) -> Columns:
    """Slim columns of live and reference predictions (no embeddings) for the `predictions` table."""
    batches = [d.batch for d in items]
    if not batches:
        return {}
    n = [b.n for b in batches]
    ts_ms = np.concatenate([b.ts_ms for b in batches]).astype(np.int64)
    return {
        "event_id": _flat(b.event_ids for b in batches),
        "model_id": _flat([b.model_id] * b.n for b in batches),
        "model_version": _flat([b.model_version] * b.n for b in batches),
        "client_id": _flat(b.client_ids for b in batches),
        "ts": _seconds(ts_ms),
        "ts_ms": ts_ms.astype(np.uint64),
        "predicted": np.concatenate([b.predicted for b in batches]).astype(np.int32),
        "confidence": np.concatenate([b.outputs.max(axis=1) for b in batches]).astype(np.float32),
        "uncertainty": np.concatenate(
            [b.uncertainty if b.uncertainty is not None else np.full(b.n, np.nan, np.float32) for b in batches]
        ).astype(np.float32),
        "truth": np.concatenate(
            [b.truth if b.truth is not None else np.full(b.n, -1, np.int32) for b in batches]
        ).astype(np.int32),
        "attack": _flat(b.attack if b.attack is not None else [""] * b.n for b in batches),
        "batch_offset": np.repeat([d.offset for d in items], n).astype(np.uint64),
        "ingested_ms": np.full(sum(n), now_ms(), dtype=np.uint64),
    }


def input_rows(items: Sequence[Delivered]) -> Columns:
    """Inputs carried by live batches (demo images) for `predictions_inputs`."""
    batches = [d.batch for d in items if d.batch.inputs is not None]
    if not batches:
        return {}
    ts_ms = np.concatenate([b.ts_ms for b in batches]).astype(np.int64)
    return {
        "event_id": _flat(b.event_ids for b in batches),
        "model_id": _flat([b.model_id] * b.n for b in batches),
        "ts": _seconds(ts_ms),
        "ts_ms": ts_ms.astype(np.uint64),
        "input": [row for b in batches for row in b.inputs.reshape(b.n, -1).astype(np.float32)],
    }


def reference_rows(items: Sequence[Delivered]) -> Columns:
    """One row per (event, layer) with its vector for `reference_embeddings`."""
    rows: dict[str, list] = {k: [] for k in ("model_id", "model_version", "layer", "event_id", "ts", "ts_ms", "predicted", "vector")}
    for d in items:
        b = d.batch
        for layer, values in b.layers.items():
            rows["model_id"].extend([b.model_id] * b.n)
            rows["model_version"].extend([b.model_version] * b.n)
            rows["layer"].extend([layer] * b.n)
            rows["event_id"].extend(b.event_ids)
            rows["ts"].append(_seconds(b.ts_ms))
            rows["ts_ms"].append(b.ts_ms.astype(np.uint64))
            rows["predicted"].append(b.predicted.astype(np.int32))
            rows["vector"].extend(np.asarray(values, dtype=np.float32))
    if not rows["event_id"]:
        return {}
    for k in ("ts", "ts_ms", "predicted"):
        rows[k] = np.concatenate(rows[k])
    return rows


def label_rows(labels: Sequence[LabelBatch]) -> Columns:
    """The classifier's verdicts for `attack_labels`, one row per event."""
    if not labels:
        return {}
    ts_ms = np.concatenate([lb.ts_ms for lb in labels]).astype(np.int64)
    return {
        "event_id": _flat(lb.event_ids for lb in labels),
        "model_id": _flat([lb.model_id] * lb.n for lb in labels),
        "model_version": _flat([lb.model_version] * lb.n for lb in labels),
        "ts": _seconds(ts_ms),
        "ts_ms": ts_ms.astype(np.uint64),
        "p_adversarial": np.concatenate([lb.p_adversarial for lb in labels]).astype(np.float32),
        "attack_type": np.concatenate([lb.attack_type for lb in labels]),
        "attack_prob": np.concatenate([lb.attack_prob for lb in labels]).astype(np.float32),
        "target_model": np.concatenate([lb.target_model for lb in labels]),
        "target_prob": np.concatenate([lb.target_prob for lb in labels]).astype(np.float32),
        "classifier_version": _flat([lb.classifier_version] * lb.n for lb in labels),
        "family": np.concatenate([lb.family if lb.family is not None else np.full(lb.n, "") for lb in labels]),
        "score_kind": _flat([lb.score_kind] * lb.n for lb in labels),
        "features_version": _flat([lb.features_version] * lb.n for lb in labels),
    }


def records_to_columns(records: Sequence[dict[str, Any]], columns: Sequence[str]) -> Columns:
    """Small result events (drift windows, alerts) as columns; these are few per second."""
    return {c: [r[c] for r in records] for c in columns}
