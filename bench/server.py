"""Benchmark: model server predictions/s with and without publishing to Kafka.

Starts an embedded Tansu broker and the model server (in-process, its own event-loop
thread), then drives ``POST /predict`` with concurrent aiohttp clients for a few
seconds per configuration: publishing off / on, and request batch sizes (inputs per
request). Prints predictions/s, requests/s and latency percentiles; with publishing
on, also the events the broker acknowledged (everything served must be delivered).

    python bench/server.py [--seconds 5] [--batches 1,16,64] [--model cnn] [--json PATH]

Not run by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streams.broker import EmbeddedBroker  # noqa: E402
from workers.inference.data import demo_split  # noqa: E402
from workers.inference.models import load_demo_models  # noqa: E402
from workers.inference.server import ModelServer, ServerThread  # noqa: E402


async def drive(url: str, model: str, batch: int, seconds: float, concurrency: int) -> dict:
    """Closed loop: ``concurrency`` clients each send the next request when the previous answer arrives."""
    import aiohttp

    x = np.array(demo_split(0).x_test)
    rng = np.random.default_rng(0)
    bodies = [x[rng.integers(len(x), size=batch)].astype("<f4").tobytes() for _ in range(32)]
    headers = {"Content-Type": "application/octet-stream", "X-Shape": f"{batch},1,8,8"}
    latencies: list[float] = []
    codes: dict[int, int] = {}
    stop_at = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession, k: int) -> None:
        i = k
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            async with session.post(f"{url}/predict", params={"model": model}, data=bodies[i % len(bodies)],
                                    headers={**headers, "X-Client-Id": f"bench-{k}"}) as response:
                await response.read()
                codes[response.status] = codes.get(response.status, 0) + 1
            latencies.append(time.perf_counter() - started)
            i += 1

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session, k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    ok = codes.get(200, 0)
    lat = np.array(latencies) * 1000
    return {
        "batch": batch,
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "requests": int(sum(codes.values())),
        "requests_per_s": round(ok / elapsed, 1),
        "predictions_per_s": round(ok * batch / elapsed, 1),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 2),
        "status": codes,
    }


def run_config(models: dict, bootstrap: str | None, args: argparse.Namespace, batch: int) -> dict:
    server = ModelServer(models, bootstrap=bootstrap, rate=None, predictions_topic="bench.predictions",
                         actions_topic="bench.actions", include_inputs=True, mc_dropout=args.mc_dropout,
                         torch_threads=args.threads or None)
    with ServerThread(server) as running:
        drive_result = asyncio.run(drive(running.url, args.model, batch, args.seconds, args.concurrency))
        flush_started = time.perf_counter()
        if bootstrap:
            running.flush(timeout=60)
        flush_s = time.perf_counter() - flush_started
        stats = running.server.stats()
    drive_result.update(
        publishing=bool(bootstrap),
        served=stats["predictions"],
        delivered=stats["delivered"],
        delivery_errors=stats["delivery_errors"],
        final_flush_s=round(flush_s, 3),
    )
    return drive_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batches", default="1,16,64", help="inputs per request, comma separated")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--mc-dropout", type=int, default=0)
    parser.add_argument("--state-dir", default=None, help="demo models (default: a temporary dir, trained)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the server (0: torch's default)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    import torch

    state_dir = args.state_dir or tempfile.mkdtemp(prefix="lw-bench-")
    models = load_demo_models(state_dir, [args.model], progress=True)
    rows = []
    with EmbeddedBroker() as broker:
        for batch in [int(b) for b in args.batches.split(",")]:
            for bootstrap in (None, broker.bootstrap):
                row = run_config(models, bootstrap, args, batch)
                rows.append(row)
                print(f"batch {batch:4d}  publish={'on ' if bootstrap else 'off'}  "
                      f"{row['predictions_per_s']:9.1f} predictions/s  {row['requests_per_s']:7.1f} requests/s  "
                      f"p50 {row['latency_ms_p50']:6.2f} ms  p99 {row['latency_ms_p99']:6.2f} ms  "
                      f"served {row['served']}  delivered {row['delivered']}  errors {row['delivery_errors']}",
                      flush=True)
    result = {"model": args.model, "torch_threads": torch.get_num_threads(), "mc_dropout": args.mc_dropout,
              "cores": __import__("os").cpu_count(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
