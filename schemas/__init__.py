"""Event contracts: Avro schemas and the codec with the Confluent wire header."""

from schemas.batch import LabelBatch, PredictionBatch
from schemas.codec import (
    DEFAULT_LIMITS,
    SCHEMA_IDS,
    CodecError,
    Limits,
    decode,
    decode_batch,
    encode,
    encode_batch,
    encode_labels,
    labels_from_record,
)

__all__ = [
    "DEFAULT_LIMITS",
    "SCHEMA_IDS",
    "CodecError",
    "LabelBatch",
    "Limits",
    "PredictionBatch",
    "decode",
    "decode_batch",
    "encode",
    "encode_batch",
    "encode_labels",
    "labels_from_record",
]
