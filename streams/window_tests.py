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
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from schemas.codec import CodecError
from schemas.window import WindowSample, decode_window
from streams.ingest import dead_letter
from streams.stages.drift import analysis_options, analyze_all, drift_records, send_drift
from streams.stages.references import ReferenceCache

log = logging.getLogger(__name__)


class WindowTests:
    """The test agent's work on each step of ``lw.windows`` records."""

    def __init__(self, runtime: Any):
        self.runtime, self.settings, self.metrics = runtime, runtime.settings, runtime.metrics
        self.references = ReferenceCache(runtime.settings, runtime.writer, runtime.metrics)
        self.options = analysis_options(runtime.settings)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lw-tests")
        self.tested = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.references.close()

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
