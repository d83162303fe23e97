"""The detection stages of a worker: drift windows and MMD tests, probing, alerts and actions.

Data flow inside one worker process:

    ingest agent ──► DriftStage.handle ──► WindowManager ──► Coalescer ──► test loop (thread) ──► lw.drift
                 └─► ProbingStage.handle ──► ProbingDetector ──► AlertHub (probing) + lw.actions
    alerts agent (lw.drift combined rows, lw.labels) ──► AlertRules ──► AlertHub ──► lw.alerts, webhook, metrics

Windows live in memory (never in Faust tables: a table write republishes the value).
After a restart they are rebuilt from what the ingest agent replays (see README,
"Guarantees"). The MMD engine runs in a one-thread executor so the event loop keeps
heart-beating; when tests fall behind, pending windows of a key are coalesced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import faust
import numpy as np

from schemas.batch import COMBINED, PENULTIMATE, LabelBatch
from schemas.codec import CodecError, decode, encode, labels_from_record
from streams.alerts.rules import AlertEvent, AlertRules
from workers.probing import ProbingDetector
from streams.rows import Delivered, now_ms
from workers.windows import ClosedWindow, Coalescer, WindowManager

log = logging.getLogger(__name__)

Key = tuple[str, str]

REFERENCE_IDS_SQL = (
    "SELECT event_id FROM reference_embeddings WHERE model_id = {model_id} AND model_version = {model_version} "
    "GROUP BY event_id ORDER BY cityHash64(event_id) LIMIT {limit}"
)
REFERENCE_ROWS_SQL = (
    "SELECT event_id, layer, any(predicted), any(vector) FROM reference_embeddings "
    "WHERE model_id = {model_id} AND model_version = {model_version} AND has({ids}, event_id) "
    "GROUP BY event_id, layer"
)


@dataclass
class Reference:
    """A frozen reference for one model version: its tester and what it was built from."""

    tester: Any  # workers.mmd.MMDTester
    layers: tuple[str, ...]
    n: int
    built_ms: int


def reference_arrays(rows: Sequence[Sequence[Any]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(event_id, layer, predicted, vector) rows → aligned {layer: (n, d)} and predicted classes.

    Only events present in every layer are kept, in one event order shared by all layers.
    """
    by_layer: dict[str, dict[str, tuple[int, Any]]] = {}
    for event_id, layer, predicted, vector in rows:
        by_layer.setdefault(layer, {})[event_id] = (predicted, vector)
    if not by_layer:
        return {}, np.empty(0, np.int64)
    common = sorted(set.intersection(*(set(v) for v in by_layer.values())))
    layers = {
        layer: np.asarray([values[e][1] for e in common], dtype=np.float32).reshape(len(common), -1)
        for layer, values in by_layer.items()
    }
    first = next(iter(by_layer.values()))
    predicted = np.asarray([first[e][0] for e in common], dtype=np.int64)
    return layers, predicted


class ReferenceCache:
    """References per model version, loaded from `reference_embeddings` and rebuilt when new reference data lands."""

    def __init__(self, runtime: Any):
        self.runtime = runtime
        self._cache: dict[Key, Reference] = {}
        self._stale: set[Key] = set()
        self._warned: set[Key] = set()

    def mark_stale(self, key: Key) -> None:
        self._stale.add(key)

    async def get(self, key: Key, executor: ThreadPoolExecutor) -> Reference | None:
        if key in self._cache and key not in self._stale:
            return self._cache[key]
        settings = self.runtime.settings
        params = {"model_id": key[0], "model_version": key[1], "limit": settings.reference_max}
        ids = [r[0] for r in await self.runtime.writer.query(REFERENCE_IDS_SQL, params)]
        if len(ids) < max(2, settings.detection_m // 2):
            if key not in self._warned:
                log.warning("model %s version %s has %d reference events: not tested until `layerwatch reference` "
                            "publishes its validation data", key[0], key[1], len(ids))
                self._warned.add(key)
            return None
        rows = await self.runtime.writer.query(REFERENCE_ROWS_SQL, {**params, "ids": ids})
        layers, classes = reference_arrays(rows)
        loop = asyncio.get_running_loop()
        tester = await loop.run_in_executor(executor, self._build, layers, classes)
        self._stale.discard(key)
        self._warned.discard(key)
        reference = Reference(tester, tuple(layers), len(classes), now_ms())
        self._cache[key] = reference
        log.info("reference for %s@%s: %d events, layers %s", key[0], key[1], reference.n, ", ".join(layers))
        return reference

    def _build(self, layers: dict[str, np.ndarray], classes: np.ndarray) -> Any:
        from workers.mmd import MMDTester

        return MMDTester(layers, n_permutations=self.runtime.settings.mmd_permutations, seed=0,
                         reference_classes=classes)


def drift_records(window: ClosedWindow, reference: Reference, analysis: tuple, settings: Any, device: str,
                  compute_ms: float) -> list[dict[str, Any]]:
    """DriftResult records, one per layer plus the combined row, from one `MMDTester.analyze` call."""
    test, rate, scores = analysis
    top = [{"event_id": str(window.event_ids[i]), "score": float(s)} for i, s in zip(scores.indices, scores.scores)]
    base = {
        "window_id": window.window_id, "model_id": window.model_id, "model_version": window.model_version,
        "window_start_ms": int(window.start_ms), "window_end_ms": int(window.end_ms),
        "n_reference": reference.n, "n_window": window.n_samples, "alpha": settings.alpha,
        "n_permutations": settings.mmd_permutations, "compute_ms": compute_ms, "device": device,
    }
    bandwidth = reference.tester.bandwidth
    records = []
    for layer in reference.layers:
        lt = test.layers.get(layer, test) if test.layers else test
        lr = rate.layers.get(layer, rate) if rate.layers else rate
        ls = scores.layers.get(layer, scores) if scores.layers else scores
        layer_top = [{"event_id": str(window.event_ids[i]), "score": float(s)} for i, s in zip(ls.indices, ls.scores)]
        records.append({**base, "layer": layer, "mmd2": float(lt.mmd2), "p_value": float(lt.p_value),
                        "detection_rate": float(lr.rate),
                        "bandwidth": float(bandwidth[layer] if isinstance(bandwidth, dict) else bandwidth),
                        "top_samples": layer_top})
    records.append({**base, "layer": COMBINED, "mmd2": float(test.mmd2), "p_value": float(test.p_value),
                    "detection_rate": float(rate.rate), "bandwidth": 0.0, "top_samples": top})
    return records


class DriftStage:
    """Feeds live batches into windows and tests each closed window against the model's reference."""

    def __init__(self, app: faust.App, runtime: Any):
        s = runtime.settings
        self.app, self.runtime, self.settings = app, runtime, s
        self.windows = WindowManager(size_s=s.window_size_s, step_s=s.window_step_s, capacity=s.window_max_samples,
                                     min_samples=s.window_min_samples, count_trigger=s.window_count_trigger)
        # windows closed in a burst (a backlog replayed after a restart) are tested one by one up to
        # two minutes' worth per key; only past that are they merged
        self.pending = Coalescer(capacity=s.window_max_samples, max_pending=max(1, int(120 / s.window_step_s)))
        self.references = ReferenceCache(runtime)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lw-mmd")
        self.wakeup = asyncio.Event()
        self.tested = 0
        self.ready = asyncio.Event()  # cleared while streams/recovery.py rebuilds the windows after a (re)start
        self.ready.set()

    async def handle(self, items: Sequence[Delivered]) -> None:
        await self.ready.wait()
        for d in items:
            b = d.batch
            key = (b.model_id, b.model_version)
            if b.role == "reference":
                self.references.mark_stale(key)
                continue
            self.enqueue(self.windows.add(key, b.ts_ms, b.event_ids, b.predicted, b.layers))

    def enqueue(self, closed: list[ClosedWindow]) -> None:
        """Queue closed windows for testing (coalesced per key when tests fall behind)."""
        for window in closed:
            if self.pending.put(window):
                self.runtime.metrics.coalesced.labels(window.model_id).inc()
        if closed:
            self.wakeup.set()

    def close_idle(self) -> None:
        self.enqueue(self.windows.close_idle(now_ms()))

    async def run(self) -> None:
        """The test loop: one window at a time, newest data coalesced while a test runs."""
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while (window := self.pending.pop_any()) is not None:
                try:
                    await self._test(window)
                except Exception:  # a failed test must not stop the loop
                    log.exception("testing window %s failed", window.window_id)

    async def _test(self, window: ClosedWindow) -> None:
        reference = await self.references.get(window.key, self.executor)
        if reference is None:
            return
        layers = {name: window.layers[name] for name in reference.layers if name in window.layers}
        if len(layers) != len(reference.layers):
            log.warning("window %s lacks layers %s of the reference; skipped", window.window_id,
                        sorted(set(reference.layers) - set(layers)))
            return
        s = self.settings
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        analysis = await loop.run_in_executor(
            self.executor,
            lambda: reference.tester.analyze(layers, k=s.top_k, repeats=s.detection_repeats,
                                             m=min(s.detection_m, window.n_samples), alpha=s.alpha,
                                             window_classes=window.predicted if s.shift_adjust else None),
        )
        elapsed = time.perf_counter() - started
        metrics = self.runtime.metrics
        metrics.test_seconds.observe(elapsed)
        metrics.windows.labels(window.model_id).inc()
        self.tested += 1
        records = drift_records(window, reference, analysis, s, str(reference.tester.device), elapsed * 1000)
        topic = self.runtime.topics["drift"]
        for record in records:
            metrics.detection_rate.labels(window.model_id, record["layer"]).set(record["detection_rate"])
            metrics.p_value.labels(window.model_id, record["layer"]).set(record["p_value"])
            await topic.send(key=window.model_id.encode(), value=encode("DriftResult", record))


class AlertHub:
    """Publishes alert transitions to lw.alerts, the webhook and the metrics; owns the rules."""

    def __init__(self, runtime: Any):
        s = runtime.settings
        self.runtime = runtime
        self.rules = AlertRules(detection_threshold=s.alert_detection_rate, consecutive=s.alert_consecutive,
                                clear_windows=s.alert_clear_windows, adversarial_share=s.alert_adversarial_share)
        self.webhook = Webhook(s.webhook_url, s.webhook_token, s.webhook_timeout_s, runtime.metrics) if s.webhook_url else None
        self.ready = asyncio.Event()  # cleared while streams/recovery.py restores the open alerts
        self.ready.set()

    async def publish(self, events: Sequence[AlertEvent]) -> None:
        metrics = self.runtime.metrics
        for event in events:
            record = event.to_record()
            gauge = metrics.open_alerts.labels(event.model_id, event.kind)
            gauge.inc() if event.state == "open" else gauge.dec()
            metrics.alerts.labels(event.model_id, event.kind, event.state).inc()
            log.warning("alert %s: %s", event.state, event.message)
            await self.runtime.topics["alerts"].send(key=event.model_id.encode(), value=encode("Alert", record))
            if self.webhook is not None:
                self.webhook.post(record)


class Webhook:
    """POSTs alert JSON to a URL in the background: timeout, retries with backoff, bounded queue."""

    def __init__(self, url: str, token: str, timeout_s: float, metrics: Any, attempts: int = 4, queue_size: int = 1000):
        self.url, self.token, self.timeout_s, self.metrics, self.attempts = url, token, timeout_s, metrics, attempts
        self.queue: asyncio.Queue[dict] = asyncio.Queue(maxsize=queue_size)
        self.task: asyncio.Task | None = None

    def post(self, record: dict) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._deliver_forever())
        try:
            self.queue.put_nowait({k: v for k, v in record.items()})
        except asyncio.QueueFull:
            self.metrics.webhook_failures.inc()
            log.warning("webhook queue full; alert %s not delivered to the webhook", record["alert_id"])

    async def _deliver_forever(self) -> None:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            while True:
                record = await self.queue.get()
                backoff = 0.5
                for attempt in range(1, self.attempts + 1):
                    try:
                        async with session.post(self.url, json=record) as resp:
                            if resp.status < 500:
                                break
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        pass
                    if attempt == self.attempts:
                        self.metrics.webhook_failures.inc()
                        log.warning("webhook delivery of alert %s failed after %d attempts", record["alert_id"], attempt)
                    else:
                        await asyncio.sleep(backoff)  # retry backoff
                        backoff *= 2


class ProbingStage:
    """Flags clients sending many near-identical inputs; opens a probing alert and throttles them."""

    def __init__(self, runtime: Any, hub: AlertHub):
        self.runtime, self.hub = runtime, hub
        self.detectors: dict[str, ProbingDetector] = {}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lw-probing")

    def detector(self, model_id: str) -> ProbingDetector:
        """One detector per model: embeddings of different models are not comparable."""
        if model_id not in self.detectors:
            s = self.runtime.settings
            self.detectors[model_id] = ProbingDetector(similarity=s.probing_similarity,
                                                       min_queries=s.probing_min_queries, window_s=s.probing_window_s)
        return self.detectors[model_id]

    async def handle(self, items: Sequence[Delivered]) -> None:
        s = self.runtime.settings
        batches = [d.batch for d in items if d.batch.role == "live" and PENULTIMATE in d.batch.layers]
        if not batches:
            return
        # in its own thread: the products and conversions release the GIL, so the loop (the alerts
        # agent, the results sink, Kafka) and the classifier's thread go on meanwhile
        found = await asyncio.get_running_loop().run_in_executor(self.executor, self._update, batches)
        for model_id, hit in found:
            events = self.hub.rules.on_probing(model_id, hit.client_id, int(hit.ts_ms), int(hit.count))
            await self.hub.publish(events)
            action = {"client_id": hit.client_id, "action": "throttle", "model_id": model_id,
                      "until_ms": now_ms() + int(s.probing_throttle_s * 1000),
                      "reason": f"probing: {hit.count} near-identical queries in {s.probing_window_s:.0f} s"}
            self.runtime.metrics.actions.labels("throttle").inc()
            await self.runtime.topics["actions"].send(key=hit.client_id.encode(), value=encode("Action", action))

    def _update(self, batches: Sequence[Any]) -> list[tuple[str, Any]]:
        """(model id, hit) of the batches, in order (runs in the probing thread, one call at a time)."""
        return [(b.model_id, hit) for b in batches
                for hit in self.detector(b.model_id).update(b.client_ids, b.ts_ms, b.layers[PENULTIMATE])]


def install(app: faust.App, runtime: Any) -> None:
    """Add the detection stages and the alerts agent to the app, as the settings' agent list says."""
    agents = runtime.agents
    hub = AlertHub(runtime)
    runtime.alert_hub = hub
    if "drift" in agents:
        drift = DriftStage(app, runtime)
        runtime.stages.append(drift)
        runtime.drift = drift

        @app.task
        async def drift_tests() -> None:
            await drift.run()

        @app.timer(interval=1.0)
        async def close_idle_windows() -> None:
            drift.close_idle()

    if "classify" in agents:
        from streams.stages.classify import ClassifyStage

        runtime.stages.append(ClassifyStage(runtime))

    if "probing" in agents:
        runtime.stages.append(ProbingStage(runtime, hub))

        @app.timer(interval=5.0)
        async def expire_probing() -> None:
            await hub.publish(hub.rules.expire(now_ms(), runtime.settings.probing_window_s))

    if "alerts" in agents:
        topics = app.topic(runtime.topics["drift"].get_topic_name(), runtime.topics["labels"].get_topic_name(),
                           key_serializer="raw", value_serializer="raw")

        tally = LabelTally(step_ms=int(runtime.settings.window_size_s * 1000))

        @app.agent(topics, name="layerwatch.alerts")
        async def alerts(stream: faust.StreamT) -> None:
            async for value in stream:
                await hub.ready.wait()
                try:
                    name, record = decode(value or b"")
                except CodecError as exc:
                    log.warning("alerts agent skipped an undecodable record: %s", exc)
                    continue
                if name == "DriftResult" and record["layer"] == COMBINED:
                    top = [s["event_id"] for s in record["top_samples"]]
                    await hub.publish(hub.rules.on_drift(record["model_id"], record["window_id"],
                                                         record["window_end_ms"], record["detection_rate"], top))
                elif name == "AttackLabels":
                    for verdict in tally.add(labels_from_record(record)):
                        await hub.publish(hub.rules.on_labels(*verdict))

    from streams import recovery

    recovery.install(app, runtime)


class LabelTally:
    """Classifier verdicts counted per model and time bucket, so attack_classified judges whole buckets.

    One AttackLabels record covers one micro-batch; judging each alone makes the alert flap.
    A bucket (``step_ms`` of event time) is judged once, when an event of a later bucket arrives.

    Example:
        >>> from schemas.batch import LabelBatch
        >>> def rec(ts, p):
        ...     n = len(ts)
        ...     return LabelBatch("m", "1", "c", [str(t) for t in ts], np.array(ts), np.array(p, np.float32),
        ...                       np.array(["x"] * n), np.ones(n, np.float32), np.array(["m"] * n), np.ones(n, np.float32))
        >>> tally = LabelTally(step_ms=1000)
        >>> tally.add(rec([100, 200], [0.9, 0.1]))
        []
        >>> [(m, end, n, adv) for m, end, n, adv, _ in tally.add(rec([1100], [0.9]))]
        [('m', 1000, 2, 1)]
    """

    def __init__(self, step_ms: int, top: int = 20):
        self.step_ms, self.top = step_ms, top
        self.open: dict[str, tuple[int, int, int, list[tuple[float, str]]]] = {}  # model -> bucket, n, n_adv, top

    def add(self, labels: LabelBatch) -> list[tuple[str, int, int, int, list[str]]]:
        """Count one micro-batch's verdicts; (model, bucket end, events, flagged, top event ids) of closed buckets."""
        model = labels.model_id
        ts = labels.ts_ms
        if ts.size == 0:
            return []
        p = labels.p_adversarial
        ids = np.asarray(labels.event_ids, dtype=object)
        buckets = ts // self.step_ms
        verdicts = []
        for bucket in np.unique(buckets):
            mask = buckets == bucket
            current = self.open.get(model)
            if current is not None and bucket < current[0]:
                bucket = current[0]  # late events count in the open bucket
            if current is not None and bucket > current[0]:
                verdicts.append(self._verdict(model, current))
                current = None
            b, n, adv, best = current or (int(bucket), 0, 0, [])
            pm, im = p[mask], ids[mask]
            order = np.argsort(-pm)[: self.top]
            best = sorted(best + list(zip(pm[order].tolist(), im[order].tolist())), reverse=True)[: self.top]
            self.open[model] = (b, n + pm.size, adv + int((pm >= 0.5).sum()), best)
        return verdicts

    def _verdict(self, model: str, state: tuple[int, int, int, list]) -> tuple[str, int, int, int, list[str]]:
        bucket, n, adv, best = state
        return model, int((bucket + 1) * self.step_ms), n, adv, [event for _, event in best]
