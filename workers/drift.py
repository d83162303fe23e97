"""The drift-test contract: what the drift stage asks of a two-sample test, whatever its method.

A test is fitted once per model version on the clean reference (``{layer: (n, d)}`` plus
the predicted class of each row) and then analyses windows (``{layer: (m, d)}`` with the
same layer names). It answers, per layer and for the layers combined, a statistic, a
p-value, a detection rate (the LADIS share of subsample tests that reject; a test
without subsampling reports 1.0 or 0.0 from its p-value) and the window rows that
look least like the reference, with their scores.

:class:`workers.mmd.drift_test.MMDDriftTest` (MMD, LADIS detection rate) is the built-in
implementation; ``LW_DRIFT_TEST=package.module:factory`` selects another (see
docs/architecture.md, "Add a drift test").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import numpy as np


@dataclass(frozen=True)
class Verdict:
    """One layer's (or the combination's) answer for one window."""

    statistic: float
    p_value: float
    detection_rate: float
    top_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # window rows, most suspicious first
    top_scores: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    bandwidth: float = 0.0


@dataclass(frozen=True)
class WindowAnalysis:
    """A window's verdicts: one per layer of the reference, and the combined one."""

    layers: dict[str, Verdict]
    combined: Verdict


@dataclass(frozen=True)
class AnalysisOptions:
    """What the worker's settings ask of every analysis."""

    top_k: int = 20
    repeats: int = 100
    m: int = 100
    alpha: float = 0.05
    shift_adjust: bool = False


class DriftTest(Protocol):
    """A test fitted on one model version's reference; see the module doc."""

    device: str

    def analyze(self, window: Mapping[str, np.ndarray], options: AnalysisOptions,
                window_classes: np.ndarray | None = None) -> WindowAnalysis: ...


class DriftTestFactory(Protocol):
    """Fits a :class:`DriftTest`: ``factory(reference, reference_classes, settings)``.

    ``settings`` is the worker's settings object (``n_permutations`` as
    ``settings.mmd_permutations``, and so on); a factory reads what it needs.
    """

    def __call__(self, reference: Mapping[str, np.ndarray], reference_classes: np.ndarray,
                 settings: Any) -> DriftTest: ...
