"""Multi-layer combinations (minp, fisher, max, sum): exact p-values of every column, level, power."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.mmd import COMBINATIONS, MMDTester, column_p_values, combine_layers
from workers.mmd import kernels as km


def test_column_p_values_match_brute_force():
    rng = np.random.default_rng(0)
    stats = torch.tensor(rng.integers(0, 6, size=(3, 4, 21)).astype(float))  # ties on purpose
    p = column_p_values(stats).numpy()
    s = stats.numpy()
    brute = (s[..., None, :] >= s[..., :, None]).sum(-1) / s.shape[-1]
    np.testing.assert_allclose(p, brute)
    np.testing.assert_allclose(p[..., 0], km.permutation_p_value(stats).numpy())


def test_all_combinations_at_once_match_their_definitions():
    rng = np.random.default_rng(1)
    stats = torch.tensor(rng.normal(size=(3, 5, 41)))  # (layers, repeats, 1 + P)
    p = column_p_values(stats)
    z = km.standardize_by_null(stats)
    fisher = -p.log().sum(0)
    n = stats.shape[-1]
    expected = {"fisher": fisher, "minp": fisher / (3 * np.log(n) + 1.0) / (2.0 * n) - p.amin(0),
                "max": z.amax(0), "sum": z.sum(0)}
    every = km.combine_layers_all(stats)
    assert list(every) == list(COMBINATIONS)
    for method in COMBINATIONS:
        torch.testing.assert_close(every[method], expected[method])
        torch.testing.assert_close(combine_layers(stats, method), expected[method])
    assert list(km.combine_layers_all(stats, ("sum", "minp"))) == ["sum", "minp"]


def test_unknown_combination_is_an_error():
    with pytest.raises(ValueError, match="unknown combination"):
        combine_layers(torch.zeros(2, 5), "mean")
    with pytest.raises(ValueError, match="unknown combination"):
        MMDTester(np.zeros((10, 2)), n_permutations=5, device="cpu", combine="mean")


@pytest.mark.parametrize("method", COMBINATIONS)
def test_level_with_exchangeable_columns_and_dependent_layers(method):
    """Under H0 the observed column is one more exchangeable draw: the rejection rate is α ± 0.01.

    4000 tests, layers correlated (0.8) and with different null shapes (normal, χ², exponential).
    """
    g = torch.Generator().manual_seed(1)
    n_tests, P = 4000, 199
    base = torch.randn(n_tests, 1 + P, generator=g, dtype=torch.float64)
    noise = torch.randn(3, n_tests, 1 + P, generator=g, dtype=torch.float64)
    layers = 0.8 * base + 0.6 * noise
    stats = torch.stack([layers[0], layers[1] ** 2, layers[2].exp()])
    p = km.permutation_p_value(combine_layers(stats, method)).numpy()
    assert abs(np.mean(p <= 0.05) - 0.05) <= 0.01, np.mean(p <= 0.05)


def _three_layers(rng: np.random.Generator, n: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    h0 = rng.normal(size=(n, 12))
    h0[:, :3] += shift
    return {"a": h0, "b": np.tanh(rng.normal(size=(n, 12))), "c": rng.normal(size=(n, 6))}


def test_tester_detection_rate_holds_its_level_for_every_combination():
    """Clean windows of dependent layers: every combination's detection rate stays near α."""
    rng = np.random.default_rng(3)
    rates = {m: [] for m in COMBINATIONS}
    for draw in range(4):
        tester = MMDTester(_three_layers(rng, 400), n_permutations=100, seed=draw, device="cpu")
        res = tester.detection_rate(_three_layers(rng, 400), repeats=500, m=50)
        for m in COMBINATIONS:
            rates[m].append(np.mean(res.combinations[m] <= 0.05))
        assert res.method == "minp" and res.rate == pytest.approx(rates["minp"][-1])
    for m, r in rates.items():
        assert abs(np.mean(r) - 0.05) <= 0.02, (m, r)


def test_minp_keeps_the_power_of_the_one_layer_with_signal():
    """One layer of five carries the signal: the sum dilutes it, min-p keeps most of it."""

    def layers(rng: np.random.Generator, n: int, shift: float = 0.0) -> dict[str, np.ndarray]:
        h = rng.normal(size=(n, 12))
        h[:, :3] += shift
        return {"signal": h, **{f"null{i}": rng.normal(size=(n, 8)) for i in range(4)}}

    rng = np.random.default_rng(4)
    tester = MMDTester(layers(rng, 1000), n_permutations=200, seed=0, device="cpu")
    res = tester.detection_rate(layers(rng, 1000, shift=0.45), repeats=200, m=100)
    best = max(r.rate for r in res.layers.values())
    assert res.layers["signal"].rate == best >= 0.9
    minp = np.mean(res.combinations["minp"] <= 0.05)
    total = np.mean(res.combinations["sum"] <= 0.05)
    assert minp >= best - 0.15, (minp, best)
    assert minp >= total + 0.2, (minp, total)


def test_test_reports_every_combination_and_uses_the_chosen_one():
    rng = np.random.default_rng(5)
    ref, win = _three_layers(rng, 200), _three_layers(rng, 80, shift=1.0)
    res = MMDTester(ref, n_permutations=200, seed=0, device="cpu", combine="sum").test(win)
    assert set(res.combined.p_values) == set(COMBINATIONS)
    assert res.combined.method == "sum" and res.p_value == res.combined.p_values["sum"]
    assert res.combined.p_values["minp"] <= 0.05 and res.layers["a"].p_value <= 0.05
