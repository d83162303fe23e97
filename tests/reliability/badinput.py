"""Hypothesis strategies for bad PredictionBatch records, one per kind of damage.

Every strategy draws ``(kind, raw bytes)``. The records are built the way a careless or
hostile producer would: Avro bodies encoded with the codec's own schemas but without the
validation ``encode_batch`` applies, truncations and byte flips of valid records, random
bytes, other schemas and unknown schema ids, oversized records, and well-formed batches
of a model the worker is not configured for.
"""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import strategies as st

from schemas.codec import HEADER, Limits, encode, encode_batch, matrix
from tests.reliability.synthetic import MODEL, make_batch

#: The limits the fuzz worker runs with (LW_MAX_RECORD_BYTES / LW_MAX_BATCH_ROWS / LW_MAX_DIM).
LIMITS = Limits(max_record_bytes=64 * 1024, max_rows=4096, max_dim=256)
LIMIT_ENV = {"LW_MAX_RECORD_BYTES": str(LIMITS.max_record_bytes), "LW_MAX_BATCH_ROWS": str(LIMITS.max_rows),
             "LW_MAX_DIM": str(LIMITS.max_dim), "LW_MODELS": MODEL}

#: Words every dead letter of a kind has in its reason.
REASONS = {
    "random": None,  # anything, as long as there is a reason
    "truncated": None,
    "flipped": None,
    "oversized": "exceeds the limit",
    "nan_inf": "NaN or Inf",
    "wrong_dim": None,
    "unknown_schema": None,
    "unknown_model": "unknown model",
}


def record(n: int, dim: int, seed: int, *, model_id: str = MODEL, classes: int = 10) -> dict:
    """A PredictionBatch record dict (what the codec writes), valid until someone edits it."""
    rng = np.random.default_rng(seed)
    ids = [f"fz{seed}-{i}" for i in range(n)]
    b = make_batch(ids, np.full(n, 1_900_000_000_000, np.int64), rng, model_id=model_id)
    pen = rng.normal(size=(n, dim)).astype(np.float32)
    return {
        "model_id": model_id, "model_version": "1", "role": "live", "event_ids": ids, "client_ids": b.client_ids,
        "ts_ms": matrix(b.ts_ms), "predicted": matrix(b.predicted), "outputs": matrix(b.outputs[:, :classes]),
        "layers": [{"name": "penultimate", "dtype": "f32", "dim": dim, "data": pen.tobytes()}],
        "uncertainty": None, "truth": None, "attack": None, "inputs": None,
    }


def valid_bytes(seed: int, n: int = 4, dim: int = 8) -> bytes:
    return encode("PredictionBatch", record(n, dim, seed))


seeds = st.integers(0, 2**31 - 1)
small_n = st.integers(1, 8)
small_dim = st.integers(1, 16)


@st.composite
def random_bytes(draw) -> tuple[str, bytes]:
    data = draw(st.binary(min_size=0, max_size=200))
    if draw(st.booleans()):  # a plausible header in front of garbage goes further into the decoder
        data = HEADER.pack(0, 1) + data
    return "random", data


@st.composite
def truncated(draw) -> tuple[str, bytes]:
    data = valid_bytes(draw(seeds), draw(small_n), draw(small_dim))
    return "truncated", data[: draw(st.integers(0, len(data) - 1))]


@st.composite
def flipped(draw) -> tuple[str, bytes]:
    data = bytearray(valid_bytes(draw(seeds), draw(small_n), draw(small_dim)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    return "flipped", bytes(data)


@st.composite
def oversized(draw) -> tuple[str, bytes]:
    if draw(st.booleans()):
        size = draw(st.integers(LIMITS.max_record_bytes + 1, LIMITS.max_record_bytes + 4096))
        rng = np.random.default_rng(draw(seeds))
        return "oversized", HEADER.pack(0, 1) + rng.bytes(size)
    dim = LIMITS.max_dim
    n = LIMITS.max_record_bytes // (dim * 4) + draw(st.integers(1, 8))
    return "oversized", encode("PredictionBatch", record(n, dim, draw(seeds)))


@st.composite
def nan_inf(draw) -> tuple[str, bytes]:
    n, dim = draw(small_n), draw(small_dim)
    rec = record(n, dim, draw(seeds))
    bad = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    where = draw(st.sampled_from(["layer", "outputs", "uncertainty"]))
    if where == "layer":
        values = np.frombuffer(rec["layers"][0]["data"], np.float32).copy()
        values[draw(st.integers(0, values.size - 1))] = bad
        rec["layers"][0]["data"] = values.tobytes()
    elif where == "outputs":
        out = np.frombuffer(rec["outputs"]["data"], np.float32).copy().reshape(n, -1)
        out[draw(st.integers(0, n - 1)), draw(st.integers(0, out.shape[1] - 1))] = bad
        rec["outputs"] = matrix(out)
    else:
        u = np.zeros(n, np.float32)
        u[draw(st.integers(0, n - 1))] = bad
        rec["uncertainty"] = matrix(u)
    return "nan_inf", encode("PredictionBatch", rec)


@st.composite
def wrong_dim(draw) -> tuple[str, bytes]:
    n, dim = draw(small_n), draw(small_dim)
    rec = record(n, dim, draw(seeds))
    how = draw(st.sampled_from(["dim_field", "data_short", "too_wide", "ts_len", "ids_len", "outputs_shape",
                                "predicted_range", "no_layers", "dup_layer", "layer_dtype", "negative_ts"]))
    if how == "dim_field":
        rec["layers"][0]["dim"] = dim + draw(st.integers(1, 5))
    elif how == "data_short":
        rec["layers"][0]["data"] = rec["layers"][0]["data"][:-draw(st.integers(1, 4 * dim))]
    elif how == "too_wide":
        wide = LIMITS.max_dim + draw(st.integers(1, 64))
        rec["layers"][0] = {"name": "penultimate", "dtype": "f32", "dim": wide, "data": bytes(4 * wide * n)}
    elif how == "ts_len":
        rec["ts_ms"] = matrix(np.zeros(n + draw(st.integers(1, 3)), np.int64))
    elif how == "ids_len":
        rec["client_ids"] = rec["client_ids"] + ["extra"]
    elif how == "outputs_shape":
        rec["outputs"] = {**rec["outputs"], "shape": [n + 1, 10]}
    elif how == "predicted_range":
        rec["predicted"] = matrix(np.full(n, 10 + draw(st.integers(0, 100)), np.int32))
    elif how == "no_layers":
        rec["layers"] = []
    elif how == "dup_layer":
        rec["layers"] = rec["layers"] * 2
    elif how == "layer_dtype":
        rec["layers"][0]["dtype"] = draw(st.sampled_from(["f64", "i32", "u8", "bf16", ""]))
    else:
        rec["ts_ms"] = matrix(np.full(n, -draw(st.integers(1, 10**12)), np.int64))
    return "wrong_dim", encode("PredictionBatch", rec)


@st.composite
def unknown_schema(draw) -> tuple[str, bytes]:
    how = draw(st.sampled_from(["id", "magic", "other_schema"]))
    body = valid_bytes(draw(seeds))[HEADER.size:]
    if how == "id":
        return "unknown_schema", struct.pack(">bI", 0, draw(st.integers(7, 2**32 - 1))) + body
    if how == "magic":
        return "unknown_schema", struct.pack(">bI", draw(st.integers(1, 127)), 1) + body
    action = {"client_id": "c", "action": "throttle", "model_id": MODEL, "until_ms": 1, "reason": "r"}
    return "unknown_schema", encode("Action", action)


@st.composite
def unknown_model(draw) -> tuple[str, bytes]:
    name = draw(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(lambda s: s != MODEL))
    n = draw(small_n)
    rng = np.random.default_rng(draw(seeds))
    b = make_batch([f"um-{i}" for i in range(n)], np.full(n, 1_900_000_000_000, np.int64), rng, model_id=name)
    return "unknown_model", encode_batch(b)


bad_records = st.one_of(random_bytes(), truncated(), flipped(), oversized(), nan_inf(), wrong_dim(),
                        unknown_schema(), unknown_model())
