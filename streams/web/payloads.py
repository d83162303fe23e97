"""The dashboard's data: request parameters, the payload builders and the pure shaping of their rows.

Each payload takes a ``query(sql, params) -> (column names, rows)`` coroutine, so tests run them
on a store without a web server; streams/web/dashboard.py serves them.
"""

from __future__ import annotations

import math
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

import numpy as np

from schemas.batch import CLIENT_PREFIX, COMBINED, PENULTIMATE, is_layer
from streams.store.statements import (
    MODEL_LAYERS_SQL,
    MODEL_EVENTS_SQL,
    MODEL_REFERENCE_SQL,
    DATA_SPAN_SQL,
    DRIFT_SQL,
    ALERT_BANDS_SQL,
    LABEL_MIX_SQL,
    ALERTS_SQL,
    WINDOW_SQL,
    WINDOW_EVENTS_SQL,
    WINDOW_LABELS_SQL,
    WINDOW_INPUTS_SQL,
    DASHBOARD_QUERIES,
)

DEFAULT_MINUTES = 15
MAX_MINUTES = 7 * 1440
SPAN_LOOKBACK_DAYS = 30  # how far back the data-span range looks for data
MAX_DRIFT_ROWS = 50_000  # window points over all series in one answer
MAX_SERIES_POINTS = 600  # points drawn per chart; longer series are downsampled (peaks kept)
MAX_MODEL_ROWS = 1_000
MAX_ALERTS = 500
DEFAULT_ALERTS = 100
MAX_BAND_ROWS = 5_000
MAX_LABEL_ROWS = 20_000
LABEL_BUCKETS = 120  # target number of label-mix buckets over the range
DEFAULT_EVENTS = 20
MAX_EVENTS = 100
MAX_ID_CHARS = 512

QueryFn = Callable[[str, Mapping[str, Any]], Awaitable[tuple[Sequence[str], Sequence[Sequence[Any]]]]]


QUERIES = DASHBOARD_QUERIES

# ------------------------------------------------------------------------ pure helpers


class BadParameter(ValueError):
    """A request parameter that cannot be used (answered with 400)."""


def bounded_int(value: Any, default: int, low: int, high: int, name: str) -> int:
    """An integer request parameter clamped to [low, high]; empty means the default."""
    if value is None or value == "":
        return default
    try:
        number = int(float(value))
    except (TypeError, ValueError, OverflowError):
        raise BadParameter(f"{name} must be a number") from None
    return max(low, min(high, number))


def text_param(value: Any, name: str) -> str:
    """A string request parameter (model id, layer, window id), empty when absent."""
    text = "" if value is None else str(value)
    if len(text) > MAX_ID_CHARS:
        raise BadParameter(f"{name} is longer than {MAX_ID_CHARS} characters")
    return text


def parse_minutes(value: Any) -> int:
    """The ``minutes`` parameter: default 15, between 1 and ``MAX_MINUTES``."""
    return bounded_int(value, DEFAULT_MINUTES, 1, MAX_MINUTES, "minutes")


def span_range(rows: Iterable[Mapping[str, Any]], now: int) -> tuple[int, int] | None:
    """(minutes, end ms) of a range covering the data (DATA_SPAN_SQL rows), with a margin; None without data.

    The end is the last data time plus the margin (never past ``now``'s minute), the length at
    least a minute and at most ``MAX_MINUTES`` (then the last ``MAX_MINUTES`` of the data).

    Example:
        >>> span_range([{"n": 3, "first_ms": 0, "last_ms": 600_000}, {"n": 0, "first_ms": 0, "last_ms": 0}], 10**9)
        (11, 630000)
    """
    spans = [(int(r["first_ms"]), int(r["last_ms"])) for r in rows if int(r["n"] or 0) > 0]
    if not spans:
        return None
    first, last = min(f for f, _ in spans), max(last for _, last in spans)
    margin = max(30_000, (last - first) // 50)
    end = min(last + margin, max(now, last))
    minutes = math.ceil((end - (first - margin)) / 60_000)
    return max(1, min(MAX_MINUTES, minutes)), end


def downsample_indices(values: Sequence[float | None], max_points: int = MAX_SERIES_POINTS) -> np.ndarray:
    """Indices of at most about ``max_points`` points of a series that keep its peaks (and its last point).

    The series is cut into equal runs of consecutive points; of each run the point with the
    highest value is kept, so a short burst over the alert threshold still shows.

    Example:
        >>> downsample_indices([0.1, 0.9, 0.2, 0.1, 0.3, 0.2, 0.0], 3).tolist()
        [1, 4, 6]
    """
    n = len(values)
    if n <= max_points:
        return np.arange(n)
    stride = -(-n // max_points)
    padded = np.full(-(-n // stride) * stride, -np.inf)
    padded[:n] = np.nan_to_num(np.array(values, dtype=np.float64), nan=-1.0)  # None → nan → -1
    runs = padded.reshape(-1, stride)
    picked = runs.argmax(axis=1) + np.arange(runs.shape[0]) * stride
    return np.unique(np.append(picked, n - 1))


def bucket_ms_for(minutes: int, buckets: int = LABEL_BUCKETS) -> int:
    """A round bucket width giving at most about ``buckets`` buckets over the range (>= 5 s)."""
    raw_s = minutes * 60 / max(1, buckets)
    for step in (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600):
        if step >= raw_s:
            return step * 1000
    return 3600 * 1000 * math.ceil(raw_s / 3600)


def time_bounds(since_ms: int) -> dict[str, int]:
    """The range's start as epoch ms and as epoch seconds (for the ``ts`` DateTime columns)."""
    return {"since_ms": int(since_ms), "since_s": int(since_ms) // 1000}


def layer_order(layer: str) -> tuple[int, str]:
    """Sort key: the combined test first, the penultimate layer next, then by name."""
    return (0 if layer == COMBINED else 1 if layer == PENULTIMATE else 2, layer)


def records(names: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """Rows as dicts keyed by column name."""
    return [dict(zip(names, row)) for row in rows]


def finite(value: Any) -> float | None:
    """A float for JSON: NaN and infinities become None (JSON has no NaN)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def alert_bands(rows: Iterable[Mapping[str, Any]], now: int) -> dict[str, list[dict[str, Any]]]:
    """Pair the open and resolved rows of alerts into bands per model.

    Each band is {alert_id, start_ms, end_ms, open, severity}: from the open row's ts_ms
    to the resolved row's ts_ms, or to ``now`` while the alert is still open. An alert
    whose open row is missing has no known start and gets no band. Bands of a model are
    sorted by start.
    """
    by_id: dict[str, dict[str, Any]] = {}
    for r in rows:
        a = by_id.setdefault(str(r["alert_id"]), {"model_id": str(r["model_id"]), "open": None, "resolved": None,
                                                  "severity": ""})
        ts = int(r["ts_ms"])
        if r["state"] == "open":
            if a["open"] is None or ts < a["open"]:
                a["open"] = ts
                a["severity"] = str(r.get("severity") or "")
        elif r["state"] == "resolved":
            if a["resolved"] is None or ts > a["resolved"]:
                a["resolved"] = ts
    out: dict[str, list[dict[str, Any]]] = {}
    for alert_id, a in by_id.items():
        if a["open"] is None:
            continue
        still_open = a["resolved"] is None
        end = max(a["open"], now) if still_open else max(a["open"], a["resolved"])
        out.setdefault(a["model_id"], []).append(
            {"alert_id": alert_id, "start_ms": a["open"], "end_ms": end, "open": still_open, "severity": a["severity"]})
    for bands in out.values():
        bands.sort(key=lambda b: (b["start_ms"], b["alert_id"]))
    return out


def drift_series(rows: Iterable[Mapping[str, Any]], max_points: int = MAX_SERIES_POINTS) -> list[dict[str, Any]]:
    """Window rows → one series per (model, layer), columns in time order.

    Series are ordered by model, then combined / penultimate / other layers. A model with
    one tapped layer gets that layer's series only (its combined test is the same test) with
    ``only_layer`` set. A series of more than ``max_points`` windows is downsampled
    (:func:`downsample_indices`); ``windows`` counts them all.
    """
    grouped: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        if not str(r["layer"]).startswith(CLIENT_PREFIX):  # one client's rows are no series of the model
            grouped.setdefault((str(r["model_id"]), str(r["layer"])), []).append(r)
    tapped: dict[str, set[str]] = {}
    for model_id, layer in grouped:
        if is_layer(layer):
            tapped.setdefault(model_id, set()).add(layer)
    series = []
    for (model_id, layer) in sorted(grouped, key=lambda k: (k[0], layer_order(k[1]))):
        only_layer = len(tapped.get(model_id, ())) == 1
        if only_layer and layer == COMBINED:
            continue
        points = sorted(grouped[(model_id, layer)], key=lambda r: (int(r["window_end_ms"]), str(r["window_id"])))
        total = len(points)
        if total > max_points:
            keep = downsample_indices([finite(p["detection_rate"]) for p in points], max_points)
            points = [points[i] for i in keep]
        series.append({
            "model_id": model_id,
            "layer": layer,
            "only_layer": only_layer,
            "windows": total,
            "downsampled": total > len(points),
            "window_id": [str(p["window_id"]) for p in points],
            "model_version": [str(p["model_version"]) for p in points],
            "window_start_ms": [int(p["window_start_ms"]) for p in points],
            "window_end_ms": [int(p["window_end_ms"]) for p in points],
            "detection_rate": [finite(p["detection_rate"]) for p in points],
            "p_value": [finite(p["p_value"]) for p in points],
            "mmd2": [finite(p["mmd2"]) for p in points],
            "n_window": [int(p["n_window"]) for p in points],
        })
    return series


#: the order score kinds are listed in: the per-event detector's two kinds, then the output-only forest
SCORE_KINDS = ("supervised", "unsupervised", "classifier")


def label_mix(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """(bucket_start_ms, score_kind, attack_type, events) rows → aligned columns for a stacked chart, split by score kind.

    ``buckets`` are the bucket starts in time order; ``series`` holds one list of counts
    per (score kind, attack type) (0 where it has no events): supervised first, then
    unsupervised, then the forest's ('classifier', also rows without a kind), each with
    'clean' first, then by total events. ``kinds`` totals each score kind: its events
    and how many were flagged (attack type other than 'clean').
    """
    counts: dict[tuple[str, str], dict[int, int]] = {}
    buckets: set[int] = set()
    for r in rows:
        b = int(r["bucket_start_ms"])
        buckets.add(b)
        key = (str(r.get("score_kind") or "classifier"), str(r["attack_type"]) or "unknown")
        counts.setdefault(key, {})[b] = counts.get(key, {}).get(b, 0) + int(r["events"])
    ordered = sorted(buckets)

    def rank(kind: str) -> tuple[int, str]:
        return (SCORE_KINDS.index(kind) if kind in SCORE_KINDS else len(SCORE_KINDS), kind)

    keys = sorted(counts, key=lambda k: (rank(k[0]), k[1] != "clean", -sum(counts[k].values()), k[1]))
    kinds: dict[str, dict[str, Any]] = {}
    for kind, attack_type in keys:
        total = kinds.setdefault(kind, {"score_kind": kind, "events": 0, "flagged": 0})
        n = sum(counts[(kind, attack_type)].values())
        total["events"] += n
        total["flagged"] += n if attack_type != "clean" else 0
    return {
        "buckets": ordered,
        "series": [{"score_kind": kind, "attack_type": attack_type,
                    "events": [counts[(kind, attack_type)].get(b, 0) for b in ordered]} for kind, attack_type in keys],
        "kinds": list(kinds.values()),
    }


def image_values(values: Any, digits: int = 3) -> list[float] | None:
    """A flattened input as rounded floats for the page (None when absent or empty)."""
    if values is None:
        return None
    if hasattr(values, "tolist"):
        values = values.tolist()
    out = [round(v, digits) if (v := finite(x)) is not None else 0.0 for x in values]
    return out or None


def window_events(events: Iterable[Mapping[str, Any]], labels: Iterable[Mapping[str, Any]],
                  inputs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Merge the window's top events with their attack labels and inputs (kept in score order)."""
    by_label = {str(r["event_id"]): r for r in labels}
    by_input = {str(r["event_id"]): r.get("input") for r in inputs}
    out = []
    for e in events:
        eid = str(e["event_id"])
        label = by_label.get(eid)
        out.append({
            "event_id": eid,
            "model_id": str(e.get("model_id") or ""),
            "score": finite(e.get("score")),
            "rank": int(e.get("rank") or 0),
            "layer": str(e.get("layer") or ""),
            "client_id": str(e.get("client_id") or ""),
            "predicted": int(e.get("predicted") or 0),
            "confidence": finite(e.get("confidence")),
            "ts_ms": int(e.get("ts_ms") or 0),
            "attack": str(e.get("attack") or ""),
            "label": None if label is None else {
                "attack_type": str(label["attack_type"]), "attack_prob": finite(label["attack_prob"]),
                "p_adversarial": finite(label["p_adversarial"]), "target_model": str(label["target_model"]),
                "score_kind": str(label.get("score_kind") or ""), "family": str(label.get("family") or "")},
            "input": image_values(by_input.get(eid)),
        })
    return out


def alert_records(names: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """ALERTS_SQL rows as JSON objects (resolved_ms is null while open)."""
    out = []
    for r in records(names, rows):
        resolved = int(r["resolved_ms"] or 0)
        opened = int(r["opened_ms"] or 0)
        out.append({
            "alert_id": str(r["alert_id"]), "model_id": str(r["model_id"]), "kind": str(r["kind"]),
            "status": str(r["status"]), "severity": str(r["severity"]), "opened_ms": opened,
            "resolved_ms": resolved if r["status"] == "resolved" else None,
            "duration_ms": max(0, resolved - opened) if r["status"] == "resolved" else None,
            "window_id": str(r["window_id"]), "n_events": int(r["n_events"] or 0), "client_id": str(r["client_id"]),
            "message": str(r["message"]), "resolution": str(r["resolution"]),
        })
    return out


# ------------------------------------------------------------------------ data functions


async def models_payload(query: QueryFn, *, minutes: int, now: int,
                         event_time: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """Models seen in the range (predictions or tested windows) with their tested layers.

    ``event_time`` holds this worker's counts per model of ``late`` and ``clamped`` events
    (since it started), shown on each model's card.
    """
    since = now - minutes * 60_000
    bounds = time_bounds(since)
    names, rows = await query(MODEL_LAYERS_SQL, {**bounds, "limit": MAX_MODEL_ROWS})
    enames, erows = await query(MODEL_EVENTS_SQL, {**bounds, "limit": MAX_MODEL_ROWS})
    models: dict[str, dict[str, Any]] = {}
    for r in records(enames, erows):
        models[str(r["model_id"])] = {"model_id": str(r["model_id"]), "events": int(r["events"]),
                                      "last_event_ms": int(r["last_ms"]), "layers": []}
    for r in records(names, rows):
        m = models.setdefault(str(r["model_id"]), {"model_id": str(r["model_id"]), "events": 0, "last_event_ms": None,
                                                   "layers": []})
        m["layers"].append({"layer": str(r["layer"]), "windows": int(r["windows"]), "last_window_ms": int(r["last_ms"]),
                            "last_detection_rate": finite(r["last_detection_rate"])})
    rnames, rrows = await query(MODEL_REFERENCE_SQL, {"limit": MAX_MODEL_ROWS})
    references = {str(r["model_id"]): int(r["reference_events"]) for r in records(rnames, rrows)}
    for model_id, n in references.items():  # a reference alone is a model waiting for live traffic
        models.setdefault(model_id, {"model_id": model_id, "events": 0, "last_event_ms": None, "layers": []})
    for m in models.values():
        m["layers"].sort(key=lambda x: layer_order(x["layer"]))
        m["reference_events"] = references.get(m["model_id"], 0)
        m["state"] = model_state(m)
        for kind in ("late", "clamped"):
            m[f"{kind}_events"] = int((event_time or {}).get(kind, {}).get(m["model_id"], 0))
    return {"now_ms": now, "minutes": minutes, "models": [models[k] for k in sorted(models)]}


def model_state(model: Mapping[str, Any]) -> str:
    """What a model's drift charts wait for: ``ok`` (windows tested), ``awaiting_reference``
    (no clean reference stored), ``awaiting_traffic`` (a reference, no live events) or
    ``awaiting_windows`` (both, but no window tested yet)."""
    if model["layers"]:
        return "ok"
    if not model.get("reference_events"):
        return "awaiting_reference"
    return "awaiting_windows" if model.get("events") else "awaiting_traffic"


async def data_span(query: QueryFn, *, now: int) -> tuple[int, int] | None:
    """(minutes, end ms) of the range covering the stored data of the last ``SPAN_LOOKBACK_DAYS``; None without data."""
    since = now - SPAN_LOOKBACK_DAYS * 86_400_000
    names, rows = await query(DATA_SPAN_SQL, time_bounds(since))
    return span_range(records(names, rows), now)


async def drift_payload(query: QueryFn, *, minutes: int, now: int, threshold: float, alpha: float,
                        model_id: str = "", layer: str = "") -> dict[str, Any]:
    """Detection rate and p-value per (model, layer), the threshold, and alert bands per model."""
    since = now - minutes * 60_000
    names, rows = await query(DRIFT_SQL, {**time_bounds(since), "model_id": model_id, "layer": layer,
                                          "limit": MAX_DRIFT_ROWS})
    bnames, brows = await query(ALERT_BANDS_SQL, {"since_ms": since, "model_id": model_id, "limit": MAX_BAND_ROWS})
    return {
        "now_ms": now, "since_ms": since, "minutes": minutes, "threshold": threshold, "alpha": alpha,
        "truncated": len(rows) >= MAX_DRIFT_ROWS,
        "series": drift_series(records(names, rows)),
        "bands": alert_bands(records(bnames, brows), now),
    }


async def labels_payload(query: QueryFn, *, minutes: int, now: int, model_id: str = "") -> dict[str, Any]:
    """Events per score kind and attack type per time bucket (the per-event label mix)."""
    since = now - minutes * 60_000
    bucket = bucket_ms_for(minutes)
    names, rows = await query(LABEL_MIX_SQL, {**time_bounds(since - since % bucket), "bucket_ms": bucket,
                                              "model_id": model_id, "limit": MAX_LABEL_ROWS})
    return {"now_ms": now, "since_ms": since, "minutes": minutes, "bucket_ms": bucket, **label_mix(records(names, rows))}


async def alerts_payload(query: QueryFn, *, minutes: int, now: int, model_id: str = "",
                         limit: int = DEFAULT_ALERTS) -> dict[str, Any]:
    """Open alerts and the alerts of the range, open first, newest first."""
    since = now - minutes * 60_000
    names, rows = await query(ALERTS_SQL, {"since_ms": since, "model_id": model_id, "limit": limit})
    alerts = alert_records(names, rows)
    return {"now_ms": now, "minutes": minutes, "open": sum(a["status"] == "open" for a in alerts), "alerts": alerts}


async def window_payload(query: QueryFn, *, window_id: str, layer: str = "", limit: int = DEFAULT_EVENTS
                         ) -> dict[str, Any]:
    """One window's test results per layer and its most suspicious events (labels, inputs)."""
    names, rows = await query(WINDOW_SQL, {"window_id": window_id})
    layers = [{
        "layer": str(r["layer"]), "model_id": str(r["model_id"]), "model_version": str(r["model_version"]),
        "window_start_ms": int(r["window_start_ms"]), "window_end_ms": int(r["window_end_ms"]),
        "detection_rate": finite(r["detection_rate"]), "p_value": finite(r["p_value"]), "mmd2": finite(r["mmd2"]),
        "n_window": int(r["n_window"]), "n_reference": int(r["n_reference"]),
    } for r in records(names, rows)]
    layers.sort(key=lambda x: layer_order(x["layer"]))
    enames, erows = await query(WINDOW_EVENTS_SQL, {"window_id": window_id, "layer": layer, "limit": limit})
    events = records(enames, erows)
    model_id = layers[0]["model_id"] if layers else next((str(e["model_id"]) for e in events if e["model_id"]), "")
    labels: list[dict[str, Any]] = []
    inputs: list[dict[str, Any]] = []
    ids = [str(e["event_id"]) for e in events]
    if ids:
        params = {"model_id": model_id, "ids": ids, "limit": len(ids)}
        labels = records(*await query(WINDOW_LABELS_SQL, params))
        inputs = records(*await query(WINDOW_INPUTS_SQL, params))
    return {"window_id": window_id, "layer": layer, "model_id": model_id, "layers": layers,
            "events": window_events(events, labels, inputs)}
