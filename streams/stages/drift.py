"""The drift stage: live batches into sliding windows, each closed window tested against its model's reference.

    ingest step ──► DriftStage.handle ──► WindowManager ──► Coalescer ──► test loop (thread) ──► lw.drift

Windows live in memory (never in Faust tables: a table write republishes the value);
after a restart :mod:`streams.recovery` rebuilds them through :meth:`DriftStage.pause`,
:meth:`DriftStage.replay` and :meth:`DriftStage.resume`. The test (``LW_DRIFT_TEST``,
MMD by default; see :mod:`workers.drift`) runs in a one-thread executor so the event
loop keeps heart-beating; the loop drains every waiting window at once (up to
``LW_DRIFT_BATCH``), MMD tests of windows of equal shape stacked into shared GEMMs. When
tests fall behind, pending windows of a key are coalesced (counted in
``layerwatch_windows_coalesced_total``); a window that is not tested at all (no reference
yet, layers missing, the test failed) is counted in ``layerwatch_windows_untested_total``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from schemas.batch import CLIENT_PREFIX, COMBINED, COUNT, PredictionBatch
from schemas.codec import encode
from schemas.window import WindowSample, encode_window
from streams.rows import Delivered, now_ms
from streams.stages.bootstrap import ReferenceBootstrap
from streams.stages.references import Reference, ReferenceCache, drift_layers
from workers.drift import AnalysisOptions, Verdict, WindowAnalysis
from workers.hidden_attacks import ClientTest
from workers.mmd.batch import analyze_windows
from workers.windows import ClosedWindow, Coalescer, WindowManager

log = logging.getLogger(__name__)

Key = tuple[str, str]
Hidden = tuple[Verdict, list[ClientTest]]  # a window's count verdict and its heavy clients


def analysis_options(settings: Any) -> AnalysisOptions:
    return AnalysisOptions(top_k=settings.top_k, repeats=settings.detection_repeats, m=settings.detection_m,
                           alpha=settings.alpha, shift_adjust=settings.shift_adjust)


def analyze_all(jobs: Sequence[tuple[Any, Reference, dict]], options: AnalysisOptions,
                ) -> list[tuple[WindowAnalysis, Hidden | None, float]]:
    """Each window's analysis, hidden-attack tests and compute time in ms (runs in the test thread).

    ``jobs`` are ``(window, reference, layers)``; a window is a :class:`ClosedWindow` or a
    :class:`WindowSample` (``predicted``, ``client_ids``). One call of
    :func:`workers.mmd.batch.analyze_windows` for all of them (MMD GEMMs stacked across
    models); each window's compute time is its share of the whole.
    """
    started = time.perf_counter()
    analyses = analyze_windows([(ref.test, layers, w.predicted) for w, ref, layers in jobs], options)
    hidden = [ref.hidden.analyze(layers, w.predicted, w.client_ids, options.top_k) if ref.hidden is not None else None
              for w, ref, layers in jobs]
    each_ms = (time.perf_counter() - started) * 1000 / max(1, len(jobs))
    return [(analysis, h, each_ms) for analysis, h in zip(analyses, hidden)]


def drift_records(window: Any, reference: Reference, analysis: WindowAnalysis, settings: Any,
                  compute_ms: float, hidden: Hidden | None = None) -> list[dict[str, Any]]:
    """DriftResult records of one window: one per layer, the combined row, and with ``hidden`` the count
    row (statistic: flagged events) and one row per heavy client whose adjusted p-value is <= alpha."""
    base = {
        "window_id": window.window_id, "model_id": window.model_id, "model_version": window.model_version,
        "window_start_ms": int(window.start_ms), "window_end_ms": int(window.end_ms),
        "n_reference": reference.n, "n_window": window.n_samples, "alpha": settings.alpha,
        "n_permutations": settings.mmd_permutations, "compute_ms": compute_ms, "device": reference.test.device,
    }

    def record(layer: str, verdict: Verdict, rows: Any = None) -> dict[str, Any]:
        top = [{"event_id": str(window.event_ids[i]), "score": float(s)}
               for i, s in zip(verdict.top_rows, verdict.top_scores) if rows is None or rows[i]]
        return {**base, "layer": layer, "mmd2": verdict.statistic, "p_value": verdict.p_value,
                "detection_rate": verdict.detection_rate, "bandwidth": verdict.bandwidth, "top_samples": top}

    records = [record(layer, analysis.layers[layer]) for layer in reference.layers] + \
        [record(COMBINED, analysis.combined)]
    if hidden is not None:
        count, clients = hidden
        records.append(record(COUNT, count))
        shown = [c for c in clients if c.p_adjusted <= settings.alpha]
        ids = np.asarray(window.client_ids).astype(str) if shown else None
        for c in shown:
            verdict = Verdict(float(c.flagged), c.p_adjusted, c.flagged / c.n, count.top_rows, count.top_scores)
            records.append({**record(CLIENT_PREFIX + c.client, verdict, ids == c.client), "n_window": c.n})
    return records


class DriftStage:
    """Feeds live batches into windows and tests each closed window against the model's reference."""

    name = "drift"

    def __init__(self, runtime: Any, publish: bool = False):
        s = runtime.settings
        self.settings, self.metrics, self.topic = s, runtime.metrics, runtime.topics.drift
        # publish: closed windows go to lw.windows for the test workers instead of being tested here
        self.windows_topic = runtime.topics.windows if publish else None
        self.windows = WindowManager(size_s=s.window_size_s, step_s=s.window_step_s, capacity=s.window_max_samples,
                                     min_samples=s.window_min_samples, count_trigger=s.window_count_trigger,
                                     lateness_s=s.window_lateness_s)
        # windows closed in a burst (a backlog replayed after a restart) are tested one by one up to
        # two minutes' worth per key; only past that are they merged
        self.pending = Coalescer(capacity=s.window_max_samples, max_pending=max(1, int(120 / s.window_step_s)))
        self.references = ReferenceCache(s, runtime.writer, runtime.metrics)
        self.bootstrap = ReferenceBootstrap(s, runtime.writer, self.references)
        self.options = analysis_options(s)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lw-mmd")
        self.batch_size = max(1, int(s.drift_batch))
        self.wakeup = asyncio.Event()
        self.tested = 0
        self._ready = asyncio.Event()  # cleared while recovery rebuilds the windows after a (re)start
        self._ready.set()
        self._tasks: list[asyncio.Task] = []
        self._partitions: dict[Key, set[int]] = {}  # the predictions partitions each key's events came from
        self.metrics.window_keys.set_function(lambda: len(self.windows.keys()))  # read when /metrics is scraped
        self.metrics.window_bytes.set_function(self.windows.nbytes)

    # -- Stage protocol
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.run(), name="lw-drift-tests"),
                       loop.create_task(self._close_idle_forever(), name="lw-drift-idle")]

    async def handle(self, items: Sequence[Delivered]) -> None:
        await self._ready.wait()
        for d in items:
            b = d.batch
            if b.role == "reference":
                self.references.mark_stale((b.model_id, b.model_version))
                self.bootstrap.published((b.model_id, b.model_version))
                continue
            if self.bootstrap.enabled:
                await self.bootstrap.observe(b)
            late = self.windows.late_events
            self.enqueue(self.replay(b, d.partition))
            if self.windows.late_events > late:
                self.metrics.late.labels(b.model_id).inc(self.windows.late_events - late)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.references.close()

    def health(self) -> str:
        return ""

    # -- used by recovery
    def pause(self) -> None:
        """Hold ``handle`` until :meth:`resume` (recovery feeds the history first)."""
        self._ready.clear()

    def resume(self) -> None:
        self._ready.set()

    def replay(self, batch: PredictionBatch, partition: int) -> list[ClosedWindow]:
        """Feed one live batch (of ``partition``) into the windows; the windows it closed, not yet queued."""
        key = (batch.model_id, batch.model_version)
        self._partitions.setdefault(key, set()).add(int(partition))
        return self.windows.add(key, batch.ts_ms, batch.event_ids, batch.predicted,
                                drift_layers(batch.layers, self.settings.drift_layers), client_ids=batch.client_ids)

    def drop_partitions(self, partitions: set[int]) -> int:
        """Forget the windows of keys whose events all came from ``partitions`` (revoked); how many keys."""
        gone = [key for key, seen in self._partitions.items() if seen <= partitions]
        for key in gone:
            del self._partitions[key]
            self.windows.drop(key)
        return len(gone)

    @property
    def lateness_ms(self) -> int:
        return self.windows.lateness_ms

    def open_windows(self) -> int:
        return sum(len(self.windows.open_windows(k)) for k in self.windows.keys())

    def enqueue(self, closed: list[ClosedWindow]) -> None:
        """Queue closed windows for testing (coalesced per key when tests fall behind)."""
        for window in closed:
            if self.pending.put(window):
                self.metrics.coalesced.labels(window.model_id).inc()
        if closed:
            self.wakeup.set()

    # -- the test loop
    async def _close_idle_forever(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)  # a timer: idle windows close by wall clock
            self.enqueue(self.windows.close_idle(now_ms()))

    async def run(self) -> None:
        """Drain the queue in batches: every window waiting (up to ``drift_batch``) is tested in one call,
        the MMD tests of windows of equal shape stacked into shared GEMMs (:mod:`workers.mmd.batch`);
        windows closing meanwhile queue (and are coalesced, counted, past two minutes' worth per key)."""
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while len(self.pending):
                windows = []
                while len(windows) < self.batch_size and (window := self.pending.pop_any()) is not None:
                    windows.append(window)
                self.metrics.drift_queue.set(len(self.pending))
                if self.windows_topic is not None:  # published for the test workers (streams/window_tests.py)
                    for window in windows:
                        try:
                            await self._publish(window)
                        except Exception:
                            log.exception("publishing window %s failed", window.window_id)
                            self.metrics.untested.labels(window.model_id, "failed").inc()
                    continue
                try:
                    await self._test_batch(windows)
                except Exception:  # a failed batch must not stop the loop: one by one, to find the bad window
                    log.exception("testing a batch of %d windows failed; testing them one by one", len(windows))
                    for window in windows:
                        try:
                            await self._test_batch([window])
                        except Exception:
                            log.exception("testing window %s failed", window.window_id)
                            self.metrics.untested.labels(window.model_id, "failed").inc()

    async def _publish(self, window: ClosedWindow) -> None:
        sample = WindowSample(window.window_id, window.model_id, window.model_version, window.start_ms, window.end_ms,
                              window.n_events, window.event_ids, window.predicted, window.layers, window.client_ids,
                              window.trigger, window.merged, self.windows.late_by_key().get(window.key, 0))
        value, sent = encode_window(sample, self.settings.max_window_bytes)
        if sent.downsampled_from:
            self.metrics.windows_downsampled.labels(window.model_id).inc()
        await self.windows_topic.send(key=window.model_id.encode(), value=value)
        self.metrics.windows_published.labels(window.model_id).inc()

    async def _jobs(self, windows: list[ClosedWindow]) -> list[tuple[ClosedWindow, Reference, dict]]:
        """The windows that can be tested, with their references and layers; the others are counted."""
        jobs = []
        for window in windows:
            reference = await self.references.get(window.key, self.executor)
            if reference is None:
                self.metrics.untested.labels(window.model_id, "no_reference").inc()
                continue
            layers = {name: window.layers[name] for name in reference.layers if name in window.layers}
            if len(layers) != len(reference.layers):
                log.warning("window %s lacks layers %s of the reference; skipped", window.window_id,
                            sorted(set(reference.layers) - set(layers)))
                self.metrics.untested.labels(window.model_id, "missing_layers").inc()
                continue
            jobs.append((window, reference, layers))
        return jobs

    async def _test_batch(self, windows: list[ClosedWindow]) -> None:
        jobs = await self._jobs(windows)
        if not jobs:
            return
        results = await asyncio.get_running_loop().run_in_executor(self.executor, analyze_all, jobs, self.options)
        self.metrics.test_batch.observe(len(jobs))
        for (window, reference, _), (analysis, hidden, compute_ms) in zip(jobs, results):
            self.metrics.test_seconds.observe(compute_ms / 1000)
            self.metrics.windows.labels(window.model_id).inc()
            self.tested += 1
            for record in drift_records(window, reference, analysis, self.settings, compute_ms, hidden):
                await send_drift(self.topic, self.metrics, record)


async def send_drift(topic: Any, metrics: Any, record: dict[str, Any]) -> None:
    """Publish one DriftResult; its gauges are set for layer, combined and count rows (not per client)."""
    if not record["layer"].startswith(CLIENT_PREFIX):
        metrics.detection_rate.labels(record["model_id"], record["layer"]).set(record["detection_rate"])
        metrics.p_value.labels(record["model_id"], record["layer"]).set(record["p_value"])
    await topic.send(key=record["model_id"].encode(), value=encode("DriftResult", record))
