"""Brute-force numpy references for the MMD engine tests (float64, loops over permutations)."""

from __future__ import annotations

import numpy as np


def sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def kernel(z: np.ndarray, bandwidths, w: np.ndarray | None = None) -> np.ndarray:
    d = sqdist(z, z if w is None else w)
    return np.mean([np.exp(-d / (2.0 * s * s)) for s in bandwidths], axis=0)


def mmd2(k: np.ndarray, in_y: np.ndarray, unbiased: bool = True) -> float:
    """MMD² of the split ``in_y`` (bool per pooled row) by explicit block sums."""
    iy, ix = np.flatnonzero(in_y), np.flatnonzero(~in_y)
    nx, ny = len(ix), len(iy)
    kxx, kyy, kxy = k[np.ix_(ix, ix)], k[np.ix_(iy, iy)], k[np.ix_(ix, iy)]
    if unbiased:
        return (
            (kxx.sum() - np.trace(kxx)) / (nx * (nx - 1))
            + (kyy.sum() - np.trace(kyy)) / (ny * (ny - 1))
            - 2.0 * kxy.mean()
        )
    return kxx.mean() + kyy.mean() - 2.0 * kxy.mean()


def permutation_stats(k: np.ndarray, assignments: np.ndarray, unbiased: bool = True) -> np.ndarray:
    """MMD² of every column of a (N, P) bool assignment matrix (one loop per permutation)."""
    return np.array([mmd2(k, col, unbiased) for col in assignments.T])


def p_value(observed: float, null: np.ndarray) -> float:
    return (1.0 + np.sum(null >= observed)) / (1.0 + len(null))


def observed_split(n_x: int, n_y: int) -> np.ndarray:
    return np.r_[np.zeros(n_x, bool), np.ones(n_y, bool)]


def median_bandwidth(x: np.ndarray) -> float:
    d = sqdist(x, x)
    iu = np.triu_indices(len(x), 1)
    vals = np.sort(d[iu])
    med = vals[(len(vals) - 1) // 2]  # lower median, like torch.median
    return float(np.sqrt(med / 2.0))
