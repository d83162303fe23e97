"""Avro encoding of every layerwatch event behind the Confluent wire header.

Wire format: magic byte 0, a 4-byte big-endian schema id, then the schemaless Avro
body (fastavro). Matrices travel as raw little-endian bytes with dtype and shape
beside them and are decoded with one ``numpy.frombuffer`` each. Decoding validates
everything a downstream agent relies on and raises one typed error, ``CodecError``,
naming the field and the reason, so a bad record can be dead-lettered precisely.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import fastavro
import numpy as np

from schemas.batch import ROLES, LabelBatch, PredictionBatch

SCHEMA_DIR = Path(__file__).resolve().parent
SCHEMA_FILES = {
    "PredictionBatch": "prediction_batch.avsc",
    "DriftResult": "drift_result.avsc",
    "AttackLabels": "attack_labels.avsc",
    "Alert": "alert.avsc",
    "Action": "action.avsc",
    "DeadLetter": "dead_letter.avsc",
    "WindowSample": "window_sample.avsc",
}
# Ids are part of the wire contract: never renumber, add new ids for incompatible changes.
SCHEMA_IDS = {
    "PredictionBatch": 1,
    "DriftResult": 2,
    "Alert": 9,
    "Action": 5,
    "DeadLetter": 6,
    "AttackLabels": 7,
    "WindowSample": 8,
}
RETIRED_IDS = {3: "AttackLabels with per-event arrays, replaced by schema id 7 (Matrix columns)"}
# Earlier versions still read: records written with them are resolved into today's schema (Avro
# schema resolution: an enum that gained symbols reads every old symbol unchanged).
EARLIER_IDS = {4: ("Alert", "alert_v4.avsc")}
NAMES_BY_ID = {v: k for k, v in SCHEMA_IDS.items()} | {i: name for i, (name, _) in EARLIER_IDS.items()}
MAGIC = 0
HEADER = struct.Struct(">bI")

DTYPES = {
    "f16": np.dtype("<f2"),
    "f32": np.dtype("<f4"),
    "f64": np.dtype("<f8"),
    "i32": np.dtype("<i4"),
    "i64": np.dtype("<i8"),
    "u8": np.dtype("u1"),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
LAYER_DTYPES = ("f16", "f32")


class CodecError(ValueError):
    """A record that cannot be encoded or decoded; ``field`` says where, ``reason`` says why."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """Upper bounds a decoded record must respect (the broker does not enforce sizes)."""

    max_record_bytes: int = 32 * 1024 * 1024
    max_rows: int = 65_536
    max_dim: int = 16_384
    max_layers: int = 32
    max_classes: int = 100_000
    max_id_chars: int = 256


DEFAULT_LIMITS = Limits()


@lru_cache(maxsize=None)
def parsed_schema(name: str) -> dict:
    """The parsed Avro schema of one event type."""
    if name not in SCHEMA_FILES:
        raise CodecError("schema", f"unknown schema name {name!r}")
    return _parse_file(SCHEMA_FILES[name])


@lru_cache(maxsize=None)
def _parse_file(file: str) -> dict:
    with open(SCHEMA_DIR / file, encoding="utf-8") as f:
        return fastavro.parse_schema(json.load(f))


def encode(name: str, record: dict[str, Any]) -> bytes:
    """Encode one event (a dict matching the named schema) with the wire header."""
    buf = io.BytesIO()
    buf.write(HEADER.pack(MAGIC, SCHEMA_IDS[name]))
    try:
        fastavro.schemaless_writer(buf, parsed_schema(name), record, strict_allow_default=True)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise CodecError(name, f"does not match the schema: {exc}") from exc
    return buf.getvalue()


def decode(data: bytes, *, expect: str | None = None, limits: Limits = DEFAULT_LIMITS) -> tuple[str, dict[str, Any]]:
    """Decode one event and return (schema name, record dict); ``expect`` rejects other types."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError("record", f"expected bytes, got {type(data).__name__}")
    if len(data) > limits.max_record_bytes:
        raise CodecError("record", f"{len(data)} bytes exceeds the limit of {limits.max_record_bytes}")
    if len(data) < HEADER.size:
        raise CodecError("header", f"record of {len(data)} bytes is shorter than the 5-byte header")
    magic, schema_id = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError("header", f"magic byte is {magic}, expected {MAGIC}")
    name = NAMES_BY_ID.get(schema_id)
    if schema_id in RETIRED_IDS:
        raise CodecError("header", f"schema id {schema_id} is retired: {RETIRED_IDS[schema_id]}")
    if name is None:
        raise CodecError("header", f"unknown schema id {schema_id}")
    if expect is not None and name != expect:
        raise CodecError("header", f"schema {name} where {expect} was expected")
    body = io.BytesIO(data)  # shares a bytes object's buffer (a memoryview slice would be copied)
    body.seek(HEADER.size)
    try:
        if schema_id in EARLIER_IDS:
            record = fastavro.schemaless_reader(body, _parse_file(EARLIER_IDS[schema_id][1]), parsed_schema(name))
        else:
            record = fastavro.schemaless_reader(body, parsed_schema(name))
    except Exception as exc:  # fastavro raises many types on malformed input
        raise CodecError("record", f"malformed Avro body: {type(exc).__name__}: {exc}"[:300]) from exc
    if body.tell() != len(data):
        raise CodecError("record", f"{len(data) - body.tell()} trailing bytes after the Avro body")
    return name, record


# --- matrices -------------------------------------------------------------------------------


def matrix(array: np.ndarray) -> dict[str, Any]:
    """A numpy array as the Avro Matrix record (little-endian bytes, dtype, shape)."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    key = DTYPE_NAMES.get(np.dtype(dtype))
    if key is None:
        raise CodecError("matrix", f"unsupported dtype {array.dtype}")
    return {"dtype": key, "shape": list(array.shape), "data": np.ascontiguousarray(array, dtype=DTYPES[key]).tobytes()}


def from_matrix(
    field: str, m: dict[str, Any], *, shape: tuple[int | None, ...], kinds: str, limits: Limits
) -> np.ndarray:
    """Decode a Matrix record, checking dtype kind ('f', 'i', 'u'), shape pattern and finiteness."""
    dtype = DTYPES.get(m["dtype"])
    if dtype is None:
        raise CodecError(field, f"unknown dtype {m['dtype']!r}")
    if dtype.kind not in kinds:
        raise CodecError(field, f"dtype {m['dtype']} not allowed here")
    got = tuple(int(s) for s in m["shape"])
    if len(got) != len(shape):
        raise CodecError(field, f"shape {got} has {len(got)} dimensions, expected {len(shape)}")
    for axis, (want, have) in enumerate(zip(shape, got)):
        if have <= 0:
            raise CodecError(field, f"dimension {axis} is {have}, must be positive")
        if want is not None and have != want:
            raise CodecError(field, f"shape {got} does not match the {want} expected on axis {axis}")
        if have > max(limits.max_rows, limits.max_dim, limits.max_classes):
            raise CodecError(field, f"dimension {axis} = {have} exceeds the limits")
    size = int(np.prod(got, dtype=np.int64))
    if size * dtype.itemsize != len(m["data"]):
        raise CodecError(field, f"{len(m['data'])} bytes for shape {got} of {m['dtype']} (want {size * dtype.itemsize})")
    array = np.frombuffer(m["data"], dtype=dtype).reshape(got)
    if dtype.kind == "f" and not _all_finite(array):
        raise CodecError(field, "contains NaN or Inf")
    return array


_F16_EXPONENT = np.uint16(0x7C00)


def _all_finite(array: np.ndarray) -> bool:
    """``np.isfinite(array).all()``; float16 is checked on its bits (exponent all ones = NaN/Inf),
    ~3x faster than isfinite, which converts every half float first."""
    if array.dtype.itemsize == 2:
        return not bool((np.bitwise_and(array.view(np.uint16), _F16_EXPONENT) == _F16_EXPONENT).any())
    return bool(np.isfinite(array).all())


# --- PredictionBatch ------------------------------------------------------------------------


def encode_batch(batch: PredictionBatch) -> bytes:
    """Encode a PredictionBatch (validated first, so a publisher fails before sending)."""
    record = {
        "model_id": batch.model_id,
        "model_version": batch.model_version,
        "role": batch.role,
        "event_ids": list(batch.event_ids),
        "client_ids": list(batch.client_ids),
        "ts_ms": matrix(np.asarray(batch.ts_ms, dtype=np.int64)),
        "predicted": matrix(np.asarray(batch.predicted, dtype=np.int32)),
        "outputs": matrix(np.asarray(batch.outputs, dtype=np.float32)),
        "layers": [_layer_record(name, values) for name, values in batch.layers.items()],
        "uncertainty": None if batch.uncertainty is None else matrix(np.asarray(batch.uncertainty, np.float32)),
        "truth": None if batch.truth is None else matrix(np.asarray(batch.truth, np.int32)),
        "attack": None if batch.attack is None else list(batch.attack),
        "inputs": None if batch.inputs is None else matrix(np.asarray(batch.inputs, np.float32)),
    }
    batch_from_record(record, DEFAULT_LIMITS)  # the decoder's rules, applied before sending
    return encode("PredictionBatch", record)


def _layer_record(name: str, values: np.ndarray) -> dict[str, Any]:
    values = np.asarray(values)
    if values.ndim != 2:
        raise CodecError(f"layers[{name}]", f"must be (n, dim), got shape {values.shape}")
    key = "f16" if values.dtype == np.float16 else "f32"
    return {
        "name": name,
        "dtype": key,
        "dim": int(values.shape[1]),
        "data": np.ascontiguousarray(values, dtype=DTYPES[key]).tobytes(),
    }


def decode_batch(data: bytes, limits: Limits = DEFAULT_LIMITS) -> PredictionBatch:
    """Decode and validate one PredictionBatch record."""
    _, record = decode(data, expect="PredictionBatch", limits=limits)
    return batch_from_record(record, limits)


def _check_ids(field: str, ids: list[str], n: int, limits: Limits, *, allow_empty: bool) -> None:
    if len(ids) != n:
        raise CodecError(field, f"has {len(ids)} entries for {n} events")
    longest = max(map(len, ids), default=0)
    if longest > limits.max_id_chars:
        raise CodecError(field, f"an id of {longest} characters exceeds {limits.max_id_chars}")
    if not allow_empty and not all(ids):
        raise CodecError(field, "contains an empty id")


def batch_from_record(record: dict[str, Any], limits: Limits) -> PredictionBatch:
    """Validate a decoded PredictionBatch record and build the numpy-backed batch."""
    for name in ("model_id", "model_version"):
        if not record[name] or len(record[name]) > limits.max_id_chars:
            raise CodecError(name, f"must be 1..{limits.max_id_chars} characters")
    if record["role"] not in ROLES:
        raise CodecError("role", f"unknown role {record['role']!r}")
    event_ids = record["event_ids"]
    n = len(event_ids)
    if n == 0:
        raise CodecError("event_ids", "batch holds no events")
    if n > limits.max_rows:
        raise CodecError("event_ids", f"{n} events exceed the limit of {limits.max_rows}")
    _check_ids("event_ids", event_ids, n, limits, allow_empty=False)
    _check_ids("client_ids", record["client_ids"], n, limits, allow_empty=True)
    ts_ms = from_matrix("ts_ms", record["ts_ms"], shape=(n,), kinds="i", limits=limits)
    if (ts_ms < 0).any():
        raise CodecError("ts_ms", "negative timestamp")
    predicted = from_matrix("predicted", record["predicted"], shape=(n,), kinds="iu", limits=limits)
    outputs = from_matrix("outputs", record["outputs"], shape=(n, None), kinds="f", limits=limits)
    if outputs.shape[1] > limits.max_classes:
        raise CodecError("outputs", f"{outputs.shape[1]} classes exceed the limit of {limits.max_classes}")
    if ((predicted < 0) | (predicted >= outputs.shape[1])).any():
        raise CodecError("predicted", f"class index outside 0..{outputs.shape[1] - 1}")
    layer_records = record["layers"]
    if not layer_records:
        raise CodecError("layers", "no layer activations")
    if len(layer_records) > limits.max_layers:
        raise CodecError("layers", f"{len(layer_records)} layers exceed the limit of {limits.max_layers}")
    layers: dict[str, np.ndarray] = {}
    for layer in layer_records:
        field = f"layers[{layer['name']}]"
        if not layer["name"] or layer["name"] in layers:
            raise CodecError(field, "layer names must be non-empty and unique")
        if layer["dtype"] not in LAYER_DTYPES:
            raise CodecError(field, f"dtype {layer['dtype']!r} is not one of {LAYER_DTYPES}")
        if not 0 < layer["dim"] <= limits.max_dim:
            raise CodecError(field, f"dim {layer['dim']} outside 1..{limits.max_dim}")
        m = {"dtype": layer["dtype"], "shape": [n, layer["dim"]], "data": layer["data"]}
        layers[layer["name"]] = from_matrix(field, m, shape=(n, layer["dim"]), kinds="f", limits=limits)
    optional = {
        "uncertainty": ((n,), "f"),
        "truth": ((n,), "i"),
        "inputs": ((n, None), "fu"),
    }
    extra = {
        name: None if record.get(name) is None else from_matrix(name, record[name], shape=shape, kinds=kinds, limits=limits)
        for name, (shape, kinds) in optional.items()
    }
    attack = record.get("attack")
    if attack is not None:
        _check_ids("attack", attack, n, limits, allow_empty=True)
    return PredictionBatch(
        model_id=record["model_id"],
        model_version=record["model_version"],
        role=record["role"],
        event_ids=event_ids,
        client_ids=record["client_ids"],
        ts_ms=ts_ms,
        predicted=predicted,
        outputs=outputs,
        layers=layers,
        uncertainty=extra["uncertainty"],
        truth=extra["truth"],
        attack=attack,
        inputs=extra["inputs"],
    )


# --- AttackLabels ---------------------------------------------------------------------------


def _dictionary(field: str, values: np.ndarray, n: int) -> tuple[list[str], np.ndarray]:
    """Names and int32 codes of a string column (``names[codes] == values``)."""
    values = np.asarray(values)
    if values.shape != (n,):
        raise CodecError(field, f"has shape {values.shape} for {n} events")
    names, codes = np.unique(values.astype(str), return_inverse=True)
    return names.tolist(), codes.astype(np.int32)


def encode_labels(labels: LabelBatch) -> bytes:
    """Encode a LabelBatch (validated first, so the classify stage fails before sending)."""
    n = labels.n
    attack_types, attack_codes = _dictionary("attack_type", labels.attack_type, n)
    target_models, target_codes = _dictionary("target_model", labels.target_model, n)
    record = {
        "model_id": labels.model_id,
        "model_version": labels.model_version,
        "classifier_version": labels.classifier_version,
        "event_ids": list(labels.event_ids),
        "ts_ms": matrix(np.asarray(labels.ts_ms, dtype=np.int64)),
        "p_adversarial": matrix(np.asarray(labels.p_adversarial, dtype=np.float32)),
        "attack_types": attack_types,
        "attack_type": matrix(attack_codes),
        "attack_prob": matrix(np.asarray(labels.attack_prob, dtype=np.float32)),
        "target_models": target_models,
        "target_model": matrix(target_codes),
        "target_prob": matrix(np.asarray(labels.target_prob, dtype=np.float32)),
        "score_kind": labels.score_kind,
        "features_version": labels.features_version,
        "families": [],
        "family": None,
    }
    if labels.family is not None:
        record["families"], family_codes = _dictionary("family", labels.family, n)
        record["family"] = matrix(family_codes)
    labels_from_record(record, DEFAULT_LIMITS)
    return encode("AttackLabels", record)


def labels_from_record(record: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> LabelBatch:
    """Validate a decoded AttackLabels record and build the numpy-backed LabelBatch."""
    event_ids = record["event_ids"]
    n = len(event_ids)
    if n > limits.max_rows:
        raise CodecError("event_ids", f"{n} events exceed the limit of {limits.max_rows}")
    _check_ids("event_ids", event_ids, n, limits, allow_empty=False)
    if n == 0:
        raise CodecError("event_ids", "labels for no events")
    columns = {}
    for field, kinds in (("ts_ms", "i"), ("p_adversarial", "f"), ("attack_prob", "f"), ("target_prob", "f")):
        columns[field] = from_matrix(field, record[field], shape=(n,), kinds=kinds, limits=limits)
    for field, names_field in (("attack_type", "attack_types"), ("target_model", "target_models")):
        names = record[names_field]
        _check_ids(names_field, names, len(names), limits, allow_empty=True)
        codes = from_matrix(field, record[field], shape=(n,), kinds="i", limits=limits)
        if codes.min() < 0 or codes.max() >= len(names):
            raise CodecError(field, f"index outside the {len(names)} names of {names_field}")
        columns[field] = np.asarray(names, dtype=str)[codes]
    family = None
    if record.get("family") is not None:
        names = record.get("families") or []
        _check_ids("families", names, len(names), limits, allow_empty=True)
        codes = from_matrix("family", record["family"], shape=(n,), kinds="i", limits=limits)
        if codes.min() < 0 or codes.max() >= len(names):
            raise CodecError("family", f"index outside the {len(names)} names of families")
        family = np.asarray(names, dtype=str)[codes]
    return LabelBatch(
        model_id=record["model_id"],
        model_version=record["model_version"],
        classifier_version=record["classifier_version"],
        event_ids=event_ids,
        ts_ms=columns["ts_ms"].astype(np.int64, copy=False),
        p_adversarial=columns["p_adversarial"].astype(np.float32, copy=False),
        attack_type=columns["attack_type"],
        attack_prob=columns["attack_prob"].astype(np.float32, copy=False),
        target_model=columns["target_model"],
        target_prob=columns["target_prob"].astype(np.float32, copy=False),
        family=family,
        score_kind=str(record.get("score_kind", "classifier")),
        features_version=str(record.get("features_version", "")),
    )
