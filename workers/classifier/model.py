"""The attack classifier: a tree ensemble on a model's output vector with three heads.

Seed 001 (Kalin, Ciolino, Noever) shows that a random forest on the output vector of
a prediction tells clean from adversarial inputs, which attack was used and which
model was attacked. :class:`AttackClassifier` does that with three heads:

- ``adversarial``  — clean or adversarial (``p_adversarial``);
- ``attack_type``  — ``"clean"`` or the attack preset (``attack_type``, ``attack_prob``);
- ``target_model`` — which model produced the output (``target_model``, ``target_prob``).

Features (:func:`output_features`, vectorised, one pass over an (n, classes) array):
the probabilities sorted descending, their entropy, the top-1 − top-2 margin, the
gaps between consecutive sorted log-probabilities (logit gaps: softmax is invariant
to a shift of the logits, so these are the recoverable part of the logit vector's
shape), and — the class set being fixed — the raw probability vector and the
centred log-probabilities (the logits up to a constant). ``FeatureSpec`` records
n_classes and the names; outputs of another width are refused.

Kinds (``kind=``):

- ``"rf"``  scikit-learn ``RandomForestClassifier``, ONE multi-output forest whose
  leaves hold the three heads' class distributions (one tree walk for all heads);
- ``"et"``  ``ExtraTreesClassifier``, the same multi-output layout;
- ``"hgb"`` ``HistGradientBoostingClassifier``, one model per head.

``DEFAULT_KIND`` / ``DEFAULT_PARAMS`` come from measurements on the demo setup
(held-out split, ``layerwatch classifier eval`` and ``bench/classifier.py``): every kind
reaches about the same quality (the output vectors of 10-class digit models carry
limited signal, ROC AUC ~0.87 for clean vs adversarial), so the choice is speed:
``rf`` with 50 trees and ``min_samples_leaf=3`` predicts in < 10 µs per output at batch
1024 and matches a 100-tree full-depth forest; ``et`` trains faster with slightly better
attack-type/target heads but predicts slower; ``hgb`` is the slowest to train and predict.

Operating point: the forest's raw vote share is not a calibrated probability (and
downstream, ``p_adversarial >= 0.5`` means *flagged*: the attack_classified alert
rule counts those). ``fit`` therefore estimates out-of-fold adversarial scores
(``GroupKFold`` by source input when ``groups`` is given), takes the threshold at
which ``target_fpr`` (5%) of clean rows would be flagged, and ``predict`` maps the
raw score monotonically so that this threshold lands on 0.5:
``p = 0.5 + 0.5 (s - t) / (1 - t)`` above it, ``p = 0.4999 s / t`` at or below it.
Rankings (average precision, ROC) are unchanged; ``raw_threshold`` is in the metadata.

Persistence: skops (no pickle). :meth:`AttackClassifier.save` writes
``classifier.skops`` and ``classifier.json`` beside it (version, kind, feature spec,
classes, threshold, trusted types, metrics). The metadata also travels inside the
skops file and is what :meth:`AttackClassifier.load` trusts. Loading refuses any file
whose schema names a type outside :data:`ALLOWED_TYPES` (checked on every node of
the skops schema, and on skops' own ``get_untrusted_types`` list), then calls
``skops.io.load(path, trusted=<that list>)`` — never ``trusted=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "layerwatch.attack_classifier/1"
HEADS = ("adversarial", "attack_type", "target_model")
KINDS = ("rf", "et", "hgb")
DEFAULT_KIND = "rf"
DEFAULT_TARGET_FPR = 0.05
BELOW = 0.4999  # p_adversarial at the threshold's low side: strictly under 0.5 in float32
EPS = 1e-30  # floor before log: float32 softmax tails of the demo models stay above 1e-25

DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    # chosen by the measurements in the report (quality at <= 20 µs/prediction at batch 1024)
    "rf": {"n_estimators": 50, "min_samples_leaf": 3, "max_features": "sqrt"},
    "et": {"n_estimators": 50, "min_samples_leaf": 3, "max_features": 0.5},
    "hgb": {"max_iter": 60, "max_leaf_nodes": 15, "learning_rate": 0.2, "early_stopping": False},
}

# Every type a layerwatch classifier file may name (skops schema nodes), and the loaders.
ALLOWED_TYPES = frozenset({
    "builtins.dict", "builtins.list", "builtins.tuple", "builtins.str", "builtins.int", "builtins.float",
    "builtins.bool", "builtins.NoneType",
    "numpy.ndarray", "numpy.int64", "numpy.int32", "numpy.intp", "numpy.uint64", "numpy.uint32", "numpy.float64",
    "numpy.float32", "numpy.bool_", "numpy.bool", "numpy.str_",
    "numpy.random._generator.Generator",
    "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.ensemble._forest.ExtraTreesClassifier",
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._classes.ExtraTreeClassifier",
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier",
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.preprocessing._label.LabelEncoder",
    "sklearn._loss.loss.HalfBinomialLoss", "sklearn._loss.loss.HalfMultinomialLoss",
    "sklearn._loss._loss.CyHalfBinomialLoss", "sklearn._loss._loss.CyHalfMultinomialLoss",
    "sklearn._loss.link.Interval", "sklearn._loss.link.LogitLink", "sklearn._loss.link.MultinomialLogit",
})
ALLOWED_LOADERS = frozenset({
    "DictNode", "ListNode", "TupleNode", "JsonNode", "TypeNode", "NdArrayNode", "ObjectNode", "TreeNode",
    "LossNode", "RandomGeneratorNode",
})


class UntrustedClassifierError(ValueError):
    """A classifier file naming types (or skops loaders) outside the allow-list: refused, never loaded."""


# --- features -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSpec:
    """What the features are computed from: the output width and the feature names (in column order)."""

    n_classes: int
    names: tuple[str, ...]

    @classmethod
    def for_classes(cls, n_classes: int) -> "FeatureSpec":
        return cls(n_classes, tuple(feature_names(n_classes)))

    def to_dict(self) -> dict[str, Any]:
        return {"n_classes": self.n_classes, "names": list(self.names)}


def feature_names(n_classes: int) -> list[str]:
    """Column names of :func:`output_features` for outputs of ``n_classes`` classes."""
    c = range(n_classes)
    return ([f"sorted_p{i}" for i in c] + ["entropy", "margin"] + [f"logit_gap{i}" for i in range(n_classes - 1)]
            + [f"p{i}" for i in c] + [f"centred_logp{i}" for i in c])


def output_features(outputs: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """(n, 4·classes + 1) float32 features of softmax outputs (n, classes); see the module docstring."""
    p = np.asarray(outputs, dtype=np.float32)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"outputs must be (n, classes >= 2), got shape {p.shape}")
    if n_classes is not None and p.shape[1] != n_classes:
        raise ValueError(f"outputs have {p.shape[1]} classes; this classifier was trained on {n_classes}")
    logp = np.log(np.maximum(p, EPS))
    order = np.argsort(-p, axis=1)
    sorted_p = np.take_along_axis(p, order, axis=1)
    sorted_logp = np.take_along_axis(logp, order, axis=1)
    out = np.empty((p.shape[0], 4 * p.shape[1] + 1), dtype=np.float32)
    k = p.shape[1]
    out[:, :k] = sorted_p
    out[:, k] = -(p * logp).sum(axis=1)
    out[:, k + 1] = sorted_p[:, 0] - sorted_p[:, 1]
    out[:, k + 2 : 2 * k + 1] = sorted_logp[:, :-1] - sorted_logp[:, 1:]
    out[:, 2 * k + 1 : 3 * k + 1] = p
    out[:, 3 * k + 1 :] = logp - logp.mean(axis=1, keepdims=True)
    return out


# --- predictions --------------------------------------------------------------------------------


@dataclass
class Labels:
    """The three heads' verdicts on n outputs (numpy arrays of length n)."""

    p_adversarial: np.ndarray  # float32, >= 0.5 means flagged (see the module docstring)
    attack_type: np.ndarray  # unicode: "clean" or an attack preset
    attack_prob: np.ndarray  # float32
    target_model: np.ndarray  # unicode: a model name
    target_prob: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.p_adversarial)


def _estimator(kind: str, params: dict[str, Any], seed: int, n_jobs: int):
    from sklearn.ensemble import (
        ExtraTreesClassifier,
        HistGradientBoostingClassifier,
        RandomForestClassifier,
    )

    if kind == "rf":
        return RandomForestClassifier(random_state=seed, n_jobs=n_jobs, **params)
    if kind == "et":
        return ExtraTreesClassifier(random_state=seed, n_jobs=n_jobs, **params)
    if kind == "hgb":
        return HistGradientBoostingClassifier(random_state=seed, **params)
    raise ValueError(f"unknown classifier kind {kind!r}: choose from {', '.join(KINDS)}")


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes, codes = np.unique(np.asarray(values).astype(str), return_inverse=True)
    return classes, codes.astype(np.int64)


class AttackClassifier:
    """Tree ensemble on output vectors: ``fit`` on labelled outputs, ``predict`` one micro-batch per call."""

    def __init__(self, kind: str = DEFAULT_KIND, *, seed: int = 0, n_jobs: int = 2,
                 target_fpr: float = DEFAULT_TARGET_FPR, calibration_folds: int = 3, **params: Any):
        if kind not in KINDS:
            raise ValueError(f"unknown classifier kind {kind!r}: choose from {', '.join(KINDS)}")
        self.kind = kind
        self.seed = seed
        self.n_jobs = n_jobs
        self.target_fpr = target_fpr
        self.calibration_folds = calibration_folds
        self.params = {**DEFAULT_PARAMS[kind], **params}
        self.estimators: dict[str, Any] = {}
        self.classes: dict[str, np.ndarray] = {}
        self.spec: FeatureSpec | None = None
        self.raw_threshold = 0.5
        self.meta: dict[str, Any] = {}
        self._tables: tuple[Any, list[np.ndarray]] | None = None

    # -- training --

    def fit(
        self,
        outputs: np.ndarray,
        adversarial: np.ndarray,
        attack_type: np.ndarray,
        target_model: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        extra_meta: dict[str, Any] | None = None,
    ) -> "AttackClassifier":
        """Train the three heads on output vectors (n, classes) and their labels.

        Clean and adversarial rows are weighted to equal totals (the data set holds one
        clean row per input and one per attack). ``groups`` (e.g. the source input index)
        keeps every version of an input in one fold of the calibration cross-validation.
        """
        started = time.perf_counter()
        outputs = np.asarray(outputs, dtype=np.float32)
        adversarial = np.asarray(adversarial, dtype=bool)
        n = len(outputs)
        if not (len(adversarial) == len(attack_type) == len(target_model) == n) or n == 0:
            raise ValueError("outputs and the three label arrays must have the same positive length")
        if adversarial.all() or not adversarial.any():
            raise ValueError("training needs both clean and adversarial rows")
        self.spec = FeatureSpec.for_classes(outputs.shape[1])
        x = output_features(outputs, self.spec.n_classes)
        attack_classes, attack_codes = _codes(attack_type)
        target_classes, target_codes = _codes(target_model)
        self.classes = {"adversarial": np.array(["clean", "adversarial"]), "attack_type": attack_classes,
                        "target_model": target_classes}
        y = np.column_stack([adversarial.astype(np.int64), attack_codes, target_codes])
        weight = np.where(adversarial, 1.0, adversarial.sum() / max((~adversarial).sum(), 1))
        self.estimators = self._fit_heads(x, y, weight)
        raw_oof = self._out_of_fold_scores(x, y, weight, groups)
        clean_scores = raw_oof[~adversarial]
        self.raw_threshold = float(np.clip(np.quantile(clean_scores, 1.0 - self.target_fpr), 1e-6, 1 - 1e-6))
        data_hash = hashlib.sha256()
        for a in (outputs, y):
            data_hash.update(np.ascontiguousarray(a).tobytes())
        data_hash.update(json.dumps([self.kind, self.params, self.seed, self.target_fpr, self.spec.to_dict(),
                                     {k: v.tolist() for k, v in self.classes.items()}], sort_keys=True).encode())
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.meta = {
            "format": FORMAT,
            "version": f"{self.kind}-{stamp}-{data_hash.hexdigest()[:12]}",
            "kind": self.kind,
            "params": self.params,
            "seed": self.seed,
            "feature_spec": self.spec.to_dict(),
            "classes": {k: v.tolist() for k, v in self.classes.items()},
            "raw_threshold": self.raw_threshold,
            "target_fpr": self.target_fpr,
            "oof_clean_fpr": float((clean_scores > self.raw_threshold).mean()),
            "oof_adversarial_tpr": float((raw_oof[adversarial] > self.raw_threshold).mean()),
            "n_train": int(n),
            "trained_at": stamp,
            "train_seconds": round(time.perf_counter() - started, 3),
            **(extra_meta or {}),
        }
        return self

    def _fit_heads(self, x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> dict[str, Any]:
        if self.kind in ("rf", "et"):
            forest = _estimator(self.kind, self.params, self.seed, self.n_jobs).fit(x, y, sample_weight=weight)
            forest.n_jobs = 1  # prediction: micro-batches are small, joblib dispatch costs more than it saves
            return {"forest": forest}
        uniform = np.ones_like(weight)
        return {head: _estimator(self.kind, self.params, self.seed, 1).fit(x, y[:, i], sample_weight=w)
                for i, (head, w) in enumerate(zip(HEADS, (weight, weight, uniform)))}

    def _out_of_fold_scores(self, x: np.ndarray, y: np.ndarray, weight: np.ndarray,
                            groups: np.ndarray | None) -> np.ndarray:
        """Raw adversarial scores of each training row from a model that did not train on its group."""
        from sklearn.model_selection import GroupKFold, StratifiedKFold

        folds = (GroupKFold(self.calibration_folds).split(x, y[:, 0], groups) if groups is not None
                 else StratifiedKFold(self.calibration_folds, shuffle=True, random_state=self.seed).split(x, y[:, 0]))
        scores = np.empty(len(x), dtype=np.float64)
        for fit_idx, held_idx in folds:
            if self.kind in ("rf", "et"):
                est = _estimator(self.kind, self.params, self.seed, self.n_jobs).fit(x[fit_idx], y[fit_idx],
                                                                                     sample_weight=weight[fit_idx])
                proba = est.predict_proba(x[held_idx])[0]
                cls = est.classes_[0]
            else:
                est = _estimator(self.kind, self.params, self.seed, 1).fit(x[fit_idx], y[fit_idx, 0],
                                                                           sample_weight=weight[fit_idx])
                proba, cls = est.predict_proba(x[held_idx]), est.classes_
            scores[held_idx] = proba[:, cls == 1].sum(axis=1)
        return scores

    # -- prediction --

    def raw_proba(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        """Per head, (n, k) class probabilities in ``self.classes[head]`` order (raw, uncalibrated)."""
        if self.spec is None:
            raise RuntimeError("the classifier is not trained")
        x = output_features(outputs, self.spec.n_classes)
        out: dict[str, np.ndarray] = {}
        if "forest" in self.estimators:
            forest = self.estimators["forest"]
            per_output = self._forest_proba(forest, x)
            for i, head in enumerate(HEADS):
                full = np.zeros((len(x), len(self.classes[head])), dtype=np.float64)
                full[:, forest.classes_[i].astype(np.int64)] = per_output[i]
                out[head] = full
        else:
            with _one_openmp_thread():  # HGB predicts with OpenMP: oversubscribes shared cores at batch sizes
                for head in HEADS:
                    est = self.estimators[head]
                    full = np.zeros((len(x), len(self.classes[head])), dtype=np.float64)
                    full[:, est.classes_.astype(np.int64)] = est.predict_proba(x)
                    out[head] = full
        return out

    def _forest_proba(self, forest: Any, x: np.ndarray) -> list[np.ndarray]:
        """``forest.predict_proba(x)`` without its per-tree validation and locking (same numbers).

        Each tree's leaf class distributions are normalised once (``_leaf_tables``); a
        prediction is one ``tree_.apply`` per tree plus a gather-add, which halves the
        cost at micro-batch sizes.
        """
        if self._tables is None or self._tables[0] is not forest:
            self._tables = (forest, _leaf_tables(forest))
        trees, tables = forest.estimators_, self._tables[1]
        x = np.ascontiguousarray(x, dtype=np.float32)
        acc = tables[0][trees[0].tree_.apply(x)]
        for tree, table in zip(trees[1:], tables[1:]):
            acc += table[tree.tree_.apply(x)]
        acc /= len(trees)
        acc = acc.reshape(len(x), forest.n_outputs_, -1)
        return [acc[:, i, : len(cls)] for i, cls in enumerate(forest.classes_)]

    def calibrate(self, raw_score: np.ndarray) -> np.ndarray:
        """Map raw adversarial scores so the operating threshold lands on 0.5 (monotone, float32)."""
        t = self.raw_threshold
        s = np.asarray(raw_score, dtype=np.float64)
        p = np.where(s > t, 0.5 + 0.5 * (s - t) / (1.0 - t), BELOW * s / t)
        return np.clip(p, 0.0, 1.0).astype(np.float32)

    def predict(self, outputs: np.ndarray) -> Labels:
        """The three heads on a micro-batch of outputs (n, classes): one call, vectorised."""
        return self.labels_from_proba(self.raw_proba(outputs))

    def labels_from_proba(self, proba: dict[str, np.ndarray]) -> Labels:
        """Labels from :meth:`raw_proba`'s per-head probabilities (argmax per head, calibrated p_adversarial)."""
        attack_idx = proba["attack_type"].argmax(axis=1)
        target_idx = proba["target_model"].argmax(axis=1)
        rows = np.arange(len(attack_idx))
        return Labels(
            p_adversarial=self.calibrate(proba["adversarial"][:, 1]),
            attack_type=self.classes["attack_type"][attack_idx],
            attack_prob=proba["attack_type"][rows, attack_idx].astype(np.float32),
            target_model=self.classes["target_model"][target_idx],
            target_prob=proba["target_model"][rows, target_idx].astype(np.float32),
        )

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "untrained"))

    # -- persistence --

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (skops) and ``path.with_suffix('.json')`` (metadata) atomically; returns ``path``."""
        import skops.io as sio

        if not self.estimators:
            raise RuntimeError("the classifier is not trained")
        path = Path(path)
        payload = {
            "format": FORMAT,
            "estimators": self.estimators,
            "classes": {k: [str(c) for c in v] for k, v in self.classes.items()},
            "meta": json.dumps(self.meta, sort_keys=True),
        }
        blob = sio.dumps(payload, compression=zipfile.ZIP_DEFLATED, compresslevel=6)  # leaf tables: ~9x smaller
        untrusted = sorted(sio.get_untrusted_types(data=blob))
        named = _schema_types(blob)
        extra = sorted((set(untrusted) | named[0]) - ALLOWED_TYPES) + sorted(named[1] - ALLOWED_LOADERS)
        if extra:
            raise UntrustedClassifierError(f"refusing to save: the classifier would contain types outside the "
                                           f"allow-list {extra}; add them to ALLOWED_TYPES only after review")
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, blob)
        sidecar = {**self.meta, "trusted_types": untrusted, "sha256": hashlib.sha256(blob).hexdigest(),
                   "file": path.name}
        _atomic_write(path.with_suffix(".json"), json.dumps(sidecar, indent=2, sort_keys=True).encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AttackClassifier":
        """Load a classifier saved by :meth:`save`; files naming types outside the allow-list are refused."""
        import skops.io as sio

        path = Path(path)
        blob = path.read_bytes()
        types, loaders = _schema_types(blob)
        untrusted = sorted(sio.get_untrusted_types(data=blob))
        extra = sorted((types | set(untrusted)) - ALLOWED_TYPES) + sorted(loaders - ALLOWED_LOADERS)
        if extra:
            raise UntrustedClassifierError(
                f"refusing to load {path}: it contains types not in layerwatch's allow-list: {', '.join(extra)}")
        payload = sio.loads(blob, trusted=untrusted)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not a layerwatch attack classifier ({FORMAT})")
        meta = json.loads(payload["meta"])
        clf = cls(meta["kind"], seed=meta.get("seed", 0), target_fpr=meta.get("target_fpr", DEFAULT_TARGET_FPR),
                  **meta.get("params", {}))
        clf.estimators = payload["estimators"]
        clf.classes = {k: np.asarray(v, dtype=str) for k, v in payload["classes"].items()}
        spec = meta["feature_spec"]
        clf.spec = FeatureSpec(int(spec["n_classes"]), tuple(spec["names"]))
        if clf.spec.names != tuple(feature_names(clf.spec.n_classes)):
            raise ValueError(f"{path} was trained on other features than this layerwatch computes; retrain it")
        clf.raw_threshold = float(meta["raw_threshold"])
        clf.meta = meta
        return clf


_CONTROLLER: Any = None


def _one_openmp_thread() -> Any:
    """Limit OpenMP to one thread in the calling thread (threadpoolctl, ~30 µs per use)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="openmp")


def _leaf_tables(forest: Any) -> list[np.ndarray]:
    """Per tree, (nodes, outputs · max_classes) float32 class distributions normalised per output."""
    tables = []
    for tree in forest.estimators_:
        value = np.asarray(tree.tree_.value, dtype=np.float64)  # (nodes, outputs, max_classes)
        total = value.sum(axis=2, keepdims=True)
        total[total == 0] = 1.0
        tables.append((value / total).reshape(len(value), -1).astype(np.float32))
    return tables


def _schema_types(blob: bytes) -> tuple[set[str], set[str]]:
    """Every ``module.class`` and loader named by a node of a skops file's schema."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            schema = json.loads(z.read("schema.json"))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise UntrustedClassifierError(f"not a skops file: {exc}") from None
    types: set[str] = set()
    loaders: set[str] = set()
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "__class__" in node or "__module__" in node or "__loader__" in node:
                types.add(f"{node.get('__module__')}.{node.get('__class__')}")
                loaders.add(str(node.get("__loader__")))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return types, loaders


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def default_path(state_dir: str | os.PathLike) -> Path:
    """<state_dir>/classifier/classifier.skops"""
    return Path(state_dir) / "classifier" / "classifier.skops"

