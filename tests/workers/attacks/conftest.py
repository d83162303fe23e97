"""Attack tests reuse the inference tests' session state dir (demo models trained once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workers.inference.conftest import demo_state_dir


@pytest.fixture(scope="session")
def attack_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_state_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def cnn(attack_state_dir: Path):
    from workers.inference.models import load_demo_models

    return load_demo_models(attack_state_dir, ["cnn"], progress=False)["cnn"]
