"""The attack classifier's data set: output vectors of every demo model on clean and attacked inputs.

Seed 001 (Kalin, Ciolino, Noever) trains a random forest on a model's *output vector*
to tell clean from adversarial predictions, the attack used and the model attacked.
This module builds that data set for the demo setup:

- inputs: the **validation + test** parts of :func:`workers.inference.data.demo_split`
  (the demo models never trained on them), pooled; ``source_index`` numbers the pooled
  inputs (validation first, then test), ``part`` says which split each came from;
- for every demo model: its output vector (softmax probabilities) on each clean input
  (``attack="clean"``), and on the adversarial version of each input crafted against
  that model by every attack preset of :data:`workers.attacks.PRESETS`;
- labels per row: ``adversarial`` (False only for clean rows), ``attack`` (preset name or
  ``"clean"``), ``target_model`` (the model attacked; for clean rows the model that
  served the input), ``success`` (the attack flipped the label: the model was right on
  the clean input and is wrong on the adversarial one — the definition of
  :mod:`workers.attacks.generate`; always False for clean rows), and ``clean_correct``
  (the model got the clean input right, so ``adversarial & clean_correct & ~success``
  are the attacks that *failed*).

Every row is kept, failed attacks included (an attack was applied, so they are
adversarial); the evaluation reports them separately.

Storage: ``<state_dir>/classifier/dataset.npz`` (``np.savez``; strings as fixed-width
unicode arrays, so it loads with ``allow_pickle=False``) and ``manifest.json`` beside it
(seed, models and their weight hashes, attacks, inputs, counts and success rates per
(model, attack), build time, a fingerprint of the arrays).

Adversarial sets come from :func:`workers.attacks.generate`, which caches them. The
test-split sets are cached where the demo's traffic simulator looks
(``<state_dir>/attacks/<model>_<preset>.npz``, the same call, so each side reuses the
other's), the validation-split sets under ``<state_dir>/classifier/cache/val/``;
subsets (``n_inputs``) cache under ``<state_dir>/classifier/cache/subset-<n>/`` so they
never overwrite the demo's sets.

Train/test split (:func:`split_masks`): by **source input**, so the clean version of
an image and all of its adversarial versions (against every model) fall on the same
side and the classifier is never tested on an image it saw attacked. The input ids
are split per true digit (stratified) with ``numpy.random.default_rng(seed)``, a
fraction ``test_fraction`` (0.3) of each digit's inputs held out. Note: the demo's
simulated traffic draws from the test part of ``demo_split``, so about 70% of the
live demo inputs were seen (clean and attacked) when the classifier was trained; the
evaluation on the held-out part is the honest figure.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from workers.progress import progress_bar

CLEAN = "clean"
DATASET_VERSION = 1
DEFAULT_TEST_FRACTION = 0.3


def classifier_dir(state_dir: str | os.PathLike) -> Path:
    """<state_dir>/classifier"""
    return Path(state_dir) / "classifier"


def dataset_path(state_dir: str | os.PathLike) -> Path:
    """<state_dir>/classifier/dataset.npz"""
    return classifier_dir(state_dir) / "dataset.npz"


def manifest_path(state_dir: str | os.PathLike) -> Path:
    """<state_dir>/classifier/manifest.json"""
    return classifier_dir(state_dir) / "manifest.json"


@dataclass
class AttackDataset:
    """Rows of (output vector, labels), column-wise numpy arrays of equal length."""

    outputs: np.ndarray  # (n, classes) float32 softmax probabilities
    adversarial: np.ndarray  # (n,) bool
    attack: np.ndarray  # (n,) unicode: preset name or "clean"
    target_model: np.ndarray  # (n,) unicode: model attacked (clean: model that served)
    success: np.ndarray  # (n,) bool: clean prediction right, adversarial prediction wrong
    clean_correct: np.ndarray  # (n,) bool: the model got the clean input right
    source_index: np.ndarray  # (n,) int32: pooled input id (validation first, then test)
    part: np.ndarray  # (n,) unicode: "val" | "test" (the demo_split part of the input)
    truth: np.ndarray  # (n,) int64 true digit
    predicted: np.ndarray  # (n,) int64 argmax of outputs
    perturbation_l2: np.ndarray  # (n,) float32 L2 norm of x_adv - x (0 for clean rows)

    def __len__(self) -> int:
        return len(self.adversarial)

    @property
    def n_classes(self) -> int:
        return int(self.outputs.shape[1])

    def subset(self, mask: np.ndarray) -> "AttackDataset":
        """The rows selected by a boolean mask or an index array."""
        return AttackDataset(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def fingerprint(self) -> str:
        """sha256 over every array (name, dtype, shape, bytes): identifies the data set's content."""
        h = hashlib.sha256()
        for name, a in self.arrays().items():
            a = np.ascontiguousarray(a)
            h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    @classmethod
    def concat(cls, parts: Sequence["AttackDataset"]) -> "AttackDataset":
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})


def split_masks(
    dataset: AttackDataset, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) boolean row masks, split by source input (stratified by digit, seeded).

    All rows of one source input (clean and every attack, every model) land on the same
    side, so no image is both trained on and tested. Deterministic in (source inputs, seed).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ids, first = np.unique(dataset.source_index, return_index=True)
    truth = dataset.truth[first]
    rng = np.random.default_rng(seed)
    test_ids = []
    for digit in np.unique(truth):  # one draw per class: a handful of iterations
        members = ids[truth == digit]
        k = int(round(test_fraction * len(members)))
        test_ids.append(rng.permutation(members)[:k])
    test = np.isin(dataset.source_index, np.concatenate(test_ids) if test_ids else np.empty(0, ids.dtype))
    return ~test, test


# --- storage ------------------------------------------------------------------------------------


def save_dataset(state_dir: str | os.PathLike, dataset: AttackDataset, manifest: dict) -> Path:
    """Write dataset.npz and manifest.json atomically; returns the .npz path."""
    path = dataset_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".dataset.{os.getpid()}.tmp.npz")
    np.savez(tmp, **dataset.arrays())
    os.replace(tmp, path)
    mpath = manifest_path(state_dir)
    tmp_m = mpath.with_name(f".manifest.{os.getpid()}.tmp")
    tmp_m.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp_m, mpath)
    return path


def load_dataset(state_dir: str | os.PathLike) -> AttackDataset:
    """Read <state_dir>/classifier/dataset.npz (no pickle); FileNotFoundError when missing."""
    path = dataset_path(state_dir)
    if not path.exists():
        raise FileNotFoundError(f"no attack data set at {path}: build it with workers.classifier.dataset.build_dataset")
    with np.load(path, allow_pickle=False) as npz:
        missing = [f.name for f in fields(AttackDataset) if f.name not in npz.files]
        if missing:
            raise ValueError(f"{path} lacks arrays {missing}: rebuild the data set")
        return AttackDataset(**{f.name: npz[f.name] for f in fields(AttackDataset)})


def load_manifest(state_dir: str | os.PathLike) -> dict | None:
    try:
        return json.loads(manifest_path(state_dir).read_text())
    except (OSError, ValueError):
        return None


# --- building -----------------------------------------------------------------------------------


def _pool(seed: int, n_inputs: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, slice]]:
    """Validation + test inputs (the first n_inputs of each when given), labels, part names, slices."""
    from workers.inference.data import demo_split

    split = demo_split(seed)
    xs, ys, parts, slices, start = [], [], [], {}, 0
    for name in ("val", "test"):
        x, y = split.part(name)
        if n_inputs is not None:
            x, y = x[:n_inputs], y[:n_inputs]
        xs.append(x)
        ys.append(y)
        parts += [name] * len(y)
        slices[name] = slice(start, start + len(y))
        start += len(y)
    return np.concatenate(xs), np.concatenate(ys), np.array(parts), slices


def _cache_root(state_dir: str | os.PathLike, part: str, n_inputs: int | None) -> Path:
    """Where generate() caches a part's adversarial sets (see the module docstring)."""
    if n_inputs is not None:
        return classifier_dir(state_dir) / "cache" / f"subset-{n_inputs}" / part
    if part == "test":
        return Path(state_dir)  # the demo traffic's own cache: same inputs, same key
    return classifier_dir(state_dir) / "cache" / part


def _expected_manifest(seed: int, models: dict, attacks: Sequence[str], n_inputs: int | None) -> dict:
    return {
        "dataset_version": DATASET_VERSION,
        "seed": seed,
        "models": list(models),
        "model_weights": {name: m.meta.get("sha256", "") for name, m in models.items()},
        "attacks": list(attacks),
        "n_inputs": n_inputs,
    }


def build_dataset(
    state_dir: str | os.PathLike,
    seed: int = 0,
    models: Iterable[str] | None = None,
    attacks: Iterable[str] | None = None,
    progress: bool = True,
    *,
    n_inputs: int | None = None,
    rebuild: bool = False,
) -> AttackDataset:
    """Build (or load when up to date) the data set for ``models`` x ``attacks`` and save it.

    ``models`` defaults to every demo model, ``attacks`` to every preset; ``n_inputs``
    keeps only the first n inputs of each of the validation and test parts (for tests).
    The saved set is reused when its manifest matches (seed, models and their weights,
    attacks, n_inputs) unless ``rebuild``.
    """
    from workers.attacks import PRESETS, generate
    from workers.inference.models import load_demo_models

    attacks = list(attacks) if attacks is not None else list(PRESETS)
    unknown = [a for a in attacks if a not in PRESETS]
    if unknown or CLEAN in attacks:
        raise ValueError(f"unknown attack preset(s) {unknown or [CLEAN]}; known: {', '.join(PRESETS)}")
    demo = load_demo_models(state_dir, models, progress=progress, seed=seed)
    expected = _expected_manifest(seed, demo, attacks, n_inputs)
    manifest = load_manifest(state_dir)
    if not rebuild and manifest is not None and all(manifest.get(k) == v for k, v in expected.items()):
        try:
            dataset = load_dataset(state_dir)
            if dataset.fingerprint() == manifest.get("fingerprint"):
                return dataset
        except (OSError, ValueError):
            pass

    started = time.perf_counter()
    x_pool, y_pool, part, slices = _pool(seed, n_inputs)
    source = np.arange(len(y_pool), dtype=np.int32)
    chunks: list[AttackDataset] = []
    counts: dict[str, dict[str, int]] = {}
    success_rates: dict[str, dict[str, float]] = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("attack data set", total=len(demo) * (1 + len(attacks) * len(slices)))
        for name, model in demo.items():
            clean_probs, _ = model.predict(x_pool)
            clean_pred = clean_probs.argmax(1).astype(np.int64)
            clean_correct = clean_pred == y_pool
            n = len(y_pool)
            chunks.append(AttackDataset(
                outputs=np.asarray(clean_probs, np.float32), adversarial=np.zeros(n, bool),
                attack=np.full(n, CLEAN), target_model=np.full(n, name), success=np.zeros(n, bool),
                clean_correct=clean_correct, source_index=source, part=part, truth=y_pool,
                predicted=clean_pred, perturbation_l2=np.zeros(n, np.float32),
            ))
            counts[name] = {CLEAN: n}
            success_rates[name] = {}
            bar.update(task, advance=1)
            for attack in attacks:
                bar.update(task, description=f"{name} × {attack}")
                x_adv = np.empty_like(x_pool)
                for part_name, sl in slices.items():
                    result = generate(model.module, x_pool[sl], y_pool[sl], attack, seed=seed,
                                      state_dir=_cache_root(state_dir, part_name, n_inputs), model_name=name)
                    x_adv[sl] = result.x_adv
                    bar.update(task, advance=1)
                adv_probs, _ = model.predict(x_adv)
                adv_pred = adv_probs.argmax(1).astype(np.int64)
                success = clean_correct & (adv_pred != y_pool)
                chunks.append(AttackDataset(
                    outputs=np.asarray(adv_probs, np.float32), adversarial=np.ones(n, bool),
                    attack=np.full(n, attack), target_model=np.full(n, name), success=success,
                    clean_correct=clean_correct, source_index=source, part=part, truth=y_pool,
                    predicted=adv_pred,
                    perturbation_l2=np.linalg.norm((x_adv - x_pool).reshape(n, -1), axis=1).astype(np.float32),
                ))
                counts[name][attack] = n
                success_rates[name][attack] = round(float(success.sum() / max(int(clean_correct.sum()), 1)), 4)
    dataset = AttackDataset.concat(chunks)
    # fixed-width unicode arrays (never object arrays) so np.load works with allow_pickle=False
    for key in ("attack", "target_model", "part"):
        setattr(dataset, key, np.asarray(getattr(dataset, key), dtype=str))
    manifest = {
        **expected,
        "n_rows": len(dataset),
        "n_classes": dataset.n_classes,
        "inputs": {k: int(s.stop - s.start) for k, s in slices.items()},
        "counts": counts,
        "success_rate": success_rates,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.perf_counter() - started, 3),
        "fingerprint": dataset.fingerprint(),
        "split": {"by": "source_index", "stratified_by": "truth", "default_test_fraction": DEFAULT_TEST_FRACTION},
    }
    save_dataset(state_dir, dataset, manifest)
    return dataset



