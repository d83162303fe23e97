"""Benchmark: predictions/s one publishing process delivers to the broker (512-dim float16 activations).

Two paths, each for ``--seconds`` against an embedded Tansu broker, counting only events
the broker acknowledged:

- ``publisher``: ``Publisher.publish`` of ready (256, 512) float16 layer batches (encode + send);
- ``monitor``:   ``Monitor.observe`` of (32, 512) rows from the caller's thread, the background
  thread building micro-batches of 256 (queue, device concat, host copy, encode, send).

kafka-python computes the record batch CRC32C in pure Python unless the ``crc32c`` package
is importable; ``--no-crc32c`` blocks that import to measure the "before" figure.

    python bench/publisher.py [--seconds 5] [--no-crc32c] [--json PATH]

Not run by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DIM, CLASSES, BATCH = 512, 10, 256


def bench_publisher(bootstrap: str, topic: str, seconds: float) -> dict:
    import numpy as np

    from workers.inference.publisher import Publisher

    rng = np.random.default_rng(0)
    pool = 16  # distinct random batches, so compression sees fresh rows as in production
    outputs = rng.dirichlet(np.ones(CLASSES), size=(pool, BATCH)).astype(np.float32)
    layers = rng.normal(size=(pool, BATCH, DIM)).astype(np.float16)
    with Publisher(bootstrap, "bench", topic=topic) as publisher:
        handed = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            k = (handed // BATCH) % pool
            publisher.publish(outputs[k], {"penultimate": layers[k]}, client_ids=["c"] * BATCH)
            handed += BATCH
        publisher.flush(120)
        elapsed = time.perf_counter() - started
        sent = publisher.sent_events
    return {"path": "publisher", "handed": handed, "acknowledged": sent, "seconds": round(elapsed, 2),
            "predictions_per_s": round(sent / elapsed), "record_rows": BATCH}


def bench_monitor(bootstrap: str, prefix: str, seconds: float) -> dict:
    import numpy as np
    import torch

    from layerwatch import Monitor, load_settings

    settings = load_settings(env={"LW_KAFKA_BOOTSTRAP": bootstrap, "LW_TOPIC_PREFIX": prefix})
    rng = np.random.default_rng(0)
    rows, pool = 32, 128  # distinct random rows, so compression sees fresh data as in production
    outputs = torch.from_numpy(rng.normal(size=(pool, rows, CLASSES)).astype(np.float32))
    layers = torch.from_numpy(rng.normal(size=(pool, rows, DIM)).astype(np.float32))
    monitor = Monitor(None, "bench-monitor", settings=settings, actions=False, queue_rows=65_536)
    observed = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        k = (observed // rows) % pool
        monitor.observe(outputs[k], {"penultimate": layers[k]}, client_id="c")
        observed += rows
        if monitor.stats()["queued"] > 32_768:  # a closed loop: do not measure the drop counter
            time.sleep(0.001)
    monitor.flush(120)
    elapsed = time.perf_counter() - started
    stats = monitor.close()
    return {"path": "monitor", "handed": observed, "acknowledged": stats["sent"], "dropped": stats["dropped"],
            "seconds": round(elapsed, 2), "predictions_per_s": round(stats["sent"] / elapsed), "record_rows": 256}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-crc32c", action="store_true", help="block the crc32c package (the 'before' figure)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.no_crc32c:
        sys.modules["crc32c"] = None  # type: ignore[assignment]  # makes `import crc32c` fail
    import kafka.record.util as kafka_util

    from streams.broker import EmbeddedBroker

    crc = "crc32c package" if kafka_util.crc32c_c is not None else "pure Python"
    rows = []
    with EmbeddedBroker() as broker:
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        for run in (lambda: bench_publisher(broker.bootstrap, prefix + "predictions", args.seconds),
                    lambda: bench_monitor(broker.bootstrap, prefix, args.seconds)):
            row = run()
            row["crc32c"] = crc
            rows.append(row)
            print(f"{row['path']:9s}  crc32c: {crc:15s}  {row['predictions_per_s']:8d} predictions/s  "
                  f"(acknowledged {row['acknowledged']} of {row['handed']} in {row['seconds']} s)", flush=True)
    result = {"dim": DIM, "dtype": "float16", "classes": CLASSES, "cores": os.cpu_count(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
