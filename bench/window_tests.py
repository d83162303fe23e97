"""Test-pool throughput: window tests per second with K test workers and the ingest side held fixed.

The ingest side is held fixed by publishing its output directly: a reference for each of
``--models`` synthetic models, then ``--windows`` WindowSample records (the records an
``--agents ingest`` worker publishes) to ``lw.windows``. For K = 1, 2, … (``--test-workers``)
a fresh consumer group of K ``--agents test`` workers drains the same backlog; the figure
is windows tested per second between the first and the last drift row,. ClickHouse server store (Debian's), embedded
Tansu broker. A benchmark, not a test; prints a table and writes ``--json``.

    python bench/window_tests.py --test-workers 1,2 --windows 400 --json /tmp/tests.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402

from schemas import PredictionBatch, encode_batch  # noqa: E402
from schemas.window import WindowSample, encode_window  # noqa: E402
from streams.broker import EmbeddedBroker  # noqa: E402
from streams.client import WorkerClient  # noqa: E402
from streams.stack import LocalStack  # noqa: E402

console = Console()


def publish(bootstrap: str, prefix: str, models: int, windows: int, dim: int, m: int, seed: int = 0) -> None:
    from kafka import KafkaProducer

    rng = np.random.default_rng(seed)
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=16 << 20, linger_ms=5)
    now = int(time.time() * 1000)
    for k in range(models):
        model = f"model{k:03d}"
        pen = rng.normal(size=(1000, dim)).astype(np.float16)
        probs = np.full((1000, 10), 0.1, np.float32)
        for start in range(0, 1000, 250):
            batch = PredictionBatch.build(model, [f"r{k}-{i}" for i in range(start, start + 250)], probs[start:start + 250],
                                          {"penultimate": pen[start:start + 250]}, role="reference",
                                          ts_ms=np.full(250, now, np.int64))
            producer.send(prefix + "predictions", key=model.encode(), value=encode_batch(batch))
    producer.flush()
    for w in range(windows):
        model = f"model{w % models:03d}"
        start = now + (w // models) * 5000
        sample = WindowSample(f"{model}@1:{start}-{start + 10000}", model, "1", start, start + 10000, m,
                              np.array([f"{model}-{w}-{i}" for i in range(m)], object), np.zeros(m, np.int64),
                              {"penultimate": rng.normal(size=(m, dim)).astype(np.float16)},
                              np.array([f"c{i % 50}" for i in range(m)], object))
        producer.send(prefix + "windows", key=model.encode(), value=encode_window(sample)[0])
    producer.flush()
    producer.close()


def run(k: int, server, bootstrap: str, args: argparse.Namespace, tmp: Path) -> dict:
    prefix = f"wt{k}_{int(time.time())}."
    url = server.url_for(f"bench_tests_{k}_{int(time.time())}")
    with LocalStack(state_dir=tmp / f"k{k}", clickhouse_url=url, bootstrap=bootstrap) as stack:
        env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"bench-{prefix}", "LW_MMD_PERMUTATIONS": str(args.permutations),
               "LW_DETECTION_REPEATS": str(args.repeats), "LW_DETECTION_M": str(args.m),
               "LW_TOPIC_PARTITIONS": str(args.partitions)}
        stack.env = env
        # one sink-only worker lands the references and the drift rows in the store
        _, sink = stack.start_worker("sink", LW_AGENTS="sink")
        publish(bootstrap, prefix, args.models, args.windows, args.dim, args.window_rows)
        api = WorkerClient(sink)
        deadline = time.time() + 120
        while api.rows("SELECT count() FROM reference_embeddings FINAL")[0][0] < args.models * 1000:
            if time.time() > deadline:
                raise TimeoutError("references did not land")
            time.sleep(0.5)  # polling the store, not synchronisation of the measured work
        started = time.time()
        for i in range(k):
            stack.start_worker(f"tests{i}", LW_AGENTS="test")
        # the rate is taken from the first tested window on, so the workers' start-up does not count
        first_at, first_done, done = None, 0, 0
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"K={k}", total=args.windows)
            while done < args.windows and time.time() - started < args.timeout:
                done = api.rows("SELECT uniqExact(window_id) FROM drift_windows WHERE layer = '__combined__'")[0][0]
                if first_at is None and done:
                    first_at, first_done = time.time(), done
                progress.update(task, completed=done)
                time.sleep(0.5)  # polling progress
        seconds = time.time() - (first_at or started)
    return {"test_workers": k, "windows": int(done), "measured_windows": int(done - first_done),
            "seconds": round(seconds, 2), "window_tests_per_s": round((done - first_done) / seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-workers", default="1,2", help="comma list of K")
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--windows", type=int, default=200)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--window-rows", type=int, default=200)
    ap.add_argument("--m", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--permutations", type=int, default=500)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from tests.clickhouse_server import ClickHouseServer

    rows = []
    with tempfile.TemporaryDirectory(prefix="lw-bench-tests-") as tmp:
        broker = EmbeddedBroker(log_path=Path(tmp) / "tansu.log").start()
        server = ClickHouseServer(Path(tmp) / "clickhouse").start()
        try:
            for k in (int(x) for x in args.test_workers.split(",")):
                rows.append(run(k, server, broker.bootstrap, args, Path(tmp)))
                console.print(rows[-1])
        finally:
            server.close()
            broker.stop()
    base = rows[0]["window_tests_per_s"] or float("nan")
    for r in rows:
        r["speedup"] = round(r["window_tests_per_s"] / base, 2)
    console.print("| test workers | windows | seconds | window tests/s | speed-up |")
    for r in rows:
        console.print(f"| {r['test_workers']} | {r['windows']} | {r['seconds']} | {r['window_tests_per_s']} | {r['speedup']} |")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
