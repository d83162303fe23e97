"""LW_REFERENCE_BOOTSTRAP=N: a model version that arrives with no reference gets one from its first N live events.

For teams with no clean validation set. The drift stage hands every live batch to
:meth:`ReferenceBootstrap.observe`; the first batch of a model version asks the store
once whether it has reference events. If not, the next N live events are kept (in
memory, in arrival order); once N arrived, a uniform sample of them (at most
``LW_REFERENCE_MAX``, seeded by the model version) is written to
``reference_embeddings`` like a published reference, a ``reference_sources`` row marks
it ``bootstrap`` with the event-time range it covers, and the reference cache reloads.

The bootstrapped reference is only as clean as that traffic was: an attack running while
it is taken becomes part of "normal". Publish a real reference (``layerwatch reference``,
``Monitor.publish_reference``) under a new model version as soon as one exists. Events
kept before a worker restart are lost and collection starts again.
"""

from __future__ import annotations

import logging
import zlib
from types import SimpleNamespace
from typing import Any

import numpy as np

from schemas.batch import PredictionBatch
from streams import rows as R
from streams.rows import now_ms
from streams.stages.references import ReferenceCache
from streams.store import statements as Q
from streams.writer import StoreWriter

log = logging.getLogger(__name__)

Key = tuple[str, str]
HAS_REFERENCE, COLLECTING, DONE = "has reference", "collecting", "done"


class ReferenceBootstrap:
    """Per model version: does it have a reference; if not, collect its first N live events and write them as one."""

    def __init__(self, settings: Any, writer: StoreWriter, references: ReferenceCache):
        self.n = int(settings.reference_bootstrap)
        self.max_rows = int(settings.reference_max)
        self.writer, self.references = writer, references
        self.state: dict[Key, str] = {}
        self._parts: dict[Key, list[PredictionBatch]] = {}
        self._rows: dict[Key, int] = {}

    @property
    def enabled(self) -> bool:
        return self.n > 0

    def published(self, key: Key) -> None:
        """A published reference arrived for ``key``: stop collecting for it."""
        if self.state.get(key) == COLLECTING:
            self._parts.pop(key, None)
            self._rows.pop(key, None)
        self.state[key] = HAS_REFERENCE

    async def observe(self, batch: PredictionBatch) -> None:
        """Account one live batch; writes the reference when the N-th event arrived."""
        key = (batch.model_id, batch.model_version)
        state = self.state.get(key)
        if state in (HAS_REFERENCE, DONE):
            return
        if state is None:
            found = await self.writer.query(Q.REFERENCE_IDS, {"model_id": key[0], "model_version": key[1], "limit": 1})
            if found:
                self.state[key] = HAS_REFERENCE
                return
            self.state[key] = COLLECTING
            log.warning("model %s version %s has no reference: bootstrapping one from its first %d live events",
                        key[0], key[1], self.n)
        take = min(batch.n, self.n - self._rows.get(key, 0))
        self._parts.setdefault(key, []).append(batch.slice(0, take))
        self._rows[key] = self._rows.get(key, 0) + take
        if self._rows[key] >= self.n:
            await self._write(key)

    async def _write(self, key: Key) -> None:
        parts = self._parts.pop(key)
        self._rows.pop(key)
        sample = _concat(parts)
        if sample.n > self.max_rows:
            rng = np.random.default_rng(zlib.crc32(f"{key[0]}\0{key[1]}".encode()))
            keep = np.sort(rng.choice(sample.n, self.max_rows, replace=False))
            sample = _take(sample, keep)
        await self.writer.write("reference_embeddings", R.reference_rows([SimpleNamespace(batch=sample)]))
        from_ms, to_ms = int(min(p.ts_ms.min() for p in parts)), int(max(p.ts_ms.max() for p in parts))
        created = now_ms()
        await self.writer.write("reference_sources", {
            "model_id": [key[0]], "model_version": [key[1]], "source": ["bootstrap"], "rows": [sample.n],
            "from_ms": [from_ms], "to_ms": [to_ms], "created_ms": [created], "ts": [created // 1000]})
        self.state[key] = DONE
        self.references.mark_stale(key)
        log.warning("model %s version %s: bootstrapped reference of %d events from its live traffic %d..%d ms",
                    key[0], key[1], sample.n, from_ms, to_ms)


def _concat(parts: list[PredictionBatch]) -> PredictionBatch:
    first = parts[0]
    return PredictionBatch.build(
        first.model_id, [e for p in parts for e in p.event_ids], np.concatenate([p.outputs for p in parts]),
        {name: np.concatenate([p.layers[name] for p in parts]) for name in first.layers},
        model_version=first.model_version, role="reference", ts_ms=np.concatenate([p.ts_ms for p in parts]),
        predicted=np.concatenate([p.predicted for p in parts]))


def _take(batch: PredictionBatch, rows: np.ndarray) -> PredictionBatch:
    return PredictionBatch.build(
        batch.model_id, [batch.event_ids[i] for i in rows], batch.outputs[rows],
        {name: values[rows] for name, values in batch.layers.items()}, model_version=batch.model_version,
        role="reference", ts_ms=batch.ts_ms[rows], predicted=batch.predicted[rows])
