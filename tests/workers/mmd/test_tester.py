"""MMDTester against brute force, plus its API contract (caching, seeds, dtypes, layers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.workers.mmd import _brute as bf
from workers.mmd import (
    LADIS_MULTIPLIERS,
    MEDIAN_ONLY,
    DetectionRateResult,
    MMDTester,
    ScoresResult,
    TestResult,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(77)


def _standardized(x, ref):
    sd = ref.std(0, ddof=1)
    return (x - ref.mean(0)) / np.where(sd > 1e-12, sd, 1.0)


@pytest.mark.parametrize(
    "dtype,multipliers,unbiased,standardize",
    [
        (torch.float32, (1.0,), True, False),
        (torch.float32, LADIS_MULTIPLIERS, True, True),
        (torch.float64, (1.0,), False, False),
        (torch.float64, LADIS_MULTIPLIERS, True, False),
        (torch.float32, (0.5, 2.0), False, True),
    ],
)
def test_test_matches_brute_force(rng, dtype, multipliers, unbiased, standardize):
    n_x, n_y, d = 48, 31, 6
    x = rng.normal(size=(n_x, d)) * rng.uniform(0.5, 2.0, size=d)
    y = rng.normal(size=(n_y, d)) + 0.25
    tester = MMDTester(
        x, n_permutations=150, seed=4, device="cpu", dtype=dtype,
        bandwidth_multipliers=multipliers, unbiased=unbiased, standardize=standardize,
    )
    result = tester.test(y)
    xs, ys = (_standardized(x, x), _standardized(y, x)) if standardize else (x, y)
    k = bf.kernel(np.vstack([xs, ys]), tester.bandwidths)
    observed = bf.mmd2(k, bf.observed_split(n_x, n_y), unbiased)
    null = bf.permutation_stats(k, tester.assignments(n_y), unbiased)
    assert result.mmd2 == pytest.approx(observed, rel=1e-5)
    assert result.p_value == bf.p_value(observed, null)
    np.testing.assert_allclose(result.null, null, rtol=1e-4, atol=1e-7)
    assert isinstance(result, TestResult) and result.n_reference == n_x and result.n_window == n_y
    assert tester.bandwidth == pytest.approx(bf.median_bandwidth(xs), rel=1e-5)


@pytest.mark.parametrize("unbiased", [True, False])
def test_detection_rate_matches_brute_force(rng, unbiased):
    x = rng.normal(size=(70, 5))
    y = rng.normal(size=(45, 5)) + 0.15
    tester = MMDTester(x, n_permutations=80, seed=2, device="cpu", unbiased=unbiased, standardize=False)
    res = tester.detection_rate(y, repeats=6, m=25, alpha=0.2)
    a = tester.subsample_assignments(25, 25)
    for r in range(6):
        z = np.vstack([x[res.reference_indices[r]], y[res.window_indices[r]]])
        k = bf.kernel(z, tester.bandwidths)
        observed = bf.mmd2(k, bf.observed_split(25, 25), unbiased)
        assert res.p_values[r] == bf.p_value(observed, bf.permutation_stats(k, a, unbiased))
        assert res.mmd2[r] == pytest.approx(observed, rel=1e-4, abs=1e-7)
    assert res.rate == pytest.approx(np.mean(res.p_values <= 0.2))
    # subsamples are distinct rows
    assert all(len(set(row)) == 25 for row in res.reference_indices)
    assert all(len(set(row)) == 25 for row in res.window_indices)


def test_p_value_floor_and_strong_shift(rng):
    x = rng.normal(size=(80, 8))
    tester = MMDTester(x, n_permutations=99, seed=0, device="cpu")
    res = tester.test(rng.normal(size=(40, 8)) + 3.0)
    assert res.p_value == pytest.approx(1 / 100)  # never 0
    assert res.mmd2 > 0.1


def test_reproducible_from_seed_and_generator(rng):
    x, y = rng.normal(size=(60, 4)), rng.normal(size=(30, 4)) + 0.2
    a = MMDTester(x, n_permutations=100, seed=11, device="cpu")
    b = MMDTester(x, n_permutations=100, seed=11, device="cpu")
    c = MMDTester(x, n_permutations=100, seed=12, device="cpu")
    assert np.array_equal(a.test(y).null, b.test(y).null)
    assert not np.array_equal(a.test(y).null, c.test(y).null)
    assert np.array_equal(a.detection_rate(y, repeats=5, m=20).p_values, b.detection_rate(y, repeats=5, m=20).p_values)
    # a call's result does not depend on earlier calls (per-call generators)
    assert np.array_equal(a.detection_rate(y, repeats=5, m=20).window_indices, b.detection_rate(y, repeats=5, m=20).window_indices)
    g1 = MMDTester(x, n_permutations=100, seed=torch.Generator().manual_seed(3), device="cpu")
    g2 = MMDTester(x, n_permutations=100, seed=torch.Generator().manual_seed(3), device="cpu")
    assert np.array_equal(g1.test(y).null, g2.test(y).null)


def test_bandwidth_and_reference_kernel_frozen_across_windows(rng):
    x = rng.normal(size=(120, 6))
    tester = MMDTester(x, n_permutations=50, seed=0, device="cpu", bandwidth_multipliers=LADIS_MULTIPLIERS)
    bw, bws = tester.bandwidth, tester.bandwidths
    kxx = tester._layers["_"].kc_xx
    ptr = kxx.data_ptr()
    for scale in (0.1, 5.0, 50.0):  # wildly different windows would change a per-test median
        tester.test(rng.normal(size=(40, 6)) * scale)
    assert tester.bandwidth == bw and tester.bandwidths == bws
    assert bws == pytest.approx(tuple(bw * m for m in LADIS_MULTIPLIERS))
    assert tester._layers["_"].kc_xx.data_ptr() == ptr
    assert tester.device == torch.device("cpu")
    fixed = MMDTester(x, n_permutations=10, device="cpu", bandwidth=2.5)
    assert fixed.bandwidth == 2.5


def test_low_precision_inputs_and_float64(rng):
    x, y = rng.normal(size=(64, 16)), rng.normal(size=(32, 16)) + 0.3
    ref = MMDTester(x.astype(np.float32), n_permutations=100, seed=1, device="cpu").test(y.astype(np.float32))
    for dt in (torch.float16, torch.bfloat16):
        res = MMDTester(torch.from_numpy(x).to(dt), n_permutations=100, seed=1, device="cpu").test(torch.from_numpy(y).to(dt))
        assert np.isfinite(res.mmd2)
        assert res.mmd2 == pytest.approx(ref.mmd2, rel=0.05, abs=2e-3)
    r64 = MMDTester(x, n_permutations=100, seed=1, device="cpu", dtype="float64").test(y)
    assert r64.mmd2 == pytest.approx(ref.mmd2, rel=1e-5)
    assert r64.p_value == ref.p_value
    with pytest.raises(ValueError):
        MMDTester(x, dtype=torch.float16)


def test_chunking_does_not_change_results(rng):
    x, y = rng.normal(size=(90, 5)), rng.normal(size=(40, 5)) + 0.2
    big = MMDTester(x, n_permutations=200, seed=3, device="cpu")
    tiny = MMDTester(x, n_permutations=200, seed=3, device="cpu", max_chunk_bytes=4096)
    r1, r2 = big.test(y), tiny.test(y)
    assert r1.p_value == r2.p_value
    np.testing.assert_allclose(r1.null, r2.null, rtol=1e-5, atol=1e-8)


def test_window_smaller_than_m_uses_whole_window(rng):
    tester = MMDTester(rng.normal(size=(150, 4)), n_permutations=60, seed=0, device="cpu")
    res = tester.detection_rate(rng.normal(size=(30, 4)), repeats=8, m=100)
    assert isinstance(res, DetectionRateResult)
    assert res.m_window == 30 and res.m_reference == 100
    assert res.p_values.shape == (8,) and 0.0 <= res.rate <= 1.0
    assert all(sorted(row) == list(range(30)) for row in res.window_indices.tolist())


def test_scores_rank_planted_outliers_and_match_brute_force(rng):
    x = rng.normal(size=(200, 8))
    y = rng.normal(size=(60, 8))
    planted = np.array([3, 17, 42, 55])
    y[planted] += 2.5
    tester = MMDTester(x, n_permutations=20, seed=0, device="cpu", dtype="float64", standardize=False)
    res = tester.scores(y, k=4)
    assert isinstance(res, ScoresResult)
    assert sorted(res.indices.tolist()) == planted.tolist()
    assert np.all(np.diff(res.scores) <= 0)
    k_yy = bf.kernel(y, tester.bandwidths)
    k_xy = bf.kernel(x, tester.bandwidths, y)
    witness = (k_yy.sum(0) - 1.0) / (len(y) - 1) - k_xy.mean(0)
    np.testing.assert_allclose(res.witness, witness, rtol=1e-9, atol=1e-12)
    # ME statistic: pairs of a fixed reference order with the window rows
    rows = tester._me_reference_order[: len(y)].numpy()
    z = k_xy[rows] - k_yy
    me = len(y) * z.mean(0) ** 2 / (z.var(0) + 1e-8)
    np.testing.assert_allclose(res.me_stat, me, rtol=1e-8)
    by_me = tester.scores(y, k=10, by="me")
    assert set(planted) <= set(by_me.indices.tolist())
    assert tester.scores(y, k=1000).indices.shape == (60,)


def test_multi_layer_matches_single_layer_testers(rng):
    ref = {"pen": rng.normal(size=(80, 6)), "logits": rng.normal(size=(80, 3))}
    win = {"pen": rng.normal(size=(40, 6)) + 0.4, "logits": rng.normal(size=(40, 3))}
    multi = MMDTester(ref, n_permutations=120, seed=5, device="cpu")
    res = multi.test(win)
    assert set(res.layers) == {"pen", "logits"} and res.combined is not None
    assert isinstance(multi.bandwidth, dict) and set(multi.bandwidth) == {"pen", "logits"}
    for name in ref:
        single = MMDTester(ref[name], n_permutations=120, seed=5, device="cpu").test(win[name])
        assert res.layers[name].p_value == single.p_value  # same permutations
        assert res.layers[name].mmd2 == pytest.approx(single.mmd2, rel=1e-6)
    assert res.p_value == res.combined.p_value
    assert res.mmd2 == pytest.approx(sum(r.mmd2 for r in res.layers.values()))
    assert res.layers["pen"].p_value < 0.05 and res.combined.p_value < 0.05
    rate = multi.detection_rate(win, repeats=10, m=30)
    assert set(rate.layers) == {"pen", "logits"} and rate.p_values.shape == (10,)
    assert rate.layers["pen"].rate >= rate.layers["logits"].rate
    scores = multi.scores(win, k=5)
    assert set(scores.layers) == {"pen", "logits"} and scores.indices.shape == (5,)


def test_analyze_reuses_window_kernels(rng):
    tester = MMDTester(rng.normal(size=(100, 5)), n_permutations=50, seed=0, device="cpu")
    y = rng.normal(size=(40, 5))
    test, rate, scores = tester.analyze(y, k=7, repeats=5, m=20)
    cached = tester._window_val
    assert tester.test(y.copy()).p_value == test.p_value
    assert tester._window_val is cached  # same content: kernels not recomputed
    assert scores.indices.shape == (7,) and rate.repeats == 5


def test_shift_adjust_removes_class_mix_effect(rng):
    # two well-separated classes; the window only changes the class mix (80/20 vs 50/50)
    centers = np.zeros((2, 8))
    centers[1, 0] = 4.0
    ref_cls = np.r_[np.zeros(300, int), np.ones(300, int)]
    x = centers[ref_cls] + rng.normal(size=(600, 8))
    win_cls = np.r_[np.zeros(160, int), np.ones(40, int)]
    y = centers[win_cls] + rng.normal(size=(200, 8))
    # raw features, one bandwidth: the class-mix change is then plainly visible (the default
    # standardised kernel sees it less: 0.55), so the adjustment's effect is unambiguous
    tester = MMDTester(x, n_permutations=100, seed=0, device="cpu", reference_classes=ref_cls, standardize=False,
                       bandwidth_multipliers=MEDIAN_ONLY)
    plain = tester.detection_rate(y, repeats=40, m=100, shift_adjust=False)
    adjusted = tester.detection_rate(y, repeats=40, m=100, window_classes=win_cls)
    assert adjusted.shift_adjusted and not plain.shift_adjusted
    assert plain.rate >= 0.9
    assert adjusted.rate <= 0.15
    # the reference rows drawn have the classes of the window rows, slot by slot
    assert np.array_equal(np.sort(ref_cls[adjusted.reference_indices], 1), np.sort(win_cls[adjusted.window_indices], 1))
    with pytest.raises(ValueError):
        MMDTester(x, n_permutations=10, device="cpu").detection_rate(y, window_classes=win_cls, shift_adjust=True)


def test_input_validation(rng):
    tester = MMDTester(rng.normal(size=(20, 3)), n_permutations=10, device="cpu")
    with pytest.raises(ValueError):
        tester.test(rng.normal(size=(10, 4)))
    with pytest.raises(TypeError):
        tester.test({"a": rng.normal(size=(10, 3))})
    with pytest.raises(ValueError):
        tester.test(rng.normal(size=(1, 3)))
    multi = MMDTester({"a": rng.normal(size=(20, 3))}, n_permutations=10, device="cpu")
    with pytest.raises(KeyError):
        multi.test({"b": rng.normal(size=(10, 3))})
    with pytest.raises(ValueError):
        MMDTester({"a": rng.normal(size=(20, 3)), "b": rng.normal(size=(21, 3))})
