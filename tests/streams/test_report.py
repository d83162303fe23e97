"""`layerwatch report` (streams/report.py): PNG figures from a chDB store.

The store is filled by hand (reference_embeddings, drift_windows, predictions) and
closed before the report opens it again: chDB holds one path per process at a time.
The demo resnet comes from the shared session state dir (trained once per session).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streams.report import COMBINED, run_report_cli, write_report
from streams.report_confusion import find_confusions
from streams.store import open_store

pytestmark = pytest.mark.integration  # chDB

PNG = b"\x89PNG\r\n\x1a\n"
T0_MS = 1_767_225_600_000  # 2026-01-01 00:00 UTC


def _state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.inference.models import load_demo_models

    path = tmp_path_factory.getbasetemp() / "layerwatch-state"
    load_demo_models(path, ["resnet"], progress=False)
    return path


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _state_dir(tmp_path_factory)


def _fill(url: str, state_dir: Path) -> None:
    from workers.inference.data import demo_split
    from workers.inference.models import load_demo_models
    from workers.inference.tap import LayerTap

    model = load_demo_models(state_dir, ["resnet"], progress=False)["resnet"]
    x_val = demo_split(0).x_val[:40]
    with LayerTap(model.module, ["layer2"]) as tap:
        acts = tap.tap(x_val).layers
    store = open_store(url)
    try:
        store.migrate()
        n = len(x_val)
        for layer in ("penultimate", "layer2"):
            store.insert("reference_embeddings", {
                "model_id": ["resnet"] * n, "model_version": [model.version] * n, "layer": [layer] * n,
                "event_id": [f"ref-{i}" for i in range(n)], "ts": np.full(n, T0_MS // 1000),
                "ts_ms": np.full(n, T0_MS, np.uint64), "predicted": np.zeros(n, np.int32), "vector": acts[layer],
            })
        # a model the report cannot recompute: skipped with a message
        store.insert("reference_embeddings", {
            "model_id": ["other"] * 3, "model_version": ["1"] * 3, "layer": ["penultimate"] * 3,
            "event_id": ["o1", "o2", "o3"], "ts": np.full(3, T0_MS // 1000), "ts_ms": np.full(3, T0_MS, np.uint64),
            "predicted": np.zeros(3, np.int32), "vector": np.ones((3, 4), np.float32),
        })
        # 12 windows, 5 s apart; windows 4..7 under attack
        k = 12
        end = T0_MS + 10_000 + 5_000 * np.arange(k)
        attacked = (np.arange(k) >= 4) & (np.arange(k) < 8)
        for layer, level in (("layer2", 0.7), ("penultimate", 0.95), (COMBINED, 1.0)):
            rate = np.where(attacked, level, 0.04)
            store.insert("drift_windows", {
                "window_id": [f"w{i}" for i in range(k)], "model_id": ["resnet"] * k,
                "model_version": [model.version] * k, "layer": [layer] * k,
                "window_start_ms": (end - 10_000).astype(np.uint64), "window_end_ms": end.astype(np.uint64),
                "ts": end // 1000, "n_reference": np.full(k, 359, np.uint32), "n_window": np.full(k, 100, np.uint32),
                "mmd2": rate / 10, "p_value": 1.0 - rate, "detection_rate": rate, "alpha": np.full(k, 0.05),
                "bandwidth": np.ones(k), "n_permutations": np.full(k, 200, np.uint32), "compute_ms": np.ones(k),
                "device": ["cpu"] * k,
            })
        ts = T0_MS + 500 * np.arange(140)
        labels = np.where((ts >= T0_MS + 20_000) & (ts < T0_MS + 40_000), "pgd", "clean")
        m = len(ts)
        store.insert("predictions", {
            "event_id": [f"e{i}" for i in range(m)], "model_id": ["resnet"] * m, "model_version": ["1"] * m,
            "client_id": ["c"] * m, "ts": ts // 1000, "ts_ms": ts.astype(np.uint64),
            "predicted": np.zeros(m, np.int32), "confidence": np.ones(m, np.float32), "attack": labels.tolist(),
            "batch_offset": np.zeros(m, np.uint64), "ingested_ms": ts.astype(np.uint64),
        })
        # the live inputs the t-SNE maps recompute window activations from
        store.insert("predictions_inputs", {
            "event_id": [f"e{i}" for i in range(m)], "model_id": ["resnet"] * m, "ts": ts // 1000,
            "ts_ms": ts.astype(np.uint64), "input": demo_split(0).x_test[:m].reshape(m, -1).astype(np.float32),
        })
    finally:
        store.close()


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 2000, (path, len(data))


def test_report_writes_png_figures(chdb_url: str, state_dir: Path, tmp_path: Path) -> None:
    _fill(chdb_url, state_dir)
    evaluation = tmp_path / "evaluation.json"
    labels = ["clean", "fgsm", "pgd", "deepfool"]
    evaluation.write_text(json.dumps({"attack_type": {"labels": labels, "confusion_matrix": (
        np.eye(4, dtype=int) * 50 + 3).tolist()}, "accuracy": 0.9}))
    messages: list[str] = []
    out = tmp_path / "report"
    store = open_store(chdb_url)
    try:
        paths = write_report(store, out, state_dir, max_points=40, classifier="json", confusion_json=evaluation,
                             echo=messages.append)
    finally:
        store.close()
    names = sorted(p.name for p in paths)
    assert names == ["attack_confusion.png", "detection_rate_resnet.png", "tsne_resnet_layer2.png",
                     "tsne_resnet_penultimate.png"], (names, messages)
    for p in paths:
        assert p.parent == out
        _assert_png(p)
    assert any("'other'" in m and "not a demo model" in m for m in messages), messages
    assert not any("failed" in m for m in messages), messages


def test_report_on_an_empty_store_skips_every_figure(chdb_url: str, state_dir: Path, tmp_path: Path) -> None:
    store = open_store(chdb_url)
    store.migrate()
    store.close()
    messages: list[str] = []
    store = open_store(chdb_url)
    try:
        paths = write_report(store, tmp_path / "out", state_dir, minutes=5, classifier="json",
                             confusion_json=tmp_path / "missing.json", echo=messages.append)
    finally:
        store.close()
    assert paths == []
    assert any(m.startswith("t-SNE: skipped") for m in messages), messages
    assert any(m.startswith("detection rate: skipped") for m in messages), messages
    assert any(m.startswith("confusion matrix: skipped") for m in messages), messages


def test_run_report_cli_opens_and_closes_the_store(chdb_url: str, state_dir: Path, tmp_path: Path) -> None:
    _fill(chdb_url, state_dir)
    paths = run_report_cli(chdb_url, tmp_path / "cli", state_dir, model="resnet", minutes=1, max_points=30,
                           classifier="off")
    assert sorted(p.name for p in paths) == ["detection_rate_resnet.png", "tsne_resnet_layer2.png",
                                             "tsne_resnet_penultimate.png"]
    for p in paths:
        _assert_png(p)
    with open_store(chdb_url) as store:  # closed by run_report_cli, so it opens again
        assert store.ping()


def test_confusion_formats() -> None:
    m = [[5, 1], [0, 4]]
    for doc in (
        {"confusion_matrix": m, "labels": ["clean", "pgd"]},
        {"attack": {"confusion": {"labels": ["clean", "pgd"], "matrix": m}}},
        {"eval": {"attack_confusion": {"clean": {"clean": 5, "pgd": 1}, "pgd": {"pgd": 4}}}},
    ):
        (found,) = find_confusions(doc)
        _key, labels, matrix = found
        assert labels == ["clean", "pgd"]
        assert matrix.tolist() == [[5.0, 1.0], [0.0, 4.0]]
    assert find_confusions({"confusion": [1, 2, 3]}) == []


def test_tsne_windows_are_the_calmest_and_the_most_drifted(chdb_url: str, state_dir: Path) -> None:
    from streams.report_store import live_windows, window_inputs
    from workers.inference.models import load_demo_models

    _fill(chdb_url, state_dir)
    version = str(load_demo_models(state_dir, ["resnet"], progress=False)["resnet"].version)
    with open_store(chdb_url) as store:
        picked = live_windows(store, "resnet", version, None)
        # combined rows: 0.04 outside the attack (the newest such window wins ties), 1.0 inside (the newest)
        assert [(label, wid, rate) for label, wid, _s, _e, rate in picked] == [
            ("calmest window", "w11", 0.04), ("most drifted window", "w7", 1.0)]
        _, _, start, end, _ = picked[1]
        x = window_inputs(store, "resnet", start, end, limit=1000)
        assert x.shape == (20, 64)  # one stored input every 500 ms over the window's 10 s
