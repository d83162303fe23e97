"""The classify stage: label live micro-batches with the attack classifier and publish AttackLabels.

A stage of the ingest step (see streams/runtime.py): for the live batches of one delivery,
ONE ``AttackClassifier.predict`` call (all batches' output vectors stacked) runs in a
one-thread executor, and the AttackLabels records are encoded there too, so the event
loop keeps heart-beating and decoding; one record per micro-batch goes to ``lw.labels``
keyed by model id.

The classifier is read from ``settings.classifier_path`` (default
``<state_dir>/classifier/classifier.skops``). While the file is missing the stage
logs one warning and labels nothing; it looks again every 60 s, so a classifier
trained later (``layerwatch classifier train``) is picked up, and a replaced file
(new mtime) is reloaded. Files with types outside the allow-list are refused by
``AttackClassifier.load``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from schemas.batch import LabelBatch, PredictionBatch
from schemas.codec import encode_labels
from streams.metrics import FLAGGED_P
from streams.rows import Delivered

log = logging.getLogger(__name__)

RECHECK_S = 60.0


def classifier_path(settings: Any) -> Path:
    """``settings.classifier_path`` or ``<state_dir>/classifier/classifier.skops``."""
    if settings.classifier_path:
        return Path(settings.classifier_path)
    from workers.classifier.model import default_path

    return default_path(settings.state_path)


def fits(batch: PredictionBatch, classifier: Any) -> bool:
    """Whether the batch's output vectors have the width the classifier was trained on."""
    return batch.outputs.ndim == 2 and batch.outputs.shape[1] == classifier.spec.n_classes


def label_batches(classifier: Any, batches: Sequence[PredictionBatch]) -> list[LabelBatch]:
    """The verdicts on ``batches``, one LabelBatch each: one ``predict`` call over all their outputs (pure).

    Batches whose output width differs from the classifier's are left out (the caller warns).
    """
    usable = [b for b in batches if b.n and fits(b, classifier)]
    if not usable:
        return []
    labels = classifier.predict(np.concatenate([b.outputs for b in usable]))
    out, start = [], 0
    for b in usable:
        sl = slice(start, start + b.n)
        start += b.n
        out.append(LabelBatch(
            model_id=b.model_id,
            model_version=b.model_version,
            classifier_version=classifier.version,
            event_ids=b.event_ids,
            ts_ms=np.asarray(b.ts_ms, dtype=np.int64),
            p_adversarial=labels.p_adversarial[sl],
            attack_type=labels.attack_type[sl],
            attack_prob=labels.attack_prob[sl],
            target_model=labels.target_model[sl],
            target_prob=labels.target_prob[sl],
        ))
    return out


def encoded_labels(classifier: Any, batches: Sequence[PredictionBatch]) -> list[tuple[str, int, int, bytes]]:
    """(model id, events, flagged events, AttackLabels record) per usable batch: :func:`label_batches`, encoded."""
    return [(lb.model_id, lb.n, int(np.count_nonzero(lb.p_adversarial >= FLAGGED_P)), encode_labels(lb))
            for lb in label_batches(classifier, batches)]


class ClassifyStage:
    """Labels live batches with the attack classifier (loaded lazily, re-checked every 60 s)."""

    name = "classify"

    def __init__(self, runtime: Any, executor: ThreadPoolExecutor | None = None):
        self.topic, self.labelled, self.flagged = runtime.topics.labels, runtime.metrics.labelled, runtime.metrics.flagged
        self.path = classifier_path(runtime.settings)
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="lw-classify")
        self.classifier: Any = None
        self._mtime: float | None = None
        self._next_check = 0.0
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    async def current(self) -> Any:
        """The classifier, (re)loaded when due: missing → None with one warning; changed file → reload."""
        now = time.monotonic()
        if now < self._next_check:
            return self.classifier
        self._next_check = now + RECHECK_S
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            if self.classifier is None:
                self._warn_once("missing", "no attack classifier at %s: live events are not labelled until "
                                "`layerwatch classifier train` writes one (checked every %.0f s)", self.path, RECHECK_S)
            return self.classifier
        if mtime == self._mtime:
            return self.classifier
        from workers.classifier.model import AttackClassifier

        try:
            loaded = await asyncio.get_running_loop().run_in_executor(self.executor, AttackClassifier.load, self.path)
        except Exception as exc:  # refused or unreadable: keep the previous one, say why once per file version
            self._warn_once(f"bad:{mtime}", "cannot load the attack classifier %s: %s", self.path, exc)
            return self.classifier
        self.classifier, self._mtime = loaded, mtime
        self._warned.discard("missing")
        log.info("attack classifier %s loaded from %s", loaded.version, self.path)
        return loaded

    async def handle(self, items: Sequence[Delivered]) -> None:
        live = [d.batch for d in items if d.batch.role == "live" and d.batch.n]
        if not live:
            return
        classifier = await self.current()
        if classifier is None:
            return
        for b in live:
            if not fits(b, classifier):
                self._warn_once(f"width:{b.model_id}", "model %s sends outputs of shape %s; the attack classifier "
                                "expects %d classes: its events are not labelled", b.model_id, b.outputs.shape[1:],
                                classifier.spec.n_classes)
        records = await asyncio.get_running_loop().run_in_executor(self.executor, encoded_labels, classifier, live)
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
