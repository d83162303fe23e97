"""Pure helpers of the dashboard: parameters, alert bands, JSON shaping, static assets."""

from __future__ import annotations

import asyncio
import math
import re

import numpy as np
import pytest

from streams.web import dashboard as D
from streams.web import payloads as P
from streams.store.sql import placeholders, render


def test_minutes_default_and_bounds() -> None:
    assert P.parse_minutes(None) == P.parse_minutes("") == P.DEFAULT_MINUTES == 15
    assert P.parse_minutes("60") == 60
    assert P.parse_minutes("7.9") == 7
    assert P.parse_minutes("0") == 1 and P.parse_minutes("-5") == 1
    assert P.parse_minutes("10000000") == P.MAX_MINUTES == 7 * 1440
    with pytest.raises(P.BadParameter, match="minutes"):
        P.parse_minutes("ten")
    with pytest.raises(P.BadParameter, match="limit"):
        P.bounded_int("nan-ish", 20, 1, 100, "limit")
    with pytest.raises(P.BadParameter, match="window_id"):
        P.text_param("x" * (P.MAX_ID_CHARS + 1), "window_id")
    assert P.text_param(None, "layer") == ""


def test_bucket_width_keeps_the_label_chart_readable() -> None:
    assert P.bucket_ms_for(5) == 5_000
    assert P.bucket_ms_for(15) == 10_000
    assert P.bucket_ms_for(60) == 30_000
    assert P.bucket_ms_for(1440) == 900_000
    for minutes in (1, 5, 15, 60, 360, 1440):
        assert minutes * 60_000 / P.bucket_ms_for(minutes) <= P.LABEL_BUCKETS


def row(alert_id: str, state: str, ts: int, model: str = "m", severity: str = "warning") -> dict:
    return {"alert_id": alert_id, "model_id": model, "state": state, "ts_ms": ts, "severity": severity, "window_id": ""}


def test_alert_bands_pair_open_and_resolved_rows() -> None:
    rows = [
        row("b", "resolved", 900, severity="info"),  # order of rows does not matter
        row("a", "open", 100, severity="critical"),
        row("a", "resolved", 300, severity="info"),
        row("b", "open", 500),
        row("c", "open", 700, model="other"),  # still open: runs until now
        row("d", "resolved", 800),  # no open row: no known start, no band
        row("a", "open", 100, severity="critical"),  # a replayed row
    ]
    bands = P.alert_bands(rows, now=1_000)
    assert bands == {
        "m": [
            {"alert_id": "a", "start_ms": 100, "end_ms": 300, "open": False, "severity": "critical"},
            {"alert_id": "b", "start_ms": 500, "end_ms": 900, "open": False, "severity": "warning"},
        ],
        "other": [{"alert_id": "c", "start_ms": 700, "end_ms": 1_000, "open": True, "severity": "warning"}],
    }
    assert P.alert_bands([], now=5) == {}
    # a clock that lags the alert does not produce a negative band
    assert P.alert_bands([row("x", "open", 2_000)], now=1_000)["m"][0]["end_ms"] == 2_000


def drift_row(model: str, layer: str, end: int, rate: float = 0.1, p: float = 0.5, wid: str | None = None) -> dict:
    return {"model_id": model, "layer": layer, "window_id": wid or f"{model}:{end}", "model_version": "1",
            "window_start_ms": end - 10, "window_end_ms": end, "detection_rate": rate, "p_value": p,
            "mmd2": 0.01, "n_window": 50, "n_reference": 100}


def test_drift_series_groups_orders_and_drops_nan() -> None:
    rows = [
        drift_row("m2", "penultimate", 20),
        drift_row("m1", "conv1", 30),
        drift_row("m1", "__combined__", 20),
        drift_row("m1", "__combined__", 10, p=math.nan),
        drift_row("m1", "penultimate", 10, rate=math.inf),
        drift_row("m1", "avgpool", 10),
    ]
    series = P.drift_series(rows)
    assert [(s["model_id"], s["layer"]) for s in series] == [
        ("m1", "__combined__"), ("m1", "penultimate"), ("m1", "avgpool"), ("m1", "conv1"), ("m2", "penultimate")]
    combined = series[0]
    assert combined["window_end_ms"] == [10, 20] and combined["window_id"] == ["m1:10", "m1:20"]
    assert combined["p_value"] == [None, 0.5]
    assert series[1]["detection_rate"] == [None]
    assert set(combined) >= {"window_start_ms", "mmd2", "n_window", "model_version"}


def test_label_mix_aligns_types_on_buckets_split_by_score_kind() -> None:
    rows = [
        {"bucket_start_ms": 10_000, "score_kind": "supervised", "attack_type": "fgsm", "events": 3},
        {"bucket_start_ms": 0, "score_kind": "supervised", "attack_type": "clean", "events": 5},
        {"bucket_start_ms": 10_000, "score_kind": "supervised", "attack_type": "clean", "events": 1},
        {"bucket_start_ms": 20_000, "score_kind": "supervised", "attack_type": "pgd", "events": 9},
        {"bucket_start_ms": 20_000, "score_kind": "supervised", "attack_type": "", "events": 2},
        {"bucket_start_ms": 10_000, "score_kind": "unsupervised", "attack_type": "unknown", "events": 4},
        {"bucket_start_ms": 0, "score_kind": "unsupervised", "attack_type": "clean", "events": 7},
        {"bucket_start_ms": 0, "attack_type": "pgd", "events": 1},  # a row of the output-only forest (no kind)
    ]
    mix = P.label_mix(rows)
    assert mix["buckets"] == [0, 10_000, 20_000]
    assert mix["series"] == [
        {"score_kind": "supervised", "attack_type": "clean", "events": [5, 1, 0]},
        {"score_kind": "supervised", "attack_type": "pgd", "events": [0, 0, 9]},
        {"score_kind": "supervised", "attack_type": "fgsm", "events": [0, 3, 0]},
        {"score_kind": "supervised", "attack_type": "unknown", "events": [0, 0, 2]},
        {"score_kind": "unsupervised", "attack_type": "clean", "events": [7, 0, 0]},
        {"score_kind": "unsupervised", "attack_type": "unknown", "events": [0, 4, 0]},
        {"score_kind": "classifier", "attack_type": "pgd", "events": [1, 0, 0]},
    ]
    assert mix["kinds"] == [{"score_kind": "supervised", "events": 20, "flagged": 14},
                            {"score_kind": "unsupervised", "events": 11, "flagged": 4},
                            {"score_kind": "classifier", "events": 1, "flagged": 1}]
    assert P.label_mix([]) == {"buckets": [], "series": [], "kinds": []}

def test_window_events_merge_labels_and_images_in_score_order() -> None:
    events = [
        {"event_id": "e2", "model_id": "m", "score": 0.9, "rank": 1, "layer": "__combined__", "client_id": "c",
         "predicted": 3, "confidence": 0.8, "ts_ms": 5, "attack": "fgsm"},
        {"event_id": "e1", "model_id": "m", "score": 0.5, "rank": 2, "layer": "penultimate", "client_id": "",
         "predicted": 0, "confidence": 0.0, "ts_ms": 0, "attack": ""},  # no matching prediction row
    ]
    labels = [{"event_id": "e2", "attack_type": "fgsm", "attack_prob": 0.7, "p_adversarial": 0.95, "target_model": "m",
               "score_kind": "supervised", "family": "linf_gradient"}]
    inputs = [{"event_id": "e2", "input": np.linspace(0, 1, 64, dtype=np.float32)}, {"event_id": "e1", "input": []}]
    out = P.window_events(events, labels, inputs)
    assert [e["event_id"] for e in out] == ["e2", "e1"]
    assert out[0]["label"] == {"attack_type": "fgsm", "attack_prob": 0.7, "p_adversarial": 0.95, "target_model": "m",
                               "score_kind": "supervised", "family": "linf_gradient"}
    assert len(out[0]["input"]) == 64 and out[0]["input"][0] == 0.0 and out[0]["input"][-1] == 1.0
    assert out[0]["input"][1] == round(1 / 63, 3)
    assert out[1]["label"] is None and out[1]["input"] is None
    assert P.image_values([0.5, math.nan]) == [0.5, 0.0]


def test_alert_records_shape_open_and_resolved() -> None:
    names = ["alert_id", "model_id", "kind", "status", "severity", "opened_ms", "resolved_ms", "window_id", "n_events",
             "client_id", "message", "resolution"]
    rows = [
        ["a", "m", "distribution_shift", "open", "critical", 100, 0, "w", 3, "", "shift", ""],
        ["b", "m", "probing", "resolved", "warning", 100, 400, "", 0, "c7", "probe", "cleared"],
    ]
    a, b = P.alert_records(names, rows)
    assert a["resolved_ms"] is None and a["duration_ms"] is None and a["n_events"] == 3
    assert b["resolved_ms"] == 400 and b["duration_ms"] == 300 and b["client_id"] == "c7"


def test_queries_are_bounded_and_portable() -> None:
    for name, sql in P.QUERIES.items():
        code = sql.upper()
        assert re.search(r"\bLIMIT\b", code), name
        for banned in ("OVER (", "DATETIME64", "TOSTARTOFINTERVAL", "INTERVAL "):
            assert banned not in code, (name, banned)
        if " JOIN " in code:
            assert "ANY LEFT JOIN" in code and "USING" in code, name
    # every placeholder a data function fills is one the SQL uses, and rendering works
    rendered = render(P.WINDOW_LABELS_SQL, {"model_id": "m", "ids": ["a", "b'"], "limit": 2})
    assert "IN ('a', 'b\\'')" in rendered
    assert placeholders(P.DRIFT_SQL) == {"since_ms", "since_s", "model_id", "layer", "limit"}
    assert P.time_bounds(1_700_000_000_999) == {"since_ms": 1_700_000_000_999, "since_s": 1_700_000_000}


def test_payloads_pass_bounded_parameters() -> None:
    calls: list[tuple[str, dict]] = []

    async def query(sql: str, params: dict) -> tuple[list[str], list[list]]:
        calls.append((sql, dict(params)))
        assert placeholders(sql) <= set(params)
        return [], []

    now = 1_700_000_000_000
    drift = asyncio.run(P.drift_payload(query, minutes=15, now=now, threshold=0.5, alpha=0.05))
    assert drift["series"] == [] and drift["bands"] == {} and drift["since_ms"] == now - 900_000
    assert calls[0][1]["limit"] == P.MAX_DRIFT_ROWS and calls[1][1]["limit"] == P.MAX_BAND_ROWS
    labels = asyncio.run(P.labels_payload(query, minutes=60, now=now))
    assert labels["bucket_ms"] == 30_000 and calls[-1][1]["since_ms"] % 30_000 == 0
    window = asyncio.run(P.window_payload(query, window_id="w"))
    assert window == {"window_id": "w", "layer": "", "model_id": "", "layers": [], "events": []}
    assert len(calls) == 5  # no label / input look-ups without events


def test_static_assets_exist_and_page_uses_relative_urls() -> None:
    html = (D.STATIC_DIR / D.PAGE).read_text()
    for name in (*D.STATIC_FILES, D.PLOTLY_JS):
        assert f'src="static/{name}"' in html or f'href="static/{name}"' in html, name
    for name in D.STATIC_FILES:
        assert (D.STATIC_DIR / name).is_file(), name
    assert D.plotly_js_path().is_file()
    js = (D.STATIC_DIR / "dashboard.js").read_text()
    assert "Authorization" in js and "#token=" in js and "sessionStorage" in js
    assert "https://" not in html + js  # nothing from a CDN: works offline
    for path in ("models", "drift", "labels", "alerts", "window"):
        assert f'api("{path}"' in js, path


def test_single_layer_model_gets_one_series() -> None:
    rows = [drift_row("solo", "__combined__", t) for t in (10, 20)] + [drift_row("solo", "penultimate", t) for t in (10, 20)]
    series = P.drift_series(rows)
    assert [(s["model_id"], s["layer"], s["only_layer"]) for s in series] == [("solo", "penultimate", True)]
    assert series[0]["windows"] == 2 and not series[0]["downsampled"]


def test_long_series_are_downsampled_keeping_peaks_and_the_last_window() -> None:
    rng = np.random.default_rng(0)
    rates = rng.uniform(0, 0.2, 5000)
    rates[1234] = 0.97  # one burst over the threshold
    rows = [drift_row("m", "penultimate", t, rate=float(r)) for t, r in enumerate(rates)]
    s = P.drift_series(rows, max_points=500)[0]
    assert s["windows"] == 5000 and s["downsampled"]
    assert len(s["window_end_ms"]) <= 501 and s["window_end_ms"] == sorted(s["window_end_ms"])
    assert 0.97 in s["detection_rate"] and s["window_end_ms"][-1] == 4999
    idx = P.downsample_indices([None, 0.5, 0.1, 0.2], 2)
    assert idx.tolist() == [1, 3]


def test_span_range_covers_the_data_whatever_its_age() -> None:
    now = 1_700_000_000_000
    old = [{"source": "drift", "n": 10, "first_ms": now - 86_400_000, "last_ms": now - 86_400_000 + 600_000},
           {"source": "predictions", "n": 0, "first_ms": 0, "last_ms": 0}]  # an empty table's min/max are 0
    minutes, end = P.span_range(old, now)
    assert end == now - 86_400_000 + 630_000 and minutes == 11  # ten minutes of data, a margin each side
    assert P.span_range([{"n": 0, "first_ms": 0, "last_ms": 0}], now) is None
    long = [{"n": 5, "first_ms": now - 60 * 86_400_000, "last_ms": now}]
    assert P.span_range(long, now) == (P.MAX_MINUTES, now)  # capped: the last week of it, ending now


def test_model_state_says_what_the_charts_wait_for() -> None:
    assert P.model_state({"layers": [{"layer": "penultimate"}], "reference_events": 0}) == "ok"
    assert P.model_state({"layers": [], "events": 40, "reference_events": 0}) == "awaiting_reference"
    assert P.model_state({"layers": [], "events": 0, "reference_events": 500}) == "awaiting_traffic"
    assert P.model_state({"layers": [], "events": 40, "reference_events": 500}) == "awaiting_windows"


def test_model_cards_carry_this_workers_late_and_clamped_counts() -> None:
    from streams.metrics import Metrics

    metrics = Metrics()
    metrics.late.labels("m").inc(3)
    metrics.clamped.labels("m").inc(2)

    async def query(sql: str, params: dict) -> tuple[list[str], list[list]]:
        if "uniqExact(event_id) AS events" in sql:
            return ["model_id", "events", "last_ms"], [["m", 10, 5], ["quiet", 4, 5]]
        return [], []

    event_time = {"late": metrics.by_model(metrics.late), "clamped": metrics.by_model(metrics.clamped)}
    payload = asyncio.run(P.models_payload(query, minutes=15, now=1_700_000_000_000, event_time=event_time))
    cards = {m["model_id"]: (m["late_events"], m["clamped_events"]) for m in payload["models"]}
    assert cards == {"m": (3, 2), "quiet": (0, 0)}
