"""Capacity of the drift loop: window tests per second, one by one and batched across models.

A "window test" is what the drift stage does per closed window: the permutation test,
the LADIS detection rate and the top scores (``MMDDriftTest.analyze``), here at the
issue's point R = 100 repeats, m = 100, P = 500, d = 512 (n_ref = 1000 reference rows,
n = 200 window rows, as in bench/mmd.py), for ``--models`` models each with its own
reference. ``one_by_one`` tests the windows in a loop (what the drift stage's batches do
on a CPU); ``stacked`` hands them to :func:`workers.mmd.batch.analyze_windows` in batches
of ``--batch`` with their GEMMs stacked (the default on a GPU). ``--layers 2`` adds a 64-dim layer to each model (the fleet's shape).

Usage: ``python bench/drift_capacity.py [--models 16] [--batch 1,8,16] [--threads 1] [--json PATH]``.
The figure is per worker thread count given; the machine's 2 cores are shared.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.drift import AnalysisOptions  # noqa: E402
from workers.mmd.batch import analyze_windows  # noqa: E402
from workers.mmd.drift_test import MMDDriftTest  # noqa: E402
from rich.progress import track  # noqa: E402


def build(models: int, layers: int, n_ref: int, n: int, d: int, perms: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    dims = {"penultimate": d, "aux": 64} if layers == 2 else {"penultimate": d}
    tests, windows = [], []
    for i in track(range(models), description="fitting references"):
        ref = {name: rng.normal(size=(n_ref, k)).astype(np.float32) for name, k in dims.items()}
        tests.append(MMDDriftTest.fit(ref, rng.integers(0, 10, n_ref), n_permutations=perms))
        shift = 0.3 if i % 4 == 0 else 0.0
        windows.append({name: (rng.normal(size=(n, k)) + shift).astype(np.float32) for name, k in dims.items()})
    return tests, windows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--layers", type=int, choices=(1, 2), default=1)
    ap.add_argument("--batch", default="1,8,16")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--m", type=int, default=100)
    ap.add_argument("--perms", type=int, default=500)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n-ref", type=int, default=1000)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="passes over the models; the best is kept")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    options = AnalysisOptions(top_k=20, repeats=args.repeats, m=args.m)
    tests, windows = build(args.models, args.layers, args.n_ref, args.n, args.dim, args.perms)
    jobs = [(t, w, None) for t, w in zip(tests, windows)]
    analyze_windows(jobs[:2], options)  # warm the permutation and design caches
    for t, w, _ in jobs:
        t.analyze(w, options)
    rows = []
    best = float("inf")
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for t, w, _ in jobs:
            t.analyze(w, options)
        best = min(best, time.perf_counter() - t0)
    rows.append({"mode": "one_by_one", "batch": 1, "tests_per_s": round(len(jobs) / best, 2),
                 "ms_per_test": round(best * 1e3 / len(jobs), 1)})
    for size in [int(b) for b in args.batch.split(",")]:
        best = float("inf")
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for lo in range(0, len(jobs), size):
                analyze_windows(jobs[lo : lo + size], options, stack=True)
            best = min(best, time.perf_counter() - t0)
        rows.append({"mode": "stacked", "batch": size, "tests_per_s": round(len(jobs) / best, 2),
                     "ms_per_test": round(best * 1e3 / len(jobs), 1)})
    point = {"R": args.repeats, "m": args.m, "P": args.perms, "d": args.dim, "n_ref": args.n_ref, "n": args.n,
             "layers": args.layers, "threads": args.threads, "models": args.models}
    table = Table(title="window tests per second " + ", ".join(f"{k}={v}" for k, v in point.items()))
    for col in ("mode", "batch", "tests/s", "ms/test"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["mode"], str(r["batch"]), f"{r['tests_per_s']:.1f}", f"{r['ms_per_test']:.1f}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"point": point, "capacity": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
