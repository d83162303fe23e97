"""Benchmark: what ``Monitor`` adds to a forward pass, with the broker up and with the broker stopped.

For each model (the demo ResNet on 8x8 digits, and a >= 10M-parameter MLP built here with
random weights) and batch size (1 and 32), runs ``model(x)`` and ``monitor(x)`` under
``torch.inference_mode()`` in alternating order (so drifts of a busy machine hit both
alike) and reports per-call latency percentiles:

    {"model", "batch", "plain_p50_ms", "plain_p99_ms", "monitored_p50_ms", "monitored_p99_ms", "added_p50_us"}

``added_p50_us`` is monitored p50 minus plain p50; ``added_paired_p50_us`` the median of the
differences of adjacent calls (each monitored call against the plain call next to it, which
cancels most of a busy machine's drift). First the request path alone (a monitor
whose sender never connects, so nothing is published); then the whole table twice: with
an embedded Tansu broker up (the monitor publishes everything), then after stopping it
(the queue fills and drops oldest rows; the monitor's ``stats()`` and the process RSS are
recorded; a soak of ``--soak-calls`` more batch-32 calls samples the RSS to show it levels off
once the queue and the unacknowledged rows are at their bounds).

    python bench/overhead.py [--calls 2000] [--threads 1] [--json PATH]

Targets (issue 14): added p50 <= 50 us per call at batch 1; p99 with monitoring <= 1.05 x
plain for the 10M model; broker down: p99 within 10 % of the broker-up figure, memory
bounded by the queue. Not run by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from layerwatch import Monitor, load_settings  # noqa: E402
from streams.broker import EmbeddedBroker, free_port  # noqa: E402


def big_mlp(seed: int = 0) -> nn.Module:
    """A 1024 -> 2048 -> 2048 -> 2048 -> 512 -> 100 MLP: 11.6M parameters, random weights."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                         nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 512), nn.ReLU(), nn.Linear(512, 100))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(model: nn.Module, monitor: Monitor, x: torch.Tensor, calls: int) -> dict:
    plain = np.empty(calls)
    monitored = np.empty(calls)
    clock = time.perf_counter_ns
    with torch.inference_mode():
        for _ in range(max(20, calls // 20)):  # warm-up: allocator, hooks, queue, connection
            model(x)
            monitor(x)
        for i in range(calls):
            if i % 2:
                t0 = clock(); model(x); t1 = clock(); monitor(x); t2 = clock()  # noqa: E702
                plain[i], monitored[i] = t1 - t0, t2 - t1
            else:
                t0 = clock(); monitor(x); t1 = clock(); model(x); t2 = clock()  # noqa: E702
                monitored[i], plain[i] = t1 - t0, t2 - t1
    p = lambda a, q: float(np.percentile(a, q)) / 1e6  # noqa: E731  ns -> ms
    return {"plain_p50_ms": round(p(plain, 50), 4), "plain_p99_ms": round(p(plain, 99), 4),
            "monitored_p50_ms": round(p(monitored, 50), 4), "monitored_p99_ms": round(p(monitored, 99), 4),
            "added_p50_us": round((p(monitored, 50) - p(plain, 50)) * 1000, 1),
            "added_paired_p50_us": round(float(np.median(monitored - plain)) / 1e3, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per model, batch and broker state")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--queue-rows", type=int, default=16_384)
    parser.add_argument("--soak-calls", type=int, default=4000, help="batch-32 calls with the broker down (memory)")
    parser.add_argument("--state-dir", default=None, help="demo models cache (default: ./.layerwatch)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from workers.inference.models import load_demo_models

    resnet = load_demo_models(args.state_dir or "./.layerwatch", ["resnet"], progress=True)["resnet"].module.eval()
    models = {"resnet": (resnet, (1, 8, 8)), "mlp11m": (big_mlp().eval(), (1024,))}
    params = {name: sum(p.numel() for p in m.parameters()) for name, (m, _) in models.items()}
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    memory: dict[str, dict] = {}
    # the request path alone: a monitor whose sender never connects (nothing listens at that
    # address, the queue is big enough to keep every row), so no publishing competes for the CPU
    idle = {name: Monitor(m, name, bootstrap=f"127.0.0.1:{free_port()}", actions=False, queue_rows=1 << 22)
            for name, (m, _) in models.items()}
    for name, (model, shape) in models.items():
        for batch in (1, 32):
            x = torch.from_numpy(rng.random((batch, *shape), dtype=np.float32))
            row = {"model": name, "batch": batch, "broker": "none (request path only)", "params": params[name],
                   **measure(model, idle[name], x, args.calls)}
            rows.append(row)
            print(f"request path only {name:7s} batch {batch:2d}  plain p50 {row['plain_p50_ms']:8.4f} ms "
                  f"monitored p50 {row['monitored_p50_ms']:8.4f}  added p50 {row['added_p50_us']:7.1f} us "
                  f"(paired {row['added_paired_p50_us']:7.1f} us)", flush=True)
    for monitor in idle.values():
        monitor.close(timeout=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        broker = EmbeddedBroker(log_path=Path(tmp) / "tansu.log").start()
        settings = load_settings(env={"LW_KAFKA_BOOTSTRAP": broker.bootstrap,
                                      "LW_TOPIC_PREFIX": f"bench{uuid.uuid4().hex[:6]}."})
        monitors = {name: Monitor(m, name, settings=settings, actions=False, queue_rows=args.queue_rows)
                    for name, (m, _) in models.items()}
        try:
            for state in ("up", "down"):
                if state == "down":
                    for monitor in monitors.values():
                        monitor.flush(60)
                    broker.stop()
                memory[state] = {"rss_mb_before": round(rss_mb(), 1)}
                for name, (model, shape) in models.items():
                    for batch in (1, 32):
                        x = torch.from_numpy(rng.random((batch, *shape), dtype=np.float32))
                        row = {"model": name, "batch": batch, "broker": state, "params": params[name],
                               **measure(model, monitors[name], x, args.calls)}
                        row["stats"] = monitors[name].stats()
                        rows.append(row)
                        print(f"broker {state:4s} {name:7s} batch {batch:2d}  plain p50 {row['plain_p50_ms']:8.4f} ms "
                              f"p99 {row['plain_p99_ms']:8.4f}  monitored p50 {row['monitored_p50_ms']:8.4f} "
                              f"p99 {row['monitored_p99_ms']:8.4f}  added p50 {row['added_p50_us']:7.1f} us "
                              f"(paired {row['added_paired_p50_us']:7.1f})  "
                              f"{row['stats']}", flush=True)
                memory[state]["rss_mb_after"] = round(rss_mb(), 1)
            # broker still down: keep serving resnet at batch 32 and watch the memory level off
            model, shape = models["resnet"]
            x = torch.from_numpy(rng.random((32, *shape), dtype=np.float32))
            samples = []
            with torch.inference_mode():
                for i in range(args.soak_calls):
                    monitors["resnet"](x)
                    if i % max(1, args.soak_calls // 8) == 0:
                        samples.append({"call": i, "rows": 32 * (i + 1), "rss_mb": round(rss_mb(), 1),
                                        **monitors["resnet"].stats()})
            memory["down_soak"] = samples
            print("soak (broker down):", json.dumps(samples[-1]), flush=True)
        finally:
            for monitor in monitors.values():
                monitor.close(timeout=1.0)
            broker.stop()
    result = {"torch_threads": torch.get_num_threads(), "cores": os.cpu_count(), "calls": args.calls,
              "queue_rows": args.queue_rows, "load_average": os.getloadavg(), "memory": memory, "rows": rows}
    print(json.dumps({"memory": memory, "load_average": result["load_average"]}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
