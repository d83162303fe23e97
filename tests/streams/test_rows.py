"""Row conversions and dead-letter decoding are pure and column-wise."""

from __future__ import annotations

import numpy as np

from schemas import Limits, PredictionBatch, encode, encode_batch
from schemas.batch import LabelBatch
from streams.app import result_rows
from streams.ingest import decode_records
from streams.rows import Delivered, label_rows, prediction_rows, reference_rows


def _batch(model: str, n: int, role: str = "live") -> PredictionBatch:
    rng = np.random.default_rng(n)
    return PredictionBatch.build(model, [f"{model}-{i}" for i in range(n)], outputs=rng.random((n, 3)).astype(np.float32),
                                 layers={"penultimate": rng.normal(size=(n, 4)).astype(np.float16),
                                         "block2": rng.normal(size=(n, 2)).astype(np.float32)},
                                 role=role, truth=np.arange(n) % 3)


def test_prediction_rows_concatenate_batches() -> None:
    items = [Delivered(_batch("a", 3), "t", 0, 10), Delivered(_batch("b", 2), "t", 1, 4)]
    rows = prediction_rows(items)
    assert rows["event_id"] == ["a-0", "a-1", "a-2", "b-0", "b-1"]
    assert rows["model_id"] == ["a", "a", "a", "b", "b"]
    assert rows["batch_offset"].tolist() == [10, 10, 10, 4, 4]
    np.testing.assert_allclose(rows["confidence"][:3], items[0].batch.outputs.max(axis=1))
    assert rows["truth"].tolist() == [0, 1, 2, 0, 1]
    assert np.isnan(rows["uncertainty"]).all()


def test_reference_rows_one_per_event_and_layer() -> None:
    rows = reference_rows([Delivered(_batch("a", 3, role="reference"), "t", 0, 0)])
    assert len(rows["event_id"]) == 6
    assert rows["layer"] == ["penultimate"] * 3 + ["block2"] * 3
    assert rows["vector"][0].dtype == np.float32 and len(rows["vector"][4]) == 2


def test_decode_records_dead_letters_bad_records() -> None:
    good = encode_batch(_batch("a", 2))
    records = [(good, "lw.predictions", 0, 1), (b"garbage", "lw.predictions", 0, 2), (None, "lw.predictions", 1, 7)]
    ok, dead = decode_records(records, Limits())
    assert [d.offset for d in ok] == [1]
    assert [(d["offset"], d["raw"]) for d in dead] == [(2, b"garbage"), (7, b"")]
    assert "header" in dead[0]["reason"] and "empty record" in dead[1]["reason"]
    _, unknown = decode_records([(good, "lw.predictions", 0, 1)], Limits(), known_models=frozenset({"b"}))
    assert "unknown model 'a'" in unknown[0]["reason"]


def test_result_rows_group_by_table() -> None:
    drift = {"window_id": "w", "model_id": "m", "model_version": "1", "layer": "penultimate", "window_start_ms": 0,
             "window_end_ms": 10_000, "n_reference": 100, "n_window": 50, "mmd2": 0.1, "p_value": 0.01,
             "detection_rate": 0.9, "alpha": 0.05, "bandwidth": 1.0, "n_permutations": 100, "compute_ms": 3.0,
             "device": "cpu", "top_samples": [{"event_id": "e1", "score": 2.0}, {"event_id": "e2", "score": 1.0}]}
    tables = result_rows([("DriftResult", drift), ("DeadLetter", {"topic": "t", "partition": 0, "offset": 5,
                                                                   "ts_ms": 2000, "reason": "r", "raw": b"x"})])
    assert tables["drift_windows"]["ts"] == [10]
    assert tables["sample_scores"]["rank"] == [1, 2] and tables["sample_scores"]["event_id"] == ["e1", "e2"]
    assert tables["dead_letters"]["dl_id"] == ["t:0:5"]
    assert encode("DriftResult", drift)[0] == 0


def test_label_rows_carry_family_score_kind_and_features_version() -> None:
    one = np.ones(2, np.float32)
    det = LabelBatch("a", "1", "det-1", ["e1", "e2"], np.array([1, 2]), one, np.array(["pgd", "clean"]), one,
                     np.array(["a", "a"]), one, family=np.array(["linf_gradient", "clean"]), score_kind="supervised",
                     features_version="det-features/1")
    forest = LabelBatch("b", "1", "rf-1", ["e3"], np.array([3]), one[:1], np.array(["cw"]), one[:1],
                        np.array(["b"]), one[:1])
    rows = label_rows([det, forest])
    assert rows["family"].tolist() == ["linf_gradient", "clean", ""]
    assert rows["score_kind"] == ["supervised", "supervised", "classifier"]
    assert rows["features_version"] == ["det-features/1", "det-features/1", ""]
