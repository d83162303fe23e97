"""Several windows against several references at once: the drift loop's batched MMD.

A worker closes the windows of many models in the same step. Tested one by one, each
window costs two GEMMs of its own (the permutation test's ``[K_xy; K_yy] @ A_y`` and the
LADIS rate's ``k @ W``) plus a Python round trip. Windows whose testers share the
reference size, the window size, P and the seed share the permutation matrix ``A`` and
the pair-weight matrix ``W`` too (both are drawn from the same seeded generator), so their
inputs can be stacked and multiplied at once: one GEMM per group instead of one per
window, with ``W`` (tens of MB at m = 100, P = 500) streamed from memory once per group.
The layer widths do not matter: kernels are computed per window before the products.

The results are those of :meth:`MMDTester.analyze` on each window alone (same
permutations, same subsamples; sums to float rounding). Stacking pays on a GPU (one
kernel launch and one pass over ``W`` per group); on a CPU it does not (measured), so
by default it is used on CUDA devices only.

    >>> import numpy as np
    >>> from workers.mmd import MMDTester
    >>> from workers.mmd.batch import analyze_batch
    >>> rng = np.random.default_rng(0)
    >>> testers = [MMDTester({"pen": rng.normal(size=(120, 8))}, n_permutations=100, device="cpu") for _ in range(3)]
    >>> windows = [{"pen": rng.normal(size=(60, 8)) + shift} for shift in (0.0, 0.0, 1.0)]
    >>> results = analyze_batch(list(zip(testers, windows)), repeats=20, m=30)
    >>> [round(rate.rate, 2) for _, rate, _ in results][2], results[2][0].p_value <= 0.05
    (1.0, True)
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from workers.drift import AnalysisOptions, DriftTest, WindowAnalysis

from . import kernels as km
from .results import DetectionRateResult, ScoresResult, TestResult
from .tester import MMDTester

Job = tuple  # (tester, window) or (tester, window, window_classes)
Analysis = tuple[TestResult, DetectionRateResult, ScoresResult]


def _key(tester: MMDTester, n_window: int, shift: bool) -> tuple:
    """Testers with equal keys draw the same permutations and subsample designs: their GEMMs stack."""
    return (tester.n_reference, n_window, tester.n_permutations, tester._seed, tester._generator_obj is None,
            tester.dtype, str(tester.device), tester.unbiased, len(tester._layers), shift)


def _rows(window: Any) -> int:
    return len(next(iter(window.values()))) if isinstance(window, Mapping) else len(window)


def analyze_batch(jobs: Sequence[Job], *, k: int = 100, repeats: int = 100, m: int = 100,
                  alpha: float = 0.05, stack: bool | None = None) -> list[Analysis]:
    """``(test, detection_rate, scores)`` of every ``(tester, window[, window_classes])`` job, in order.

    Jobs are grouped by :func:`_key`; within a group each round takes each tester at most
    once (a tester keeps one window's kernels at a time) and runs the round's two GEMMs
    stacked. A tester that cannot be batched (its own ``torch.Generator``) is analysed alone.
    ``stack`` (default: on a CUDA device only) chooses stacking: on a CPU the GEMMs are
    compute-bound already and the copies into the stacked inputs cost more than they save
    (measured by bench/drift_capacity.py), so the windows are analysed one by one there.
    """
    out: list[Analysis | None] = [None] * len(jobs)
    if not jobs:
        return []
    # the stacked rate inputs are (windows × L·R × T) floats: at most ~256 MB of them at once
    t0 = jobs[0][0]
    per_window = len(t0._layers) * repeats * (min(m, t0.n_reference) + min(m, _rows(jobs[0][1]))) ** 2 // 2 * 4
    max_stack = max(1, (256 << 20) // max(1, per_window))
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        tester, window = job[0], job[1]
        classes = job[2] if len(job) > 2 else None
        shift = classes is not None and tester.reference_classes is not None
        groups.setdefault(_key(tester, _rows(window), shift), []).append(i)
    for key, members in groups.items():
        pending = list(members)
        while pending:
            seen: set[int] = set()
            round_, later = [], []
            for i in pending:
                (later if id(jobs[i][0]) in seen else round_).append(i)
                seen.add(id(jobs[i][0]))
            stacking = stack if stack is not None else key[6].startswith("cuda")
            if not key[4] or len(round_) == 1 or not stacking:  # a shared generator, nothing to stack with, CPU
                for i in round_:
                    t, w = jobs[i][0], jobs[i][1]
                    out[i] = t.analyze(w, k=k, repeats=repeats, m=m, alpha=alpha,
                                       window_classes=jobs[i][2] if len(jobs[i]) > 2 else None)
            else:
                for lo in range(0, len(round_), max_stack):
                    part = round_[lo : lo + max_stack]
                    for i, result in zip(part, _analyze_round([jobs[i] for i in part], k, repeats, m, alpha)):
                        out[i] = result
            pending = later
    return out  # type: ignore[return-value]


def _analyze_round(jobs: Sequence[Job], k: int, repeats: int, m: int, alpha: float) -> list[Analysis]:
    testers = [job[0] for job in jobs]
    with ExitStack() as stack, torch.no_grad():
        for t in testers:
            stack.enter_context(t._lock)
        t0 = time.perf_counter()
        # the permutation test: [K_xy; K_yy] − c of every window and layer, stacked, times A_y once
        ctxs = [t._test_prepare(job[1]) for t, job in zip(testers, jobs)]
        lead = testers[0]
        a = ctxs[0]["perms"].assignments
        n_x, n = lead.n_reference, ctxs[0]["n"]
        n_layers, n_tot, b = len(lead._layers), n_x + n, len(jobs)
        stacked = torch.cat([c["kc_y"] for c in ctxs])  # (B·L·n_tot, n)
        forms = torch.stack([c["perms"].q_xx for c in ctxs]).clone()  # (B, L, 1 + P)
        a_y = a[n_x:]
        for sl in km._column_chunks(b * n_layers * n_tot, a.shape[1], a.element_size(), lead.max_chunk_bytes):
            g = torch.mm(stacked, a_y[:, sl]).view(b, n_layers, n_tot, -1).mul_(a[:, sl])
            forms[:, :, sl] += 2.0 * g[:, :, :n_x].sum(2) + g[:, :, n_x:].sum(2)
        del stacked
        tests = [t._test_finish(c, forms[i], t0) for i, (t, c) in enumerate(zip(testers, ctxs))]
        # the LADIS rate: every window's k_tri stacked, times W once
        t1 = time.perf_counter()
        rctx, stacked = [], None
        for i, (t, job) in enumerate(zip(testers, jobs)):
            c = t._rate_prepare(job[1], repeats, m, job[2] if len(job) > 2 else None, None, None)
            kt = c.pop("k")  # a per-thread buffer the next tester overwrites: copied into its rows at once
            if stacked is None:
                stacked = torch.empty(b, *kt.shape, dtype=kt.dtype, device=kt.device)
            if kt.shape != stacked.shape[1:]:  # some testers have the reference part cached, some not yet
                c["k"] = kt.clone()
            else:
                stacked[i] = kt
            rctx.append(c)
        raw = [torch.mm(c["k"], c["w"]) if "k" in c else None for c in rctx]
        rest = [i for i, r in enumerate(raw) if r is None]
        if rest:
            w = rctx[rest[0]]["w"]
            block = torch.mm(stacked[rest].view(-1, w.shape[0]) if len(rest) < b else stacked.view(-1, w.shape[0]), w)
            for j, i in enumerate(rest):
                raw[i] = block.view(len(rest), -1, w.shape[1])[j]
        rates = [t._rate_finish(c, raw[i], alpha, t1) for i, (t, c) in enumerate(zip(testers, rctx))]
        scores = [t.scores(job[1], k=k) for t, job in zip(testers, jobs)]
    return list(zip(tests, rates, scores))


def analyze_windows(jobs: Sequence[tuple[DriftTest, Mapping[str, np.ndarray], np.ndarray | None]],
                    options: AnalysisOptions, stack: bool | None = None) -> list[WindowAnalysis]:
    """:meth:`DriftTest.analyze` of every ``(test, window, window_classes)``, MMD tests batched, in order.

    The drift stage's (and a separate test worker's) entry point: built-in MMD tests go
    through :func:`analyze_batch`; any other :class:`~workers.drift.DriftTest` is analysed
    one window at a time.
    """
    from .drift_test import MMDDriftTest

    out: list[WindowAnalysis | None] = [None] * len(jobs)
    batched: list[int] = []
    for i, (test, window, classes) in enumerate(jobs):
        if isinstance(test, MMDDriftTest):
            batched.append(i)
        else:
            out[i] = test.analyze(window, options, classes)
    if batched:
        mmd_jobs: list[Job] = []
        for i in batched:
            test, window, classes = jobs[i]
            mmd_jobs.append((test.tester, window, classes) if options.shift_adjust else (test.tester, window))
        # every window of a group uses min(m, n): windows of one size share one m
        by_m: dict[int, list[int]] = {}
        for j, i in enumerate(batched):
            by_m.setdefault(min(options.m, _rows(jobs[i][1])), []).append(j)
        results: list[Any] = [None] * len(batched)
        for m, js in by_m.items():
            for j, r in zip(js, analyze_batch([mmd_jobs[j] for j in js], k=options.top_k, repeats=options.repeats,
                                              m=m, alpha=options.alpha, stack=stack)):
                results[j] = r
        for j, i in enumerate(batched):
            out[i] = jobs[i][0].verdicts(*results[j])
    return out  # type: ignore[return-value]
