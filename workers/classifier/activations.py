"""Layer activations for every row of the attack data set: what the per-event detector learns from.

:mod:`workers.classifier.dataset` keeps only the output vectors (the baseline forest's
input). The detector also needs what the inference server publishes beside them:
the penultimate embedding and the other tapped layers. :func:`build_activations`
replays the *cached* adversarial sets (the same :func:`workers.attacks.generate`
calls as the data set, so nothing is attacked twice) through each demo model with a
:class:`~workers.inference.tap.LayerTap` on every study layer and stores, per model,
the rows of the data set it served and one (rows, dim) matrix per layer.

Storage: ``<state_dir>/classifier/activations.npz`` (``allow_pickle=False``), keys
``<model>/rows`` (int64 row indices into the data set) and ``<model>/<layer>``;
``activations.json`` beside it records the data set's fingerprint and the layers.
The replayed outputs are checked against the data set's (same model, same inputs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workers.classifier.dataset import (
    CLEAN,
    AttackDataset,
    _cache_root,
    _pool,
    build_dataset,
    classifier_dir,
)
from workers.progress import progress_bar


@dataclass
class ModelActivations:
    """One model's rows of the data set and its tapped layers (penultimate first)."""

    rows: np.ndarray  # (n,) int64 indices into the AttackDataset
    layers: dict[str, np.ndarray]  # name -> (n, d) float32

    @property
    def embeddings(self) -> np.ndarray:
        return self.layers["penultimate"]


def activations_path(state_dir: str | os.PathLike) -> Path:
    return classifier_dir(state_dir) / "activations.npz"


def load_activations(state_dir: str | os.PathLike, dataset: AttackDataset) -> dict[str, ModelActivations] | None:
    """The stored activations when they belong to ``dataset`` (same fingerprint), else None."""
    path = activations_path(state_dir)
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("dataset_fingerprint") != dataset.fingerprint() or not path.exists():
        return None
    out: dict[str, ModelActivations] = {}
    with np.load(path, allow_pickle=False) as npz:
        for model, names in meta["layers"].items():
            out[model] = ModelActivations(npz[f"{model}/rows"], {n: npz[f"{model}/{n}"] for n in names})
    return out


def build_activations(state_dir: str | os.PathLike, seed: int = 0, progress: bool = True, *,
                      models: Iterable[str] | None = None, attacks: Iterable[str] | None = None,
                      n_inputs: int | None = None) -> tuple[AttackDataset, dict[str, ModelActivations]]:
    """(the attack data set, {model: activations}) — both built or loaded from the cache."""
    import torch

    from workers.attacks import generate
    from workers.inference.models import load_demo_models
    from workers.inference.tap import LayerTap

    dataset = build_dataset(state_dir, seed, models, attacks, progress, n_inputs=n_inputs)
    cached = load_activations(state_dir, dataset)
    if cached is not None:
        return dataset, cached
    names = list(dict.fromkeys(dataset.target_model.tolist()))
    demo = load_demo_models(state_dir, names, progress=progress, seed=seed)
    x_pool, y_pool, _, slices = _pool(seed, n_inputs)
    out: dict[str, ModelActivations] = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("layer activations", total=len(dataset))
        for name, model in demo.items():
            study = [n for n in model.layer_names() if n != "penultimate"]
            per_layer: dict[str, list[np.ndarray]] = {}
            rows_all = []
            with LayerTap(model.module, study) as tap:
                for attack in dict.fromkeys(dataset.attack[dataset.target_model == name].tolist()):
                    rows = np.flatnonzero((dataset.target_model == name) & (dataset.attack == attack))
                    x = x_pool
                    if attack != CLEAN:
                        x = np.empty_like(x_pool)
                        for part, sl in slices.items():
                            x[sl] = generate(model.module, x_pool[sl], y_pool[sl], attack, seed=seed,
                                             state_dir=_cache_root(state_dir, part, n_inputs), model_name=name).x_adv
                    x = x[dataset.source_index[rows]]
                    result = tap.tap(torch.from_numpy(np.ascontiguousarray(x)),
                                     output_fn=lambda logits: torch.softmax(logits, dim=1))
                    if not np.allclose(result.outputs, dataset.outputs[rows], atol=1e-4):
                        raise RuntimeError(f"replayed outputs of {name} × {attack} differ from the data set's: "
                                           "rebuild the data set")
                    rows_all.append(rows)
                    for layer, values in result.layers.items():
                        per_layer.setdefault(layer, []).append(np.asarray(values, np.float32))
                    bar.update(task, advance=len(rows))
            out[name] = ModelActivations(np.concatenate(rows_all).astype(np.int64),
                                         {k: np.concatenate(v) for k, v in per_layer.items()})
    path = activations_path(state_dir)
    arrays = {f"{m}/rows": a.rows for m, a in out.items()}
    arrays.update({f"{m}/{k}": v for m, a in out.items() for k, v in a.layers.items()})
    tmp = path.with_name(f".activations.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps({
        "dataset_fingerprint": dataset.fingerprint(),
        "layers": {m: list(a.layers) for m, a in out.items()},
    }, indent=2))
    return dataset, out
