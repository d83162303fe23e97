"""Which detector labels a model's events: supervised where fitted, reference-only elsewhere, none before a reference.

Today's output-vector classifier labels every model's events; on models it never saw it
flags a third to nine tenths of clean traffic. :class:`DetectorBank` applies a supervised
detector only to the model id *and version* it was fitted for (``Detector.applies_to``);
any other model gets an unsupervised detector fitted on its own clean reference
(:func:`~workers.classifier.detector.fit_reference_detector`), and no label at all while
it has no reference. The bank is pure (arrays in, labels out); the classify stage feeds
it references from the store and batches from Kafka.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from workers.classifier.detector import (
    DEFAULT_TARGET_FPR,
    PENULTIMATE,
    Detector,
    DetectorLabels,
    fit_reference_detector,
)

Key = tuple[str, str]


class DetectorBank:
    """Supervised detectors by model id (one per version it was fitted for), unsupervised ones by (model id, version)."""

    def __init__(self, supervised: Mapping[str, Detector] | Iterable[tuple[str, Detector]] | None = None, *,
                 target_fpr: float = DEFAULT_TARGET_FPR, seed: int = 0):
        self.supervised: dict[str, list[Detector]] = {}
        self.set_supervised(supervised or {})
        self.unsupervised: dict[Key, Detector] = {}
        self.target_fpr = target_fpr
        self.seed = seed

    def set_supervised(self, detectors: Mapping[str, Detector] | Iterable[tuple[str, Detector]]) -> None:
        """Replace the supervised detectors; each is filed under the model id it recorded (else its key).

        Several versions of one model may each have their own; one that recorded no version
        applies to every version, after those that name the version.
        """
        by_model: dict[str, list[Detector]] = {}
        for key, det in detectors.items() if isinstance(detectors, Mapping) else detectors:
            by_model.setdefault(str(det.meta.get("model_id") or key), []).append(det)
        for dets in by_model.values():
            dets.sort(key=lambda d: d.meta.get("model_version") is None)
        self.supervised = by_model

    @classmethod
    def from_dir(cls, path: str | os.PathLike, **kwargs: Any) -> DetectorBank:
        """Every ``*.skops`` detector of a directory, filed under the model id it records (else the file stem)."""
        files = sorted(Path(path).glob("*.skops")) if Path(path).is_dir() else []
        return cls([(file.stem, Detector.load(file)) for file in files], **kwargs)

    def set_reference(self, model_id: str, model_version: str, layers: Mapping[str, np.ndarray],
                      predicted: np.ndarray, n_classes: int) -> Detector:
        """Fit (or refit) the unsupervised detector of a model version from its clean reference rows."""
        if PENULTIMATE not in layers:
            raise ValueError(f"the reference of {model_id} has no {PENULTIMATE!r} layer")
        det = fit_reference_detector(
            {"predicted": predicted, "n_classes": n_classes, "embeddings": layers[PENULTIMATE],
             "layers": {k: v for k, v in layers.items() if k != PENULTIMATE}},
            target_fpr=self.target_fpr, seed=self.seed, model_id=model_id, model_version=model_version)
        self.unsupervised[(model_id, model_version)] = det
        return det

    def detector_for(self, model_id: str, model_version: str, layers: Mapping[str, Any] = ()) -> Detector | None:
        """The supervised detector when it applies and the batch carries its layers, else the reference one."""
        for det in self.supervised.get(model_id, ()):
            if det.applies_to(model_id, model_version) and set(det.layers) <= set(layers):
                return det
        ref = self.unsupervised.get((model_id, model_version))
        if ref is not None and set(ref.layers) <= set(layers):
            return ref
        return None

    def label(self, model_id: str, model_version: str, outputs: np.ndarray,
              layers: Mapping[str, np.ndarray]) -> DetectorLabels | None:
        """The verdicts on one batch of a model (None: no detector applies yet)."""
        det = self.detector_for(model_id, model_version, layers)
        if det is None or np.asarray(outputs).shape[1:] != (det.n_classes,):
            return None
        extra = {k: v for k, v in layers.items() if k != PENULTIMATE}
        return det.predict(outputs, layers[PENULTIMATE], extra)
