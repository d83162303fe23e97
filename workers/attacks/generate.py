"""Generate adversarial examples for a torch classifier with ART, measure success, cache the sets.

Success definition (used everywhere in layerwatch): among the inputs the model
classifies **correctly** when clean, the share whose prediction on the adversarial
version differs from the **true label**. Inputs the model already gets wrong are not
counted (they need no attack), so ``success_rate = mean(pred_adv != y | pred_clean == y)``.

Cache: ``<state_dir>/attacks/<model_name>_<preset>.npz`` (numpy, ``allow_pickle=False``)
keyed by a sha256 of the model weights, the preset's configuration, the seed, the
inputs and labels, and the ART version. A key mismatch regenerates and overwrites.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from workers.attacks.presets import Preset, get_preset


@dataclass
class AttackResult:
    """Adversarial versions of x and how well they fool the model.

    ``success`` is per input (False where the clean prediction was already wrong);
    ``success_rate`` = success.sum() / n_correct (see the module docstring).
    """

    x_adv: np.ndarray  # same shape as x, float32
    success_rate: float
    preset: str
    success: np.ndarray  # (n,) bool
    pred_clean: np.ndarray  # (n,) int64
    pred_adv: np.ndarray  # (n,) int64
    n: int
    n_correct: int
    clean_accuracy: float
    adv_accuracy: float
    mean_linf: float
    mean_l2: float
    seconds: float
    seed: int
    key: str
    cached: bool = False
    path: Path | None = None
    meta: dict = field(default_factory=dict)


def _classifier(model: nn.Module, input_shape: tuple[int, ...], nb_classes: int, clip_values: tuple[float, float]):
    from art.estimators.classification import PyTorchClassifier

    device = next(model.parameters()).device
    return PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=nb_classes,
        clip_values=clip_values,
        device_type="gpu" if device.type == "cuda" else "cpu",
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed numpy's and torch's global RNGs (ART draws from them) and restore them afterwards."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)


def _predict(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            out.append(model(torch.tensor(x[start : start + batch_size], device=device)).argmax(1).cpu().numpy())
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def cache_key(model: nn.Module, x: np.ndarray, y: np.ndarray, preset: Preset, seed: int) -> str:
    """sha256 of model weights + preset config + seed + inputs/labels + ART version."""
    import art

    from workers.inference.models import weights_hash

    h = hashlib.sha256()
    h.update(weights_hash(model).encode())
    h.update(json.dumps(preset.config(), sort_keys=True).encode())
    h.update(f"seed={seed};art={art.__version__};shape={x.shape}".encode())
    h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    return h.hexdigest()


def cache_path(state_dir: str | os.PathLike, model_name: str, preset: str) -> Path:
    """<state_dir>/attacks/<model_name>_<preset>.npz"""
    return Path(state_dir) / "attacks" / f"{model_name}_{preset}.npz"


def _load(path: Path, key: str) -> dict | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["key"]) != key:
                return None
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError):
        return None


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def generate(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    preset: str,
    seed: int = 0,
    *,
    state_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    clip_values: tuple[float, float] = (0.0, 1.0),
    nb_classes: int | None = None,
    verbose: bool = False,
    threads: int | None = 1,
) -> AttackResult:
    """Attack ``model`` (a torch module returning logits) on ``x`` with the named preset.

    ``x`` is (n, *input_shape) float in ``clip_values``; ``y`` the true labels. With
    ``state_dir`` the result is cached under ``<state_dir>/attacks/<model_name>_<preset>.npz``
    (``model_name`` defaults to the module's class name). The module's train/eval mode is
    restored afterwards; the attack itself runs on the module in eval mode. ``threads``:
    torch CPU threads during the attack (1 suits the tiny demo models; None leaves the setting).
    """
    spec = get_preset(preset)
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if x.ndim < 2 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x {x.shape} and y {y.shape} must hold the same positive number of inputs")
    key = cache_key(model, x, y, spec, seed)
    path = cache_path(state_dir, model_name or type(model).__name__, preset) if state_dir is not None else None
    if path is not None:
        hit = _load(path, key)
        if hit is not None:
            meta = json.loads(str(hit["meta"]))
            return AttackResult(
                x_adv=hit["x_adv"], success=hit["success"], pred_clean=hit["pred_clean"], pred_adv=hit["pred_adv"],
                preset=preset, seed=seed, key=key, cached=True, path=path, meta=meta,
                **{k: meta[k] for k in ("success_rate", "n", "n_correct", "clean_accuracy", "adv_accuracy",
                                        "mean_linf", "mean_l2", "seconds")},
            )
    from workers.inference.models import torch_threads

    was_training = model.training
    model.eval()
    started = time.perf_counter()
    device = next(model.parameters()).device
    try:
        with torch_threads(threads if device.type == "cpu" else None):
            x_adv, pred_clean, pred_adv = _run(model, spec, x, y, seed, clip_values, nb_classes, verbose)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started
    correct = pred_clean == y
    success = correct & (pred_adv != y)
    delta = (x_adv - x).reshape(len(x), -1)
    meta = {
        "success_rate": float(success.sum() / max(int(correct.sum()), 1)),
        "n": int(len(x)),
        "n_correct": int(correct.sum()),
        "clean_accuracy": float(correct.mean()),
        "adv_accuracy": float((pred_adv == y).mean()),
        "mean_linf": float(np.abs(delta).max(axis=1).mean()),
        "mean_l2": float(np.linalg.norm(delta, axis=1).mean()),
        "seconds": round(seconds, 3),
        "preset_config": spec.config(),
        "seed": seed,
        "model_name": model_name or type(model).__name__,
    }
    if path is not None:
        _save(path, {
            "x_adv": x_adv, "success": success, "pred_clean": pred_clean, "pred_adv": pred_adv,
            "key": np.array(key), "meta": np.array(json.dumps(meta)),
        })
    return AttackResult(
        x_adv=x_adv, success=success, pred_clean=pred_clean, pred_adv=pred_adv, preset=preset, seed=seed, key=key,
        cached=False, path=path, meta=meta,
        **{k: meta[k] for k in ("success_rate", "n", "n_correct", "clean_accuracy", "adv_accuracy",
                                "mean_linf", "mean_l2", "seconds")},
    )


def _run(model: nn.Module, spec: Preset, x: np.ndarray, y: np.ndarray, seed: int,
         clip_values: tuple[float, float], nb_classes: int | None, verbose: bool
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x_adv, clean predictions, adversarial predictions) with the module in eval mode."""
    if nb_classes is None:
        nb_classes = int(_logits_dim(model, x[:1]))
    classifier = _classifier(model, x.shape[1:], nb_classes, clip_values)
    with _seeded(seed):
        x_adv = spec(classifier, verbose=verbose).generate(x=x.copy(), y=y)
    x_adv = np.asarray(x_adv, dtype=np.float32)
    if spec.max_l2 is not None:
        x_adv = _project_l2(x, x_adv, spec.max_l2, clip_values)
    model.eval()  # ART may leave it in another mode
    return x_adv, _predict(model, x), _predict(model, x_adv)


def _logits_dim(model: nn.Module, x1: np.ndarray) -> int:
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(torch.tensor(x1, device=device)).shape[1]


def _project_l2(x: np.ndarray, x_adv: np.ndarray, radius: float, clip_values: tuple[float, float]) -> np.ndarray:
    """Shrink each perturbation to L2 norm <= radius (foolbox's epsilon), then clip to the input range."""
    delta = (x_adv - x).reshape(len(x), -1)
    norms = np.linalg.norm(delta, axis=1, keepdims=True)
    scale = np.minimum(1.0, radius / np.maximum(norms, 1e-12))
    out = x + (delta * scale).reshape(x.shape)
    return np.clip(out, *clip_values).astype(np.float32)
