"""MMD engine: kernel two-sample tests of layer activations against a reference.

``MMDTester`` (the facade) tests windows against a frozen reference; the pure maths
is in :mod:`workers.mmd.kernels`; results are the dataclasses of
:mod:`workers.mmd.results`.

    >>> import numpy as np
    >>> from workers.mmd import MMDTester
    >>> rng = np.random.default_rng(1)
    >>> tester = MMDTester({"penultimate": rng.normal(size=(200, 8)), "logits": rng.normal(size=(200, 4))},
    ...                    n_permutations=100, seed=0, device="cpu")
    >>> result = tester.test({"penultimate": rng.normal(size=(50, 8)) + 1.0, "logits": rng.normal(size=(50, 4))})
    >>> sorted(result.layers), bool(result.combined.p_value <= 0.05)
    (['logits', 'penultimate'], True)
"""

from .kernels import (
    COMBINATIONS,
    DEFAULT_MULTIPLIERS,
    LADIS_MULTIPLIERS,
    MEDIAN_ONLY,
    column_p_values,
    combine_layers,
    median_heuristic,
    mmd2_from_kernel_matrix,
    permutation_assignments,
    permutation_block_sums,
    permutation_mmd2,
    permutation_p_value,
    pick_device,
    rbf_kernel,
    squared_pairwise_distance,
)
from .results import CombinedTest, DetectionRateResult, ScoresResult, TestResult
from .tester import MMDTester

__all__ = [
    "MMDTester",
    "TestResult",
    "CombinedTest",
    "DetectionRateResult",
    "ScoresResult",
    "COMBINATIONS",
    "DEFAULT_MULTIPLIERS",
    "LADIS_MULTIPLIERS",
    "MEDIAN_ONLY",
    "column_p_values",
    "combine_layers",
    "median_heuristic",
    "mmd2_from_kernel_matrix",
    "permutation_assignments",
    "permutation_block_sums",
    "permutation_mmd2",
    "permutation_p_value",
    "pick_device",
    "rbf_kernel",
    "squared_pairwise_distance",
]
