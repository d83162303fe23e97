"""The per-event adversarial detector: features beyond the output vector, supervised and unsupervised heads.

Seed 001's forest sees only the output vector; strong attacks give confidently wrong
outputs it cannot tell from clean ones. The detector also reads what the inference
server publishes beside the output: the penultimate embedding, the other tapped
layers and, when present, the MC-dropout uncertainty (see
:mod:`workers.classifier.features` for the columns). Never the input pixels.

Two kinds of detector, one class:

- **supervised** (:func:`fit_detector`, clean *and* adversarial rows of one model):
  heads for the adversarial probability, the attack family, the attack type and
  (when the adversarial rows name more than one) the target model. The layer
  statistics are cross-fitted: each training row's features come from Gaussians
  fitted on the clean rows of the *other* fold (by ``groups``, e.g. the source
  image), so the heads learn on distances like those of unseen events. The final
  Gaussians use every clean row.
- **unsupervised** (:func:`fit_reference_detector`, a model's clean reference only):
  the Gaussian and nearest-neighbour distances of every layer, each standardised by
  its median and spread on held-out reference rows, averaged. No adversarial
  example needed; the threshold comes from the held-out rows' false-positive rate.
  A supervised detector carries one too (``score(..., kind="unsupervised")``).

Operating point: :meth:`Detector.score` returns a monotone score in [0, 1] where 0.5 is
the threshold at which ``target_fpr`` of clean rows are flagged (out-of-fold for the
supervised head, held-out reference rows for the unsupervised score): the stream's
``p_adversarial >= 0.5`` rule reads it unchanged. The supervised head's raw output is
first Platt-scaled on out-of-fold scores of class-balanced rows, so far from the
threshold it reads as a probability.

Persistence: skops with an explicit type allow-list (as :mod:`workers.classifier.model`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workers.classifier.features import (
    FEATURES_VERSION,
    LAYER_STATS,
    OUTPUT_STATS,
    ClassGaussian,
    log_probabilities,
    output_stats,
)
from workers.classifier.model import (
    ALLOWED_LOADERS,
    ALLOWED_TYPES,
    UntrustedClassifierError,
    _atomic_write,
    _schema_types,
)

FORMAT = "layerwatch.detector/1"
PENULTIMATE = "penultimate"
CLEAN = "clean"
DEFAULT_TARGET_FPR = 0.02
BELOW = 0.4999
KINDS = ("hgb", "lr", "rf")
DEFAULT_KIND = "lr"
UNSUPERVISED_STATS = ("d_pred", "d_min", "knn")

#: attack preset -> family (gradient-sign L∞, L2 gradient, minimal perturbation, black-box query)
ATTACK_FAMILIES: dict[str, str] = {
    "fgsm": "linf_gradient", "pgd": "linf_gradient", "pgd_small": "linf_gradient", "pgd_large": "linf_gradient",
    "fgm": "l2_gradient", "pgd_l2": "l2_gradient",
    "deepfool": "minimal_perturbation", "cw": "minimal_perturbation",
    "square": "black_box_query",
}

DETECTOR_ALLOWED_TYPES = ALLOWED_TYPES | {
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.pipeline.Pipeline",
    "numpy.dtype",
}


def attack_family(attacks: np.ndarray) -> np.ndarray:
    """Family names for attack names (unknown names keep their own name as family)."""
    attacks = np.asarray(attacks).astype(str)
    names, inverse = np.unique(attacks, return_inverse=True)
    return np.array([ATTACK_FAMILIES.get(n, n) for n in names], dtype=str)[inverse]


@dataclass
class Events:
    """One batch of published events, validated: outputs (n, C), penultimate embeddings, other layers."""

    outputs: np.ndarray
    embeddings: np.ndarray
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    uncertainty: np.ndarray | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], what: str = "events") -> Events:
        try:
            outputs, embeddings = d["outputs"], d["embeddings"]
        except KeyError as exc:
            raise ValueError(f"{what} need {exc.args[0]!r} (keys: outputs, embeddings, layers, uncertainty)") from None
        return cls.make(outputs, embeddings, d.get("layers"), d.get("uncertainty"), what)

    @classmethod
    def make(cls, outputs: Any, embeddings: Any, layers: Mapping[str, Any] | None = None,
             uncertainty: Any = None, what: str = "events") -> Events:
        outputs = np.asarray(outputs, dtype=np.float32)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if outputs.ndim != 2 or outputs.shape[1] < 2:
            raise ValueError(f"{what}: outputs must be (n, classes >= 2), got shape {outputs.shape}")
        n = len(outputs)
        if embeddings.ndim != 2 or len(embeddings) != n:
            raise ValueError(f"{what}: embeddings must be ({n}, d), got shape {embeddings.shape}")
        extra = {}
        for name, values in (layers or {}).items():
            if name == PENULTIMATE:
                continue
            values = np.asarray(values, dtype=np.float32)
            if values.ndim != 2 or len(values) != n:
                raise ValueError(f"{what}: layer {name!r} must be ({n}, d), got shape {values.shape}")
            extra[str(name)] = values
        if uncertainty is not None:
            uncertainty = np.asarray(uncertainty, dtype=np.float32).reshape(n, -1).mean(axis=1)
        return cls(outputs, embeddings, extra, uncertainty)

    def __len__(self) -> int:
        return len(self.outputs)

    def layer(self, name: str) -> np.ndarray:
        return self.embeddings if name == PENULTIMATE else self.layers[name]

    def subset(self, idx: np.ndarray) -> Events:
        return Events(self.outputs[idx], self.embeddings[idx], {k: v[idx] for k, v in self.layers.items()},
                      None if self.uncertainty is None else self.uncertainty[idx])

    @classmethod
    def concat(cls, parts: list[Events]) -> Events:
        unc = [p.uncertainty for p in parts]
        return cls(np.concatenate([p.outputs for p in parts]), np.concatenate([p.embeddings for p in parts]),
                   {k: np.concatenate([p.layers[k] for p in parts]) for k in parts[0].layers},
                   None if any(u is None for u in unc) else np.concatenate(unc))


@dataclass
class DetectorLabels:
    """The detector's verdicts on n events (arrays of length n); ``kind`` says which score they got."""

    p_adversarial: np.ndarray  # float32, >= 0.5 means flagged
    family: np.ndarray  # unicode: "clean" where not flagged, else the family head's answer
    attack_type: np.ndarray  # unicode: "clean" where not flagged
    attack_prob: np.ndarray  # float32: the type head's probability of its answer
    target_model: np.ndarray  # unicode
    kind: str  # "supervised" | "unsupervised"


# --- the detector ---------------------------------------------------------------------------------


class Detector:
    """Per-event detector of one model (see the module docstring); build with fit_detector / fit_reference_detector."""

    def __init__(self) -> None:
        self.layers: tuple[str, ...] = ()
        self.n_classes = 0
        self.uses_uncertainty = False
        self.gaussians: dict[str, ClassGaussian] = {}
        self.heads: dict[str, Any] = {}
        self.classes: dict[str, np.ndarray] = {}
        self.raw_threshold = 0.5
        self.platt = (1.0, 0.0)
        self.unsup: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}

    # -- features --

    @property
    def feature_names(self) -> list[str]:
        names = [f"output.{s}" for s in OUTPUT_STATS]
        names += [f"{layer}.{s}" for layer in self.layers for s in LAYER_STATS]
        names += (["mc_dropout_variance"] if self.uses_uncertainty else [])
        names += [f"output.centred_logp{i}" for i in range(self.n_classes)]
        return names + [f"raw.{layer}.{i}" for layer in self.layers for i in range(self.gaussians[layer].dim)]

    def features(self, events: Events) -> np.ndarray:
        """(n, F) float32 feature matrix of a batch (columns :attr:`feature_names`)."""
        return _features(events, self.gaussians, self.layers, self.uses_uncertainty, self.n_classes)

    @property
    def supervised(self) -> bool:
        return "adversarial" in self.heads

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "unfitted"))

    def applies_to(self, model_id: str, model_version: str | None = None) -> bool:
        """True for the model (and version, when the detector recorded one) it was fitted for."""
        if self.meta.get("model_id") not in (None, model_id):
            return False
        fitted = self.meta.get("model_version")
        return fitted is None or model_version is None or str(fitted) == str(model_version)

    # -- scores --

    def score(self, outputs: Any = None, embeddings: Any = None, layers: Mapping[str, Any] | None = None, *,
              uncertainty: Any = None, kind: str | None = None) -> np.ndarray:
        """(n,) float32 scores in [0, 1], 0.5 = the operating threshold (module docstring).

        ``kind`` "supervised" (default when fitted with adversarial rows) or "unsupervised".
        """
        events = Events.make(outputs, embeddings, layers, uncertainty)
        return self.score_features(self.features(events), kind)

    def score_features(self, x: np.ndarray, kind: str | None = None) -> np.ndarray:
        kind = kind or ("supervised" if self.supervised else "unsupervised")
        if kind == "supervised":
            if not self.supervised:
                raise ValueError("this detector has no supervised head (fitted on a clean reference only)")
            return _warp(self._platt(self._raw(x)), self.raw_threshold)
        if kind != "unsupervised":
            raise ValueError(f"kind must be 'supervised' or 'unsupervised', got {kind!r}")
        s = self._unsup_raw(x)
        return _warp_unbounded(s, self.unsup["threshold"], self.unsup["scale"])

    def predict(self, outputs: Any = None, embeddings: Any = None, layers: Mapping[str, Any] | None = None, *,
                uncertainty: Any = None) -> DetectorLabels:
        """Score plus family, attack type and target model (all heads, one call, vectorised)."""
        x = self.features(Events.make(outputs, embeddings, layers, uncertainty))
        return self.labels_from_features(x)

    def labels_from_features(self, x: np.ndarray) -> DetectorLabels:
        n = len(x)
        model = np.full(n, str(self.meta.get("model_id", "")))
        if not self.supervised:
            p = self.score_features(x, "unsupervised")
            flagged = p >= 0.5
            unknown = np.where(flagged, "unknown", CLEAN)
            return DetectorLabels(p, unknown, unknown.copy(), np.zeros(n, np.float32), model, "unsupervised")
        p = self.score_features(x, "supervised")
        flagged = p >= 0.5
        family = _head_argmax(self.heads["family"], self.classes["family"], x)[0]
        attack, attack_prob = _head_argmax(self.heads["attack_type"], self.classes["attack_type"], x)
        if "target_model" in self.heads:
            model = _head_argmax(self.heads["target_model"], self.classes["target_model"], x)[0]
        return DetectorLabels(p, np.where(flagged, family, CLEAN), np.where(flagged, attack, CLEAN),
                              attack_prob.astype(np.float32), model, "supervised")

    def _raw(self, x: np.ndarray) -> np.ndarray:
        return _positive_proba(self.heads["adversarial"], x)

    def _platt(self, raw: np.ndarray) -> np.ndarray:
        a, b = self.platt
        logit = np.log(np.clip(raw, 1e-6, 1 - 1e-6) / np.clip(1 - raw, 1e-6, 1))
        return 1.0 / (1.0 + np.exp(-(a * logit + b)))

    def _unsup_raw(self, x: np.ndarray) -> np.ndarray:
        cols = self.unsup["columns"]
        return ((x[:, cols] - self.unsup["location"]) / self.unsup["spread"]).mean(axis=1)

    # -- persistence --

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (skops, allow-listed types only) and ``path.with_suffix('.json')``."""
        import skops.io as sio

        payload = {
            "format": FORMAT,
            "layers": list(self.layers),
            "n_classes": self.n_classes,
            "uses_uncertainty": self.uses_uncertainty,
            "gaussians": {k: g.state() for k, g in self.gaussians.items()},
            "heads": self.heads,
            "classes": {k: [str(c) for c in v] for k, v in self.classes.items()},
            "raw_threshold": float(self.raw_threshold),
            "platt": [float(v) for v in self.platt],
            "unsup": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.unsup.items()},
            "meta": json.dumps(self.meta, sort_keys=True),
        }
        blob = sio.dumps(payload, compression=zipfile.ZIP_DEFLATED, compresslevel=6)
        untrusted = sorted(sio.get_untrusted_types(data=blob))
        types, loaders = _schema_types(blob)
        extra = sorted((set(untrusted) | types) - DETECTOR_ALLOWED_TYPES) + sorted(loaders - ALLOWED_LOADERS)
        if extra:
            raise UntrustedClassifierError(f"refusing to save: the detector would contain types outside the "
                                           f"allow-list {extra}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, blob)
        sidecar = {**self.meta, "trusted_types": untrusted, "sha256": hashlib.sha256(blob).hexdigest()}
        _atomic_write(path.with_suffix(".json"), json.dumps(sidecar, indent=2, sort_keys=True).encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Detector:
        """Load a detector saved by :meth:`save`; files naming types outside the allow-list are refused."""
        import skops.io as sio

        path = Path(path)
        blob = path.read_bytes()
        types, loaders = _schema_types(blob)
        untrusted = sorted(sio.get_untrusted_types(data=blob))
        extra = sorted((types | set(untrusted)) - DETECTOR_ALLOWED_TYPES) + sorted(loaders - ALLOWED_LOADERS)
        if extra:
            raise UntrustedClassifierError(
                f"refusing to load {path}: it contains types not in layerwatch's allow-list: {', '.join(extra)}")
        payload = sio.loads(blob, trusted=untrusted)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not a layerwatch detector ({FORMAT})")
        det = cls()
        det.meta = json.loads(payload["meta"])
        if det.meta.get("features_version") != FEATURES_VERSION:
            raise ValueError(f"{path} was fitted on features {det.meta.get('features_version')!r}; this layerwatch "
                             f"computes {FEATURES_VERSION!r}: fit it again")
        det.layers = tuple(payload["layers"])
        det.n_classes = int(payload["n_classes"])
        det.uses_uncertainty = bool(payload["uses_uncertainty"])
        det.gaussians = {k: ClassGaussian.from_state(v) for k, v in payload["gaussians"].items()}
        det.heads = dict(payload["heads"])
        det.classes = {k: np.asarray(v, dtype=str) for k, v in payload["classes"].items()}
        det.raw_threshold = float(payload["raw_threshold"])
        det.platt = tuple(float(v) for v in payload["platt"])
        det.unsup = {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in payload["unsup"].items()}
        return det


# --- fitting --------------------------------------------------------------------------------------


def fit_detector(clean: Mapping[str, Any], adversarial: Mapping[str, Any], *, kind: str = DEFAULT_KIND,
                 target_fpr: float = DEFAULT_TARGET_FPR, seed: int = 0, model_id: str | None = None,
                 model_version: str | None = None, folds: int = 5, label_heads: bool = True,
                 **params: Any) -> Detector:
    """Fit a supervised detector for one model from its clean and adversarial events.

    Each argument is a dict ``{"outputs": (n, C) probabilities, "embeddings": (n, d)
    penultimate, "layers": {name: (n, d_l)} (optional), "uncertainty": (n,) MC-dropout
    variance (optional), "groups": (n,) source ids (optional: rows of one source stay in
    one fold)}``; ``adversarial`` may also carry ``"attack"`` (n,) names (family and type
    heads), ``"family"`` (n,) (default: from :data:`ATTACK_FAMILIES`) and ``"target"`` (n,)
    the model each row was crafted against (a target-model head when several).
    Layers used: those present in both (penultimate first, then sorted by name).
    ``label_heads=False`` fits the adversarial head only (family/type/target answer "unknown").
    """
    if kind not in KINDS:
        raise ValueError(f"unknown detector kind {kind!r}: choose from {', '.join(KINDS)}")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # BLAS threads fight over shared cores: 30x slower fits under load (measured)
        return _fit_detector(clean, adversarial, kind=kind, target_fpr=target_fpr, seed=seed, model_id=model_id,
                             model_version=model_version, folds=folds, label_heads=label_heads, **params)


def _fit_detector(clean: Mapping[str, Any], adversarial: Mapping[str, Any], *, kind: str, target_fpr: float,
                  seed: int, model_id: str | None, model_version: str | None, folds: int, label_heads: bool,
                  **params: Any) -> Detector:
    started = time.perf_counter()
    c, a = Events.from_dict(clean, "clean"), Events.from_dict(adversarial, "adversarial")
    if len(c) < 10 or len(a) < 10:
        raise ValueError(f"fit_detector needs at least 10 clean and 10 adversarial rows, got {len(c)} and {len(a)}")
    if c.outputs.shape[1] != a.outputs.shape[1] or c.embeddings.shape[1] != a.embeddings.shape[1]:
        raise ValueError("clean and adversarial rows differ in output width or embedding dimension")
    layers = (PENULTIMATE, *sorted(set(c.layers) & set(a.layers)))
    uses_unc = c.uncertainty is not None and a.uncertainty is not None
    n_classes = c.outputs.shape[1]
    events = Events.concat([_keep(c, layers, uses_unc), _keep(a, layers, uses_unc)])
    y = np.r_[np.zeros(len(c), bool), np.ones(len(a), bool)]
    attack = np.asarray(adversarial.get("attack", np.full(len(a), "adversarial"))).astype(str)
    family = np.asarray(adversarial.get("family", attack_family(attack))).astype(str)
    target = adversarial.get("target")
    groups = _groups(clean.get("groups"), adversarial.get("groups"), len(c), len(a), seed)
    fold = _fold_of(groups, folds, seed)

    # cross-fitted features: Gaussians of fold k from the clean rows of the other folds
    width = 4 + 6 * len(layers) + int(uses_unc) + n_classes + sum(events.layer(n).shape[1] for n in layers)
    x = np.empty((len(events), width), dtype=np.float32)
    for k in range(folds):
        fit_rows = (~y) & (fold != k)
        x[fold == k] = _features(events.subset(fold == k), _fit_gaussians(events.subset(fit_rows), layers, n_classes,
                                                                          seed), layers, uses_unc, n_classes)
    det = Detector()
    det.layers, det.n_classes, det.uses_uncertainty = layers, n_classes, uses_unc
    det.gaussians = _fit_gaussians(events.subset(~y), layers, n_classes, seed)
    det.unsup = _fit_unsupervised(x[~y], det.feature_names, target_fpr)

    weight = np.where(y, 1.0, y.sum() / max((~y).sum(), 1))
    raw_oof = np.empty(len(x))
    for k in range(folds):
        head = _estimator(kind, seed, params).fit(x[fold != k], y[fold != k], **_sw(kind, weight[fold != k]))
        raw_oof[fold == k] = _positive_proba(head, x[fold == k])
    det.heads["adversarial"] = _estimator(kind, seed, params).fit(x, y, **_sw(kind, weight))
    det.platt = _fit_platt(raw_oof, y, weight)
    cal_oof = det._platt(raw_oof)
    det.raw_threshold = float(np.clip(np.quantile(cal_oof[~y], 1.0 - target_fpr), 1e-6, 1 - 1e-6))
    xa = x[y]
    if not label_heads:
        family = attack = np.full(len(xa), "unknown")
    for name, labels in (("family", family), ("attack_type", attack)):
        det.classes[name], codes = np.unique(labels, return_inverse=True)
        det.heads[name] = _estimator(kind, seed, params, multiclass=True).fit(xa, codes) \
            if len(det.classes[name]) > 1 else None
    if label_heads and target is not None and len(np.unique(np.asarray(target).astype(str))) > 1:
        det.classes["target_model"], codes = np.unique(np.asarray(target).astype(str), return_inverse=True)
        det.heads["target_model"] = _estimator(kind, seed, params, multiclass=True).fit(xa, codes)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:12]
    det.meta = {
        "format": FORMAT, "kind": "supervised", "estimator": kind, "params": params, "seed": seed,
        "version": f"det-{kind}-{stamp}-{digest}", "features_version": FEATURES_VERSION,
        "feature_names": det.feature_names, "model_id": model_id, "model_version": model_version,
        "target_fpr": target_fpr, "raw_threshold": det.raw_threshold,
        "oof_clean_fpr": float((cal_oof[~y] > det.raw_threshold).mean()),
        "oof_adversarial_tpr": float((cal_oof[y] > det.raw_threshold).mean()),
        "n_clean": len(c), "n_adversarial": len(a), "attacks": sorted(set(attack.tolist())),
        "fitted_at": stamp, "fit_seconds": round(time.perf_counter() - started, 3),
    }
    return det


def fit_reference_detector(clean: Mapping[str, Any], *, target_fpr: float = DEFAULT_TARGET_FPR,
                           holdout: float = 0.3, seed: int = 0, model_id: str | None = None,
                           model_version: str | None = None) -> Detector:
    """An unsupervised detector from a model's clean reference only (dict as :func:`fit_detector`'s ``clean``).

    A seeded ``holdout`` share of the rows is kept out of the Gaussians; the distances'
    standardisation and the threshold (``target_fpr`` of them flagged) come from those rows.
    A reference that kept only the top-1 class per event (the stream's ``reference_embeddings``)
    may give ``"predicted"`` (n,) and ``"n_classes"`` instead of ``"outputs"``: the score
    uses the outputs only through their top-1 class.
    """
    if "outputs" not in clean and "predicted" in clean:
        predicted = np.asarray(clean["predicted"], dtype=np.int64)
        n_classes = int(clean.get("n_classes") or predicted.max() + 1)
        if predicted.min(initial=0) < 0 or predicted.max(initial=0) >= n_classes:
            raise ValueError(f"reference: predicted classes must lie in [0, {n_classes})")
        onehot = np.full((len(predicted), n_classes), 0.01 / max(n_classes - 1, 1), np.float32)
        onehot[np.arange(len(predicted)), predicted] = 0.99
        clean = {**clean, "outputs": onehot}
    c = Events.from_dict(clean, "reference")
    if len(c) < 20:
        raise ValueError(f"a reference detector needs at least 20 reference rows, got {len(c)}")
    layers = (PENULTIMATE, *sorted(c.layers))
    uses_unc = c.uncertainty is not None
    groups = _groups(clean.get("groups"), None, len(c), 0, seed)
    ids = np.unique(groups)
    held_ids = np.random.default_rng(seed).permutation(ids)[: max(1, round(holdout * len(ids)))]
    held = np.isin(groups, held_ids)
    det = Detector()
    det.layers, det.n_classes, det.uses_uncertainty = layers, c.outputs.shape[1], uses_unc
    det.gaussians = _fit_gaussians(c.subset(~held), layers, det.n_classes, seed)
    det.unsup = _fit_unsupervised(det.features(c.subset(held)), det.feature_names, target_fpr)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    det.meta = {"format": FORMAT, "kind": "unsupervised", "seed": seed, "features_version": FEATURES_VERSION,
                "version": f"ref-{stamp}-{hashlib.sha256(c.embeddings.tobytes()).hexdigest()[:12]}",
                "feature_names": det.feature_names, "model_id": model_id, "model_version": model_version,
                "target_fpr": target_fpr, "n_reference": len(c), "n_held_out": int(held.sum()),
                "fitted_at": stamp}
    return det


# --- helpers --------------------------------------------------------------------------------------


def _features(events: Events, gaussians: Mapping[str, ClassGaussian], layers: tuple[str, ...], uses_unc: bool,
              n_classes: int) -> np.ndarray:
    if events.outputs.shape[1] != n_classes:
        raise ValueError(f"outputs have {events.outputs.shape[1]} classes; the detector was fitted on {n_classes}")
    missing = [name for name in layers if name != PENULTIMATE and name not in events.layers]
    if missing:
        raise ValueError(f"the detector needs the tapped layer(s) {missing}; got {sorted(events.layers)}")
    if uses_unc and events.uncertainty is None:
        raise ValueError("the detector was fitted with MC-dropout uncertainty; pass uncertainty=")
    predicted = events.outputs.argmax(axis=1)
    parts = [output_stats(events.outputs)]
    parts += [gaussians[name].features(events.layer(name), predicted) for name in layers]
    if uses_unc:
        parts.append(events.uncertainty[:, None])
    logp = log_probabilities(events.outputs)
    parts.append(logp - logp.mean(axis=1, keepdims=True))
    parts += [events.layer(name) for name in layers]  # the activations themselves (supervised heads only)
    return np.concatenate(parts, axis=1)


def _keep(e: Events, layers: tuple[str, ...], uses_unc: bool) -> Events:
    return Events(e.outputs, e.embeddings, {k: e.layers[k] for k in layers if k != PENULTIMATE},
                  e.uncertainty if uses_unc else None)


def _fit_gaussians(clean: Events, layers: tuple[str, ...], n_classes: int, seed: int) -> dict[str, ClassGaussian]:
    predicted = clean.outputs.argmax(axis=1)
    return {name: ClassGaussian.fit(clean.layer(name), predicted, n_classes, seed=seed) for name in layers}


def _groups(clean: Any, adversarial: Any, n_clean: int, n_adv: int, seed: int) -> np.ndarray:
    """Group ids for every row (clean first); rows without ids get their own."""
    if clean is None and adversarial is None:
        return np.arange(n_clean + n_adv)
    own = np.arange(n_clean + n_adv) + (1 << 40)
    g_c = np.asarray(clean, dtype=np.int64) if clean is not None else own[:n_clean]
    g_a = np.asarray(adversarial, dtype=np.int64) if adversarial is not None else own[n_clean:]
    if len(g_c) != n_clean or len(g_a) != n_adv:
        raise ValueError("groups must have one id per row")
    return np.concatenate([g_c, g_a])


def _fold_of(groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    ids, inverse = np.unique(groups, return_inverse=True)
    return (np.random.default_rng(seed).permutation(len(ids)) % folds)[inverse]


def _fit_unsupervised(x_clean_held: np.ndarray, names: list[str], target_fpr: float) -> dict[str, Any]:
    """Columns, robust location/spread and threshold of the unsupervised score from held-out clean features."""
    cols = np.array([i for i, n in enumerate(names) if n.rsplit(".", 1)[-1] in UNSUPERVISED_STATS])
    sub = x_clean_held[:, cols].astype(np.float64)
    location = np.median(sub, axis=0)
    q25, q75 = np.quantile(sub, [0.25, 0.75], axis=0)
    spread = np.maximum((q75 - q25) / 1.349, 1e-6)
    s = ((sub - location) / spread).mean(axis=1)
    return {"columns": cols, "location": location.astype(np.float32), "spread": spread.astype(np.float32),
            "threshold": float(np.quantile(s, 1.0 - target_fpr)), "scale": float(max(s.std(), 1e-6)),
            "held_out_fpr": float((s > np.quantile(s, 1.0 - target_fpr)).mean()), "n_held_out": len(s)}


def _fit_platt(raw: np.ndarray, y: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression

    logit = np.log(np.clip(raw, 1e-6, 1 - 1e-6) / np.clip(1 - raw, 1e-6, 1))[:, None]
    lr = LogisticRegression(C=1e4).fit(logit, y, sample_weight=weight)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def _warp(p: np.ndarray, t: float) -> np.ndarray:
    """Monotone map of [0, 1] sending the threshold t to 0.5 (as AttackClassifier.calibrate)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.where(p > t, 0.5 + 0.5 * (p - t) / (1.0 - t), BELOW * p / t)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _warp_unbounded(s: np.ndarray, t: float, scale: float) -> np.ndarray:
    """Logistic map of an unbounded score: the threshold lands on 0.5 (below it: at most BELOW)."""
    p = 1.0 / (1.0 + np.exp(-np.clip((s - t) / scale, -50, 50)))
    return np.where(s > t, np.maximum(p, 0.5), np.minimum(p, BELOW)).astype(np.float32)


def _estimator(kind: str, seed: int, params: Mapping[str, Any], multiclass: bool = False) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "hgb":
        defaults = {"max_iter": 60 if multiclass else 150, "max_leaf_nodes": 15, "learning_rate": 0.1,
                    "early_stopping": False, "l2_regularization": 1.0}
        return HistGradientBoostingClassifier(random_state=seed, **{**defaults, **params})
    if kind == "rf":
        defaults = {"n_estimators": 100, "min_samples_leaf": 2, "max_features": "sqrt", "n_jobs": 1}
        return RandomForestClassifier(random_state=seed, **{**defaults, **params})
    return Pipeline([("scale", StandardScaler()),
                     ("lr", LogisticRegression(C=params.get("C", 0.1), max_iter=params.get("max_iter", 1000)))])


def _sw(kind: str, weight: np.ndarray) -> dict[str, Any]:
    return {"lr__sample_weight": weight} if kind == "lr" else {"sample_weight": weight}


def _positive_proba(est: Any, x: np.ndarray) -> np.ndarray:
    proba = est.predict_proba(x)
    return proba[:, list(est.classes_).index(True)] if True in list(est.classes_) else np.zeros(len(x))


def _head_argmax(est: Any, classes: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if est is None:  # one class only
        return np.full(len(x), classes[0]), np.ones(len(x))
    proba = est.predict_proba(x)
    idx = proba.argmax(axis=1)
    return classes[np.asarray(est.classes_)[idx]], proba[np.arange(len(x)), idx]
