"""Batched MMD (workers/mmd/batch.py): the same answers as window-by-window analysis, in input order."""

from __future__ import annotations

import doctest

import numpy as np

import workers.mmd.batch as B
from workers.drift import AnalysisOptions
from workers.mmd import MMDTester
from workers.mmd.batch import analyze_batch, analyze_windows
from workers.mmd.drift_test import MMDDriftTest


def _tester(rng: np.random.Generator, n_ref: int, dims=(16, 4)) -> MMDTester:
    ref = {"pen": rng.normal(size=(n_ref, dims[0])), "aux": rng.normal(size=(n_ref, dims[1]))}
    return MMDTester(ref, n_permutations=99, device="cpu", reference_classes=rng.integers(0, 3, n_ref))


def test_doctests() -> None:
    result = doctest.testmod(B)
    assert result.attempted > 0 and result.failed == 0


def test_batched_equals_one_by_one_across_references_sizes_and_repeated_testers() -> None:
    rng = np.random.default_rng(0)
    testers = [_tester(rng, 150), _tester(rng, 150, dims=(8, 2)), _tester(rng, 90)]
    jobs = []
    for t, shift in [(testers[0], 0.0), (testers[1], 0.8), (testers[2], 0.0), (testers[0], 0.6), (testers[1], 0.0)]:
        d = t._layers["pen"].x.shape[1], t._layers["aux"].x.shape[1]
        jobs.append((t, {"pen": rng.normal(size=(60, d[0])) + shift, "aux": rng.normal(size=(60, d[1]))}))
    batched = analyze_batch(jobs, k=5, repeats=12, m=30, stack=True)
    for (t, w), (test, rate, scores) in zip(jobs, batched):
        alone_test, alone_rate, alone_scores = t.analyze(w, k=5, repeats=12, m=30)
        assert np.isclose(test.mmd2, alone_test.mmd2, rtol=1e-4, atol=1e-7)
        assert abs(test.p_value - alone_test.p_value) <= 1 / 100
        assert np.allclose(rate.mmd2, alone_rate.mmd2, rtol=1e-4, atol=1e-6)
        assert np.array_equal(rate.reference_indices, alone_rate.reference_indices)
        assert abs(rate.rate - alone_rate.rate) <= 1 / 12
        assert sorted(scores.indices.tolist()) == sorted(alone_scores.indices.tolist())
    shifted = [i for i, r in enumerate(batched) if r[0].p_value <= 0.05]
    assert 1 in shifted and 3 in shifted and 0 not in shifted  # the windows that moved, and not a clean one


def test_analyze_windows_batches_mmd_tests_and_runs_other_tests_alone() -> None:
    rng = np.random.default_rng(1)

    class Constant:
        device = "const"

        def __init__(self) -> None:
            self.calls = 0

        def analyze(self, window, options, window_classes=None):
            self.calls += 1
            return "constant"

    other = Constant()
    mmd = [MMDDriftTest.fit({"pen": rng.normal(size=(100, 8))}, rng.integers(0, 3, 100), n_permutations=99)
           for _ in range(2)]
    windows = [{"pen": rng.normal(size=(50, 8)) + s} for s in (0.0, 1.0, 0.0)]
    options = AnalysisOptions(top_k=5, repeats=10, m=25)
    out = analyze_windows([(mmd[0], windows[0], None), (other, windows[2], None), (mmd[1], windows[1], None)],
                          options, stack=True)
    assert out[1] == "constant" and other.calls == 1
    assert out[2].combined.detection_rate > out[0].combined.detection_rate
    alone = mmd[1].analyze(windows[1], options)
    assert np.isclose(out[2].layers["pen"].statistic, alone.layers["pen"].statistic, rtol=1e-4)
