"""Cost of the probing detector per prediction against the number of clients.

One model's detector is fed ingest steps of ``--batch`` rows (512-dim float16 penultimate
embeddings, Zipf-distributed clients, one probing client at a 2 % share) from 8, 512 and
5,000 clients; the figure is the best per-step time (after a warm-up that fills the ring)
divided by the rows: µs per prediction. ``--per-client`` also times the previous
per-client-sketch detector (kept in tests/workers/probing_reference.py) for comparison.

Usage: ``python bench/probing.py [--batch 1024] [--steps 30] [--per-client] [--json PATH]``.
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

from workers.probing import ProbingDetector  # noqa: E402

CLIENTS = (8, 512, 5000)


def traffic(clients: int, batch: int, steps: int, dim: int, seed: int = 0):
    """(ids, ts, embeddings) per step: Zipf clients, a prober sending one input plus tiny noise."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=dim)
    names = np.array([f"client-{i}" for i in range(clients)], dtype=object)
    out = []
    for step in range(steps):
        pick = (rng.zipf(1.3, size=batch) - 1) % clients
        ids = names[pick].tolist()
        emb = rng.normal(size=(batch, dim))
        probe = rng.random(batch) < 0.02
        emb[probe] = base + 0.01 * rng.normal(size=(int(probe.sum()), dim))
        for i in np.flatnonzero(probe):
            ids[i] = "prober"
        ts = step * 20 + np.sort(rng.integers(0, 20, size=batch))  # 50 steps/s
        out.append((ids, ts.astype(np.int64), emb.astype(np.float16)))
    return out


def measure(make, steps: list, warmup: int) -> tuple[float, int]:
    """Best seconds per step after ``warmup`` steps, and the hits of the whole run."""
    det, best, hits = make(), float("inf"), 0
    for i, (ids, ts, emb) in enumerate(steps):
        t0 = time.perf_counter()
        hits += len(det.update(ids, ts, emb))
        if i >= warmup:
            best = min(best, time.perf_counter() - t0)
    return best, hits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--per-client", action="store_true", help="also time the previous per-client detector")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    detectors = {"shared ring": ProbingDetector}
    if args.per_client:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.workers.probing_reference import ProbingDetector as PerClient

        detectors["per client (before)"] = PerClient
    rows = []
    for clients in CLIENTS:
        steps = traffic(clients, args.batch, args.steps, args.dim)
        for name, cls in detectors.items():
            best, hits = measure(cls, steps, warmup=min(10, args.steps // 2))
            rows.append({"detector": name, "clients": clients, "batch": args.batch, "dim": args.dim,
                         "ms_per_step": round(best * 1e3, 3), "us_per_prediction": round(best * 1e6 / args.batch, 3),
                         "hits": hits})
    table = Table(title=f"probing, {args.batch}-row steps, {args.dim}-dim float16")
    for col in ("detector", "clients", "ms/step", "µs/prediction", "hits"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["detector"], str(r["clients"]), f"{r['ms_per_step']:.2f}", f"{r['us_per_prediction']:.2f}",
                      str(r["hits"]))
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"probing": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
