"""Result records of the MMD engine: small dataclasses of plain floats and numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["CombinedTest", "TestResult", "DetectionRateResult", "ScoresResult"]


@dataclass(frozen=True)
class CombinedTest:
    """Several layers tested with the same permutations.

    ``statistic`` combines the layers' MMD² by ``method`` (see
    :func:`workers.mmd.kernels.combine_layers`: ``minp``, the smallest per-layer
    permutation p-value; ``max``/``sum`` of the layer statistics standardised by
    their own permutation distributions); ``p_value`` ranks it among the same
    combinations of the permuted splits, so it is a calibrated permutation p-value
    even though the layers are dependent (no Fisher's method, no Bonferroni).
    ``p_values`` holds the p-value of every method (same permutations), ``layer_z``
    each layer's standardised statistic.
    """

    statistic: float
    p_value: float
    layer_z: dict[str, float]
    method: str = "minp"
    p_values: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TestResult:
    """One two-sample test of a window against the reference.

    For a single layer, ``mmd2`` and ``p_value`` are that layer's. For several layers
    ``layers`` holds one result per layer, ``combined`` the combined test, and the
    top-level ``p_value`` is the combined one while ``mmd2`` is the sum of the
    layers' MMD² (which is the MMD² of the sum of the layer kernels).
    ``null`` holds the P permutation statistics (single layer) or the P combined
    statistics (several layers).
    """

    __test__ = False  # not a pytest class

    mmd2: float
    p_value: float
    n_reference: int
    n_window: int
    n_permutations: int
    unbiased: bool
    null: np.ndarray
    layers: dict[str, "TestResult"] = field(default_factory=dict)
    combined: CombinedTest | None = None
    compute_ms: float = 0.0


@dataclass(frozen=True)
class DetectionRateResult:
    """LADIS detection rate: the fraction of R subsample tests rejecting at ``alpha``.

    ``p_values`` and ``mmd2`` have one entry per repeat. For several layers the
    top-level ``rate``/``p_values`` are those of the combined per-repeat tests and
    ``layers`` holds one result per layer (``mmd2`` is then the per-repeat sum).
    ``reference_indices``/``window_indices`` say which rows each repeat used.
    ``statistics`` is ``(R, 1 + P)``: each repeat's observed statistic (column 0) and
    its permutation statistics (a layer's MMD², or the combined statistic at the top
    level), so other combinations can be evaluated without recomputing kernels;
    ``combinations`` holds the per-repeat p-values of every combination method and
    ``method`` the one the top-level ``rate`` uses.
    """

    rate: float
    p_values: np.ndarray
    mmd2: np.ndarray
    alpha: float
    repeats: int
    m_reference: int
    m_window: int
    n_permutations: int
    shift_adjusted: bool
    reference_indices: np.ndarray  # (R, m_reference) reference rows of each repeat
    window_indices: np.ndarray  # (R, m_window) window rows of each repeat
    layers: dict[str, "DetectionRateResult"] = field(default_factory=dict)
    compute_ms: float = 0.0
    statistics: np.ndarray | None = None
    combinations: dict[str, np.ndarray] = field(default_factory=dict)
    method: str = ""


@dataclass(frozen=True)
class ScoresResult:
    """Per-sample scores of a window and its top-k samples.

    ``witness[i]`` = mean kernel of window sample i to the other window samples minus
    its mean kernel to the reference (high = unlike the reference). ``me_stat[i]`` is
    the LADIS ME statistic with test location = window sample i. ``indices`` and
    ``scores`` are the top-k by ``by``, highest first. For several layers the
    top-level arrays combine the layers (sum of per-layer witness z-scores; sum of
    ME statistics) and ``layers`` holds each layer's. ``reference_witness`` is the same
    witness function at the reference rows (mean kernel to the window minus mean kernel to
    the other reference rows; for several layers mapped like the window's): its spread is
    the witness's clean scale, which :func:`workers.hidden_attacks.rank_events` uses.
    """

    indices: np.ndarray
    scores: np.ndarray
    witness: np.ndarray
    me_stat: np.ndarray
    by: str
    layers: dict[str, "ScoresResult"] = field(default_factory=dict)
    compute_ms: float = 0.0
    reference_witness: np.ndarray | None = None
