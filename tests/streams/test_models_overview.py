"""The models overview joins the four aggregate queries into one record per model (pure)."""

from __future__ import annotations

from schemas.batch import COMBINED
from streams.models import overview


def test_overview_joins_events_references_windows_and_alerts() -> None:
    now = 1_000_000
    rows = {
        "events": [["cnn", "1", 500, 120, 10, 900_000], ["new", "3", 40, 40, 950_000, 990_000]],
        "references": [["cnn", "1", "penultimate", 1000, 64, 5, 7], ["cnn", "1", "layer2", 1000, 32, 5, 8],
                       ["offline", "2", "penultimate", 300, 16, 1, 2]],
        "windows": [["cnn", "1", "penultimate", 12, 990_000, 0.2, "w-p"], ["cnn", "1", COMBINED, 12, 990_000, 0.4, "w-c"],
                    ["cnn", "1", "layer2", 12, 980_000, 0.1, "w-l"]],
        "alerts": [["cnn", 1], ["gone", 2]],
        "sources": [["offline", "2", "bootstrap", 300, 100, 200]],
    }
    models = {m["model_id"]: m for m in overview(rows, now)}
    assert list(models) == ["cnn", "gone", "new", "offline"]
    (cnn,) = models["cnn"]["versions"]
    assert cnn["status"] == "monitored" and cnn["events"] == 500 and cnn["events_per_min"] == 120
    assert cnn["reference"] == {"rows": 1000, "source": "published", "from_ms": 5, "to_ms": 8}
    assert {(layer["name"], layer["dim"]) for layer in cnn["layers"]} == {("penultimate", 64), ("layer2", 32)}
    assert cnn["last_window"]["window_id"] == "w-c" and cnn["windows"] == 12 and models["cnn"]["open_alerts"] == 1
    (new,) = models["new"]["versions"]
    assert new["status"] == "awaiting reference" and new["reference"] is None and new["layers"] == []
    (offline,) = models["offline"]["versions"]
    assert offline["status"] == "monitored" and offline["events"] == 0 and offline["last_window"] is None
    assert offline["reference"] == {"rows": 300, "source": "bootstrap", "from_ms": 100, "to_ms": 200}
    assert models["gone"] == {"model_id": "gone", "versions": [], "open_alerts": 2}
