"""Find the attack classifier's confusion matrix for ``layerwatch report``: from an evaluation run or a saved JSON.

The evaluation result and the JSON files are searched for any entry whose key names a
confusion matrix (a square matrix, a dict holding one and its labels, or ``{true: {pred: n}}``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

Echo = Callable[[str], None]


def as_confusion(value: Any, siblings: Mapping[str, Any] | None) -> tuple[list[str], np.ndarray] | None:
    """(labels, square matrix) from a confusion entry: a matrix, or a dict holding one and its labels."""
    labels = None
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if isinstance(value, Mapping):
        for key in ("matrix", "confusion", "confusion_matrix", "counts", "values"):
            if key in value:
                labels = next((value[k] for k in ("labels", "classes", "names") if k in value), None)
                value = value[key]
                if hasattr(value, "tolist"):
                    value = value.tolist()
                break
        else:
            # {true: {pred: count}}
            if value and all(isinstance(v, Mapping) for v in value.values()):
                rows = list(value)
                cols = list(dict.fromkeys(c for v in value.values() for c in v))
                names = list(dict.fromkeys([*rows, *cols]))
                m = np.array([[float(value.get(r, {}).get(c, 0)) for c in names] for r in names])
                return [str(n) for n in names], m
            return None
    if labels is None and siblings is not None:
        labels = next((siblings[k] for k in ("labels", "classes", "attack_labels", "names") if k in siblings), None)
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        return None
    if labels is None or len(labels) != m.shape[0]:
        labels = [str(i) for i in range(m.shape[0])]
    return [str(x) for x in labels], m


def find_confusions(obj: Any, path: str = "", depth: int = 0) -> list[tuple[str, list[str], np.ndarray]]:
    """Every confusion matrix inside a result / JSON document: (key path, labels, matrix)."""
    if depth > 4:
        return []
    if not isinstance(obj, Mapping):
        if hasattr(obj, "__dict__") and not isinstance(obj, type):
            obj = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
        else:
            return []
    found = []
    for key, value in obj.items():
        here = f"{path}.{key}" if path else str(key)
        if "confusion" in str(key).lower():
            got = as_confusion(value, obj)
            if got is not None:
                found.append((here, *got))
                continue
        if isinstance(value, Mapping) or (hasattr(value, "__dict__") and not isinstance(value, type)
                                          and not callable(value)):
            found += find_confusions(value, here, depth + 1)
    return found


def pick(found: list[tuple[str, list[str], np.ndarray]]) -> tuple[str, list[str], np.ndarray] | None:
    if not found:
        return None
    return sorted(found, key=lambda f: ("attack" not in f[0].lower(), "test" not in f[0].lower(), len(f[0])))[0]


def confusion_from_evaluate(state_dir: str | os.PathLike, echo: Echo) -> tuple[str, list[str], np.ndarray] | None:
    """The confusion matrix of ``layerwatch classifier eval`` on the held-out split (None when there is none)."""
    import tempfile

    from workers.classifier.training import evaluate

    try:
        with tempfile.TemporaryDirectory(prefix="lw-report-") as scratch:  # evaluate draws its own PNG: not ours
            result = evaluate(state_dir, png_path=Path(scratch) / "confusion.png", print_tables=False)
    except FileNotFoundError:
        echo("confusion matrix: no trained attack classifier (run `layerwatch classifier train`); "
             "trying a saved evaluation JSON")
        return None
    except ValueError as exc:
        echo(f"confusion matrix: {exc}; trying a saved evaluation JSON")
        return None
    got = pick(find_confusions(result))
    if got is None:
        echo("confusion matrix: the classifier evaluation has no confusion matrix")
    return got


def confusion_from_json(paths: Iterable[Path]) -> tuple[str, list[str], np.ndarray] | None:
    for path in paths:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        got = pick(find_confusions(doc if isinstance(doc, Mapping) else {}))
        if got is not None:
            return f"{path.name}:{got[0]}", got[1], got[2]
    return None
