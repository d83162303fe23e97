"""MMDTester behind the drift-test contract of :mod:`workers.drift` (the worker's default test)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from workers.drift import AnalysisOptions, Verdict, WindowAnalysis
from workers.mmd.kernels import MEDIAN_ONLY
from workers.mmd.tester import MMDTester


class MMDDriftTest:
    """Kernel MMD permutation tests and the LADIS detection rate, per layer and combined.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> test = MMDDriftTest.fit({"penultimate": rng.normal(size=(200, 8))}, np.zeros(200, int),
        ...                         n_permutations=100)
        >>> out = test.analyze({"penultimate": rng.normal(size=(80, 8)) + 1.0}, AnalysisOptions(m=40, repeats=10))
        >>> out.combined.detection_rate, out.layers["penultimate"].p_value < 0.05
        (1.0, True)
    """

    def __init__(self, tester: MMDTester):
        self.tester = tester
        self.device = str(tester.device)

    @classmethod
    def fit(cls, reference: Mapping[str, np.ndarray], reference_classes: np.ndarray, *,
            n_permutations: int = 200, seed: int = 0, **kernel: Any) -> "MMDDriftTest":
        return cls(MMDTester(dict(reference), n_permutations=n_permutations, seed=seed,
                             reference_classes=reference_classes, **kernel))

    def analyze(self, window: Mapping[str, np.ndarray], options: AnalysisOptions,
                window_classes: np.ndarray | None = None) -> WindowAnalysis:
        n = len(next(iter(window.values())))
        test, rate, scores = self.tester.analyze(
            dict(window), k=options.top_k, repeats=options.repeats, m=min(options.m, n), alpha=options.alpha,
            window_classes=window_classes if options.shift_adjust else None)
        return self.verdicts(test, rate, scores)

    def verdicts(self, test: Any, rate: Any, scores: Any) -> WindowAnalysis:
        """The :class:`WindowAnalysis` of one window from the tester's ``(test, detection_rate, scores)``."""
        bandwidth = self.tester.bandwidth
        layers = {}
        for name in self.tester.layer_names:
            lt = test.layers.get(name, test) if test.layers else test
            lr = rate.layers.get(name, rate) if rate.layers else rate
            ls = scores.layers.get(name, scores) if scores.layers else scores
            layers[name] = Verdict(float(lt.mmd2), float(lt.p_value), float(lr.rate), np.asarray(ls.indices),
                                   np.asarray(ls.scores),
                                   float(bandwidth[name] if isinstance(bandwidth, dict) else bandwidth))
        combined = Verdict(float(test.mmd2), float(test.p_value), float(rate.rate), np.asarray(scores.indices),
                           np.asarray(scores.scores))
        return WindowAnalysis(layers, combined)


def fit(reference: Mapping[str, np.ndarray], reference_classes: np.ndarray, settings: Any) -> MMDDriftTest:
    """The worker's factory (``LW_DRIFT_TEST=mmd``): permutations from ``settings.mmd_permutations``, the kernel
    from ``settings.mmd_kernel`` (``median``: raw features, one median bandwidth; ``ladis``: MMDTester's defaults).

    The worker keeps ``median`` by default: with the LADIS kernel the end-to-end test opens a false
    distribution-shift alert in the first clean windows, where the probing client's near-duplicate
    queries form a point mass its small bandwidths detect (docs/detection.md has the offline evidence).
    """
    kernel = {} if settings.mmd_kernel == "ladis" else {"standardize": False, "bandwidth_multipliers": MEDIAN_ONLY}
    return MMDDriftTest.fit(reference, reference_classes, n_permutations=settings.mmd_permutations, **kernel)
