"""Pure maths of the MMD engine: distances, RBF kernels, MMD², permutation sums.

Nothing here keeps detector state (the alibi-detect habit): every function takes
tensors and returns tensors, so the facade in :mod:`workers.mmd.tester` stays
thin and each piece can be checked against a brute-force implementation.

Conventions
-----------
* A *pooled* sample is ``Z = [X; Y]``: the ``n_x`` reference rows first, then the
  ``n_y`` window rows.
* An *assignment matrix* ``A`` has shape ``(n_x + n_y, P)`` and holds 0/1 in the
  compute dtype; column ``b`` marks with 1 the rows that permutation ``b`` puts in
  the window group (exactly ``n_y`` ones per column). Column 0 of the matrices
  built by :func:`permutation_assignments` is the observed split.
* For a kernel matrix ``Kc`` with zero diagonal and an assignment ``a`` the three
  quadratic forms ``q = aᵀKc a``, ``s = aᵀKc 1`` and ``T = 1ᵀKc 1`` give every
  block sum: ``S_yy = q``, ``S_xy = s - q``, ``S_xx = T - 2s + q``. So all P
  permutations cost one matrix product ``Kc @ A`` and a column sum — no gathers,
  no copy of the N×N matrix per permutation, no Python loop over permutations.
* MMD² weights sum to zero over the pairs (both the U- and the V-statistic), so a
  constant ``c`` subtracted from every off-diagonal kernel entry does not change
  MMD²; it only shrinks the sums. :func:`center_kernel` uses that to keep
  float32 products accurate (no cancellation of large block sums).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "DEFAULT_MULTIPLIERS",
    "LADIS_MULTIPLIERS",
    "pick_device",
    "squared_pairwise_distance",
    "median_heuristic",
    "rbf_kernel",
    "center_kernel",
    "mmd_coefficients",
    "mmd2_from_kernel_matrix",
    "permutation_assignments",
    "quadratic_forms",
    "permutation_block_sums",
    "mmd2_from_quadratic_forms",
    "permutation_mmd2",
    "pair_weights",
    "permutation_p_value",
    "column_p_values",
    "standardize_by_null",
    "COMBINATIONS",
    "combine_layers",
    "combine_layers_all",
]

#: The five bandwidths of LADIS: median × 2^f for f = -2..2.
LADIS_MULTIPLIERS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
#: The engine's default bandwidths (chosen by ``bench/detection.py``, see docs/detection.md).
DEFAULT_MULTIPLIERS: tuple[float, ...] = LADIS_MULTIPLIERS
#: One bandwidth: the median heuristic itself (the engine's default before issue 18).
MEDIAN_ONLY: tuple[float, ...] = (1.0,)
#: How the layers of a multi-layer test are combined (see :func:`combine_layers`).
COMBINATIONS: tuple[str, ...] = ("minp", "fisher", "max", "sum")
#: The engine's default combination (chosen by ``bench/detection.py``).
DEFAULT_COMBINATION = "minp"


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``cuda`` when available, else ``cpu`` (or the device asked for)."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def squared_pairwise_distance(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    x_sqnorm: torch.Tensor | None = None,
    y_sqnorm: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared Euclidean distances ``‖x_i − y_j‖²`` from the GEMM expansion.

    ``‖x‖² + ‖y‖² − 2 x·y`` costs one matrix product; rounding can make it slightly
    negative, so it is clamped at 0. With ``y`` omitted the distances are of ``x`` to
    itself and the diagonal is set to exactly 0 (so ``k(x, x) = 1`` exactly).
    Precomputed squared norms may be passed to skip recomputing them; ``out`` (a
    contiguous ``(n_x, n_y)`` tensor) receives the result without allocating.
    """
    same = y is None
    if same:
        y = x
    if x_sqnorm is None:
        x_sqnorm = (x * x).sum(-1)
    if y_sqnorm is None:
        y_sqnorm = x_sqnorm if same else (y * y).sum(-1)
    if out is None:
        d = torch.addmm(y_sqnorm.unsqueeze(0), x, y.T, alpha=-2.0)
    else:
        d = torch.addmm(y_sqnorm.unsqueeze(0), x, y.T, alpha=-2.0, out=out)
    d.add_(x_sqnorm.unsqueeze(1)).clamp_min_(0.0)
    if same:
        d.fill_diagonal_(0.0)
    return d


def median_heuristic(
    sqdist: torch.Tensor, *, self_distances: bool = True
) -> float:
    """Median-heuristic bandwidth ``σ = sqrt(median(‖x_i − x_j‖²) / 2)``.

    With this σ the Gaussian kernel ``exp(−d²/(2σ²))`` is ``exp(−d²/median d²)``, the
    convention of Gretton et al. and alibi-detect. For a matrix of a sample to
    itself only the pairs ``i < j`` count (no zero diagonal, no double counting); the
    lower median is taken. A degenerate sample (all points equal) gives σ = 1.
    """
    if self_distances:
        n = sqdist.shape[0]
        iu = torch.triu_indices(n, n, offset=1, device=sqdist.device)
        values = sqdist[iu[0], iu[1]]
    else:
        values = sqdist.reshape(-1)
    if values.numel() == 0:
        return 1.0
    med = float(values.double().median())
    if not math.isfinite(med) or med <= 0.0:
        positive = values[values > 0]
        med = float(positive.double().median()) if positive.numel() else 2.0
    return math.sqrt(med / 2.0)


def rbf_kernel(
    sqdist: torch.Tensor, bandwidths: Sequence[float] | torch.Tensor, *, inplace: bool = False
) -> torch.Tensor:
    """Gaussian RBF kernel on squared distances, averaged over bandwidths.

    ``k(d²) = (1/F) Σ_f exp(−d² / (2 σ_f²))``. Several bandwidths are evaluated from
    the one distance matrix; averaging (a sum divided by F) keeps ``k(x, x) = 1`` and
    gives the same tests as the plain sum (MMD² only scales by F). With ``inplace``
    the distance matrix is overwritten by the kernel (no allocation for one
    bandwidth, one temporary for several).
    """
    bw = [float(b) for b in (bandwidths.tolist() if torch.is_tensor(bandwidths) else bandwidths)]
    if not bw:
        raise ValueError("at least one bandwidth is needed")
    gammas = [-0.5 / (b * b) for b in bw]
    if len(bw) == 1:
        return sqdist.mul_(gammas[0]).exp_() if inplace else torch.exp(sqdist * gammas[0])
    out = torch.exp(sqdist * gammas[0])
    for g in gammas[1:-1]:
        out.add_(torch.exp(sqdist * g))
    last = sqdist.mul_(gammas[-1]).exp_() if inplace else torch.exp(sqdist * gammas[-1])
    last.add_(out).mul_(1.0 / len(bw))
    return last


def center_kernel(kernel: torch.Tensor, c: float, *, zero_diagonal: bool = True) -> torch.Tensor:
    """``K − c`` off the diagonal, 0 on the diagonal (a new tensor).

    MMD² is unchanged by the shift (see the module docstring); the diagonal is
    handled apart by :func:`mmd2_from_quadratic_forms`.
    """
    out = kernel - c
    if zero_diagonal:
        out.fill_diagonal_(0.0)
    return out


def mmd_coefficients(n_x: int, n_y: int, unbiased: bool = True) -> tuple[float, float, float]:
    """Weights ``(c_xx, c_yy, c_xy)`` of ``MMD² = c_xx S_xx + c_yy S_yy − 2 c_xy S_xy``.

    Unbiased (U-statistic, sums over ``i ≠ j``): ``1/(n(n−1))``; biased
    (V-statistic, sums include ``i = j``): ``1/n²``. Unequal sizes are allowed.
    """
    if unbiased:
        if n_x < 2 or n_y < 2:
            raise ValueError("the unbiased MMD² needs at least 2 samples on each side")
        return 1.0 / (n_x * (n_x - 1)), 1.0 / (n_y * (n_y - 1)), 1.0 / (n_x * n_y)
    if n_x < 1 or n_y < 1:
        raise ValueError("the MMD² needs at least 1 sample on each side")
    return 1.0 / (n_x * n_x), 1.0 / (n_y * n_y), 1.0 / (n_x * n_y)


def mmd2_from_kernel_matrix(
    kernel: torch.Tensor, n_x: int, n_y: int | None = None, *, unbiased: bool = True
) -> float:
    """MMD² of a pooled kernel matrix ``[[K_xx, K_xy], [K_yx, K_yy]]`` (float64 sums).

    Unbiased: zero-diagonal U-statistic; biased: V-statistic. Sizes may differ.
    """
    n = kernel.shape[0]
    n_y = n - n_x if n_y is None else n_y
    if n_x + n_y != n:
        raise ValueError("n_x + n_y must equal the kernel size")
    c_xx, c_yy, c_xy = mmd_coefficients(n_x, n_y, unbiased)
    k_xx, k_yy, k_xy = kernel[:n_x, :n_x], kernel[n_x:, n_x:], kernel[:n_x, n_x:]
    s_xx, s_yy, s_xy = (_sum64(b) for b in (k_xx, k_yy, k_xy))
    if unbiased:
        s_xx = s_xx - float(k_xx.diagonal().double().sum())
        s_yy = s_yy - float(k_yy.diagonal().double().sum())
    return float(c_xx * s_xx + c_yy * s_yy - 2.0 * c_xy * s_xy)


def _sum64(x: torch.Tensor) -> float:
    """Sum with row sums in the tensor's dtype and the total in float64 (no big copy)."""
    if x.dtype == torch.float64 or x.ndim < 2:
        return float(x.double().sum())
    return float(x.sum(-1).double().sum())


def permutation_assignments(
    n_x: int,
    n_y: int,
    n_permutations: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    include_observed: bool = True,
) -> torch.Tensor:
    """0/1 assignment matrix ``(n_x + n_y, [1 +] P)``; column 0 the observed split.

    Each random column puts a uniformly random subset of ``n_y`` of the pooled rows in
    the window group (the smallest of float64 uniform keys drawn from ``generator`` on
    the cpu, so a seed gives the same permutations on any device).
    """
    n = n_x + n_y
    keys = torch.rand(n_permutations, n, generator=generator, dtype=torch.float64)
    if n_y <= n_x:  # mark the n_y smallest keys as the window group
        chosen = keys.topk(n_y, dim=1, largest=False, sorted=False).indices
        perm = torch.zeros(n_permutations, n, dtype=dtype).scatter_(1, chosen, 1.0)
    else:  # equivalently: the n_x largest keys form the reference group
        chosen = keys.topk(n_x, dim=1, largest=True, sorted=False).indices
        perm = torch.ones(n_permutations, n, dtype=dtype).scatter_(1, chosen, 0.0)
    if include_observed:
        observed = torch.zeros(1, n, dtype=dtype)
        observed[0, n_x:] = 1.0
        perm = torch.cat([observed, perm], 0)
    return perm.T.contiguous().to(device) if device is not None else perm.T.contiguous()


def _column_chunks(n_rows: int, n_cols: int, itemsize: int, max_bytes: int) -> list[slice]:
    width = max(1, int(max_bytes // max(1, n_rows * itemsize)))
    return [slice(i, min(i + width, n_cols)) for i in range(0, n_cols, width)]


def quadratic_forms(
    kernel: torch.Tensor,
    assignments: torch.Tensor,
    *,
    max_chunk_bytes: int = 64 << 20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q_b = a_bᵀ K a_b``, ``s_b = a_bᵀ K 1`` for every column, and ``T = 1ᵀ K 1``.

    One product ``G = K A`` (2·N²·P flops) evaluated in column chunks whose
    ``N × chunk`` buffer stays under ``max_chunk_bytes``; then ``q`` is the column sum
    of ``A ∘ G``. ``q, s`` are returned in the kernel's dtype, ``T`` in float64.
    """
    a = assignments.to(kernel.dtype)
    row = kernel.sum(1)
    total = row.double().sum()
    s = row @ a
    q = torch.empty(a.shape[1], dtype=kernel.dtype, device=kernel.device)
    for sl in _column_chunks(kernel.shape[0], a.shape[1], kernel.element_size(), max_chunk_bytes):
        block = a[:, sl]
        q[sl] = (torch.mm(kernel, block) * block).sum(0)
    return q, s, total


def mmd2_from_quadratic_forms(
    q: torch.Tensor,
    s: torch.Tensor,
    total: torch.Tensor | float,
    n_x: int,
    n_y: int,
    *,
    unbiased: bool = True,
    diagonal_term: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """MMD² per assignment from the quadratic forms of a zero-diagonal kernel.

    ``MMD² = c_xx(T − 2s + q) + c_yy q − 2 c_xy (s − q) + diagonal_term`` in float64,
    where ``diagonal_term`` adds the V-statistic's ``i = j`` terms (0 for the
    U-statistic).
    """
    c_xx, c_yy, c_xy = mmd_coefficients(n_x, n_y, unbiased)
    q64, s64 = q.double(), s.double()
    out = (c_xx + c_yy + 2.0 * c_xy) * q64 - 2.0 * (c_xx + c_xy) * s64 + c_xx * total
    return out + diagonal_term


def permutation_block_sums(
    kernel: torch.Tensor,
    assignments: torch.Tensor,
    *,
    unbiased: bool = True,
    max_chunk_bytes: int = 64 << 20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(S_xx, S_yy, S_xy)`` of every column of ``assignments`` (float64).

    ``S_xy`` sums the window-group rows against the reference-group columns (one
    direction). With ``unbiased`` the diagonal is left out of ``S_xx`` and ``S_yy``.
    """
    k = kernel.clone()
    diag = k.diagonal().clone()
    k.fill_diagonal_(0.0)
    q, s, total = quadratic_forms(k, assignments, max_chunk_bytes=max_chunk_bytes)
    q, s = q.double(), s.double()
    s_yy, s_xy, s_xx = q, s - q, total - 2.0 * s + q
    if not unbiased:
        in_y = diag.double() @ assignments.double()
        s_yy = s_yy + in_y
        s_xx = s_xx + (diag.double().sum() - in_y)
    return s_xx, s_yy, s_xy


def permutation_mmd2(
    kernel: torch.Tensor,
    assignments: torch.Tensor,
    n_x: int,
    n_y: int | None = None,
    *,
    unbiased: bool = True,
    center: float | None = None,
    max_chunk_bytes: int = 64 << 20,
) -> torch.Tensor:
    """MMD² of every assignment (column) on one pooled kernel matrix, float64 ``(P,)``.

    The kernel is centred by ``center`` (default: the mean off-diagonal entry) and its
    diagonal zeroed once; then all permutations are one chunked matrix product.
    """
    n = kernel.shape[0]
    n_y = n - n_x if n_y is None else n_y
    diag = kernel.diagonal().double()
    if center is None:
        center = float((kernel.sum(1).double().sum() - diag.sum()) / max(1, n * (n - 1)))
    kc = center_kernel(kernel, center)
    q, s, total = quadratic_forms(kc, assignments, max_chunk_bytes=max_chunk_bytes)
    c_xx, c_yy, _ = mmd_coefficients(n_x, n_y, unbiased)
    if unbiased:
        diagonal_term: torch.Tensor | float = 0.0
    else:
        # i = j terms of the V-statistic: K_ii/n_y² in the window group, K_ii/n_x² else.
        in_y = diag @ assignments.double()
        diagonal_term = c_xx * (diag.sum() - in_y) + c_yy * in_y
        # the centring removed c from every off-diagonal term; its weights sum to
        # −(1/n_x + 1/n_y) for the V-statistic, so add that back.
        diagonal_term = diagonal_term - center * (1.0 / n_x + 1.0 / n_y)
    return mmd2_from_quadratic_forms(q, s, total, n_x, n_y, unbiased=unbiased, diagonal_term=diagonal_term)


def pair_weights(
    assignments: torch.Tensor,
    n_x: int,
    n_y: int,
    *,
    unbiased: bool = True,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """MMD² weight of every unordered pair ``i < j`` under every assignment, ``(T, P)``.

    ``MMD²(a) = Σ_{i<j} W[(i,j), a] · K_ij`` (+ a constant for the V-statistic):
    ``2 c_xx`` if both rows are in the reference group, ``2 c_yy`` if both are in the
    window group, ``−2 c_xy`` if split. With one such matrix, shared by many kernels,
    ``K_tri @ W`` gives every permutation statistic of every kernel in one GEMM with
    half the flops of ``K A`` (symmetry). Pairs default to ``triu_indices(N, N, 1)``.
    """
    n = n_x + n_y
    if rows is None or cols is None:
        iu = torch.triu_indices(n, n, offset=1, device=assignments.device)
        rows, cols = iu[0], iu[1]
    c_xx, c_yy, c_xy = mmd_coefficients(n_x, n_y, unbiased)
    a_i, a_j = assignments[rows], assignments[cols]
    # W = α + β(a_i + a_j) + γ a_i a_j takes the three values 2c_xx, −2c_xy, 2c_yy.
    alpha, beta, gamma = 2.0 * c_xx, -2.0 * (c_xy + c_xx), 2.0 * (c_yy + c_xx + 2.0 * c_xy)
    w = (a_i + a_j).mul_(beta).add_(alpha)
    return w.addcmul_(a_i, a_j, value=gamma)


def permutation_p_value(null: torch.Tensor, observed: torch.Tensor | None = None) -> torch.Tensor:
    """``p = (1 + #{stat_b ≥ observed}) / (1 + P)`` along the last axis.

    With ``observed`` omitted, column 0 of ``null`` is the observed statistic and the
    rest are the P permutation statistics. Never 0: the smallest value is 1/(1+P).
    """
    if observed is None:
        observed, null = null[..., 0], null[..., 1:]
    count = (null >= observed.unsqueeze(-1)).sum(-1)
    return (1.0 + count.double()) / (1.0 + null.shape[-1])


def column_p_values(stats: torch.Tensor) -> torch.Tensor:
    """Permutation p-value of *every* column among all columns, along the last axis.

    ``p_b = #{j : stat_j ≥ stat_b} / (1 + P)`` with j over the observed and the P
    permuted columns (b itself included). For column 0 this is
    :func:`permutation_p_value`; for a permuted column it is the p-value that split
    would have had, were it the observed one. One sort and one ``searchsorted`` per
    row, no loop over permutations.
    """
    s = stats.double().contiguous()
    n = s.shape[-1]
    below = torch.searchsorted(s.sort(-1).values, s, right=False)  # #{j : stat_j < stat_b}
    return (n - below).double() / n


def combine_layers(stats: torch.Tensor, method: str = "minp") -> torch.Tensor:
    """One statistic per column from per-layer statistics ``(L, ..., 1 + P)`` (larger = more extreme).

    All layers are evaluated on the same splits (column b is the same permutation in
    every layer), and each method is a symmetric function of the set of columns, so
    ranking column 0 among the others (:func:`permutation_p_value`) is an exact
    permutation test of the combination, whatever the dependence between layers:

    * ``minp`` — minus the smallest per-layer p-value (:func:`column_p_values`), ties
      broken by Fisher's sum: the Westfall–Young min-p; as powerful as the best layer up
      to the price of looking at L layers, insensitive to the shape of each layer's null;
    * ``fisher`` — Fisher's ``−Σ log p`` of the per-layer permutation p-values, itself
      ranked among the permuted splits (so no independence is assumed): between ``minp``
      and ``sum``, strong when two or three layers each see part of the signal;
    * ``max`` — the largest layer statistic standardised by its permutation mean/sd;
    * ``sum`` — the sum of the standardised statistics (layerwatch's combination before
      issue 18): strong when every layer sees a little, diluted when one layer carries
      the signal.
    """
    if method not in COMBINATIONS:
        raise ValueError(f"unknown combination {method!r}: use one of {', '.join(COMBINATIONS)}")
    return combine_layers_all(stats, (method,))[method]


def combine_layers_all(stats: torch.Tensor, methods: tuple[str, ...] = COMBINATIONS) -> dict[str, torch.Tensor]:
    """:func:`combine_layers` for several methods at once: the per-layer p-values (one sort) and the
    standardised statistics are computed once and shared."""
    out: dict[str, torch.Tensor] = {}
    if "minp" in methods or "fisher" in methods:
        p = column_p_values(stats)
        fisher = -p.log().sum(0)
        if "fisher" in methods:
            out["fisher"] = fisher
        if "minp" in methods:
            # p-values are multiples of 1/(1+P): many splits share the smallest one, and ties
            # count against the observed split. Fisher's sum breaks them (a symmetric function
            # too, so the test stays exact), scaled below one step of 1/(1+P).
            n = stats.shape[-1]
            tie_break = fisher / (stats.shape[0] * math.log(n) + 1.0) / (2.0 * n)
            out["minp"] = tie_break - p.amin(0)
    if "max" in methods or "sum" in methods:
        z = standardize_by_null(stats)
        if "max" in methods:
            out["max"] = z.amax(0)
        if "sum" in methods:
            out["sum"] = z.sum(0)
    return {m: out[m] for m in methods}


def standardize_by_null(stats: torch.Tensor) -> torch.Tensor:
    """Standardise each row by the mean/sd of all its columns (observed + permuted).

    Using every column (the observed one included) keeps the standardised statistics
    a symmetric function of the set of assignments, so a sum over layers still gives
    an exact permutation test. A row with zero spread maps to zeros.
    """
    s = stats.double()
    mean = s.mean(-1, keepdim=True)
    sd = s.std(-1, keepdim=True)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    return (s - mean) / sd


def as_numpy(x: torch.Tensor) -> np.ndarray:
    """Detach to a cpu numpy array."""
    return x.detach().cpu().numpy()
