"""What ``layerwatch report`` reads from the store: references, tested windows, live inputs, attack spans.

Read-only queries (``readonly=True``) over the tables the worker writes; the figures are
drawn by :mod:`streams.report`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from schemas.batch import COMBINED

_CLEAN_LABELS = ("", "clean")


def reference_models(store: Any, model: str | None) -> list[str]:
    rows = store.query("SELECT DISTINCT model_id FROM reference_embeddings ORDER BY model_id", readonly=True)
    found = [str(r[0]) for r in rows]
    return [m for m in found if model is None or m == model]


def reference_version(store: Any, model: str, preferred: str) -> str | None:
    rows = store.query(
        "SELECT model_version, max(ts_ms) AS last FROM reference_embeddings WHERE model_id = {m} "
        "GROUP BY model_version ORDER BY last DESC", {"m": model}, readonly=True)
    versions = [str(r[0]) for r in rows]
    if not versions:
        return None
    return preferred if preferred in versions else versions[0]


def reference_layer(store: Any, model: str, version: str, layer: str, limit: int) -> np.ndarray:
    """Up to ``limit`` reference vectors of one layer, a deterministic sample (by event id hash)."""
    rows = store.query(
        "SELECT event_id, any(vector) FROM reference_embeddings "
        "WHERE model_id = {m} AND model_version = {v} AND layer = {l} "
        "GROUP BY event_id ORDER BY cityHash64(event_id) LIMIT {n}",
        {"m": model, "v": version, "l": layer, "n": int(limit)}, readonly=True)
    if not rows:
        return np.zeros((0, 0), np.float32)
    return np.asarray([r[1] for r in rows], dtype=np.float32)


def live_windows(store: Any, model: str, version: str, minutes: float | None) -> list[tuple[str, str, int, int, float]]:
    """The calmest and the most drifted tested window of ``model`` (label, window id, start, end, rate).

    Read from ``drift_windows`` (the combined row when there is one); ``minutes`` counts back from
    the newest window, as for the detection-rate figure. One entry when both are the same window.
    """
    rows = store.query(
        "SELECT window_id, any(window_start_ms), any(window_end_ms), "
        "if(countIf(layer = {c}) > 0, maxIf(detection_rate, layer = {c}), max(detection_rate)) "
        "FROM drift_windows FINAL WHERE model_id = {m} AND model_version = {v} GROUP BY window_id",
        {"m": model, "v": version, "c": COMBINED}, readonly=True)
    if not rows:
        return []
    if minutes is not None:
        newest = max(int(r[2]) for r in rows)
        rows = [r for r in rows if int(r[2]) >= newest - int(float(minutes) * 60_000)]
    calm = min(rows, key=lambda r: (float(r[3]), -int(r[2])))
    hot = max(rows, key=lambda r: (float(r[3]), int(r[2])))
    picked = [("calmest window", calm)] + ([("most drifted window", hot)] if hot[0] != calm[0] else [])
    return [(label, str(r[0]), int(r[1]), int(r[2]), float(r[3])) for label, r in picked]


def window_inputs(store: Any, model: str, start_ms: int, end_ms: int, limit: int) -> np.ndarray:
    """Up to ``limit`` live inputs of ``model`` in [start_ms, end_ms) from ``predictions_inputs``."""
    rows = store.query(
        "SELECT event_id, any(input) FROM predictions_inputs WHERE model_id = {m} AND ts_ms >= {s} AND ts_ms < {e} "
        "GROUP BY event_id ORDER BY cityHash64(event_id) LIMIT {n}",
        {"m": model, "s": int(start_ms), "e": int(end_ms), "n": int(limit)}, readonly=True)
    if not rows:
        return np.zeros((0, 0), np.float32)
    return np.asarray([r[1] for r in rows], dtype=np.float32)


def window_rates(store: Any, model: str | None, minutes: float | None) -> dict[str, dict[str, np.ndarray]]:
    """{model: {"layer", "end_ms", "rate"}} of drift_windows, deduplicated, oldest first."""
    where, params = [], {}
    if model is not None:
        where.append("model_id = {m}")
        params["m"] = model
    if minutes is not None:
        newest = store.query("SELECT max(window_end_ms), count() FROM drift_windows"
                             + (" WHERE model_id = {m}" if model is not None else ""), params, readonly=True)
        if newest and newest[0][1]:
            where.append("window_end_ms >= {since}")
            params["since"] = max(0, int(newest[0][0]) - int(float(minutes) * 60_000))
    sql = ("SELECT model_id, layer, window_end_ms, detection_rate FROM drift_windows FINAL"
           + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY model_id, window_end_ms, layer")
    rows = store.query(sql, params, readonly=True)
    out: dict[str, dict[str, list]] = {}
    for model_id, layer, end_ms, rate in rows:
        d = out.setdefault(str(model_id), {"layer": [], "end_ms": [], "rate": []})
        d["layer"].append(str(layer))
        d["end_ms"].append(int(end_ms))
        d["rate"].append(float(rate))
    return {k: {"layer": np.asarray(v["layer"]), "end_ms": np.asarray(v["end_ms"], np.int64),
                "rate": np.asarray(v["rate"], np.float64)} for k, v in out.items()}


def attack_spans(store: Any, model: str, start_ms: int, end_ms: int, bucket_ms: int = 5000
                  ) -> list[tuple[int, int, str]]:
    """(start_ms, end_ms, attack) spans where most predictions of ``model`` carry an attack label."""
    try:
        rows = store.query(
            "SELECT intDiv(ts_ms, {b}) AS bucket, attack, count() FROM predictions FINAL "
            "WHERE model_id = {m} AND ts_ms >= {s} AND ts_ms <= {e} GROUP BY bucket, attack ORDER BY bucket",
            {"b": int(bucket_ms), "m": model, "s": int(max(0, start_ms - bucket_ms)), "e": int(end_ms)},
            readonly=True)
    except Exception:  # noqa: BLE001 - shading is a bonus; the figure is drawn without it
        return []
    per: dict[int, dict[str, int]] = {}
    for bucket, attack, count in rows:
        per.setdefault(int(bucket), {})[str(attack)] = int(count)
    spans: list[tuple[int, int, str]] = []
    for bucket in sorted(per):
        counts = per[bucket]
        total = sum(counts.values())
        attacked = {a: c for a, c in counts.items() if a not in _CLEAN_LABELS}
        if not attacked or sum(attacked.values()) * 2 < total:
            continue
        name = max(attacked, key=attacked.get)
        lo, hi = bucket * bucket_ms, (bucket + 1) * bucket_ms
        if spans and spans[-1][2] == name and spans[-1][1] >= lo:
            spans[-1] = (spans[-1][0], hi, name)
        else:
            spans.append((lo, hi, name))
    return spans


def report_models(store: Any) -> list[str]:
    """Model ids the store has predictions, references or windows of."""
    rows = store.query("SELECT DISTINCT model_id FROM (SELECT model_id FROM predictions UNION ALL "
                       "SELECT model_id FROM reference_embeddings UNION ALL SELECT model_id FROM drift_windows) "
                       "ORDER BY model_id", readonly=True)
    return [str(r[0]) for r in rows]
