"""Test workers: the drift tests of windows that ingest workers published to ``lw.windows``.

With ``--agents ingest`` a worker windows its partitions and publishes each closed
window (:mod:`schemas.window`); workers started with ``--agents test`` form their own
consumer group on ``lw.windows`` (app id ``<LW_APP_ID>-tests``), so test capacity grows
apart from ingestion. A test worker loads and caches each model version's reference
from the store (a ClickHouse server: the chDB file belongs to one process), tests the
windows of one step in one call of its test thread, and publishes the DriftResults to
``lw.drift`` exactly as the in-process drift stage does; alerts, the results sink and
the dashboard do not change. A step's records are acked after its results are sent: a
test worker that dies mid-step leaves its windows to another member of the group, and
the deterministic window ids collapse a window tested twice.

On each partition assignment a test worker loads, in the background, the references of
the models whose windows land on its partitions (their home partition: murmur2 of the
model id, as the ingest workers key them), so a restarted or added test worker is warm
before those models' windows reach it (``layerwatch_references_preload_pending``).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

from schemas.codec import CodecError
from schemas.window import WindowSample, decode_window
from streams.ingest import dead_letter
from streams.repartition import murmur2_partition
from streams.stages.drift import analysis_options, analyze_all, drift_records, send_drift
from streams.stages.references import ReferenceCache
from streams.store import statements as Q

log = logging.getLogger(__name__)


class WindowTests:
    """The test agent's work on each step of ``lw.windows`` records."""

    def __init__(self, runtime: Any):
        self.runtime, self.settings, self.metrics = runtime, runtime.settings, runtime.metrics
        self.references = ReferenceCache(runtime.settings, runtime.writer, runtime.metrics)
        self.options = analysis_options(runtime.settings)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lw-tests")
        self.tested = 0
        self._preload: asyncio.Task | None = None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        if self._preload is not None:
            self._preload.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.references.close()

    async def on_assigned(self, sender: Any = None, assigned: Iterable[Any] = (), **_: Any) -> None:
        """Partitions of ``lw.windows`` assigned: load their models' references now, not at their first window."""
        topic = self.settings.topic("windows")
        mine = {tp.partition for tp in assigned if tp.topic == topic}
        if not mine:
            return
        if self._preload is not None:
            self._preload.cancel()  # a newer assignment replaces it; what it loaded stays cached
        self._preload = asyncio.get_running_loop().create_task(self._load_references(mine), name="lw-references-preload")

    async def _load_references(self, partitions: set[int]) -> None:
        try:
            rows = await self.runtime.writer.query(Q.REFERENCE_KEYS)
        except Exception as exc:  # noqa: BLE001 - the store may be down: references then load at first use
            log.warning("cannot list the stored references to preload them: %s", exc)
            return
        n = self.settings.topic_partitions
        keys = sorted((str(m), str(v)) for m, v in rows if murmur2_partition(str(m).encode(), n) in partitions)
        gauge = self.metrics.references_preload
        gauge.set(len(keys))
        try:
            for key in keys:
                try:
                    await self.references.get(key, self.executor)
                except Exception as exc:  # noqa: BLE001 - one bad reference must not stop the others
                    log.warning("preloading the reference of %s@%s failed: %s", key[0], key[1], exc)
                gauge.dec()
        finally:
            gauge.set(0)
        log.info("references preloaded for %d model version(s) of partitions %s", len(keys), sorted(partitions))

    async def handle(self, events: Sequence[Any]) -> None:
        """Decode, test and publish the results of one step's window records (bad records dead-lettered)."""
        windows: list[WindowSample] = []
        for e in events:
            m = e.message
            try:
                windows.append(decode_window(m.value or b"", self.runtime.limits))
            except CodecError as exc:
                await self.runtime.dead_letter(dead_letter(m.value, str(exc), m.topic, m.partition, m.offset))
        pairs = []
        for window in windows:
            reference = await self.references.get(window.key, self.executor)
            if reference is None:
                continue
            missing = set(reference.layers) - set(window.layers)
            if missing:
                log.warning("window %s lacks layers %s of the reference; skipped", window.window_id, sorted(missing))
                continue
            pairs.append((window, reference, {name: window.layers[name] for name in reference.layers}))
        if not pairs:
            return
        results = await asyncio.get_running_loop().run_in_executor(self.executor, analyze_all, pairs, self.options)
        for (window, reference, _), (analysis, hidden, compute_ms) in zip(pairs, results):
            self.metrics.test_seconds.observe(compute_ms / 1000)
            self.metrics.windows.labels(window.model_id).inc()
            self.tested += 1
            for record in drift_records(window, reference, analysis, self.settings, compute_ms, hidden):
                await send_drift(self.runtime.topics.drift, self.metrics, record)
