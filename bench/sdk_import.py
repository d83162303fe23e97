"""Benchmark: what ``import layerwatch`` and a ``Monitor`` cost an inference process (time and memory).

Each step runs in a fresh interpreter, ``--repeats`` times (median reported):

- ``python``: the bare interpreter (baseline RSS);
- ``import layerwatch``: the face package alone (exports resolve lazily);
- ``import torch``: what any torch server already pays;
- ``from layerwatch import Monitor``: torch, numpy, kafka-python, fastavro, the codec;
- ``Monitor(model, ...)``: a Monitor on a small MLP with its sender and action-listener threads
  (broker address with nothing listening: construction never waits for Kafka);

and checks that none of faust, chdb, clickhouse_driver, art, plotly, matplotlib was imported.

    python bench/sdk_import.py [--repeats 5] [--json PATH]

Not run by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("faust", "chdb", "clickhouse_driver", "art", "plotly", "matplotlib")

PROBE = """
import sys, time
t0 = time.perf_counter()
{body}
elapsed = time.perf_counter() - t0
rss = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')) / 1024
print(elapsed, rss, [m for m in {heavy!r} if m in sys.modules])
"""

STEPS = {
    "python": "pass",
    "import layerwatch": "import layerwatch",
    "import torch": "import torch",
    "from layerwatch import Monitor": "from layerwatch import Monitor",
    "Monitor(model, ...)": (
        "import torch\n"
        "from layerwatch import Monitor\n"
        "net = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))\n"
        "m = Monitor(net, 'probe', bootstrap='127.0.0.1:9')\n"
        "with torch.inference_mode():\n"
        "    m(torch.ones(8, 20))"
    ),
}


def run(body: str) -> tuple[float, float, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE.format(body=body, heavy=HEAVY)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True)
    elapsed, rss, heavy = out.stdout.strip().splitlines()[-1].split(" ", 2)
    return float(elapsed), float(rss), eval(heavy)  # noqa: S307 - our own probe's printed list


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for name, body in STEPS.items():
        runs = [run(body) for _ in range(args.repeats)]
        row = {"step": name, "seconds": round(statistics.median(r[0] for r in runs), 4),
               "rss_mb": round(statistics.median(r[1] for r in runs), 1),
               "heavy_modules": sorted({m for r in runs for m in r[2]})}
        rows.append(row)
        print(f"{name:32s} {row['seconds'] * 1000:9.1f} ms  RSS {row['rss_mb']:7.1f} MB  heavy: {row['heavy_modules']}",
              flush=True)
    result = {"repeats": args.repeats, "load_average": os.getloadavg(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
