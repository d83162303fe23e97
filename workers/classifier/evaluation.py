"""Evaluation of the per-event detector on the demo's held-out split, beside the output-only baseline.

:func:`evaluate_detector` fits one detector per demo model (:func:`fit_detector`) on
the *train* part of the attack data set and scores the held-out part; the split is
the baseline classifier's (:func:`~workers.classifier.dataset.split_masks`, by source
image: no image is both trained on and tested). Layers used per model: what the
demo server taps (:data:`workers.inference.models.DETECTOR_LAYERS` + penultimate).
Scores of the three models are pooled (each is calibrated so 0.5 is its own
threshold). It reports:

- ``clean_vs_adversarial``: mAP (mean of the clean and adversarial classes' average
  precision, as the baseline), ROC AUC, recall and F1 (per-class means at
  ``score >= 0.5``) and the clean false-positive rate at that threshold;
- ``per_attack_auroc``: each attack's rows against every clean held-out row;
- ``leave_one_attack_out_auroc``: detectors fitted without attack A, tested on A;
- ``family`` (accuracy on adversarial rows, confusion) and ``attack_type`` (accuracy);
- ``failed_attacks`` / ``successful_attacks``: detection of attacks that did / did not
  flip the label, separately;
- ``unsupervised``: the reference-only score (:func:`fit_reference_detector` on the
  clean train rows), the same clean-vs-adversarial figures and per-attack AUROC.

:func:`evaluate` runs the baseline classifier's evaluation (today's fields) and adds
the ``detector`` and ``baseline_output_only`` blocks.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from workers.classifier.activations import ModelActivations, build_activations
from workers.classifier.dataset import (
    CLEAN,
    DEFAULT_TEST_FRACTION,
    AttackDataset,
    split_masks,
)
from workers.classifier.detector import (
    DEFAULT_KIND,
    DEFAULT_TARGET_FPR,
    Detector,
    attack_family,
    fit_reference_detector,
)
from workers.classifier.fitting import _events, fit_demo_detectors, model_layers
from workers.progress import progress_bar

STRONG_ATTACKS = ("pgd", "pgd_large", "pgd_l2", "cw")


def _f(value: float) -> float | None:
    value = float(value)
    return None if np.isnan(value) else round(value, 6)


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, bool)
    return float(roc_auc_score(y, s)) if y.any() and not y.all() else float("nan")


def _ap(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    y = np.asarray(y, bool)
    return float(average_precision_score(y, s)) if y.any() else float("nan")


def clean_vs_adversarial(adversarial: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """{"map", "auroc", "recall", "f1", "fpr_at_threshold"} of scores against the truth (pure)."""
    from sklearn.metrics import precision_recall_fscore_support

    adv = np.asarray(adversarial, bool)
    flagged = score >= threshold
    _, rec, f1, _ = precision_recall_fscore_support(adv, flagged, labels=[False, True], zero_division=0)
    return {"map": _f((_ap(adv, score) + _ap(~adv, -score)) / 2), "auroc": _f(_auc(adv, score)),
            "recall": _f(rec.mean()), "f1": _f(f1.mean()),
            "fpr_at_threshold": _f(flagged[~adv].mean()) if (~adv).any() else None,
            "tpr_at_threshold": _f(flagged[adv].mean()) if adv.any() else None}


def per_attack_auroc(attack: np.ndarray, score: np.ndarray) -> dict[str, float | None]:
    clean = attack == CLEAN
    return {a: _f(_auc(np.r_[np.zeros(clean.sum(), bool), np.ones((attack == a).sum(), bool)],
                       np.r_[score[clean], score[attack == a]]))
            for a in sorted(set(attack.tolist()) - {CLEAN})}


def _score_all(dets: dict[str, Detector], dataset: AttackDataset, acts: dict[str, ModelActivations],
               rows_mask: np.ndarray, kind: str | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(dataset row ids, scores, {family, attack_type predictions}) of the rows in ``rows_mask``, all models."""
    ids, scores, fam, typ = [], [], [], []
    for model, det in dets.items():
        a = acts[model]
        idx = np.flatnonzero(rows_mask[a.rows])
        ev = _events(a, dataset, idx, det.layers)
        x = det.features(_as_events(ev))
        scores.append(det.score_features(x, kind))
        if det.supervised and kind != "unsupervised":
            from workers.classifier.detector import _head_argmax

            fam.append(_head_argmax(det.heads["family"], det.classes["family"], x)[0])
            typ.append(_head_argmax(det.heads["attack_type"], det.classes["attack_type"], x)[0])
        ids.append(a.rows[idx])
    preds = {"family": np.concatenate(fam), "attack_type": np.concatenate(typ)} if fam else {}
    return np.concatenate(ids), np.concatenate(scores), preds


def _as_events(d: dict[str, Any]):
    from workers.classifier.detector import Events

    return Events.make(d["outputs"], d["embeddings"], d["layers"])


def evaluate_detector(state_dir: str | os.PathLike, *, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION,
                      kind: str = DEFAULT_KIND, target_fpr: float = DEFAULT_TARGET_FPR,
                      leave_one_out: bool = True, progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ``detector`` block, per-row held-out scores for the tables) — see the module docstring."""
    started = time.perf_counter()
    dataset, acts = build_activations(state_dir, seed, progress=progress)
    train, test = split_masks(dataset, test_fraction, seed)
    attacks = sorted(set(dataset.attack.tolist()) - {CLEAN})
    with progress_bar(progress) as bar:
        task = bar.add_task("detector: fit on the train split", total=1 + (len(attacks) if leave_one_out else 0))
        dets = fit_demo_detectors(dataset, acts, train, kind=kind, target_fpr=target_fpr, seed=seed)
        bar.update(task, advance=1)
        ids, score, preds = _score_all(dets, dataset, acts, test)
        t = dataset.subset(ids)
        loao: dict[str, float | None] = {}
        if leave_one_out:
            for attack in attacks:
                bar.update(task, description=f"detector: leave out {attack}")
                held = fit_demo_detectors(dataset, acts, train, exclude_attack=attack, kind=kind,
                                          target_fpr=target_fpr, seed=seed, label_heads=False)
                mask = test & np.isin(dataset.attack, [CLEAN, attack])
                l_ids, l_score, _ = _score_all(held, dataset, acts, mask)
                loao[attack] = _f(_auc(dataset.adversarial[l_ids], l_score))
                bar.update(task, advance=1)

    adv = t.adversarial
    families = attack_family(t.attack[adv])
    fam_labels = sorted(set(families.tolist()) | set(preds["family"][adv].tolist()))
    fam_index = {f: i for i, f in enumerate(fam_labels)}
    confusion = np.zeros((len(fam_labels), len(fam_labels)), dtype=np.int64)
    np.add.at(confusion, (np.array([fam_index[f] for f in families], dtype=np.int64),
                          np.array([fam_index[f] for f in preds["family"][adv]], dtype=np.int64)), 1)
    failed = adv & t.clean_correct & ~t.success
    succeeded = adv & t.success

    def detection(rows: np.ndarray) -> dict[str, Any]:
        both = rows | ~adv
        return {"n": int(rows.sum()), "detection_rate": _f((score[rows] >= 0.5).mean()) if rows.any() else None,
                "auroc_vs_clean": _f(_auc(rows[both], score[both])),
                "per_attack_detection_rate": {a: _f((score[rows & (t.attack == a)] >= 0.5).mean())
                                              for a in sorted(set(t.attack[rows].tolist()))}}

    # the reference-only score: fitted on the clean train rows of each model, no adversarial example
    unsup = {}
    for model, a in acts.items():
        idx = np.flatnonzero(train[a.rows] & ~dataset.adversarial[a.rows])
        unsup[model] = fit_reference_detector(_events(a, dataset, idx, model_layers(model, a.layers)),
                                              target_fpr=target_fpr, seed=seed, model_id=model)
    u_ids, u_score, _ = _score_all(unsup, dataset, acts, test, kind="unsupervised")
    ut = dataset.subset(u_ids)
    u_strong = np.isin(ut.attack, [CLEAN, *STRONG_ATTACKS])
    # the supervised detectors' own unsupervised part, for comparison
    block = {
        "kind": kind,
        "target_clean_fpr": target_fpr,
        "layers": {m: list(d.layers) for m, d in dets.items()},
        "features": {m: d.feature_names for m, d in list(dets.items())[:1]},
        "versions": {m: d.version for m, d in dets.items()},
        "n_test": len(t),
        "clean_vs_adversarial": clean_vs_adversarial(adv, score),
        "per_attack_auroc": per_attack_auroc(t.attack, score),
        "per_attack_detection_rate": {a: _f((score[t.attack == a] >= 0.5).mean())
                                      for a in sorted(set(t.attack.tolist()) - {CLEAN})},
        "leave_one_attack_out_auroc": loao,
        "family": {"accuracy": _f((preds["family"][adv] == families).mean()), "labels": fam_labels,
                   "confusion": confusion.tolist()},
        "attack_type": {"accuracy": _f((preds["attack_type"][adv] == t.attack[adv]).mean())},
        "per_model": {m: clean_vs_adversarial(adv[t.target_model == m], score[t.target_model == m])
                      for m in dets},
        "successful_attacks": detection(succeeded),
        "failed_attacks": {"definition": "adversarial rows whose clean input the model got right and whose label "
                                         "did not flip", **detection(failed)},
        "unsupervised": {
            "clean_vs_adversarial": clean_vs_adversarial(ut.adversarial, u_score),
            "strong_attacks_auroc": _f(_auc(ut.adversarial[u_strong], u_score[u_strong])),
            "strong_attacks": list(STRONG_ATTACKS),
            "per_attack_auroc": per_attack_auroc(ut.attack, u_score),
        },
        "notes": [
            "family and attack_type accuracy: the heads' answers on adversarial held-out rows",
            ("split by source image (the baseline's split); each model's detector is calibrated so that "
             f"score 0.5 flags {target_fpr:.0%} of its clean out-of-fold rows"),
            "unsupervised: fitted on each model's clean train rows only (30% of them held out for the threshold)",
        ],
        "seconds": round(time.perf_counter() - started, 1),
    }
    return block, {"ids": ids, "score": score}


def baseline_block(report: dict[str, Any], dataset: AttackDataset | None = None) -> dict[str, Any]:
    """The output-only forest's clean-vs-adversarial figures in the detector block's field names."""
    cva = report["clean_vs_adversarial"]
    out = {"map": cva["map"], "auroc": cva["roc_auc"], "recall": cva["recall"], "f1": cva["f1"],
           "fpr_at_threshold": cva["false_positive_rate"]}
    per_attack = {a: row.get("roc_auc_vs_clean") for a, row in report.get("per_attack", {}).items() if a != CLEAN}
    return {"clean_vs_adversarial": out, "per_attack_auroc": per_attack,
            "target_clean_fpr": report.get("operating_point", {}).get("target_clean_fpr")}


def evaluate(state_dir: str | os.PathLike, json_path: str | os.PathLike | None = None,
             png_path: str | os.PathLike | None = None, *, print_tables: bool = True,
             leave_one_out: bool = True, kind: str = DEFAULT_KIND) -> dict[str, Any]:
    """Today's classifier evaluation plus the ``detector`` and ``baseline_output_only`` blocks."""
    from workers.classifier.model import default_path
    from workers.classifier.training import evaluate as evaluate_baseline

    report = evaluate_baseline(state_dir, None, png_path, print_tables=print_tables)
    split = json.loads(default_path(state_dir).with_suffix(".json").read_text()).get("split") or {}
    block, _ = evaluate_detector(state_dir, seed=split.get("seed", 0),
                                 test_fraction=split.get("test_fraction", DEFAULT_TEST_FRACTION),
                                 leave_one_out=leave_one_out, kind=kind, progress=print_tables)
    report["detector"] = block
    report["baseline_output_only"] = baseline_block(report)
    if print_tables:
        print_detector(report)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2, sort_keys=True))
    return report


def print_detector(report: dict[str, Any]) -> None:
    """The detector against the baseline as rich tables."""
    from rich.console import Console
    from rich.table import Table

    def f(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}"

    det, base = report["detector"], report["baseline_output_only"]
    t = Table(title=f"per-event detector vs output-only baseline — held-out, n={det['n_test']}")
    for col in ("method", "mAP", "AUROC", "recall", "F1", "clean FPR"):
        t.add_column(col, justify="right" if col != "method" else "left")
    for name, row in (("detector (supervised)", det["clean_vs_adversarial"]),
                      ("unsupervised (reference only)", det["unsupervised"]["clean_vs_adversarial"]),
                      ("baseline (output-only forest)", base["clean_vs_adversarial"])):
        t.add_row(name, f(row["map"]), f(row["auroc"]), f(row["recall"]), f(row["f1"]), f(row["fpr_at_threshold"]))
    Console().print(t)
    t = Table(title="AUROC per attack (vs every clean held-out row)")
    for col in ("attack", "detector", "leave-one-out", "unsupervised", "baseline", "detected@0.5"):
        t.add_column(col, justify="right" if col != "attack" else "left")
    for a, v in det["per_attack_auroc"].items():
        t.add_row(a, f(v), f(det["leave_one_attack_out_auroc"].get(a)), f(det["unsupervised"]["per_attack_auroc"].get(a)),
                  f(base["per_attack_auroc"].get(a)), f(det["per_attack_detection_rate"].get(a)))
    Console().print(t)
    Console().print(f"family accuracy {f(det['family']['accuracy'])}, attack-type accuracy "
                    f"{f(det['attack_type']['accuracy'])}; failed attacks detected "
                    f"{f(det['failed_attacks']['detection_rate'])} (n={det['failed_attacks']['n']}), "
                    f"successful {f(det['successful_attacks']['detection_rate'])}")
