"""``layerwatch classifier fit``: a supervised detector for a user's model, from its stored reference and attacks.

The classify stage gives every model an unsupervised per-event score fitted on its own
clean reference; a supervised detector (adversarial probability, family, attack type)
needs adversarial examples, which only the torch model itself can produce. A CLI has
no model in hand, so the user names it:

- ``--model-factory package.module:callable`` — user code (on ``PYTHONPATH`` or in the
  current directory), imported and called with no arguments, returning a
  ``torch.nn.Module`` (logits out);
- ``--weights FILE.pt`` (optional) — a state dict read with ``torch.load(weights_only=True)``
  (tensors only: nothing is unpickled);
- ``--inputs FILE.npz`` — clean inputs to attack (``x``, optional labels ``y``), read with
  ``allow_pickle=False``: the store keeps layer activations of the reference, not its inputs.

The store's reference of that model version decides which layers are tapped (the ones
the model publishes, so the live events carry what the detector needs) and vouches for
the model: a reference-only detector fitted on the stored rows (the one the stream uses)
scores the model's activations on the clean inputs, and a model that disagrees with
its reference (wrong weights, wrong version, other data) is refused unless ``force``.
The detector is saved where the classify stage loads supervised detectors
(``<state_dir>/classifier/detectors/``), recording the model id and version: the stage
applies it to that version only, within its 60 s re-read.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streams.plugins import PluginError, load
from streams.store import statements as Q

#: a model whose clean inputs its own stored reference flags this often is refused (expected: ~target FPR)
MAX_REFERENCE_FLAGGED = 0.3
MIN_INPUTS = 20


class FitError(ValueError):
    """A ``classifier fit`` input the user can fix; the message says which and what to do, in one line."""


@dataclass
class StoredReference:
    """A model version's reference rows from ``reference_embeddings``: aligned layers and top-1 classes."""

    model_version: str
    layers: dict[str, np.ndarray]
    predicted: np.ndarray

    @property
    def n(self) -> int:
        return len(self.predicted)


@dataclass
class FitResult:
    path: Path
    model_id: str
    model_version: str
    layers: tuple[str, ...]
    attacks: list[str]
    n_inputs: int
    reference_rows: int
    reference_flagged: float  # share of the clean inputs the stored reference's own score flags
    oof_clean_fpr: float
    oof_adversarial_tpr: float
    replaced: bool  # the file held a detector of the same model version before
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)


def load_model(factory: str, weights: str | None = None) -> Any:
    """The ``nn.Module`` the factory builds, in eval mode, with ``weights`` (a state dict) loaded when given."""
    import torch

    if os.getcwd() not in sys.path and "" not in sys.path:  # the console script: your module in this directory too
        sys.path.append(os.getcwd())
    try:
        build = load(factory, {}, "--model-factory")
    except PluginError as exc:
        raise FitError(str(exc)) from None
    if not callable(build):
        raise FitError(f"--model-factory: {factory!r} is not callable")
    try:
        module = build()
    except Exception as exc:  # noqa: BLE001 - user code: say what it raised, in one line
        raise FitError(f"--model-factory: {factory}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(module, torch.nn.Module):
        raise FitError(f"--model-factory: {factory}() returned {type(module).__name__}, not a torch.nn.Module")
    if weights:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FitError(f"--weights: no file {weights}") from None
        except Exception as exc:  # noqa: BLE001 - refused unpickling or a corrupt file
            raise FitError(f"--weights: {weights} is not a tensors-only state dict ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:200]})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise FitError(f"--weights: {weights} holds a {type(state).__name__}, not a state dict")
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
            raise FitError(f"--weights: {weights} does not fit the factory's model: {first}") from None
    return module.eval()


def load_inputs(path: str, limit: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` (n, *input_shape) and optional ``y`` (n,) from an ``.npz`` (no pickles); at most ``limit`` rows, seeded."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise FitError(f"--inputs: no file {path}") from None
    except (OSError, ValueError) as exc:
        raise FitError(f"--inputs: {path} is not a readable .npz without pickles ({exc})") from None
    if "x" not in arrays:
        raise FitError(f"--inputs: {path} has no 'x' array (found: {', '.join(arrays) or 'nothing'})")
    x, y = arrays["x"], arrays.get("y")
    if x.dtype.kind not in "fiu" or x.ndim < 2 or len(x) < MIN_INPUTS:
        raise FitError(f"--inputs: x must be (n >= {MIN_INPUTS}, *input_shape) numbers, got {x.shape} of {x.dtype}")
    if y is not None and (y.shape != (len(x),) or y.dtype.kind not in "iu"):
        raise FitError(f"--inputs: y must be ({len(x)},) integer labels, got {y.shape} of {y.dtype}")
    if limit is not None and len(x) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), limit, replace=False))
        x, y = x[keep], (None if y is None else y[keep])
    return np.ascontiguousarray(x, dtype=np.float32), None if y is None else y.astype(np.int64)


def stored_reference(store: Any, model_id: str, model_version: str | None, limit: int) -> StoredReference:
    """The reference of ``model_id`` at ``model_version`` (default: the version whose reference arrived last)."""
    from streams.stages.references import reference_arrays

    versions = [(str(v), int(n)) for v, n, _ in store.query(Q.REFERENCE_VERSIONS, {"model_id": model_id})]
    if not versions:
        raise FitError(f"model {model_id!r} has no reference in the store: publish clean data first "
                       "(`layerwatch reference`, or Monitor.publish_reference)")
    if model_version is None:
        model_version = versions[0][0]
    elif model_version not in dict(versions):
        raise FitError(f"model {model_id!r} version {model_version!r} has no reference in the store (versions "
                       f"with one: {', '.join(v for v, _ in versions)}): publish its clean data first")
    params = {"model_id": model_id, "model_version": model_version, "limit": limit}
    ids = [r[0] for r in store.query(Q.REFERENCE_IDS, params)]
    layers, predicted = reference_arrays(store.query(Q.REFERENCE_ROWS, {**params, "ids": ids}))
    from workers.classifier.detector import PENULTIMATE

    if PENULTIMATE not in layers or len(predicted) < MIN_INPUTS:
        raise FitError(f"the reference of {model_id!r} version {model_version!r} has {len(predicted)} complete "
                       f"events and layers {sorted(layers)}: it needs >= {MIN_INPUTS} with a {PENULTIMATE!r} layer")
    return StoredReference(model_version, layers, predicted)


def detector_file(directory: Path, model_id: str, model_version: str) -> tuple[Path, bool]:
    """The file for the detector of ``model_id`` at ``model_version``, and whether it replaces one.

    The file already recording that model id and version (e.g. a demo model's), else
    ``<id>@<version>.skops`` (other characters replaced, plus a hash when any were).
    Detectors of the model's other versions stay: each applies to its own version.
    """
    import json

    for sidecar in sorted(directory.glob("*.json")) if directory.is_dir() else ():
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(meta, dict) and meta.get("model_id") == model_id
                and str(meta.get("model_version")) == model_version and sidecar.with_suffix(".skops").exists()):
            return sidecar.with_suffix(".skops"), True
    name = f"{model_id}@{model_version}"
    stem = re.sub(r"[^A-Za-z0-9@._-]", "_", name).lstrip(".") or "model"
    if stem != name:
        stem += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return directory / f"{stem}.skops", False


def fit_model_detector(settings: Any, store: Any, *, model_id: str, model_version: str | None, factory: str,
                       weights: str | None, inputs: str, attacks: list[str] | None = None,
                       clip: tuple[float, float] | None = None, limit: int | None = 1000, target_fpr: float = 0.02,
                       seed: int = 0, force: bool = False, progress: bool = True) -> FitResult:
    """Fit, check against the stored reference and save the supervised detector of one model version."""
    import torch

    from workers.attacks import PRESETS
    from workers.classifier.detector import PENULTIMATE, fit_reference_detector
    from workers.classifier.fitting import (
        DEFAULT_FIT_ATTACKS,
        detectors_dir,
        fit_torch_detector,
    )
    from workers.inference.tap import LayerTap

    started = time.perf_counter()
    attacks = list(attacks or DEFAULT_FIT_ATTACKS)
    unknown = [a for a in attacks if a not in PRESETS]
    if unknown:
        raise FitError(f"--attacks: unknown attack(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}")
    ref = stored_reference(store, model_id, model_version, settings.reference_max)
    module = load_model(factory, weights)
    x, y = load_inputs(inputs, limit, seed)
    extra = sorted(name for name in ref.layers if name != PENULTIMATE)
    modules = dict(module.named_modules())
    missing = [name for name in extra if name not in modules]
    if missing:
        raise FitError(f"the reference of {model_id}@{ref.model_version} has layer(s) {', '.join(missing)} that the "
                       f"model from {factory} does not have (its modules: {', '.join(n for n in modules if n)})")
    with LayerTap(module, extra) as tap:
        try:
            clean = tap.tap(x, output_fn=lambda logits: torch.softmax(logits.float(), dim=1))
        except Exception as exc:  # noqa: BLE001 - user model on user inputs: one line
            raise FitError(f"the model cannot run on --inputs x {x.shape}: {type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:200]}") from None
    n_classes = clean.outputs.shape[1]
    for name, stored in ref.layers.items():
        if clean.layers[name].shape[1] != stored.shape[1]:
            raise FitError(f"layer {name!r}: the model gives {clean.layers[name].shape[1]} dimensions, the stored "
                           f"reference of {model_id}@{ref.model_version} has {stored.shape[1]}: another model?")
    if ref.predicted.max() >= n_classes:
        raise FitError(f"the stored reference names class {ref.predicted.max()} but the model has {n_classes} outputs")
    # the stored reference vouches for the model: its own score (as the stream fits it) on the model's clean rows
    judge = fit_reference_detector({"predicted": ref.predicted, "n_classes": n_classes,
                                    "embeddings": ref.layers[PENULTIMATE],
                                    "layers": {k: ref.layers[k] for k in extra}},
                                   target_fpr=target_fpr, seed=seed, model_id=model_id)
    flagged = float((judge.score(clean.outputs, clean.layers[PENULTIMATE],
                                 {k: clean.layers[k] for k in extra}) >= 0.5).mean())
    if flagged > MAX_REFERENCE_FLAGGED and not force:
        raise FitError(f"the model's clean activations on --inputs do not match the stored reference of "
                       f"{model_id}@{ref.model_version}: its score flags {flagged:.0%} of them (expected about "
                       f"{target_fpr:.0%}); wrong --weights, factory or version, or other data? (--force fits anyway)")
    if y is None:
        y = clean.outputs.argmax(axis=1)  # untargeted attacks away from the model's own answer
    lo, hi = clip if clip is not None else (float(min(x.min(), 0.0)), float(max(x.max(), 1.0)))
    try:
        det = fit_torch_detector(module, x, y, layers=extra, attacks=attacks, model_id=model_id,
                                 model_version=ref.model_version, seed=seed, state_dir=settings.state_path,
                                 clip_values=(lo, hi), target_fpr=target_fpr, progress=progress)
    except ValueError as exc:
        raise FitError(f"cannot fit a detector for {model_id}@{ref.model_version}: {exc}") from None
    det.meta.update(source="layerwatch classifier fit", model_factory=factory,
                    weights_sha256=_sha256(weights) if weights else "", inputs_sha256=_sha256(inputs),
                    reference_rows=ref.n, reference_flagged=flagged, clip_values=[lo, hi])
    path, replaced = detector_file(detectors_dir(settings.state_path), model_id, ref.model_version)
    det.save(path)
    return FitResult(path, model_id, ref.model_version, det.layers, attacks, len(x), ref.n, flagged,
                     float(det.meta["oof_clean_fpr"]), float(det.meta["oof_adversarial_tpr"]), replaced,
                     time.perf_counter() - started, det.meta)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
