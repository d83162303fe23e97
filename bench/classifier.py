"""Benchmark of the attack classifier and the per-event detector: µs per prediction at batch 1, 64 and 1024.

One ``AttackClassifier.predict`` call = feature computation + all three heads
(adversarial, attack type, target model) + calibration, on held-out output vectors
of the demo data set. ``us_per_prediction`` is the best wall time of a call divided
by the batch size (the minimum: on the shared 2-core machine other work only ever
adds time); the median wall time and the process CPU time are reported beside it.

Usage: ``python bench/classifier.py [--state-dir ./.layerwatch] [--kind rf|et|hgb]
[--json PATH]``. Without ``--kind`` it times the saved classifier
(``<state_dir>/classifier/classifier.skops``); with ``--kind`` it trains that kind on
the data set's train part first (not saved). Seed 001 reports 120 µs per prediction.

Detector rows (``method="detector"``, one per demo model): ``Detector.predict`` (features
from the output, penultimate and tapped layers + all heads) and ``Detector.score`` (the
adversarial probability only) on held-out rows, BLAS limited to one thread (as the
classify stage runs it). The detectors are ``<state_dir>/classifier/detectors/*.skops``
(``layerwatch classifier train``), fitted on the train split when missing (not saved).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.classifier.dataset import load_dataset, split_masks
from workers.classifier.model import AttackClassifier, default_path

BATCHES = (1, 64, 1024)


def measure(classifier: AttackClassifier | Callable[[int], None], outputs: np.ndarray | None, batch: int,
            min_time_s: float = 1.0, max_runs: int = 2000) -> dict[str, float]:
    """Best / median wall and mean CPU µs per prediction of ``predict`` on ``batch`` rows.

    ``classifier`` may also be a function of the batch size that makes one call (detector rows).
    """
    if callable(classifier) and not isinstance(classifier, AttackClassifier):
        call = classifier
    else:
        x = np.ascontiguousarray(np.resize(outputs, (batch, outputs.shape[1])))

        def call(_batch: int) -> None:
            classifier.predict(x)
    call(batch)  # warm-up (leaf tables, caches)
    walls, cpu0, start = [], time.process_time(), time.perf_counter()
    while len(walls) < 5 or (time.perf_counter() - start < min_time_s and len(walls) < max_runs):
        t0 = time.perf_counter()
        call(batch)
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


def detector_rows(state_dir: str, test: np.ndarray) -> list[dict]:
    """Rows for each demo model's detector: ``score`` and ``predict`` at every batch size."""
    from threadpoolctl import threadpool_limits

    from workers.classifier.activations import build_activations
    from workers.classifier.detector import Detector
    from workers.classifier.fitting import _events, detectors_dir, fit_demo_detectors

    dataset, acts = build_activations(state_dir, progress=False)
    paths = {m: detectors_dir(state_dir) / f"{m}.skops" for m in acts}
    if all(p.exists() for p in paths.values()):
        dets = {m: Detector.load(p) for m, p in paths.items()}
    else:
        dets = fit_demo_detectors(dataset, acts, split_masks(dataset)[0])
    rows = []
    with threadpool_limits(1):
        for model, det in dets.items():
            ev = _events(acts[model], dataset, np.flatnonzero(test[acts[model].rows]), det.layers)

            def take(batch: int, ev: dict = ev) -> dict:
                pick = np.resize(np.arange(len(ev["outputs"])), batch)
                return {"outputs": ev["outputs"][pick], "embeddings": ev["embeddings"][pick],
                        "layers": {k: v[pick] for k, v in ev["layers"].items()}}

            for call in ("score", "predict"):
                for b in BATCHES:
                    batch = take(b)
                    fn = getattr(det, call)
                    rows.append(dict(measure(lambda _b, fn=fn, batch=batch: fn(**batch), None, b),
                                     method="detector", call=call, model=model, kind=det.meta.get("estimator"),
                                     version=det.version))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state-dir", default="./.layerwatch")
    ap.add_argument("--kind", choices=("rf", "et", "hgb"), help="train this kind (not saved) instead of loading")
    ap.add_argument("--json", type=Path, help="write the rows as JSON to PATH")
    ap.add_argument("--no-detector", action="store_true", help="time the baseline classifier only")
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
    rows = [dict(measure(classifier, outputs, b), method="baseline_output_only", call="predict", model="all",
                 kind=classifier.kind, version=classifier.version) for b in BATCHES]
    if not args.no_detector:
        rows += detector_rows(args.state_dir, test)
    table = Table(title="µs per prediction — baseline: output-only forest, features + 3 heads; detector: "
                        "features on output + tapped layers, score only or every head")
    for col in ("method", "call", "model", "batch", "µs/prediction (best)", "median", "cpu", "µs/call (best)", "runs"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["method"], r["call"], r["model"], str(r["batch"]), f"{r['us_per_prediction']:.2f}",
                      f"{r['us_per_prediction_median']:.2f}", f"{r['us_per_prediction_cpu']:.2f}",
                      f"{r['us_per_call']:.0f}", str(r["runs"]))
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        console.print(f"wrote {len(rows)} rows to {args.json}")


if __name__ == "__main__":
    main()
