"""The example's model and data: a 20-feature, 4-class MLP on scikit-learn's make_classification.

Not a layerwatch demo model: any torch model works the same way. Seeded; the trained
weights are cached at ``EXAMPLE_MODEL_PATH`` (default ``./.layerwatch/examples/tabular-mlp.pt``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

FEATURES, CLASSES = 20, 4
MODEL_PATH = Path(os.environ.get("EXAMPLE_MODEL_PATH", "./.layerwatch/examples/tabular-mlp.pt"))


def dataset(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Standardised train / validation / test splits of a seeded make_classification problem."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=6000, n_features=FEATURES, n_informative=12, n_redundant=4,
                               n_classes=CLASSES, class_sep=1.5, random_state=seed)
    x = ((x - x[:3000].mean(axis=0)) / x[:3000].std(axis=0)).astype(np.float32)
    return {"train": (x[:3000], y[:3000]), "val": (x[3000:4000], y[3000:4000]), "test": (x[4000:], y[4000:])}


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def load_model(path: Path = MODEL_PATH) -> nn.Module:
    """The trained MLP: loaded from ``path`` (weights only), trained and saved there on first use."""
    model = build_model()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    x, y = (torch.from_numpy(a) for a in dataset()["train"])
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and does not fight a busy machine
    try:
        for _ in range(60):  # full batch, test accuracy 0.94, well under a second
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()
