"""Attack presets on the demo CNN: success >= 80%, budgets respected, the success definition, the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workers.attacks
from workers.attacks import PRESETS, cache_path, generate, get_preset
from workers.inference.data import demo_split

SPLIT = demo_split(0)
X = np.array(SPLIT.x_test[:200])
Y = np.array(SPLIT.y_test[:200])


@pytest.fixture(scope="module")
def results(cnn, attack_state_dir):
    """Every preset once on 200 test digits (cached on disk for the rest of the session)."""
    return {name: generate(cnn.module, X, Y, name, seed=0, state_dir=attack_state_dir, model_name="cnn")
            for name in PRESETS}


def test_evaluation_presets_are_reachable_by_name_but_not_required_to_fool():
    from workers.attacks import EVAL_PRESETS

    assert {"pgd_003", "pgd_010"} <= set(EVAL_PRESETS) and not set(EVAL_PRESETS) & set(PRESETS)
    assert get_preset("pgd_003").params["eps"] == 0.03
    with pytest.raises(KeyError, match="pgd_003"):
        get_preset("nope")


def test_the_presets_asked_for_exist():
    assert {"fgsm", "fgm", "pgd", "pgd_small", "pgd_large", "pgd_l2", "deepfool"} <= set(PRESETS)
    assert {"cw", "square"} & set(PRESETS)
    assert "torchvision" in workers.attacks.__doc__


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_fools_the_demo_cnn(name, results):
    result = results[name]
    assert result.preset == name and result.n == 200
    assert result.success_rate >= 0.80, f"{name}: {result.success_rate:.3f}"
    assert result.x_adv.shape == X.shape and result.x_adv.dtype == np.float32
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0
    delta = (result.x_adv - X).reshape(len(X), -1)
    spec = get_preset(name)
    eps = spec.params.get("eps")
    if eps is not None and spec.norm == np.inf:
        assert np.abs(delta).max() <= eps + 1e-5
    if eps is not None and spec.norm == 2 and spec.attack == "ProjectedGradientDescent":
        assert np.linalg.norm(delta, axis=1).max() <= eps + 1e-4
    if spec.max_l2 is not None:
        assert np.linalg.norm(delta, axis=1).max() <= spec.max_l2 + 1e-4


def test_success_is_measured_on_inputs_the_model_got_right(results, cnn):
    result = results["pgd"]
    with torch.inference_mode():
        clean = cnn.module(torch.tensor(X)).argmax(1).numpy()
        adv = cnn.module(torch.tensor(result.x_adv)).argmax(1).numpy()
    correct = clean == Y
    np.testing.assert_array_equal(result.pred_clean, clean)
    np.testing.assert_array_equal(result.success, correct & (adv != Y))
    assert result.n_correct == correct.sum() < 200  # one or more digits were already wrong: not counted
    assert result.success_rate == pytest.approx(result.success.sum() / correct.sum())
    assert not result.success[~correct].any()


def test_cache_round_trip_and_key(results, cnn, attack_state_dir):
    path = cache_path(attack_state_dir, "cnn", "fgsm")
    assert path.exists() and results["fgsm"].path == path
    with np.load(path, allow_pickle=False) as npz:
        assert str(npz["key"]) == results["fgsm"].key
    again = generate(cnn.module, X, Y, "fgsm", seed=0, state_dir=attack_state_dir, model_name="cnn")
    assert again.cached and again.success_rate == results["fgsm"].success_rate
    np.testing.assert_array_equal(again.x_adv, results["fgsm"].x_adv)
    # other inputs, another seed or other weights give another key, so the file is regenerated
    fewer = generate(cnn.module, X[:50], Y[:50], "fgsm", seed=0, state_dir=attack_state_dir, model_name="cnn")
    assert not fewer.cached and fewer.key != again.key and fewer.n == 50
    other_seed = generate(cnn.module, X[:50], Y[:50], "fgsm", seed=1, state_dir=attack_state_dir, model_name="cnn")
    assert other_seed.key != fewer.key
    import copy

    changed = copy.deepcopy(cnn.module)
    with torch.no_grad():
        changed.head.bias += 0.01
    assert generate(changed, X[:50], Y[:50], "fgsm", seed=1).key != other_seed.key


def test_generation_is_seeded_and_leaves_the_model_alone(cnn):
    before = {k: v.clone() for k, v in cnn.module.state_dict().items()}
    cnn.module.train()
    try:
        a = generate(cnn.module, X[:40], Y[:40], "square", seed=5)
        b = generate(cnn.module, X[:40], Y[:40], "square", seed=5)
        assert cnn.module.training  # mode restored
    finally:
        cnn.module.eval()
    np.testing.assert_array_equal(a.x_adv, b.x_adv)
    assert all(torch.equal(before[k], v) for k, v in cnn.module.state_dict().items())


def test_unknown_preset_lists_the_known_ones(cnn):
    with pytest.raises(KeyError, match="known presets are fgsm, fgm, pgd"):
        generate(cnn.module, X[:2], Y[:2], "bim")
