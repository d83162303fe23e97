"""Insert throughput of both store backends (a benchmark, not a test).

    python bench/store_insert.py [--rows 65536] [--repeats 5] [--json PATH]

Inserts ``--rows`` predictions rows (numpy columns, as the sink builds them
from a decoded batch) ``--repeats`` times into chDB and into a ClickHouse
server started for the purpose, and reports the median rows/s. Also
reference_embeddings rows with a 64-dim Array(Float32) vector.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from streams.store import Store, open_store  # noqa: E402
from tests.clickhouse_server import ClickHouseServer  # noqa: E402


def predictions(n: int, offset: int, rng: np.random.Generator) -> dict:
    ts_ms = (1_700_000_000_000 + np.arange(n, dtype=np.uint64) * 7).astype(np.uint64)
    ids = np.array([f"ev-{offset + i:012d}" for i in range(n)], dtype=object)
    return {
        "event_id": ids,
        "model_id": np.full(n, "resnet18-cifar10", dtype=object),
        "model_version": np.full(n, "v1", dtype=object),
        "client_id": np.array([f"client-{i % 97}" for i in range(n)], dtype=object),
        "ts": (ts_ms // 1000).astype(np.uint32),
        "ts_ms": ts_ms,
        "predicted": rng.integers(0, 10, n).astype(np.int32),
        "confidence": rng.random(n, dtype=np.float32),
        "uncertainty": np.full(n, np.nan, np.float32),
        "truth": np.full(n, -1, np.int32),
        "attack": np.full(n, "", dtype=object),
        "batch_offset": np.arange(offset, offset + n, dtype=np.uint64),
        "ingested_ms": ts_ms + 5,
    }


def embeddings(n: int, offset: int, rng: np.random.Generator, dim: int = 64) -> dict:
    ts_ms = (1_700_000_000_000 + np.arange(n, dtype=np.uint64) * 7).astype(np.uint64)
    return {
        "model_id": np.full(n, "resnet18-cifar10", dtype=object),
        "model_version": np.full(n, "v1", dtype=object),
        "layer": np.full(n, "penultimate", dtype=object),
        "event_id": np.array([f"ref-{offset + i:012d}" for i in range(n)], dtype=object),
        "ts": (ts_ms // 1000).astype(np.uint32),
        "ts_ms": ts_ms,
        "predicted": rng.integers(0, 10, n).astype(np.int32),
        "vector": rng.standard_normal((n, dim), dtype=np.float32),
    }


def bench(store: Store, table: str, make, rows: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    times = []
    for r in range(repeats):
        cols = make(rows, r * rows, rng)
        t0 = time.perf_counter()
        store.insert(table, cols)
        times.append(time.perf_counter() - t0)
    count = store.query(f"SELECT count() FROM {table}")[0][0]
    assert count == rows * repeats, count
    med = statistics.median(times)
    return {"table": table, "rows": rows, "repeats": repeats, "median_s": med,
            "rows_per_s": rows / med, "best_rows_per_s": rows / min(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp, ClickHouseServer() as server:
        for backend, url in (("chdb", f"chdb://{tmp}/store"), ("server", server.url)):
            with open_store(url) as store:
                store.migrate()
                for table, make, n in (("predictions", predictions, args.rows),
                                       ("reference_embeddings", embeddings, args.rows // 4)):
                    res = {"backend": backend, **bench(store, table, make, n, args.repeats)}
                    results.append(res)
                    print(f"{backend:6s} {table:21s} {n:6d} rows: median {res['median_s'] * 1000:7.1f} ms"
                          f"  {res['rows_per_s']:>10,.0f} rows/s (best {res['best_rows_per_s']:,.0f})",
                          flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
