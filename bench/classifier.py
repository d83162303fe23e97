"""Benchmark of the attack classifier: µs per prediction at batch 1, 64 and 1024.

One ``AttackClassifier.predict`` call = feature computation + all three heads
(adversarial, attack type, target model) + calibration, on held-out output vectors
of the demo data set. ``us_per_prediction`` is the best wall time of a call divided
by the batch size (the minimum: on the shared 2-core machine other work only ever
adds time); the median wall time and the process CPU time are reported beside it.

Usage: ``python bench/classifier.py [--state-dir ./.layerwatch] [--kind rf|et|hgb]
[--json PATH]``. Without ``--kind`` it times the saved classifier
(``<state_dir>/classifier/classifier.skops``); with ``--kind`` it trains that kind on
the data set's train part first (not saved). Seed 001 reports 120 µs per prediction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.classifier.dataset import load_dataset, split_masks  # noqa: E402
from workers.classifier.model import AttackClassifier, default_path  # noqa: E402

BATCHES = (1, 64, 1024)


def measure(classifier: AttackClassifier, outputs: np.ndarray, batch: int, min_time_s: float = 1.0,
            max_runs: int = 2000) -> dict[str, float]:
    """Best / median wall and mean CPU µs per prediction of ``predict`` on ``batch`` rows."""
    x = np.ascontiguousarray(np.resize(outputs, (batch, outputs.shape[1])))
    classifier.predict(x)  # warm-up (leaf tables, caches)
    walls, cpu0, start = [], time.process_time(), time.perf_counter()
    while len(walls) < 5 or (time.perf_counter() - start < min_time_s and len(walls) < max_runs):
        t0 = time.perf_counter()
        classifier.predict(x)
        walls.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / len(walls)
    return {
        "batch": batch,
        "us_per_prediction": round(min(walls) / batch * 1e6, 3),
        "us_per_prediction_median": round(float(np.median(walls)) / batch * 1e6, 3),
        "us_per_prediction_cpu": round(cpu / batch * 1e6, 3),
        "us_per_call": round(min(walls) * 1e6, 1),
        "runs": len(walls),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state-dir", default="./.layerwatch")
    ap.add_argument("--kind", choices=("rf", "et", "hgb"), help="train this kind (not saved) instead of loading")
    ap.add_argument("--json", type=Path, help="write the rows as JSON to PATH")
    args = ap.parse_args()
    console = Console()
    dataset = load_dataset(args.state_dir)
    if args.kind:
        train, test = split_masks(dataset)
        part = dataset.subset(train)
        classifier = AttackClassifier(args.kind).fit(part.outputs, part.adversarial, part.attack, part.target_model,
                                                     groups=part.source_index)
    else:
        classifier = AttackClassifier.load(default_path(args.state_dir))
        split = classifier.meta.get("split", {})
        _, test = split_masks(dataset, split.get("test_fraction", 0.3), split.get("seed", 0))
    outputs = dataset.outputs[test]
    rows = [dict(measure(classifier, outputs, b), kind=classifier.kind, version=classifier.version) for b in BATCHES]
    table = Table(title=f"attack classifier predict ({classifier.kind}, {classifier.version}) — features + 3 heads")
    for col in ("batch", "µs/prediction (best)", "median", "cpu", "µs/call (best)", "runs"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["batch"]), f"{r['us_per_prediction']:.2f}", f"{r['us_per_prediction_median']:.2f}",
                      f"{r['us_per_prediction_cpu']:.2f}", f"{r['us_per_call']:.0f}", str(r["runs"]))
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        console.print(f"wrote {len(rows)} rows to {args.json}")


if __name__ == "__main__":
    main()
