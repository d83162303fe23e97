"""Fixtures: a small attack data set (2 models x 2 fast attacks x 40+40 inputs) and a classifier trained on it.

The demo models are trained (once per session) into the session's shared
``layerwatch-state`` dir, the convention of tests/workers/inference/conftest.py, and
linked into a state dir of our own, so the classifier's files never land where other
tests look.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MODELS = ("cnn", "mlp")
ATTACKS = ("fgsm", "pgd")
N_INPUTS = 40


@pytest.fixture(scope="session")
def small_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.classifier.dataset import build_dataset
    from workers.inference.models import load_demo_models

    shared = tmp_path_factory.getbasetemp() / "layerwatch-state"
    load_demo_models(shared, MODELS, progress=False)
    state = tmp_path_factory.mktemp("classifier-state")
    os.symlink(shared / "models", state / "models", target_is_directory=True)
    build_dataset(state, 0, MODELS, ATTACKS, progress=False, n_inputs=N_INPUTS)
    return state


@pytest.fixture(scope="session")
def small_dataset(small_state: Path):
    from workers.classifier.dataset import load_dataset

    return load_dataset(small_state)


@pytest.fixture(scope="session")
def trained(small_state: Path) -> Path:
    """The classifier trained by cli.train on the small data set; returns its .skops path."""
    from workers.classifier.training import train

    return train(small_state, seed=0, model_kind="rf", progress=False, models=MODELS, attacks=ATTACKS,
                 n_inputs=N_INPUTS)
