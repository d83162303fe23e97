"""Every model layerwatch has seen: versions, layers, reference, traffic, last tested window, open alerts.

Shared by `layerwatch models` (through the worker's API or the store) and `GET /api/models`:
five aggregate queries (streams/store/statements.py, ``MODELS_*``) and one pure function
that joins their rows into one record per model. A model version with live events and no
reference is reported as ``awaiting reference`` instead of being left out; a reference
bootstrapped from live traffic (``LW_REFERENCE_BOOTSTRAP``) says so, with its time range.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable, Sequence

from schemas.batch import COMBINED, is_layer
from streams.store import statements as Q

QUERIES = {"events": Q.MODELS_EVENTS, "references": Q.MODELS_REFERENCES, "sources": Q.MODELS_REFERENCE_SOURCES,
           "windows": Q.MODELS_WINDOWS, "alerts": Q.MODELS_OPEN_ALERTS}
RECENT_MS = 60_000


def query_params(now_ms: int) -> dict[str, Any]:
    return {"since_ms": now_ms - RECENT_MS}


def overview(rows: dict[str, Sequence[Sequence[Any]]], now_ms: int) -> list[dict[str, Any]]:
    """One record per model from the rows of ``QUERIES`` (pure; see the module docstring)."""
    versions: dict[tuple[str, str], dict[str, Any]] = {}

    def version(model: str, ver: str) -> dict[str, Any]:
        return versions.setdefault((model, ver), {
            "version": ver, "events": 0, "events_per_min": 0, "first_event_ms": None, "last_event_ms": None,
            "layers": {}, "reference": None, "last_window": None, "windows": 0})

    for model, ver, events, recent, first, last in rows["events"]:
        v = version(model, ver)
        v.update(events=int(events), events_per_min=int(recent) * 60_000 // RECENT_MS,
                 first_event_ms=int(first), last_event_ms=int(last))
    for model, ver, layer, n, dim, first, last in rows["references"]:
        v = version(model, ver)
        v["layers"][layer] = {"dim": int(dim), "reference_rows": int(n)}
        ref = v["reference"] or {"rows": 0, "source": "published", "from_ms": int(first), "to_ms": int(last)}
        ref.update(rows=max(ref["rows"], int(n)), from_ms=min(ref["from_ms"], int(first)),
                   to_ms=max(ref["to_ms"], int(last)))
        v["reference"] = ref
    for model, ver, source, n, first, last in rows.get("sources", ()):
        v = version(model, ver)
        v["reference"] = {**(v["reference"] or {"rows": int(n)}), "source": source, "from_ms": int(first),
                          "to_ms": int(last)}
    for model, ver, layer, windows, last_ms, rate, window_id in rows["windows"]:
        v = version(model, ver)
        if is_layer(layer):
            v["layers"].setdefault(layer, {"dim": None, "reference_rows": 0})
        v["windows"] = max(v["windows"], int(windows))
        if v["last_window"] is None or int(last_ms) > v["last_window"]["end_ms"] or (
                int(last_ms) == v["last_window"]["end_ms"] and layer == COMBINED):
            v["last_window"] = {"end_ms": int(last_ms), "layer": layer, "detection_rate": float(rate),
                                "window_id": window_id}
    alerts = {model: int(n) for model, n in rows["alerts"]}
    models: dict[str, dict[str, Any]] = {}
    for (model, _), v in sorted(versions.items()):
        v["status"] = "monitored" if v["reference"] else "awaiting reference"
        v["layers"] = [{"name": name, **info} for name, info in v["layers"].items()]
        entry = models.setdefault(model, {"model_id": model, "versions": [], "open_alerts": alerts.get(model, 0)})
        entry["versions"].append(v)
    for model, n in alerts.items():
        models.setdefault(model, {"model_id": model, "versions": [], "open_alerts": n})
    return [models[m] for m in sorted(models)]


async def models_async(query: Callable[[str, dict], Awaitable[tuple[list[str], list[list]]]]) -> list[dict]:
    """The overview through an async query function (the worker's store writer)."""
    now = int(time.time() * 1000)
    rows = {name: (await query(sql, query_params(now)))[1] for name, sql in QUERIES.items()}
    return overview(rows, now)


def models_sync(query: Callable[[str, dict], tuple[list[str], list[list]]]) -> list[dict]:
    """The overview through a blocking query function (`layerwatch models`)."""
    now = int(time.time() * 1000)
    return overview({name: query(sql, query_params(now))[1] for name, sql in QUERIES.items()}, now)
