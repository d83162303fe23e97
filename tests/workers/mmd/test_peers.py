"""Agreement with alibi-detect's MMDDrift (pytorch backend): same kernel, same P."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.mmd import MEDIAN_ONLY, MMDTester

alibi_cd = pytest.importorskip("alibi_detect.cd", reason="alibi-detect (dev extra) not installed")

P = 1000


@pytest.mark.parametrize("shift", [0.0, 0.1, 0.15, 0.2])
def test_p_value_and_statistic_agree_with_alibi_detect(shift):
    rng = np.random.default_rng(int(shift * 100) + 11)
    x = rng.normal(size=(100, 8)).astype(np.float32)
    y = (rng.normal(size=(100, 8)) + shift).astype(np.float32)
    # alibi-detect's kernel: one bandwidth, raw features
    ours = MMDTester(x, n_permutations=P, seed=0, device="cpu", standardize=False,
                     bandwidth_multipliers=MEDIAN_ONLY).test(y)
    bandwidth = MMDTester(x, n_permutations=1, device="cpu", standardize=False).bandwidth
    with torch.random.fork_rng():
        torch.manual_seed(0)  # alibi-detect permutes with the global torch RNG
        detector = alibi_cd.MMDDrift(
            x, backend="pytorch", sigma=np.array([bandwidth], dtype=np.float32), n_permutations=P, device="cpu"
        )
        p_alibi, mmd2_alibi, _ = detector.score(y)
    # both estimate the same permutation p-value with P draws each
    p = (ours.p_value + p_alibi) / 2
    tolerance = 4 * np.sqrt(2 * p * (1 - p) / P) + 2 / P
    assert abs(ours.p_value - p_alibi) <= tolerance, (ours.p_value, p_alibi)
    assert ours.mmd2 == pytest.approx(mmd2_alibi, abs=1e-6)
