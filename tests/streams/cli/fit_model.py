"""A user's model as ``layerwatch classifier fit --model-factory`` imports it: a tiny digit CNN (8x8 inputs)."""

from __future__ import annotations

from torch import nn


def build() -> nn.Module:
    """The architecture only; the weights come from ``--weights``. Module ``"1"`` is the shallow tapped layer."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def broken() -> nn.Module:
    raise RuntimeError("no such checkpoint")
