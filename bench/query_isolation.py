"""Ingestion while a slow /api/query runs: does one user query stall the worker? (a benchmark, not a test)

    python bench/query_isolation.py [--rate 2000] [--seconds 30] [--store chdb|server]
                                    [--json PATH]

Starts a Tansu broker and one worker (sink only, so the figure is about the store), then
publishes synthetic predictions paced at ``--rate`` events/s (micro-batches of 50) for
the whole run and measures the rows the worker writes to ``predictions`` per second
(from its ``/metrics``, so no SQL runs on the worker for the measurement):

1. ``baseline``: ``--seconds`` with no query;
2. ``with_query``: ``--seconds`` while one ``/api/query`` runs for its full time limit
   (the worker's ``max_execution_time``, 30 s, unless its memory limit stops it first):
   a cross join of ``predictions`` with itself, hashed pair by pair.

Prints both rates, their ratio, and the query's answer (a timeout is the expected end).
Run it against an older checkout (``PYTHONPATH=/path/to/old``) for a before/after.
Not run by pytest.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas import PredictionBatch, encode_batch  # noqa: E402
from streams.client import http_json  # noqa: E402
from streams.stack import LocalStack  # noqa: E402

QUERIES = {
    "cpu": "SELECT count() FROM predictions AS a CROSS JOIN predictions AS b "
           "WHERE sipHash64(a.event_id, b.event_id) % 7 = 1",
}


def rows_written(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.findall(r'^layerwatch_rows_written_total\{table="predictions"\} (\S+)$', text, re.MULTILINE)
    return float(found[0]) if found else 0.0


class Publisher(threading.Thread):
    """Paced micro-batches of a synthetic model until stopped."""

    def __init__(self, bootstrap: str, topic: str, rate: float, batch: int = 50):
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.rate, self.batch = bootstrap, topic, rate, batch
        self.stopping = threading.Event()
        self.sent = 0

    def run(self) -> None:
        from kafka import KafkaProducer

        rng = np.random.default_rng(0)
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, max_request_size=8 << 20)
        period = self.batch / self.rate
        next_at = time.monotonic()
        k = 0
        while not self.stopping.is_set():
            ids = [f"e{k}-{i}" for i in range(self.batch)]
            logits = rng.normal(size=(self.batch, 10)).astype(np.float32)
            probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            batch = PredictionBatch.build("bench", ids, probs,
                                          {"penultimate": rng.normal(size=(self.batch, 64)).astype(np.float16)},
                                          client_ids=[f"c{i % 5}" for i in range(self.batch)])
            producer.send(self.topic, key=b"bench", value=encode_batch(batch))
            self.sent += self.batch
            k += 1
            next_at += period
            self.stopping.wait(max(0.0, next_at - time.monotonic()))  # pacing
        producer.flush()
        producer.close()


def measure(url: str, seconds: float) -> float:
    start, t0 = rows_written(url), time.monotonic()
    time.sleep(seconds)  # the measurement window
    return (rows_written(url) - start) / (time.monotonic() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second published")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each measurement")
    parser.add_argument("--query", choices=sorted(QUERIES), default="cpu")
    parser.add_argument("--store", choices=["chdb", "server"], default="chdb")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lw-bench-query-") as tmp:
        server = None
        url_store = f"chdb://{tmp}/store"
        if args.store == "server":
            from tests.clickhouse_server import ClickHouseServer

            server = ClickHouseServer()
            server.start()
            url_store = server.url_for("bench_query")
        try:
            with LocalStack(state_dir=Path(tmp) / "state", clickhouse_url=url_store) as stack:
                stack.env = {"LW_AGENTS": "sink", "LW_TOPIC_PARTITIONS": "1"}
                stack.start_broker()
                _, url = stack.start_worker()
                publisher = Publisher(stack.bootstrap, "lw.predictions", args.rate)
                publisher.start()
                time.sleep(8)  # warm-up: the first steps and the store's first parts
                baseline = measure(url, args.seconds)
                answer: dict = {}

                def run_query() -> None:
                    t0 = time.monotonic()
                    answer["status"], answer["body"] = http_json(f"{url}/api/query", {"sql": QUERIES[args.query]},
                                                                 timeout=120)
                    answer["seconds"] = round(time.monotonic() - t0, 1)

                query = threading.Thread(target=run_query)
                query.start()
                time.sleep(0.5)
                with_query = measure(url, args.seconds)
                query.join(120)
                publisher.stopping.set()
                publisher.join(30)
        finally:
            if server is not None:
                server.close()
    figures = {
        "store": args.store, "query": args.query, "rate_published": args.rate, "seconds": args.seconds,
        "baseline_rows_per_s": round(baseline, 1), "with_query_rows_per_s": round(with_query, 1),
        "ratio": round(with_query / baseline, 3) if baseline else None,
        "query_seconds": answer.get("seconds"), "query_status": answer.get("status"),
        "query_answer": str(answer.get("body"))[:200],
    }
    print(f"ingestion without a query: {baseline:.0f} rows/s; during a {answer.get('seconds')} s "
          f"{args.query} query: {with_query:.0f} rows/s (ratio {figures['ratio']}); "
          f"query answer {answer.get('status')}: {figures['query_answer'][:120]}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
