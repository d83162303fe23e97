"""The classify stage: label live micro-batches with the per-event detector and publish AttackLabels.

A stage of the ingest step (see streams/runtime.py): the live batches of one delivery are
labelled in a one-thread executor (one detector call per model version), and the
AttackLabels records are encoded there too, so the event loop keeps heart-beating and
decoding; one record per micro-batch goes to ``lw.labels`` keyed by model id.

Which score an event gets (``workers.classifier.bank.DetectorBank``, issue 19):

- ``supervised`` — a detector fitted for this model id *and version*
  (``<state_dir>/classifier/detectors/*.skops``, written by ``layerwatch classifier train``
  for the demo models and ``layerwatch classifier fit`` for yours; one file per version),
  when the batch carries the layers it was fitted on;
- ``unsupervised`` — otherwise a detector fitted on the model version's own clean
  reference (``reference_embeddings``: layers and top-1 class), refitted when new
  reference batches arrive;
- no label at all while the model version has no reference.

The detectors directory is re-read every 60 s (new or replaced files are picked up);
files with types outside the allow-list are refused by ``Detector.load``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from schemas.batch import LabelBatch, PredictionBatch
from schemas.codec import encode_labels
from streams.metrics import FLAGGED_P
from streams.rows import Delivered

log = logging.getLogger(__name__)

RECHECK_S = 60.0
MIN_REFERENCE = 20


def detectors_path(settings: Any) -> Path:
    """``<state_dir>/classifier/detectors``: the supervised detectors, one file per model."""
    from workers.classifier.fitting import detectors_dir

    return detectors_dir(settings.state_path)


def label_batches(bank: Any, batches: Sequence[PredictionBatch]) -> list[LabelBatch]:
    """The verdicts on ``batches``, one LabelBatch per batch a detector applies to (pure).

    Batches of one model version are scored in one call; batches no detector applies to
    (no reference yet, other layers or output width) are left out.
    """
    groups: dict[tuple[str, str], list[PredictionBatch]] = {}
    for b in batches:
        if b.n:
            groups.setdefault((b.model_id, b.model_version), []).append(b)
    out = []
    for (model_id, version), group in groups.items():
        names = set.intersection(*(set(b.layers) for b in group))
        det = bank.detector_for(model_id, version, names)
        if det is None or any(b.outputs.ndim != 2 or b.outputs.shape[1] != det.n_classes for b in group):
            continue
        layers = {name: np.concatenate([b.layers[name] for b in group]) for name in det.layers}
        labels = bank.label(model_id, version, np.concatenate([b.outputs for b in group]), layers)
        start = 0
        for b in group:
            sl = slice(start, start + b.n)
            start += b.n
            out.append(LabelBatch(
                model_id=b.model_id, model_version=b.model_version, classifier_version=det.version,
                event_ids=b.event_ids, ts_ms=np.asarray(b.ts_ms, dtype=np.int64),
                p_adversarial=labels.p_adversarial[sl], attack_type=labels.attack_type[sl],
                attack_prob=labels.attack_prob[sl], target_model=labels.target_model[sl],
                target_prob=np.where(labels.target_model[sl] == b.model_id, 1.0, 0.0).astype(np.float32),
                family=labels.family[sl], score_kind=labels.kind,
                features_version=str(det.meta.get("features_version", "")),
            ))
    return out


def encoded_labels(bank: Any, batches: Sequence[PredictionBatch]) -> list[tuple[str, int, int, bytes]]:
    """(model id, events, flagged events, AttackLabels record) per labelled batch: :func:`label_batches`, encoded."""
    return [(lb.model_id, lb.n, int(np.count_nonzero(lb.p_adversarial >= FLAGGED_P)), encode_labels(lb))
            for lb in label_batches(bank, batches)]


class ClassifyStage:
    """Labels live batches with the per-event detectors (supervised where fitted, reference-only elsewhere)."""

    name = "classify"

    def __init__(self, runtime: Any, executor: ThreadPoolExecutor | None = None):
        from workers.classifier.bank import DetectorBank

        self.topic, self.labelled, self.flagged = runtime.topics.labels, runtime.metrics.labelled, runtime.metrics.flagged
        self.settings = runtime.settings
        self.writer = getattr(runtime, "writer", None)
        self.path = detectors_path(runtime.settings)
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="lw-classify")
        self.bank = DetectorBank()
        self._stamp: tuple | None = None
        self._next_check = 0.0
        self._reference_due: dict[tuple[str, str], float] = {}
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    async def _reload(self) -> None:
        """Re-read the supervised detectors when the directory's files changed (checked every 60 s)."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + RECHECK_S
        files = sorted(self.path.glob("*.skops")) if self.path.is_dir() else []
        stamp = tuple((f.name, f.stat().st_mtime) for f in files)
        if stamp == self._stamp:
            return
        from workers.classifier.detector import Detector

        loaded = []
        for f in files:
            try:
                det = await asyncio.get_running_loop().run_in_executor(self.executor, Detector.load, f)
            except Exception as exc:  # noqa: BLE001 - refused or unreadable: skip it, say why once per file version
                self._warn_once(f"bad:{f}:{f.stat().st_mtime}", "cannot load the detector %s: %s", f, exc)
                continue
            loaded.append((f.stem, det))
        self.bank.set_supervised(loaded)
        self._stamp = stamp
        names = [f"{d.meta.get('model_id') or stem}@{d.meta.get('model_version') or '*'}" for stem, d in loaded]
        log.info("per-event detectors for %s loaded from %s", ", ".join(names) or "no model", self.path)

    async def _reference(self, key: tuple[str, str], n_classes: int) -> None:
        """Fit the unsupervised detector of a model version from its stored reference (when due)."""
        if self.writer is None or time.monotonic() < self._reference_due.get(key, 0.0):
            return
        self._reference_due[key] = time.monotonic() + RECHECK_S
        from streams.stages.references import reference_arrays
        from streams.store import statements as Q

        params = {"model_id": key[0], "model_version": key[1], "limit": self.settings.reference_max}
        ids = [r[0] for r in await self.writer.query(Q.REFERENCE_IDS, params)]
        if len(ids) < MIN_REFERENCE:
            self._warn_once(f"noref:{key}", "model %s version %s has no reference yet: its events are not labelled "
                            "until `layerwatch reference` publishes clean data", *key)
            return
        layers, classes = reference_arrays(await self.writer.query(Q.REFERENCE_ROWS, {**params, "ids": ids}))
        try:
            det = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.bank.set_reference, key[0], key[1], layers, classes, n_classes)
        except ValueError as exc:
            self._warn_once(f"badref:{key}", "cannot fit a reference detector for %s@%s: %s", *key, exc)
            return
        self._reference_due[key] = float("inf")  # until new reference data arrives
        log.info("reference detector for %s@%s: %d events, layers %s", *key, len(classes), ", ".join(det.layers))

    async def handle(self, items: Sequence[Delivered]) -> None:
        for d in items:
            if d.batch.role == "reference":  # new reference data: refit that model version's detector
                self._reference_due[(d.batch.model_id, d.batch.model_version)] = 0.0
        live = [d.batch for d in items if d.batch.role == "live" and d.batch.n]
        if not live:
            return
        await self._reload()
        for b in live:
            key = (b.model_id, b.model_version)
            if self.bank.detector_for(*key, b.layers) is None and b.outputs.ndim == 2:
                await self._reference(key, b.outputs.shape[1])
        records = await asyncio.get_running_loop().run_in_executor(self.executor, encoded_labels, self.bank, live)
        for model_id, n, flagged, value in records:
            await self.topic.send(key=model_id.encode(), value=value)
            self.labelled.labels(model_id).inc(n)
            self.flagged.labels(model_id).inc(flagged)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def health(self) -> str:
        return ""
