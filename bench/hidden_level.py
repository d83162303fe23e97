"""Benchmark: the hidden-attack count test's level and power on the fleet bench's synthetic models.

For a few models of ``bench/fleet.py``'s generator (512-dim penultimate, 10 classes, the same
300-row references), fits :class:`workers.hidden_attacks.HiddenAttackTest` as the worker does,
then tests ``--windows`` clean 200-event windows (the fleet's clients, prober included) and
windows where a share of the events carry the fleet's attack (a shift of 0.8 on every
dimension). Prints, per model, the clean rate the count test assumes, the flagged share on
clean windows, the share of clean windows positive at ``LW_COUNT_ALPHA`` (the level), heavy
clients singled out on clean windows, and the share of attacked windows positive (the power).

    python bench/hidden_level.py [--models m003,m013,m050] [--windows 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import PEN, Fleet  # noqa: E402

from workers.hidden_attacks import HiddenAttackTest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="m003,m013,m050")
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--reference", type=int, default=300)
    parser.add_argument("--alpha", type=float, default=0.001, help="LW_COUNT_ALPHA")
    parser.add_argument("--shares", default="0.05,0.1")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    fleet = Fleet(100, 2, 5000, 256, 1.1, 3)
    rows = []
    for model in args.models.split(","):
        layers, _, predicted, _ = fleet.sample(model, args.reference, clients=False)
        test = HiddenAttackTest({PEN: layers[PEN].astype(np.float32)}, predicted)
        p_clean, flagged, singled = [], [], 0
        for _ in range(args.windows):
            window, _, pred, ids = fleet.sample(model, 200)
            count, clients = test.analyze({PEN: window[PEN].astype(np.float32)}, pred, ids)
            p_clean.append(count.p_value)
            flagged.append(count.detection_rate)
            singled += sum(c.p_adjusted <= args.alpha for c in clients)
        row = {"model": model, "rate_assumed": test.rate, "clean_flagged_share": float(np.mean(flagged)),
               "clean_windows_positive": float(np.mean(np.array(p_clean) <= args.alpha)),
               "clean_clients_singled_out": singled}
        for share in map(float, args.shares.split(",")):
            positive = []
            for _ in range(args.windows // 2):
                window, _, pred, ids = fleet.sample(model, 200)
                k = int(share * 200)
                attacked, _, pred_a, _ = fleet.sample(model, k, shift=0.8, clients=False)
                x = window[PEN].astype(np.float32)
                x[:k] = attacked[PEN]
                pred = pred.copy()
                pred[:k] = pred_a
                positive.append(test.analyze({PEN: x}, pred, ids)[0].p_value <= args.alpha)
            row[f"attacked_windows_positive_at_{share:g}"] = float(np.mean(positive))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"windows": args.windows, "alpha": args.alpha, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
