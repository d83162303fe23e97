"""Pure maths of workers.mmd.kernels against brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.workers.mmd import _brute as bf
from workers.mmd import kernels as km


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2024)


def test_squared_distance_matches_numpy_and_is_clamped(rng):
    x = rng.normal(size=(30, 7))
    y = rng.normal(size=(20, 7))
    d = km.squared_pairwise_distance(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(d, bf.sqdist(x, y), rtol=1e-10, atol=1e-10)
    # duplicated points in float32: the GEMM expansion rounds, the clamp keeps >= 0
    big = torch.from_numpy(np.repeat(rng.normal(size=(5, 64)) * 100, 2, axis=0)).float()
    dd = km.squared_pairwise_distance(big)
    assert (dd >= 0).all()
    assert torch.equal(dd.diagonal(), torch.zeros(10))


def test_rbf_kernel_mean_of_bandwidths_and_unit_diagonal(rng):
    x = torch.from_numpy(rng.normal(size=(25, 4)))
    d = km.squared_pairwise_distance(x)
    bws = [0.5, 1.0, 3.0]
    k = km.rbf_kernel(d, bws)
    expected = sum(km.rbf_kernel(d, [b]) for b in bws) / 3
    torch.testing.assert_close(k, expected)
    torch.testing.assert_close(k.diagonal(), torch.ones(25, dtype=k.dtype))
    np.testing.assert_allclose(k.numpy(), bf.kernel(x.numpy(), bws), rtol=1e-12)


def test_median_heuristic_matches_numpy(rng):
    x = rng.normal(size=(41, 6))
    d = km.squared_pairwise_distance(torch.from_numpy(x))
    assert km.median_heuristic(d) == pytest.approx(bf.median_bandwidth(x), rel=1e-12)
    assert km.median_heuristic(torch.zeros(4, 4)) == 1.0  # degenerate sample


@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd2_from_kernel_matrix_unequal_sizes(rng, unbiased):
    z = np.vstack([rng.normal(size=(23, 3)), rng.normal(size=(9, 3)) + 0.4])
    k = bf.kernel(z, [1.3])
    got = km.mmd2_from_kernel_matrix(torch.from_numpy(k), 23, unbiased=unbiased)
    assert got == pytest.approx(bf.mmd2(k, bf.observed_split(23, 9), unbiased), rel=1e-12)


def test_unbiased_mmd2_needs_two_per_side():
    with pytest.raises(ValueError):
        km.mmd_coefficients(1, 5, unbiased=True)


def test_permutation_assignments_shape_sums_and_seed():
    g = torch.Generator().manual_seed(5)
    a = km.permutation_assignments(13, 7, 50, g)
    assert a.shape == (20, 51)
    assert torch.equal(a.sum(0), torch.full((51,), 7.0))
    assert torch.equal(a[:, 0], torch.tensor([0.0] * 13 + [1.0] * 7))
    again = km.permutation_assignments(13, 7, 50, torch.Generator().manual_seed(5))
    other = km.permutation_assignments(13, 7, 50, torch.Generator().manual_seed(6))
    assert torch.equal(a, again)
    assert not torch.equal(a, other)
    # n_y > n_x takes the other branch; still n_y ones per column
    b = km.permutation_assignments(3, 9, 40, torch.Generator().manual_seed(1), include_observed=False)
    assert b.shape == (12, 40) and torch.equal(b.sum(0), torch.full((40,), 9.0))
    # every row lands in the window group sometimes: the splits are not degenerate
    assert (b.sum(1) > 0).all() and (b.sum(1) < 40).all()


@pytest.mark.parametrize("unbiased", [True, False])
def test_permutation_mmd2_and_block_sums_match_brute_force(rng, unbiased):
    n_x, n_y = 17, 11
    z = np.vstack([rng.normal(size=(n_x, 4)), rng.normal(size=(n_y, 4)) + 0.3])
    k = bf.kernel(z, [0.8, 1.6])
    k[np.diag_indices_from(k)] = rng.uniform(0.5, 1.5, size=n_x + n_y)  # a non-constant diagonal
    a = km.permutation_assignments(n_x, n_y, 60, torch.Generator().manual_seed(3), dtype=torch.float64)
    a_np = a.numpy() > 0.5
    expected = bf.permutation_stats(k, a_np, unbiased)
    got = km.permutation_mmd2(torch.from_numpy(k), a, n_x, n_y, unbiased=unbiased, max_chunk_bytes=1024)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    s_xx, s_yy, s_xy = km.permutation_block_sums(torch.from_numpy(k), a, unbiased=unbiased)
    for b in (0, 7, 33):
        iy, ix = np.flatnonzero(a_np[:, b]), np.flatnonzero(~a_np[:, b])
        kxx, kyy = k[np.ix_(ix, ix)], k[np.ix_(iy, iy)]
        off = 0.0 if not unbiased else 1.0
        assert s_xx[b].item() == pytest.approx(kxx.sum() - off * np.trace(kxx), rel=1e-10)
        assert s_yy[b].item() == pytest.approx(kyy.sum() - off * np.trace(kyy), rel=1e-10)
        assert s_xy[b].item() == pytest.approx(k[np.ix_(iy, ix)].sum(), rel=1e-10)


@pytest.mark.parametrize("unbiased", [True, False])
def test_pair_weights_give_every_permutation_statistic(rng, unbiased):
    n_x, n_y = 9, 6
    z = rng.normal(size=(n_x + n_y, 3))
    k = bf.kernel(z, [1.0])
    a = km.permutation_assignments(n_x, n_y, 30, torch.Generator().manual_seed(9), dtype=torch.float64)
    w = km.pair_weights(a, n_x, n_y, unbiased=unbiased)
    iu = np.triu_indices(n_x + n_y, 1)
    stats = torch.from_numpy(k[iu]) @ w
    if not unbiased:  # V-statistic: the i = j terms (k = 1) are a constant
        stats = stats + (1.0 / n_x + 1.0 / n_y)
    np.testing.assert_allclose(stats.numpy(), bf.permutation_stats(k, a.numpy() > 0.5, unbiased), rtol=1e-10)


def test_p_value_never_zero_and_counts_ties():
    null = torch.tensor([[5.0, 1.0, 2.0, 3.0]])  # observed is the largest
    assert km.permutation_p_value(null).item() == pytest.approx(1 / 4)
    tied = torch.tensor([[2.0, 2.0, 1.0, 3.0]])  # one tie and one larger
    assert km.permutation_p_value(tied).item() == pytest.approx(3 / 4)
    assert km.permutation_p_value(torch.tensor([1.0, 2.0]), torch.tensor(3.0)).item() == pytest.approx(1 / 3)


def test_standardize_by_null_uses_all_columns():
    s = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    z = km.standardize_by_null(s)
    torch.testing.assert_close(z[0], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(z[1], torch.zeros(3, dtype=torch.float64))


def test_pick_device():
    assert km.pick_device("cpu") == torch.device("cpu")
    assert km.pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
