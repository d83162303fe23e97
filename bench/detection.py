"""Detection quality of the MMD engine's settings, and of the window statistics for hidden attacks.

Evaluation set (built once, cached under ``<state>/detection/``): the three demo models
(:mod:`workers.inference.models`, trained on the digits' train split), every tapped layer
(:func:`workers.inference.models.layer_names`); the reference is the validation split's
activations, the clean windows the test split's, the attacked windows the adversarial
versions of the test split (ART through :mod:`workers.attacks`; every attacked input,
failed ones included, as an attacker sends them all): minimal-change attacks (PGD ε .03
and .1, CW-L2, DeepFool, Square) and FGSM/PGD. A class-mix-changed clean window holds the
clean test events predicted as classes 0–4 only.

Part 1 — window test, per (model, window, layer, setting): the LADIS detection rate
(R repeats of m reference vs m window rows, P permutations, α .05) for the settings

    today     no standardisation, one median bandwidth, layers summed (engine before issue 18)
    ladis     LADIS recipe: standardised features, mean of 5 bandwidths median × 2^f (f = −2…2)
    std1      standardised, one median bandwidth (separates the two parts of the recipe)
    wide      standardised, mean of 7 bandwidths (f = −3…3)

and, on each setting's kernels, the multi-layer combinations ``sum``, ``max`` and ``minp``
(same permutations, :func:`workers.mmd.kernels.combine_layers`). Level: the clean window
is tested with R_H0 repeats.

Part 2 — attacks hidden in clean traffic (per model, per attack): the per-event score
(:class:`workers.eventscore.EventScorer`, class-conditional Mahalanobis on every tapped
layer, fitted on the reference) flags events above its clean quantile; windows of 200
events (two hops of 100, as the 10 s/5 s hopping windows) get the exact binomial count
test (:func:`workers.hidden_attacks.count_test`); an alert opens after 2 positive windows in
a row. Minimum detectable share: the smallest share of adversarial events at which the
alert opens within 3 windows in ≥ 90% of simulated episodes. False alerts per hour of
clean traffic: the same rule on a long clean simulation, 720 windows per hour (5 s hop).
Heavy-client test: an attacking client with n events of its own in a window, tested alone
(MMD and count test, Bonferroni over 5 clients). Ranking: top-50 precision in windows of
150 clean + 50 adversarial events for the witness score, the per-event score and their
Borda combination (:func:`workers.hidden_attacks.rank_events`). Window test alone on mixed
windows (25%, 50%) for comparison.

    python bench/detection.py --json detection.json           # R=100, m=100, P=500
    python bench/detection.py --quick --json /tmp/quick.json  # R=30, m=50, P=200, one model

CPU-bound and seeded; ``--threads`` torch threads (default 1: a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ATTACKS = ("pgd_003", "pgd_010", "cw", "deepfool", "square", "fgsm", "pgd")
SMALL = ("pgd_003", "pgd_010", "cw", "deepfool")  # the minimal-change attacks
KERNELS: dict[str, dict[str, Any]] = {
    "today": {"standardize": False, "bandwidth_multipliers": (1.0,)},
    "ladis": {"standardize": True, "bandwidth_multipliers": (0.25, 0.5, 1.0, 2.0, 4.0)},
    "std1": {"standardize": True, "bandwidth_multipliers": (1.0,)},
    "wide": {"standardize": True, "bandwidth_multipliers": tuple(2.0 ** f for f in range(-3, 4))},
}
MIX_CLASSES = (0, 1, 2, 3, 4)
CLEAN, MIX, MIX_ADJ = "clean", "class-mix", "class-mix (shift-adjusted)"


# ------------------------------------------------------------------------------ evaluation set


def build_set(state_dir: Path, model: str, attacks: tuple[str, ...], seed: int) -> dict[str, Any]:
    """Activations of every tapped layer: reference (val), clean (test), each attack; cached as npz."""
    from workers.attacks import generate
    from workers.inference.data import demo_split
    from workers.inference.models import layer_names, load_demo_models
    from workers.inference.tap import PENULTIMATE, LayerTap

    cache = state_dir / "detection" / f"{model}_{seed}.npz"
    want = ("reference", "clean", *attacks)
    if cache.exists():
        with np.load(cache, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
        if all(f"{w}/outputs" in data for w in want):
            return _unflatten(data)
    demo = load_demo_models(state_dir, [model], progress=True, seed=seed)[model]
    split = demo_split(seed)
    layers = layer_names(model)
    tap = LayerTap(demo.module, [n for n in layers if n != PENULTIMATE], penultimate=PENULTIMATE in layers)
    out: dict[str, Any] = {}
    try:
        def acts(x: np.ndarray) -> dict[str, np.ndarray]:
            got = tap.tap(x)
            res = {name: np.asarray(got.layers[name], dtype=np.float32) for name in layers}
            logits = np.asarray(got.outputs, dtype=np.float64)
            res["classes"] = logits.argmax(1).astype(np.int64)
            e = np.exp(logits - logits.max(1, keepdims=True))
            res["outputs"] = (e / e.sum(1, keepdims=True)).astype(np.float32)  # softmax, as the server publishes
            return res

        out["reference"] = acts(split.x_val)
        out["clean"] = acts(split.x_test)
        for name in attacks:
            result = generate(demo.module, split.x_test, split.y_test, name, seed=seed, state_dir=state_dir,
                              model_name=model)
            out[name] = acts(result.x_adv)
            out[name]["success_rate"] = np.array(result.success_rate)
            out[name]["mean_linf"] = np.array(result.mean_linf)
            out[name]["mean_l2"] = np.array(result.mean_l2)
    finally:
        tap.remove()
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, **{f"{w}/{k}": v for w, d in out.items() for k, v in d.items()})
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in flat.items():
        w, k = key.split("/", 1)
        out.setdefault(w, {})[k] = value
    return out


def layers_of(block: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    return {k: block[k] for k in names}


# ------------------------------------------------------------------------------ part 1


def window_tests(data: dict[str, Any], names: list[str], attacks: tuple[str, ...], args: argparse.Namespace,
                 bar: Any, task: Any) -> dict[str, Any]:
    """Detection rates per kernel setting: per layer and per combination, for every window."""
    from workers.mmd import COMBINATIONS, MMDTester

    ref = layers_of(data["reference"], names)
    clean = layers_of(data["clean"], names)
    mix_rows = np.isin(data["clean"]["classes"], MIX_CLASSES)
    mix = {k: v[mix_rows] for k, v in clean.items()}
    rates: dict[str, dict[str, dict[str, float]]] = {}
    for kname, kw in KERNELS.items():
        tester = MMDTester(ref, n_permutations=args.permutations, seed=args.seed, device="cpu",
                           reference_classes=data["reference"]["classes"], **kw)
        per: dict[str, dict[str, float]] = {}

        def record(window: str, res: Any, per: dict[str, dict[str, float]] = per) -> None:
            row = {k: float(r.rate) for k, r in res.layers.items()}
            for method in COMBINATIONS:
                row[method] = float(np.mean(res.combinations[method] <= args.alpha))
            per[window] = row

        record(CLEAN, tester.detection_rate(clean, repeats=args.repeats_h0, m=args.m, alpha=args.alpha,
                                            shift_adjust=False))
        bar.advance(task)
        record(MIX, tester.detection_rate(mix, repeats=args.repeats, m=args.m, alpha=args.alpha, shift_adjust=False))
        record(MIX_ADJ, tester.detection_rate(mix, repeats=args.repeats, m=args.m, alpha=args.alpha,
                                              window_classes=data["clean"]["classes"][mix_rows]))
        bar.advance(task)
        for name in attacks:
            record(name, tester.detection_rate(layers_of(data[name], names), repeats=args.repeats, m=args.m,
                                               alpha=args.alpha, shift_adjust=False))
            bar.advance(task)
        rates[kname] = per
    return rates


def h0_level(data: dict[str, Any], names: list[str], args: argparse.Namespace, bar: Any, task: Any
             ) -> dict[str, float]:
    """Level of the default tester on exchangeable clean data: random re-splits of validation ∪ test.

    The detection rate of the clean test window is conservative (R subsamples of 100 from a pool of
    ~360 rows vary less than independent draws: the finite-population correction); here each split
    draws a fresh reference (n_ref rows) and window (m rows) from the pooled clean rows, so each
    ``MMDTester.test`` is exactly exchangeable under H0 and its rejection rate estimates the level.
    """
    from workers.mmd import COMBINATIONS, MMDTester

    pool = {k: np.vstack([data["reference"][k], data["clean"][k]]) for k in names}
    n_pool, n_ref = len(pool[names[0]]), len(data["reference"]["classes"])
    rng = np.random.default_rng(args.seed + 1)
    p = {k: [] for k in [*names, *COMBINATIONS]}
    for i in range(args.h0_splits):
        order = rng.permutation(n_pool)
        ri, wi = order[:n_ref], order[n_ref:n_ref + args.m]
        tester = MMDTester({k: v[ri] for k, v in pool.items()}, n_permutations=args.permutations, seed=i,
                           device="cpu")
        res = tester.test({k: v[wi] for k, v in pool.items()})
        for k in names:
            p[k].append(res.layers[k].p_value)
        for method in COMBINATIONS:
            p[method].append(res.combined.p_values[method])
        if (i + 1) % 50 == 0:
            bar.advance(task, 50)
    return {k: float(np.mean(np.asarray(v) <= args.alpha)) for k, v in p.items()}


# ------------------------------------------------------------------------------ part 2


def hidden_attacks(data: dict[str, Any], names: list[str], attacks: tuple[str, ...], args: argparse.Namespace,
                   bar: Any, task: Any) -> dict[str, Any]:
    """Count test, heavy-client test, ranking and the window test on mixed windows."""
    from workers.eventscore import EventScorer
    from workers.mmd import MMDTester
    from workers.hidden_attacks import (
        alert_opens,
        count_test,
        heavy_client_tests,
        rank_events,
        rate_bound,
    )

    rng = np.random.default_rng(args.seed)
    ref = layers_of(data["reference"], names)
    outputs = data["reference"]["outputs"] if args.margin else None
    scorer = EventScorer(ref, data["reference"]["classes"], outputs=outputs, seed=args.seed)

    def score(w: str) -> np.ndarray:
        return scorer.score(layers_of(data[w], names), data[w]["classes"],
                            data[w]["outputs"] if args.margin else None)

    clean_score = score("clean")
    adv_score = {a: score(a) for a in attacks}
    tester = MMDTester(ref, n_permutations=args.permutations, seed=args.seed, device="cpu")
    hop, n_win = args.hop, 2 * args.hop
    shares = np.array(args.shares)
    out: dict[str, Any] = {"flag_fpr": {}, "auc": {}, "min_share": {}, "p_open": {}, "false_alerts_per_hour": {},
                           "clients": {}, "ranking": {}, "window_test_mixed": {}}

    # per-event detector quality (AUC of clean test vs attacked), independent of the threshold
    from sklearn.metrics import roc_auc_score

    for a in attacks:
        out["auc"][a] = float(roc_auc_score(np.r_[np.zeros(len(clean_score)), np.ones(len(adv_score[a]))],
                                            np.r_[clean_score, adv_score[a]]))
    for q in args.flag_rates:
        t = scorer.threshold(q)
        exceed, n_cal = scorer.flag_rate(t)
        rate = rate_bound(exceed, n_cal, args.rate_confidence)
        fpr_pool = float((clean_score > t).mean())
        tpr = {a: float((adv_score[a] > t).mean()) for a in attacks}
        key = f"{q:g}"
        out["flag_fpr"][key] = {"threshold": t, "calibration_rate": exceed / n_cal, "tested_rate": rate,
                                "clean_test_rate": fpr_pool, "tpr": tpr}
        # false alerts: a long clean run, blocks of `hop` events, windows = two consecutive blocks
        n_blocks = int(args.clean_hours * 720) + 1
        flagged = rng.binomial(hop, fpr_pool, size=n_blocks)
        k = flagged[1:] + flagged[:-1]
        pos = count_test(k, n_win, rate) <= args.window_alpha
        opens = pos[1:] & pos[:-1] & ~np.r_[False, pos[:-2]]  # a run of two that starts here
        out["false_alerts_per_hour"][key] = float(opens.sum() / args.clean_hours)
        # attack episodes: 4 blocks = 3 windows; each event adversarial with probability `share`
        out["min_share"][key], out["p_open"][key] = {}, {}
        for a in attacks:
            n_adv = rng.binomial(hop, shares[:, None, None], size=(len(shares), args.episodes, 4))
            f = rng.binomial(n_adv, tpr[a]) + rng.binomial(hop - n_adv, fpr_pool)
            kk = f[..., 1:] + f[..., :-1]  # (S, E, 3)
            pos = count_test(kk, n_win, rate) <= args.window_alpha
            p_open = alert_opens(pos.reshape(-1, 3), consecutive=2).reshape(len(shares), -1).mean(1)
            ok = np.flatnonzero(p_open >= 0.9)
            out["p_open"][key][a] = {f"{s:g}": float(p) for s, p in zip(shares, p_open)}
            out["min_share"][key][a] = float(shares[ok[0]]) if len(ok) else None
        bar.advance(task)

    # heavy-client test: the attacker's own events in one window, tested alone (Bonferroni over 5 clients)
    t = scorer.threshold(args.client_flag_rate)
    rate = rate_bound(*scorer.flag_rate(t), args.rate_confidence)
    clean_layers = layers_of(data["clean"], names)
    for a in attacks:
        adv_layers = layers_of(data[a], names)
        row = {}
        for n_a in args.client_sizes:
            hits = 0
            for _ in range(args.client_draws):  # a few windows, each one tensor-batched test per client
                ci = rng.choice(len(clean_score), 4 * n_a, replace=False)
                ai = rng.choice(len(adv_score[a]), n_a, replace=False)
                layers = {k: np.vstack([clean_layers[k][ci], adv_layers[k][ai]]) for k in names}
                flags = np.r_[clean_score[ci], adv_score[a][ai]] > t
                ids = np.r_[np.repeat([f"c{i}" for i in range(4)], n_a), np.repeat("attacker", n_a)]
                tests = heavy_client_tests(ids, n_a, tester=tester, layers=layers, flags=flags, rate=rate)
                hits += any(x.client == "attacker" and x.p_adjusted <= args.window_alpha for x in tests)
            row[str(n_a)] = hits / args.client_draws
        out["clients"][a] = row
        bar.advance(task)

    # ranking: 150 clean + 50 adversarial, top-50 precision
    for a in attacks:
        prec = {"witness": [], "event": [], "combined": [], "borda": []}
        for _ in range(args.rank_draws):
            ci = rng.choice(len(clean_score), 150, replace=False)
            ai = rng.choice(len(adv_score[a]), 50, replace=False)
            layers = {k: np.vstack([clean_layers[k][ci], layers_of(data[a], names)[k][ai]]) for k in names}
            is_adv = np.r_[np.zeros(150, bool), np.ones(50, bool)]
            sc = tester.scores(layers, k=50)
            ev = np.r_[clean_score[ci], adv_score[a][ai]]
            prec["witness"].append(is_adv[np.argsort(-sc.witness)[:50]].mean())
            prec["event"].append(is_adv[np.argsort(-ev)[:50]].mean())
            combined = rank_events(ev, sc.witness, event_reference=scorer.calibration,
                                   witness_reference=sc.reference_witness)
            prec["combined"].append(is_adv[combined[:50]].mean())
            prec["borda"].append(is_adv[rank_events(ev, sc.witness)[:50]].mean())
        out["ranking"][a] = {k: float(np.mean(v)) for k, v in prec.items()}
        # the window test alone on mixed windows (default setting, combined test)
        row = {}
        for share in (0.25, 0.5):
            n_adv = int(round(share * 200))
            ci = rng.choice(len(clean_score), 200 - n_adv, replace=False)
            ai = rng.choice(len(adv_score[a]), n_adv, replace=False)
            layers = {k: np.vstack([clean_layers[k][ci], layers_of(data[a], names)[k][ai]]) for k in names}
            row[f"{share:g}"] = float(tester.detection_rate(layers, repeats=args.repeats, m=args.m,
                                                            alpha=args.alpha).rate)
        out["window_test_mixed"][a] = row
        bar.advance(task)
    return out


def share_needed(tpr: float, fpr: float, args: argparse.Namespace, rng: np.random.Generator) -> float | None:
    """Minimum detectable share of the count test for a per-event detector with this TPR and clean FPR."""
    from workers.hidden_attacks import alert_opens, count_test

    shares = np.array(args.shares)
    n_adv = rng.binomial(args.hop, shares[:, None, None], size=(len(shares), args.episodes, 4))
    f = rng.binomial(n_adv, tpr) + rng.binomial(args.hop - n_adv, fpr)
    pos = count_test(f[..., 1:] + f[..., :-1], 2 * args.hop, fpr) <= args.window_alpha
    p_open = alert_opens(pos.reshape(-1, 3), consecutive=2).reshape(len(shares), -1).mean(1)
    ok = np.flatnonzero(p_open >= 0.9)
    return float(shares[ok[0]]) if len(ok) else None


def requirements(args: argparse.Namespace) -> dict[str, dict[str, float | None]]:
    """Minimum detectable share as a function of the per-event detector's operating point (TPR, FPR)."""
    rng = np.random.default_rng(args.seed + 2)
    return {f"{fpr:g}": {f"{tpr:g}": share_needed(tpr, fpr, args, rng) for tpr in (0.3, 0.5, 0.7, 0.9, 0.99)}
            for fpr in (0.002, 0.005, 0.01, 0.02, 0.05)}


# ------------------------------------------------------------------------------ output


def print_tables(console: Any, results: dict[str, Any], attacks: tuple[str, ...]) -> None:
    from rich.table import Table

    from workers.mmd import COMBINATIONS

    for model, res in results["models"].items():
        names = res["layers"]
        windows = [CLEAN, MIX, MIX_ADJ, *attacks]
        if res["h0_level"]:
            console.print(f"{model}: level of the default tester on {results['params']['h0_splits']} random "
                          f"re-splits of clean data (α {results['params']['alpha']:g}): "
                          + ", ".join(f"{k} {v:.3f}" for k, v in res["h0_level"].items()))
        for kname in res["rates"]:
            rates = res["rates"][kname]
            table = Table(title=f"{model}: detection rate, kernel setting '{kname}' ({KERNELS[kname]})")
            table.add_column("window")
            for col in [*names, *COMBINATIONS]:
                table.add_column(col, justify="right")
            for w in windows:
                row = rates[w]
                best = max(row[k] for k in names)
                cells = [f"{row[k]:.2f}" for k in names]
                for method in COMBINATIONS:
                    v = row[method]
                    style = "red" if (w not in (CLEAN, MIX, MIX_ADJ) and v < best - 0.05) else ""
                    cells.append(f"[{style}]{v:.2f}[/]" if style else f"{v:.2f}")
                table.add_row(w, *cells)
            console.print(table)
        hid = res.get("hidden")
        if hid is None:
            continue
        table = Table(title=f"{model}: attacks hidden in clean traffic (count test, window α "
                            f"{results['params']['window_alpha']:g}, 2 windows in a row)")
        table.add_column("attack")
        table.add_column("AUC", justify="right")
        for key in hid["min_share"]:
            table.add_column(f"min share @flag {key}", justify="right")
        table.add_column("client test (n=" + "/".join(map(str, results["params"]["client_sizes"])) + ")")
        table.add_column("top-50 prec. witness/event/combined/borda")
        table.add_column("window test @25%/50%")
        for a in attacks:
            cells = [f"{hid['auc'][a]:.3f}"]
            for key in hid["min_share"]:
                v = hid["min_share"][key][a]
                cells.append(f"{v:.0%}" if v is not None else f"> {results['params']['shares'][-1]:.0%}")
            cells.append(" / ".join(f"{v:.2f}" for v in hid["clients"][a].values()))
            cells.append(" / ".join(f"{v:.2f}" for v in hid["ranking"][a].values()))
            cells.append(" / ".join(f"{v:.2f}" for v in hid["window_test_mixed"][a].values()))
            table.add_row(a, *cells)
        console.print(table)
        fa = ", ".join(f"flag {k}: {v:.2f}/h (clean test flag rate {hid['flag_fpr'][k]['clean_test_rate']:.3f}, "
                       f"tested against {hid['flag_fpr'][k]['tested_rate']:.3f})"
                       for k, v in hid["false_alerts_per_hour"].items())
        console.print(f"{model}: false alerts per hour of clean traffic: {fa}")


def summary(results: dict[str, Any], attacks: tuple[str, ...]) -> dict[str, Any]:
    """Averages over models: clean FPR per setting; level; combination vs best layer; small-attack cells."""
    from workers.mmd import COMBINATIONS

    out: dict[str, Any] = {}
    for kname in KERNELS:
        fpr_layers, level, gap, small = [], {m: [] for m in COMBINATIONS}, {m: [] for m in COMBINATIONS}, []
        for res in results["models"].values():
            rates = res["rates"][kname]
            fpr_layers += [rates[CLEAN][k] for k in res["layers"]]
            for m in COMBINATIONS:
                level[m].append(rates[CLEAN][m])
                gap[m] += [max(rates[a][k] for k in res["layers"]) - rates[a][m] for a in attacks]
            small += [rates[a][k] for a in SMALL if a in attacks for k in res["layers"]]
        out[kname] = {
            "clean_fpr_mean_over_layers": float(np.mean(fpr_layers)),
            "clean_fpr_mean_combined": {m: float(np.mean(v)) for m, v in level.items()},
            "combined_worst_gap_to_best_layer": {m: float(np.max(v)) for m, v in gap.items()},
            "small_attacks_mean_rate": float(np.mean(small)) if small else None,
        }
    out["h0_level_default_tester"] = {
        k: float(np.mean([res["h0_level"][k] for res in results["models"].values()]))
        for k in COMBINATIONS
    }
    out["h0_level_default_tester_layers_mean"] = float(np.mean(
        [res["h0_level"][k] for res in results["models"].values() for k in res["layers"]]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures to this path")
    parser.add_argument("--quick", action="store_true", help="R=30, m=50, P=200, the cnn only, fewer draws")
    parser.add_argument("--models", default="cnn,resnet,mlp")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--repeats", type=int, default=100, help="R")
    parser.add_argument("--repeats-h0", type=int, default=1000, help="R of the clean window (the level)")
    parser.add_argument("--m", type=int, default=100)
    parser.add_argument("--permutations", type=int, default=500, help="P")
    parser.add_argument("--h0-splits", type=int, default=1000, help="random clean re-splits for the level")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state-dir", type=Path, default=Path(os.environ.get("LW_STATE_DIR", "./.layerwatch")))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-hidden", action="store_true", help="part 1 only")
    parser.add_argument("--skip-windows", action="store_true", help="part 2 only")
    parser.add_argument("--hop", type=int, default=100,
                        help="events per window step (a window holds two hops: 100 = the 200-event reservoir)")
    parser.add_argument("--margin", action="store_true", help="add the output-margin component to the per-event score")
    parser.add_argument("--window-alpha", type=float, default=0.001, help="count test level per window")
    args = parser.parse_args(argv)
    args.flag_rates = (0.01, 0.02, 0.05)
    args.rate_confidence = 0.5
    args.shares = (0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)
    args.episodes = 2000
    args.clean_hours = 200.0
    args.client_flag_rate = 0.02
    args.client_sizes = (10, 20, 40)
    args.client_draws = 10
    args.rank_draws = 10
    if args.quick:
        args.repeats, args.repeats_h0, args.m, args.permutations, args.h0_splits = 30, 200, 50, 200, 200
        args.models = "cnn" if args.models == parser.get_default("models") else args.models
        args.client_draws, args.rank_draws, args.episodes = 4, 4, 500

    import torch
    from rich.console import Console

    from workers.inference.models import layer_names
    from workers.progress import progress_bar

    torch.set_num_threads(args.threads)
    console = Console(width=int(os.environ.get("COLUMNS", "160")))
    models = [m for m in args.models.split(",") if m]
    attacks = tuple(a for a in args.attacks.split(",") if a)
    started = time.perf_counter()
    results: dict[str, Any] = {"models": {}, "params": {k: (list(v) if isinstance(v, tuple) else v)
                                                        for k, v in vars(args).items() if k not in ("json",)}}
    results["params"]["state_dir"] = str(args.state_dir)
    results["params"]["kernels"] = {k: {"standardize": v["standardize"],
                                        "bandwidth_multipliers": list(v["bandwidth_multipliers"])}
                                    for k, v in KERNELS.items()}
    with progress_bar(True) as bar:
        for model in models:
            task = bar.add_task(f"{model}: evaluation set", total=1)
            t0 = time.perf_counter()
            data = build_set(args.state_dir, model, attacks, args.seed)
            bar.update(task, completed=1)
            names = layer_names(model)
            t_set = time.perf_counter() - t0
            rates, level, t_mmd = {}, {}, 0.0
            if not args.skip_windows:
                steps = len(KERNELS) * (2 + len(attacks))
                task = bar.add_task(f"{model}: window tests", total=steps)
                t0 = time.perf_counter()
                rates = window_tests(data, names, attacks, args, bar, task)
                task = bar.add_task(f"{model}: level on re-split clean data", total=args.h0_splits)
                level = h0_level(data, names, args, bar, task)
                t_mmd = time.perf_counter() - t0
            entry: dict[str, Any] = {
                "layers": names,
                "dims": {k: int(data["reference"][k].shape[1]) for k in names},
                "n_reference": len(data["reference"]["classes"]),
                "n_clean": len(data["clean"]["classes"]),
                "n_class_mix": int(np.isin(data["clean"]["classes"], MIX_CLASSES).sum()),
                "attacks": {a: {"success_rate": float(data[a]["success_rate"]),
                                "mean_linf": float(data[a]["mean_linf"]), "mean_l2": float(data[a]["mean_l2"])}
                            for a in attacks},
                "rates": rates,
                "h0_level": level,
                "seconds": {"evaluation_set": round(t_set, 2), "window_tests": round(t_mmd, 2)},
            }
            if not args.skip_hidden:
                task = bar.add_task(f"{model}: hidden attacks", total=len(args.flag_rates) + 2 * len(attacks))
                t0 = time.perf_counter()
                entry["hidden"] = hidden_attacks(data, names, attacks, args, bar, task)
                entry["seconds"]["hidden"] = round(time.perf_counter() - t0, 2)
            results["models"][model] = entry
    results["summary"] = summary(results, attacks) if not args.skip_windows else {}
    if not args.skip_hidden:
        results["count_test_requirements"] = requirements(args)
    results["seconds"] = round(time.perf_counter() - started, 2)
    print_tables(console, results, attacks)
    if "count_test_requirements" in results:
        from rich.table import Table

        req = results["count_test_requirements"]
        table = Table(title=f"count test: minimum detectable share by the per-event detector's operating point "
                            f"(window α {args.window_alpha:g}, 2 windows in a row, ≥ 90% within 3 windows)")
        table.add_column("clean FPR \\ TPR")
        tprs = list(next(iter(req.values())))
        for t in tprs:
            table.add_column(t, justify="right")
        for fpr, row in req.items():
            table.add_row(fpr, *(f"{v:.1%}" if v is not None else "> 50%" for v in row.values()))
        console.print(table)
    console.print_json(json.dumps(results["summary"]))
    console.print(f"total {results['seconds']:.1f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
