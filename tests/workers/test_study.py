"""Layer study (workers/study.py) on a tiny configuration: R=10 repeats, m=30, P=100, three layers.

The demo resnet is trained once per session into the shared session state dir (the
same path as ``tests.workers.inference.conftest.demo_state_dir``, so whichever test
package comes first trains it); attack sets are cached there too.

What the demo shows (see the full run in the report of the study): for PGD with the
demo's L∞ budgets (ε .16 and .3 on 8x8 digits with 17 grey levels, i.e. 2.5 and 5 grey
levels on every pixel) the *shallow* layers detect at least as well as the deep ones —
a big input-space perturbation moves the pooled stem activations directly — so the
LADIS ordering (deep ≥ shallow, seed 000's PGD ε 0.003 on ImageNet) is asserted here
with DeepFool, the demo's minimal-perturbation attack, whose inputs stay close to the
clean ones and whose effect grows with depth, as LADIS's small-ε PGD does on ResNet18.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.study import (
    CLEAN,
    COMBINED,
    StudyResult,
    combination_key,
    format_table,
    layer_study,
    to_json,
    to_markdown,
)

LAYERS = ("stem", "layer2", "penultimate")
PRESETS = ("pgd_small", "deepfool")
OTHER = [combination_key(m) for m in ("fisher", "max", "sum")]


def _state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.inference.models import load_demo_models

    path = tmp_path_factory.getbasetemp() / "layerwatch-state"
    load_demo_models(path, ["resnet"], progress=False)
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyResult:
    state = _state_dir(tmp_path_factory)
    return layer_study(state, "resnet", presets=PRESETS, repeats=10, m=30, n_permutations=100, seed=0,
                       progress=False, layers=LAYERS, device="cpu")


def test_rates_are_per_layer_in_unit_interval(study: StudyResult) -> None:
    assert study.layers == list(LAYERS)
    assert study.presets == list(PRESETS)
    assert set(study.rates) == {CLEAN, *PRESETS}
    for window, per_layer in study.rates.items():
        assert list(per_layer) == [*LAYERS, COMBINED, *OTHER], window
        for layer, rate in per_layer.items():
            assert 0.0 <= rate <= 1.0, (window, layer, rate)
            assert study.stats[window][layer].rate == rate
            assert 0.0 < study.stats[window][layer].median_p <= 1.0
    assert study.dims == {"stem": 16, "layer2": 32, "penultimate": 64}
    assert study.params["repeats"] == 10 and study.params["m"] == 30 and study.params["n_permutations"] == 100
    assert study.params["n_reference"] > 300 and study.params["n_clean"] > 300
    assert study.params["standardize"] is True and study.params["combination"] == "minp"
    assert study.params["bandwidth_multipliers"] == [0.25, 0.5, 1.0, 2.0, 4.0]
    for name in PRESETS:
        assert study.attacks[name]["success_rate"] > 0.5
        assert study.attacks[name]["n_window"] == study.params["n_clean"]


def test_deepest_layer_detects_at_least_as_often_as_the_shallowest(study: StudyResult) -> None:
    rates = study.rates["deepfool"]
    assert rates[LAYERS[-1]] >= rates[LAYERS[0]], rates
    assert rates[LAYERS[-1]] >= 0.8, rates  # the penultimate layer sees the attack


def test_every_layer_detects_pgd_and_clean_traffic_stays_quiet(study: StudyResult) -> None:
    for layer in [*LAYERS, COMBINED]:
        assert study.fpr[layer] <= 0.3, (layer, study.fpr)
        assert study.rates["pgd_small"][layer] >= 0.5, (layer, study.rates["pgd_small"])
        assert study.rates["pgd_small"][layer] > study.fpr[layer]


def test_outputs_table_markdown_json(study: StudyResult, tmp_path: Path) -> None:
    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(format_table(study))
    text = console.export_text()
    for layer in LAYERS:
        assert layer in text
    assert "clean test (FPR)" in text and "pgd_small" in text

    md = to_markdown(study)
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(LAYERS) + 1 + len(OTHER)  # header, rule, layers, default and other combinations
    assert lines[2].startswith("| 1 | `stem` | 16 |")
    assert all(line.count("|") == 5 + len(PRESETS) for line in lines)

    path = tmp_path / "study.json"
    doc = json.loads(to_json(study, path))
    assert json.loads(path.read_text()) == doc
    assert doc["rates"]["deepfool"]["penultimate"] == study.rates["deepfool"]["penultimate"]
    assert doc["layers"] == list(LAYERS)


def test_rejects_unknown_preset(tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.raises(KeyError, match="unknown attack preset"):
        layer_study(_state_dir(tmp_path_factory), "resnet", presets=("nope",), progress=False)
