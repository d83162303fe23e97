"""Level and power of the tests (fixed seeds, so deterministic)."""

from __future__ import annotations

import numpy as np

from workers.mmd import MMDTester


def test_level_under_h0():
    """Same distribution, d = 32, n = m = 100: rejection rate at 5% over 300 tests."""
    rng = np.random.default_rng(123)
    p = np.array([
        MMDTester(rng.normal(size=(100, 32)), n_permutations=200, seed=i, device="cpu").test(rng.normal(size=(100, 32))).p_value
        for i in range(300)
    ])
    rate = np.mean(p <= 0.05)
    assert 0.02 <= rate <= 0.09, rate
    # p-values roughly uniform: the median is near 1/2
    assert 0.4 <= np.median(p) <= 0.6


def test_power_sparse_mean_shift():
    """0.5 sd mean shift in 10% of d = 64 dims, n = m = 200: rejected in >= 95 of 100 tests."""
    rng = np.random.default_rng(7)
    rejected = 0
    for i in range(100):
        x, y = rng.normal(size=(200, 64)), rng.normal(size=(200, 64))
        y[:, :6] += 0.5
        rejected += MMDTester(x, n_permutations=200, seed=i, device="cpu").test(y).p_value <= 0.05
    assert rejected >= 95, rejected


def test_ladis_detection_rate_clean_vs_clean_and_shifted():
    rng = np.random.default_rng(5)
    tester = MMDTester(rng.normal(size=(1000, 32)), n_permutations=200, seed=0, device="cpu")
    clean = [tester.detection_rate(rng.normal(size=(200, 32)), repeats=100, m=100).rate for _ in range(10)]
    assert np.mean(clean) <= 0.12, clean
    shift = np.r_[np.full(4, 0.5), np.zeros(28)]
    shifted = tester.detection_rate(rng.normal(size=(200, 32)) + shift, repeats=100, m=100)
    assert shifted.rate >= 0.9
    assert shifted.p_values.shape == (100,) and shifted.p_values.min() >= 1 / 201


def test_combined_layers_hold_level_under_h0():
    """Three strongly dependent layers: the combined permutation test keeps its level."""
    rng = np.random.default_rng(99)
    w1, w2 = rng.normal(size=(16, 8)) / 4, rng.normal(size=(8, 4)) / 3

    def layers(n):
        h0 = rng.normal(size=(n, 16))
        h1 = np.tanh(h0 @ w1)
        return {"input": h0, "hidden": h1, "logits": h1 @ w2}

    p_comb, p_first = [], []
    for i in range(200):
        tester = MMDTester(layers(60), n_permutations=100, seed=i, device="cpu")
        res = tester.test(layers(40))
        p_comb.append(res.combined.p_value)
        p_first.append(res.layers["input"].p_value)
    rate = np.mean(np.array(p_comb) <= 0.05)
    assert 0.02 <= rate <= 0.09, rate
    # the combined detection rate of a window is calibrated too
    tester = MMDTester(layers(300), n_permutations=100, seed=0, device="cpu")
    rates = [tester.detection_rate(layers(100), repeats=50, m=50).rate for _ in range(8)]
    assert np.mean(rates) <= 0.12, rates
