"""The demo data set: scikit-learn's 8x8 handwritten digits, one fixed train/validation/test split.

``load_digits`` ships inside scikit-learn (no download), is small enough to train
three models in seconds on a CPU, and is still an image task where the LADIS method
(layer activations, penultimate first) and the seed's gradient attacks apply.

Pixels (0..16) are scaled to [0, 1] and shaped ``(N, 1, 8, 8)`` float32 (NCHW), labels
are int64. The split is stratified 60/20/20 and fixed by ``seed``; every component
(training, reference publication, attacks, traffic simulation) uses the same split:
the models learn on *train*, the reference distribution is the *validation* split,
and simulated production traffic (clean and adversarial) is drawn from *test*.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

IMAGE_SHAPE = (1, 8, 8)
N_CLASSES = 10
FRACTIONS = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class Split:
    """Read-only arrays of the fixed split: x_* (n, 1, 8, 8) float32 in [0, 1], y_* (n,) int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    seed: int = 0

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of 'train', 'val' (or 'validation') or 'test'."""
        key = {"validation": "val"}.get(name, name)
        if key not in ("train", "val", "test"):
            raise ValueError(f"unknown split part {name!r}: use train, val or test")
        return getattr(self, f"x_{key}"), getattr(self, f"y_{key}")


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as ((N, 1, 8, 8) float32 in [0, 1], (N,) int64)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0).reshape(-1, *IMAGE_SHAPE)
    y = bunch.target.astype(np.int64)
    return x, y


@lru_cache(maxsize=8)
def demo_split(seed: int = 0) -> Split:
    """The stratified 60/20/20 train/validation/test split fixed by ``seed`` (cached, read-only)."""
    from sklearn.model_selection import train_test_split

    x, y = load_digits_images()
    idx = np.arange(len(y))
    idx_train, idx_rest = train_test_split(idx, test_size=FRACTIONS[1] + FRACTIONS[2], stratify=y, random_state=seed)
    idx_val, idx_test = train_test_split(
        idx_rest, test_size=FRACTIONS[2] / (FRACTIONS[1] + FRACTIONS[2]), stratify=y[idx_rest], random_state=seed
    )
    arrays = []
    for part in (idx_train, idx_val, idx_test):
        part = np.sort(part)
        for a in (x[part], y[part]):
            a.flags.writeable = False
            arrays.append(a)
    return Split(*arrays, seed=seed)
