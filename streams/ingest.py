"""Decoding of consumed records into batches or dead letters (pure, no Kafka)."""

from __future__ import annotations

from typing import Iterable

from schemas.codec import CodecError, Limits, decode_batch, encode
from streams.event_guard import EventGuard
from streams.rows import Delivered, now_ms

MAX_DEAD_LETTER_BYTES = 1024 * 1024


def dead_letter(raw: bytes | None, reason: str, topic: str, partition: int, offset: int) -> dict:
    """A DeadLetter record; raw bytes past 1 MiB are cut (the reason says so)."""
    raw = bytes(raw or b"")
    if len(raw) > MAX_DEAD_LETTER_BYTES:
        reason = f"{reason} (raw record of {len(raw)} bytes truncated to {MAX_DEAD_LETTER_BYTES})"
        raw = raw[:MAX_DEAD_LETTER_BYTES]
    return {"topic": topic, "partition": int(partition), "offset": int(offset), "ts_ms": now_ms(), "reason": reason[:2000], "raw": raw}


def decode_records(
    records: Iterable[tuple], limits: Limits, known_models: frozenset[str] | None = None,
    guard: EventGuard | None = None,
) -> tuple[list[Delivered], list[dict]]:
    """Split (value, topic, partition, offset[, record timestamp ms]) records into decoded batches and
    dead letters; ``guard`` clamps future event times and refuses layer-shape changes (streams.event_guard)."""
    good: list[Delivered] = []
    dead: list[dict] = []
    now = now_ms()
    for value, topic, partition, offset, *stamp in records:
        try:
            if value is None:
                raise CodecError("record", "empty record (no value)")
            batch = decode_batch(value, limits)
            if known_models is not None and batch.model_id not in known_models:
                raise CodecError("model_id", f"unknown model {batch.model_id!r}")
            if guard is not None:
                batch = guard.check(batch, stamp[0] if stamp else None, now)
        except CodecError as exc:
            dead.append(dead_letter(value, str(exc), topic, partition, offset))
            continue
        good.append(Delivered(batch, topic, partition, offset))
    return good, dead


def encode_dead_letter(record: dict) -> bytes:
    return encode("DeadLetter", record)
