"""The probing stage: flags clients sending many near-identical inputs, opens a probing alert, throttles them."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from schemas.batch import PENULTIMATE
from schemas.codec import encode
from streams.rows import Delivered, now_ms
from workers.probing import ProbingDetector, ProbingHit, one_blas_thread


class ProbingStage:
    """Near-duplicate queries per (model, client) on the penultimate embeddings; hits become a probing
    alert (through the alert hub) and a throttle action on ``lw.actions``.

    One :class:`~workers.probing.ProbingDetector` holds every model: each batch is sketched
    (projected to the detector's sketch width, so models of any width share one ring), the
    client ids are prefixed with the model id (embeddings of different models are never
    compared), and the whole ingest step is scored in one call. A step's cost is then one
    projection per batch plus a fixed number of array operations, whatever the number of
    models and clients.
    """

    name = "probing"

    def __init__(self, runtime: Any, expire_every_s: float = 5.0):
        assert runtime.alerts is not None
        self.settings, self.metrics, self.hub = runtime.settings, runtime.metrics, runtime.alerts
        self.actions = runtime.topics.actions
        self.detector = ProbingDetector(similarity=runtime.settings.probing_similarity,
                                        min_queries=runtime.settings.probing_min_queries,
                                        window_s=runtime.settings.probing_window_s,
                                        max_clients=runtime.settings.probing_max_clients,
                                        buffer_rows=runtime.settings.probing_buffer_rows)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lw-probing")
        self.expire_every_s = expire_every_s
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._expire_forever(), name="lw-probing-expiry")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def health(self) -> str:
        return ""

    async def handle(self, items: Sequence[Delivered]) -> None:
        s = self.settings
        batches = [d.batch for d in items if d.batch.role == "live" and PENULTIMATE in d.batch.layers]
        if not batches:
            return
        # in its own thread: the products and conversions release the GIL, so the loop (the alerts
        # agent, the results sink, Kafka) and the classifier's thread go on meanwhile
        found = await asyncio.get_running_loop().run_in_executor(self.executor, self._update, batches)
        for model_id, hit in found:
            await self.hub.publish(self.hub.rules.on_probing(model_id, hit.client_id, int(hit.ts_ms), int(hit.count)))
            action = {"client_id": hit.client_id, "action": "throttle", "model_id": model_id,
                      "until_ms": now_ms() + int(s.probing_throttle_s * 1000),
                      "reason": f"probing: {hit.count} near-identical queries in {s.probing_window_s:.0f} s"}
            self.metrics.probing.labels(model_id).inc()
            self.metrics.actions.labels("throttle").inc()
            await self.actions.send(key=hit.client_id.encode(), value=encode("Action", action))

    def _update(self, batches: Sequence[Any]) -> list[tuple[str, ProbingHit]]:
        """(model id, hit) of the step's batches (runs in the probing thread, one call at a time)."""
        started = time.perf_counter()
        det = self.detector
        with one_blas_thread():
            sketches = np.concatenate([det.sketch(b.layers[PENULTIMATE]) for b in batches])
        ids = [f"{b.model_id}\0{c}" if c else "" for b in batches for c in b.client_ids]
        ts = np.concatenate([np.asarray(b.ts_ms, np.int64) for b in batches])
        found = []
        for hit in det.update_sketches(ids, ts, sketches):
            model_id, _, client_id = hit.client_id.partition("\0")
            found.append((model_id, replace(hit, client_id=client_id)))
        self.metrics.probing_seconds.inc(time.perf_counter() - started)
        self.metrics.probing_rows.inc(len(ids))
        return found

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(self.expire_every_s)  # a timer: quiet probing alerts resolve by wall clock
            await self.hub.publish(self.hub.rules.expire(now_ms(), self.settings.probing_window_s))
