"""`layerwatch classifier train` / `layerwatch classifier eval` as plain functions (the CLI wires them).

- :func:`train` builds the data set when missing or stale (:mod:`workers.classifier.dataset`),
  fits an :class:`~workers.classifier.model.AttackClassifier` on the data set's *train*
  part (split by source input, see :func:`~workers.classifier.dataset.split_masks`) and
  saves it to ``<state_dir>/classifier/classifier.skops``.
- :func:`evaluate` scores the saved classifier on the held-out part and prints seed
  001's tables: (a) clean vs adversarial — average precision per class and their mean
  (mAP), recall and F1 at the operating point (``p_adversarial >= 0.5``); (b) per target
  model — AP, recall, F1, computed on **adversarial rows only**, as the paper does
  (clean rows carry the serving model as their target but are left out); plus the
  attack-type confusion matrix (PNG), per-attack detection results and the attacks that
  failed to flip the label (which the paper does not separate).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from workers.classifier.dataset import (
    CLEAN,
    DEFAULT_TEST_FRACTION,
    AttackDataset,
    build_dataset,
    classifier_dir,
    load_dataset,
    split_masks,
)
from workers.classifier.model import (
    DEFAULT_KIND,
    AttackClassifier,
    Labels,
    default_path,
)


def train(
    state_dir: str | os.PathLike,
    seed: int = 0,
    model_kind: str = DEFAULT_KIND,
    progress: bool = True,
    *,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    models: Iterable[str] | None = None,
    attacks: Iterable[str] | None = None,
    n_inputs: int | None = None,
    path: str | os.PathLike | None = None,
) -> Path:
    """Build the data set if needed, train ``model_kind`` on its train part, save; returns the .skops path.

    ``models``, ``attacks`` and ``n_inputs`` restrict the data set (see ``build_dataset``);
    the defaults are the full demo setup.
    """
    dataset = build_dataset(state_dir, seed, models, attacks, progress, n_inputs=n_inputs)
    train_mask, test_mask = split_masks(dataset, test_fraction, seed)
    part = dataset.subset(train_mask)
    started = time.perf_counter()
    console = _console() if progress else None
    status = console.status(f"training {model_kind} on {len(part)} rows") if console else _Null()
    with status:
        classifier = AttackClassifier(model_kind, seed=seed).fit(
            part.outputs, part.adversarial, part.attack, part.target_model, groups=part.source_index,
            extra_meta={
                "dataset_fingerprint": dataset.fingerprint(),
                "split": {"test_fraction": test_fraction, "seed": seed, "by": "source_index"},
                "n_test": int(test_mask.sum()),
            },
        )
    out = classifier.save(path or default_path(state_dir))
    if console:
        console.print(f"attack classifier {classifier.version}: {len(part)} training rows, "
                      f"{time.perf_counter() - started:.1f} s → {out}")
    return out


def evaluate(
    state_dir: str | os.PathLike,
    json_path: str | os.PathLike | None = None,
    png_path: str | os.PathLike | None = None,
    *,
    path: str | os.PathLike | None = None,
    print_tables: bool = True,
) -> dict[str, Any]:
    """Score the saved classifier on the held-out split; print the tables, write the PNG (and JSON).

    ``png_path`` defaults to ``<state_dir>/classifier/confusion.png``. Raises ValueError
    when the data set changed since training (its held-out part would not be held out).
    """
    classifier = AttackClassifier.load(path or default_path(state_dir))
    dataset = load_dataset(state_dir)
    meta = classifier.meta
    if meta.get("dataset_fingerprint") != dataset.fingerprint():
        raise ValueError("the attack data set changed since the classifier was trained: run train again "
                         "(otherwise the held-out split may overlap its training rows)")
    split = meta.get("split", {})
    _, test_mask = split_masks(dataset, split.get("test_fraction", DEFAULT_TEST_FRACTION), split.get("seed", 0))
    test = dataset.subset(test_mask)
    proba = classifier.raw_proba(test.outputs)
    labels = classifier.labels_from_proba(proba)
    report = metrics(test, labels, proba["target_model"], classifier.classes["target_model"])
    report.update({
        "classifier_version": classifier.version,
        "kind": classifier.kind,
        "params": meta.get("params"),
        "n_train": meta.get("n_train"),
        "train_seconds": meta.get("train_seconds"),
        "operating_point": {"threshold": 0.5, "raw_threshold": classifier.raw_threshold,
                            "target_clean_fpr": meta.get("target_fpr")},
    })
    png = Path(png_path) if png_path else classifier_dir(state_dir) / "confusion.png"
    confusion_png(report["attack_type"], png, title=f"attack type ({classifier.kind}, held-out, n={len(test)})")
    report["confusion_png"] = str(png)
    if print_tables:
        print_report(report)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2, sort_keys=True))
    return report


# --- metrics (pure) -----------------------------------------------------------------------------


def _f(value: float) -> float | None:
    """A JSON-able metric: NaN (undefined, e.g. no positive rows) becomes None."""
    value = float(value)
    return None if np.isnan(value) else round(value, 6)


def _ap(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    y = np.asarray(y, bool)
    return float(average_precision_score(y, score)) if y.any() and len(y) else float("nan")


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, bool)
    return float(roc_auc_score(y, score)) if y.any() and not y.all() else float("nan")


def _prf(y_true: np.ndarray, y_pred: np.ndarray, labels: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return p, r, f


def _detection(rows: np.ndarray, test: AttackDataset, p_adv: np.ndarray, clean: np.ndarray) -> dict[str, Any]:
    """Detection of a set of adversarial rows against the clean rows of the same models."""
    same_models = clean & np.isin(test.target_model, np.unique(test.target_model[rows]))
    both = rows | same_models
    return {
        "n": int(rows.sum()),
        "detection_rate": _f((p_adv[rows] >= 0.5).mean()) if rows.any() else None,
        "mean_p_adversarial": _f(p_adv[rows].mean()) if rows.any() else None,
        "ap_vs_clean": _f(_ap(rows[both], p_adv[both])),
        "roc_auc_vs_clean": _f(_auc(rows[both], p_adv[both])),
    }


def metrics(test: AttackDataset, labels: Labels, target_proba: np.ndarray,
            target_classes: np.ndarray) -> dict[str, Any]:
    """Every figure of the evaluation from held-out rows and the classifier's outputs on them (pure)."""
    adv = test.adversarial
    clean = ~adv
    p = labels.p_adversarial
    flagged = p >= 0.5

    # (a) clean vs adversarial: AP per class (clean scored by 1 - p), recall and F1 per class at 0.5
    _, rec, f1 = _prf(adv, flagged, [False, True])
    ap = {"clean": _ap(clean, -p), "adversarial": _ap(adv, p)}
    per_class = {name: {"ap": _f(ap[name]), "recall": _f(rec[i]), "f1": _f(f1[i]), "n": int((adv == bool(i)).sum())}
                 for i, name in enumerate(("clean", "adversarial"))}
    clean_vs_adv = {
        "map": _f(np.mean(list(ap.values()))),
        "recall": _f(rec.mean()),
        "f1": _f(f1.mean()),
        "roc_auc": _f(_auc(adv, p)),
        "false_positive_rate": _f(flagged[clean].mean()) if clean.any() else None,
        "per_class": per_class,
    }

    # (b) target model, on adversarial rows only (as the paper)
    classes = [str(c) for c in target_classes]
    truth_t = test.target_model[adv]
    _, rec_t, f1_t = _prf(truth_t, labels.target_model[adv], classes)
    target = {}
    for i, model in enumerate(classes):
        target[model] = {"map": _f(_ap(truth_t == model, target_proba[adv, i])), "recall": _f(rec_t[i]),
                         "f1": _f(f1_t[i]), "n": int((truth_t == model).sum())}
    present = [m for m in classes if target[m]["n"]]
    target_mean = {k: _f(np.mean([target[m][k] for m in present])) if present else None
                   for k in ("map", "recall", "f1")}
    target_mean["accuracy"] = _f((labels.target_model[adv] == truth_t).mean()) if adv.any() else None

    # attack type: confusion over every name seen in truth or prediction
    names = sorted(set(test.attack.tolist()) | set(labels.attack_type.tolist()), key=lambda a: (a != CLEAN, a))
    index = {a: i for i, a in enumerate(names)}
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    code = np.vectorize(index.get, otypes=[np.int64])
    np.add.at(confusion, (code(test.attack), code(labels.attack_type)), 1)
    attack_type = {
        "accuracy": _f((labels.attack_type == test.attack).mean()),
        "accuracy_adversarial_only": _f((labels.attack_type[adv] == test.attack[adv]).mean()) if adv.any() else None,
        "labels": names,
        "confusion": confusion.tolist(),
    }

    per_attack: dict[str, Any] = {}
    for name in sorted(set(test.attack.tolist()), key=lambda a: (a != CLEAN, a)):
        rows = test.attack == name
        if name == CLEAN:
            per_attack[name] = {"n": int(rows.sum()), "false_positive_rate": _f(flagged[rows].mean()),
                                "attack_type_accuracy": _f((labels.attack_type[rows] == name).mean())}
            continue
        per_attack[name] = {
            **_detection(rows, test, p, clean),
            "success_rate": _f(test.success[rows & test.clean_correct].mean())
            if (rows & test.clean_correct).any() else None,
            "attack_type_accuracy": _f((labels.attack_type[rows] == name).mean()),
            "target_model_accuracy": _f((labels.target_model[rows] == test.target_model[rows]).mean()),
        }

    failed = adv & test.clean_correct & ~test.success
    succeeded = adv & test.success

    def by_attack(rows: np.ndarray) -> dict[str, Any]:
        return {a: {"n": int((rows & (test.attack == a)).sum()),
                    "detection_rate": _f(flagged[rows & (test.attack == a)].mean())}
                for a in sorted(set(test.attack[rows].tolist()))}

    return {
        "n_test": int(len(test)),
        "n_test_inputs": int(len(np.unique(test.source_index))),
        "clean_vs_adversarial": clean_vs_adv,
        "target_model": target,
        "target_model_mean": target_mean,
        "attack_type": attack_type,
        "per_attack": per_attack,
        "failed_attacks": {
            "definition": "adversarial rows whose clean input the model got right and whose label did not flip",
            **_detection(failed, test, p, clean), "per_attack": by_attack(failed),
        },
        "successful_attacks": {**_detection(succeeded, test, p, clean), "per_attack": by_attack(succeeded)},
        "misclassified_before_attack": {
            "definition": "adversarial rows whose clean input the model already got wrong (no success defined)",
            **_detection(adv & ~test.clean_correct, test, p, clean),
        },
        "notes": [
            "clean_vs_adversarial.map is the mean of the two classes' average precision (clean scored by "
            "1 - p_adversarial); recall and f1 are per-class means at p_adversarial >= 0.5",
            "target_model metrics use adversarial rows only (clean rows carry the serving model as target)",
            "the held-out split is by source input: no image is both trained on and tested",
        ],
    }


# --- output -------------------------------------------------------------------------------------


def confusion_png(attack_type: dict[str, Any], path: str | os.PathLike, title: str = "attack type") -> Path:
    """Row-normalised confusion matrix with counts, written as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    names = attack_type["labels"]
    counts = np.asarray(attack_type["confusion"], dtype=np.float64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 0.55 * len(names)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(names)):
        for j in range(len(names)):
            if counts[i, j]:
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true row")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def print_report(report: dict[str, Any]) -> None:
    """The evaluation as rich tables (seed 001's Tables III and IV, then the extras)."""
    from rich.table import Table

    console = _console()
    cva = report["clean_vs_adversarial"]
    t = Table(title=f"(a) clean vs adversarial — held-out, n={report['n_test']} "
                    f"({report['kind']}, {report['classifier_version']})")
    for col in ("image type", "AP", "recall", "F1", "n"):
        t.add_column(col, justify="right" if col != "image type" else "left")
    for name, row in cva["per_class"].items():
        t.add_row(name, _fmt(row["ap"]), _fmt(row["recall"]), _fmt(row["f1"]), str(row["n"]))
    t.add_row("mean", _fmt(cva["map"]), _fmt(cva["recall"]), _fmt(cva["f1"]), "", style="bold")
    t.caption = (f"ROC AUC {_fmt(cva['roc_auc'])}, clean false-positive rate "
                 f"{_fmt(cva['false_positive_rate'])} at p ≥ 0.5")
    console.print(t)

    t = Table(title="(b) target model — adversarial rows only")
    for col in ("model", "mAP", "recall", "F1", "n"):
        t.add_column(col, justify="right" if col != "model" else "left")
    for name, row in report["target_model"].items():
        t.add_row(name, _fmt(row["map"]), _fmt(row["recall"]), _fmt(row["f1"]), str(row["n"]))
    mean = report["target_model_mean"]
    t.add_row("mean", _fmt(mean["map"]), _fmt(mean["recall"]), _fmt(mean["f1"]), "", style="bold")
    console.print(t)

    t = Table(title="per attack — detection at p ≥ 0.5, AP / ROC AUC against the clean rows of the same models")
    for col in ("attack", "n", "success", "detected", "AP vs clean", "AUC vs clean", "type acc", "target acc"):
        t.add_column(col, justify="right" if col != "attack" else "left")
    for name, row in report["per_attack"].items():
        if name == CLEAN:
            t.add_row(name, str(row["n"]), "", f"FPR {_fmt(row['false_positive_rate'])}", "", "",
                      _fmt(row["attack_type_accuracy"]), "")
            continue
        t.add_row(name, str(row["n"]), _fmt(row["success_rate"]), _fmt(row["detection_rate"]), _fmt(row["ap_vs_clean"]),
                  _fmt(row["roc_auc_vs_clean"]), _fmt(row["attack_type_accuracy"]), _fmt(row["target_model_accuracy"]))
    for key, label in (("successful_attacks", "all flipped"), ("failed_attacks", "all failed"),
                       ("misclassified_before_attack", "already wrong")):
        row = report[key]
        t.add_row(label, str(row["n"]), "", _fmt(row["detection_rate"]), _fmt(row["ap_vs_clean"]),
                  _fmt(row["roc_auc_vs_clean"]), "", "", style="italic")
    console.print(t)

    at = report["attack_type"]
    t = Table(title=f"attack type confusion (rows true, columns predicted) — accuracy {_fmt(at['accuracy'])}")
    t.add_column("true \\ pred")
    for name in at["labels"]:
        t.add_column(name[:9], justify="right")
    for name, row in zip(at["labels"], at["confusion"]):
        t.add_row(name, *[str(v) if v else "·" for v in row])
    console.print(t)
    console.print(f"confusion matrix PNG: {report['confusion_png']}")


def _console():
    from rich.console import Console

    return Console()


class _Null:
    def __enter__(self) -> "_Null":
        return self

    def __exit__(self, *exc: object) -> None:
        return None
