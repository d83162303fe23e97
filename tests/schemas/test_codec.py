"""Codec round trips and rejections (property-based)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import (
    CodecError,
    LabelBatch,
    Limits,
    PredictionBatch,
    decode,
    decode_batch,
    encode,
    encode_batch,
    encode_labels,
    labels_from_record,
)
from schemas.codec import SCHEMA_IDS, matrix


@st.composite
def batches(draw: st.DrawFn) -> PredictionBatch:
    n = draw(st.integers(1, 40))
    classes = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    layers = {
        f"layer{i}": rng.normal(size=(n, draw(st.integers(1, 24)))).astype(draw(st.sampled_from([np.float16, np.float32])))
        for i in range(draw(st.integers(1, 3)))
    }
    ids = draw(st.lists(st.text(min_size=1, max_size=20), min_size=n, max_size=n))
    optional = draw(st.booleans())
    return PredictionBatch.build(
        draw(st.text(min_size=1, max_size=10)),
        ids,
        outputs=rng.random((n, classes)).astype(np.float32),
        layers=layers,
        role=draw(st.sampled_from(["live", "reference"])),
        client_ids=draw(st.lists(st.text(max_size=8), min_size=n, max_size=n)),
        ts_ms=rng.integers(0, 2**40, n),
        uncertainty=rng.random(n).astype(np.float32) if optional else None,
        truth=rng.integers(0, classes, n) if optional else None,
        attack=["pgd"] * n if optional else None,
        inputs=rng.random((n, 4)).astype(np.float32) if optional else None,
    )


@given(batches())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_batch_round_trip(batch: PredictionBatch) -> None:
    back = decode_batch(encode_batch(batch))
    assert back.model_id == batch.model_id and back.role == batch.role
    assert back.event_ids == batch.event_ids and back.client_ids == batch.client_ids
    np.testing.assert_array_equal(back.ts_ms, batch.ts_ms)
    np.testing.assert_array_equal(back.predicted, batch.predicted)
    np.testing.assert_array_equal(back.outputs, batch.outputs)
    assert list(back.layers) == list(batch.layers)
    for name, values in batch.layers.items():
        assert back.layers[name].dtype == values.dtype
        np.testing.assert_array_equal(back.layers[name], values)
    for name in ("uncertainty", "truth", "inputs"):
        sent, got = getattr(batch, name), getattr(back, name)
        assert (sent is None) == (got is None)
        if sent is not None:
            np.testing.assert_array_equal(got, sent)
    assert back.attack == batch.attack


def _batch(n: int = 4, dim: int = 3) -> PredictionBatch:
    rng = np.random.default_rng(0)
    return PredictionBatch.build("m", [f"e{i}" for i in range(n)], outputs=rng.random((n, 5)).astype(np.float32),
                                 layers={"penultimate": rng.normal(size=(n, dim)).astype(np.float32)})


def test_wire_header_is_confluent() -> None:
    data = encode_batch(_batch())
    assert data[0] == 0
    assert struct.unpack(">I", data[1:5])[0] == SCHEMA_IDS["PredictionBatch"]


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r["layers"][0].update(data=r["layers"][0]["data"][:-4]), "layers[penultimate]"),
        (lambda r: r["layers"][0].update(dim=0), "layers[penultimate]"),
        (lambda r: r["layers"][0].update(dtype="i32"), "layers[penultimate]"),
        (lambda r: r.update(client_ids=r["client_ids"][:-1]), "client_ids"),
        (lambda r: r.update(outputs=matrix(np.full((4, 5), np.nan, np.float32))), "outputs"),
        (lambda r: r.update(outputs=matrix(np.ones((3, 5), np.float32))), "outputs"),
        (lambda r: r.update(predicted=matrix(np.full(4, 9, np.int32))), "predicted"),
        (lambda r: r.update(ts_ms=matrix(np.full(4, -1, np.int64))), "ts_ms"),
        (lambda r: r.update(event_ids=["", "a", "b", "c"]), "event_ids"),
        (lambda r: r.update(layers=[]), "layers"),
        (lambda r: r.update(model_id=""), "model_id"),
    ],
)
def test_invalid_batches_name_the_field(mutate, field) -> None:
    batch = _batch()
    _, record = decode(encode_batch(batch))
    mutate(record)
    data = encode("PredictionBatch", record)
    with pytest.raises(CodecError) as info:
        decode_batch(data)
    assert info.value.field == field
    assert info.value.reason


def test_layer_with_inf_is_rejected() -> None:
    batch = _batch()
    batch.layers["penultimate"] = batch.layers["penultimate"].copy()
    batch.layers["penultimate"][1, 1] = np.inf
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode_batch(batch)


def test_unknown_schema_id_and_bad_magic() -> None:
    data = bytearray(encode_batch(_batch()))
    data[1:5] = struct.pack(">I", 999)
    with pytest.raises(CodecError, match="unknown schema id 999"):
        decode(bytes(data))
    with pytest.raises(CodecError, match="magic byte"):
        decode(b"\x07" + bytes(data[1:]))


def test_size_limits() -> None:
    data = encode_batch(_batch(n=50, dim=8))
    with pytest.raises(CodecError, match="exceeds the limit"):
        decode_batch(data, Limits(max_record_bytes=100))
    with pytest.raises(CodecError, match="exceed the limit of 10"):
        decode_batch(data, Limits(max_rows=10))
    with pytest.raises(CodecError, match="outside 1..4"):
        decode_batch(data, Limits(max_dim=4))


def test_expected_type_is_enforced() -> None:
    alert = encode("Alert", {"alert_id": "a", "ts_ms": 1, "model_id": "m", "kind": "probing",
                             "severity": "warning", "message": "x"})
    with pytest.raises(CodecError, match="Alert where PredictionBatch was expected"):
        decode_batch(alert)
    name, record = decode(alert)
    assert name == "Alert" and record["state"] == "open" and record["event_ids"] == []


@given(st.binary(max_size=300))
@settings(max_examples=2000, deadline=None)
def test_arbitrary_bytes_raise_only_codec_error(data: bytes) -> None:
    try:
        decode_batch(data)
    except CodecError:
        pass


@given(st.integers(0, 10_000), st.binary(min_size=1, max_size=8))
@settings(max_examples=500, deadline=None)
def test_corrupted_valid_record_raises_only_codec_error(position: int, noise: bytes) -> None:
    data = bytearray(encode_batch(_batch()))
    position %= len(data)
    data[position : position + len(noise)] = noise
    try:
        decode_batch(bytes(data))
    except CodecError:
        pass
    try:
        decode_batch(bytes(data[: position]))
    except CodecError:
        pass


@given(n=st.integers(1, 60), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_labels_round_trip(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = LabelBatch(
        model_id="cnn", model_version="2", classifier_version="rf-1",
        event_ids=[f"e{i}" for i in range(n)], ts_ms=rng.integers(0, 2**40, n),
        p_adversarial=rng.random(n).astype(np.float32),
        attack_type=rng.choice(np.array(["clean", "pgd", "fgsm", "cw"]), n), attack_prob=rng.random(n).astype(np.float32),
        target_model=rng.choice(np.array(["cnn", "mlp", ""]), n), target_prob=rng.random(n).astype(np.float32),
    )
    name, record = decode(encode_labels(labels), expect="AttackLabels")
    back = labels_from_record(record)
    assert name == "AttackLabels" and back.n == n and back.event_ids == labels.event_ids
    assert (back.model_id, back.model_version, back.classifier_version) == ("cnn", "2", "rf-1")
    for column in ("ts_ms", "p_adversarial", "attack_type", "attack_prob", "target_model", "target_prob"):
        np.testing.assert_array_equal(getattr(back, column), getattr(labels, column))
    assert back.ts_ms.dtype == np.int64 and back.p_adversarial.dtype == np.float32


def test_labels_carry_the_detectors_family_score_kind_and_features_version() -> None:
    labels = LabelBatch("m", "1", "det-1", ["a", "b", "c"], np.array([1, 2, 3]), np.array([0.9, 0.1, 0.7], np.float32),
                        np.array(["pgd", "clean", "cw"]), np.ones(3, np.float32), np.array(["m"] * 3),
                        np.ones(3, np.float32), family=np.array(["linf_gradient", "clean", "minimal_perturbation"]),
                        score_kind="unsupervised", features_version="det-features/1")
    back = labels_from_record(decode(encode_labels(labels), expect="AttackLabels")[1])
    assert back.family.tolist() == ["linf_gradient", "clean", "minimal_perturbation"]
    assert (back.score_kind, back.features_version) == ("unsupervised", "det-features/1")
    plain = LabelBatch("m", "1", "rf-1", ["a"], np.array([1]), np.ones(1, np.float32), np.array(["pgd"]),
                       np.ones(1, np.float32), np.array(["m"]), np.ones(1, np.float32))
    back = labels_from_record(decode(encode_labels(plain), expect="AttackLabels")[1])
    assert back.family is None and (back.score_kind, back.features_version) == ("classifier", "")
    _, record = decode(encode_labels(labels))
    record["family"] = matrix(np.array([0, 1, 9], np.int32))
    with pytest.raises(CodecError, match="family: index outside the 3 names"):
        labels_from_record(record)


def test_labels_reject_bad_indices_and_the_retired_schema_id() -> None:
    labels = LabelBatch("m", "1", "c", ["a", "b"], np.array([1, 2]), np.ones(2, np.float32), np.array(["x", "y"]),
                        np.ones(2, np.float32), np.array(["m", "m"]), np.ones(2, np.float32))
    _, record = decode(encode_labels(labels))
    record["attack_type"] = matrix(np.array([0, 5], np.int32))
    with pytest.raises(CodecError, match="attack_type: index outside the 2 names"):
        labels_from_record(record)
    record["attack_type"] = matrix(np.array([0], np.int32))
    with pytest.raises(CodecError, match="attack_type: shape"):
        labels_from_record(record)
    with pytest.raises(CodecError, match="id 3 is retired"):
        decode(struct.pack(">bI", 0, 3) + b"\x00")
    with pytest.raises(CodecError, match="p_adversarial"):
        encode_labels(LabelBatch("m", "1", "c", ["a"], np.array([1]), np.array([np.nan], np.float32),
                                 np.array(["x"]), np.ones(1, np.float32), np.array(["m"]), np.ones(1, np.float32)))


def test_alerts_written_with_schema_id_4_are_still_read() -> None:
    """Alert moved to schema id 9 when AlertKind gained hidden_attack; records of id 4 resolve into it."""
    import io
    import json

    import fastavro

    from schemas.codec import HEADER, SCHEMA_DIR, decode

    with open(SCHEMA_DIR / "alert_v4.avsc", encoding="utf-8") as f:
        old = fastavro.parse_schema(json.load(f))
    record = {"alert_id": "probing/cnn/c@1", "ts_ms": 1, "model_id": "cnn", "kind": "probing", "state": "open",
              "severity": "warning", "window_id": "", "event_ids": [], "client_id": "c", "message": "m"}
    buf = io.BytesIO()
    buf.write(HEADER.pack(0, 4))
    fastavro.schemaless_writer(buf, old, record)
    assert decode(buf.getvalue()) == ("Alert", record)
    assert SCHEMA_IDS["Alert"] == 9
