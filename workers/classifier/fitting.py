"""Fitting the per-event detectors of the demo models from the attack data set, and where they are stored.

``layerwatch classifier train`` calls :func:`train_detectors`: one supervised detector per
demo model (:func:`~workers.classifier.detector.fit_detector`) on the data set's *train*
part (the baseline classifier's split, so the evaluation's held-out part stays held out),
saved to ``<state_dir>/classifier/detectors/<model>.skops`` with the model's version.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from workers.classifier.activations import ModelActivations, build_activations
from workers.classifier.dataset import (
    DEFAULT_TEST_FRACTION,
    AttackDataset,
    classifier_dir,
    split_masks,
)
from workers.classifier.detector import (
    DEFAULT_KIND,
    DEFAULT_TARGET_FPR,
    PENULTIMATE,
    Detector,
    fit_detector,
)


def detectors_dir(state_dir: str | os.PathLike) -> Path:
    """<state_dir>/classifier/detectors"""
    return classifier_dir(state_dir) / "detectors"


def _events(acts: ModelActivations, dataset: AttackDataset, idx: np.ndarray, layers: Iterable[str]) -> dict[str, Any]:
    """The fit_detector dict of the model's rows ``idx`` (positions in ``acts.rows``)."""
    rows = acts.rows[idx]
    return {"outputs": dataset.outputs[rows], "embeddings": acts.layers[PENULTIMATE][idx],
            "layers": {name: acts.layers[name][idx] for name in layers if name != PENULTIMATE},
            "attack": dataset.attack[rows], "groups": dataset.source_index[rows]}


def model_layers(model: str, available: Iterable[str]) -> list[str]:
    """The layers the demo server taps for ``model`` (penultimate first), among ``available``."""
    from workers.inference.models import DETECTOR_LAYERS

    return [PENULTIMATE] + [n for n in DETECTOR_LAYERS.get(model, ()) if n in set(available)]


def fit_demo_detectors(dataset: AttackDataset, acts: dict[str, ModelActivations], train: np.ndarray, *,
                       exclude_attack: str | None = None, kind: str = DEFAULT_KIND,
                       target_fpr: float = DEFAULT_TARGET_FPR, seed: int = 0,
                       layers: dict[str, list[str]] | None = None, label_heads: bool = True) -> dict[str, Detector]:
    """One supervised detector per model on the rows in ``train`` (optionally without one attack)."""
    out = {}
    for model, a in acts.items():
        use = layers[model] if layers else model_layers(model, a.layers)
        in_train = train[a.rows]
        if exclude_attack is not None:
            in_train &= dataset.attack[a.rows] != exclude_attack
        clean_idx = np.flatnonzero(in_train & ~dataset.adversarial[a.rows])
        adv_idx = np.flatnonzero(in_train & dataset.adversarial[a.rows])
        out[model] = fit_detector(_events(a, dataset, clean_idx, use), _events(a, dataset, adv_idx, use), kind=kind,
                                  target_fpr=target_fpr, seed=seed, model_id=model, label_heads=label_heads)
    return out


def train_detectors(state_dir: str | os.PathLike, seed: int = 0, progress: bool = True, *,
                    test_fraction: float = DEFAULT_TEST_FRACTION, kind: str = DEFAULT_KIND,
                    target_fpr: float = DEFAULT_TARGET_FPR, models: Iterable[str] | None = None,
                    attacks: Iterable[str] | None = None, n_inputs: int | None = None) -> dict[str, Path]:
    """Fit and save one detector per demo model on the train split; returns {model: path}.

    ``models``, ``attacks`` and ``n_inputs`` restrict the attack data set as in ``build_dataset``.
    """
    from workers.inference.models import load_demo_models

    dataset, acts = build_activations(state_dir, seed, progress=progress, models=models, attacks=attacks,
                                      n_inputs=n_inputs)
    train, _ = split_masks(dataset, test_fraction, seed)
    dets = fit_demo_detectors(dataset, acts, train, kind=kind, target_fpr=target_fpr, seed=seed)
    demo = load_demo_models(state_dir, list(dets), progress=progress, seed=seed)
    out = {}
    for model, det in dets.items():
        det.meta.update(model_version=str(demo[model].version), model_weights=demo[model].meta.get("sha256", ""),
                        dataset_fingerprint=dataset.fingerprint(),
                        split={"test_fraction": test_fraction, "seed": seed, "by": "source_index"})
        out[model] = det.save(detectors_dir(state_dir) / f"{model}.skops")
    return out


#: attacks ``fit_torch_detector`` crafts by default: one or two per family, the fast ones
DEFAULT_FIT_ATTACKS = ("fgsm", "pgd", "fgm", "pgd_l2", "deepfool", "square")


def fit_torch_detector(module: Any, x: np.ndarray, y: np.ndarray, *, layers: Iterable[str] = (),
                       attacks: Iterable[str] = DEFAULT_FIT_ATTACKS, model_id: str | None = None,
                       model_version: str | None = None, seed: int = 0, state_dir: str | os.PathLike | None = None,
                       clip_values: tuple[float, float] = (0.0, 1.0), progress: bool = False,
                       **fit_kwargs: Any) -> Detector:
    """Fit a supervised detector for any torch classifier from clean inputs and attacks crafted against it.

    ``x`` (n, *input_shape) in ``clip_values`` and ``y`` true labels: clean data the model
    did not train on (e.g. its validation split). ``layers``: module names tapped besides
    the penultimate layer — publish the same ones from the inference server. Attacks are
    the :data:`workers.attacks.PRESETS` named in ``attacks`` (cached under ``state_dir``
    when given); every version of one input stays in one cross-fitting fold. ``progress``
    shows a rich bar over the attacks (the slow part).
    """
    import torch

    from workers.attacks import generate
    from workers.inference.tap import LayerTap
    from workers.progress import progress_bar

    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    groups = np.arange(len(x))
    parts: dict[str, list[np.ndarray]] = {"outputs": [], "embeddings": [], "attack": [], "groups": []}
    extra: dict[str, list[np.ndarray]] = {}
    with LayerTap(module, list(layers)) as tap:
        def tapped(inputs: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            result = tap.tap(inputs, output_fn=lambda logits: torch.softmax(logits.float(), dim=1))
            return result.outputs, result.layers

        clean_out, clean_layers = tapped(x)
        attacks = list(attacks)
        name = model_id or type(module).__name__
        with progress_bar(progress) as bar:
            task = bar.add_task(f"attacks on {name}", total=len(attacks))
            for attack in attacks:
                bar.update(task, description=f"attack {attack} on {name} ({len(x)} inputs)")
                adv = generate(module, x, y, attack, seed=seed, state_dir=state_dir, model_name=model_id,
                               clip_values=clip_values).x_adv
                bar.advance(task)
                out, got = tapped(adv)
                parts["outputs"].append(out)
                parts["embeddings"].append(got[PENULTIMATE])
                parts["attack"].append(np.full(len(x), attack))
                parts["groups"].append(groups)
                for layer, values in got.items():
                    if layer != PENULTIMATE:
                        extra.setdefault(layer, []).append(values)
    clean = {"outputs": clean_out, "embeddings": clean_layers[PENULTIMATE], "groups": groups,
             "layers": {k: v for k, v in clean_layers.items() if k != PENULTIMATE}}
    adversarial = {k: np.concatenate(v) for k, v in parts.items()}
    adversarial["layers"] = {k: np.concatenate(v) for k, v in extra.items()}
    return fit_detector(clean, adversarial, model_id=model_id, model_version=model_version, seed=seed, **fit_kwargs)
