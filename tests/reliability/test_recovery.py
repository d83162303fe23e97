"""streams/recovery.py against the real broker, without a worker: the rebuilt windows equal the lost ones.

A stream is published with explicit record timestamps (200 ms apart, as a paced
publisher would stamp them, sent in one go), a consumer group's offset is committed in
the middle, and the rebuild must leave the WindowManager with exactly the open windows
— same ids, same event counts — that a worker fed with the whole stream up to the
committed offset had, read from the window horizon only (not from the beginning:
Tansu answers offsets_for_times with offset 0, so the binary search is exercised).
"""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from schemas import encode_batch
from schemas.codec import Limits
from streams.alerts.hub import AlertHub
from streams.alerts.rules import AlertEvent, AlertRules
from streams.metrics import Metrics
from streams.settings import Settings
from workers.windows import WindowManager
from tests.reliability.synthetic import MODEL, Plan, make_batch

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

_run = itertools.count()


class FakeDrift:
    """The drift stage's public face to recovery (pause, replay, enqueue, resume), over a real WindowManager."""

    def __init__(self, settings: Settings) -> None:
        s = settings
        self.windows = WindowManager(size_s=s.window_size_s, step_s=s.window_step_s, capacity=s.window_max_samples,
                                     min_samples=s.window_min_samples, count_trigger=s.window_count_trigger)
        self.ready = asyncio.Event()
        self.ready.set()
        self.enqueued: list = []

    def pause(self) -> None:
        self.ready.clear()

    def resume(self) -> None:
        self.ready.set()

    def replay(self, batch, partition: int) -> list:
        return self.windows.add((batch.model_id, batch.model_version), batch.ts_ms, batch.event_ids, batch.predicted,
                                batch.layers)

    @property
    def lateness_ms(self) -> int:
        return self.windows.lateness_ms

    def open_windows(self) -> int:
        return sum(len(self.windows.open_windows(k)) for k in self.windows.keys())

    def drop_partitions(self, partitions: set[int]) -> int:
        return 0

    def enqueue(self, windows: list) -> None:
        self.enqueued.extend(windows)


class FakeWriter:
    def __init__(self, stored_windows: set[str], open_alerts: list[tuple]) -> None:
        self.stored_windows, self.open_alerts = stored_windows, open_alerts

    async def query(self, sql: str, params: dict | None = None, **_) -> list[tuple]:
        if "drift_windows" in sql:
            return [(w,) for w in params["ids"] if w in self.stored_windows]
        if "FROM alerts" in sql:
            return self.open_alerts
        raise AssertionError(sql)


def _publish(bootstrap: str, topic: str, plan: Plan, t0_ms: int, period_ms: int) -> None:
    from kafka import KafkaProducer

    rng = np.random.default_rng(3)
    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    for i in range(plan.n_batches):
        batch = make_batch(plan.ids(i), plan.ts(i), rng)
        p.send(topic, key=MODEL.encode(), value=encode_batch(batch), partition=0, timestamp_ms=t0_ms + i * period_ms)
    p.send(topic, key=b"junk", value=b"\x00\x00\x00\x00\x01garbage", partition=0, timestamp_ms=t0_ms + plan.n_batches * period_ms)
    p.flush()
    p.close()


async def _commit(bootstrap: str, group: str, offsets: dict) -> None:
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        c.assign(list(offsets))
        await c.commit(offsets)
    finally:
        await c.stop()


def test_rebuild_reads_the_horizon_only_and_restores_the_open_windows(broker) -> None:
    from aiokafka import TopicPartition

    from streams.kafka import ensure_topics
    from streams.recovery import Recovery

    prefix = f"rec{next(_run)}."
    settings = Settings(kafka_bootstrap=broker, topic_prefix=prefix, topic_partitions=2, app_id=f"lw-{prefix}",
                        window_size_s=4, window_step_s=2, window_max_samples=256, window_min_samples=50)
    ensure_topics(settings)
    topic = settings.topic("predictions")
    base, period_ms = 1_900_000_000_000, 200
    plan = Plan(base_ms=base, n_batches=150, batch=10, spacing_ms=20)
    _publish(broker, topic, plan, t0_ms=1_800_000_000_000, period_ms=period_ms)
    committed = 100  # the old worker finished batches 0..99

    # what the old worker's windows looked like when it died
    lost = FakeDrift(settings)
    closed_before = []
    for i in range(committed):
        closed_before += lost.windows.add((MODEL, "1"), plan.ts(i), plan.ids(i), np.zeros(plan.batch, np.int32),
                                          {"penultimate": np.zeros((plan.batch, 4), np.float32)})
    key = (MODEL, "1")
    lost_open = {s: r.seen for s, r in lost.windows._keys[key].open.items()}
    assert lost_open  # windows were open at the crash

    drift = FakeDrift(settings)
    alert = AlertEvent("distribution_shift/synth/w1", base, MODEL, "distribution_shift", "open", "warning", window_id="w1")
    open_row = (alert.alert_id, alert.ts_ms, MODEL, alert.kind, alert.severity, "w1", [], "", "m")
    last_closed = closed_before[-1].window_id  # closed just before the crash: its result never landed
    stored = {w.window_id for w in closed_before[:-1]}
    hub = AlertHub(AlertRules(consecutive=2, clear_windows=2), [], Metrics())
    runtime = SimpleNamespace(settings=settings, limits=Limits(), writer=FakeWriter(stored, [open_row]),
                              agents=frozenset({"drift", "alerts"}), drift=drift, alerts=hub)

    async def scenario() -> Recovery:
        await _commit(broker, settings.app_id, {TopicPartition(topic, 0): committed})
        recovery = Recovery(runtime)
        from faust.types import TP  # Faust's own tuple type, as the signal hands it

        await recovery.on_assigned(None, [TP(topic, 0), TP(topic, 1)])
        assert not drift.ready.is_set() and not hub.ready.is_set()  # the stages wait for the rebuild
        await asyncio.wait_for(asyncio.gather(*recovery.tasks), 60)
        return recovery

    recovery = asyncio.run(scenario())
    stats = recovery.history[-1]
    assert not stats.error, stats.error
    assert drift.ready.is_set() and hub.ready.is_set()
    # horizon: size + step + lateness = 7 s of record time = 35 batches before the last committed one
    horizon_batches = (4000 + 2000 + 1000) // period_ms
    start, end = stats.ranges[f"{topic}:0"]
    assert end == committed and start == committed - 1 - horizon_batches, stats.ranges
    assert stats.records == horizon_batches + 1 and stats.events == stats.records * plan.batch
    rebuilt_open = {s: r.seen for s, r in drift.windows._keys[key].open.items()}
    assert rebuilt_open == lost_open
    # closed during the rebuild: only the whole window whose result is missing is tested again
    assert [w.window_id for w in drift.enqueued] == [last_closed]
    assert stats.windows_retested == 1 and stats.windows_dropped >= 1
    # the open alert is back: a window over the threshold does not open a second one, two under it resolve it
    assert stats.alerts_restored == 1
    rules = hub.rules
    assert rules.on_drift(MODEL, "w9", base + 9, 0.99) == []
    rules.on_drift(MODEL, "w10", base + 10, 0.0)
    resolved = rules.on_drift(MODEL, "w11", base + 11, 0.0)
    assert [(e.alert_id, e.state) for e in resolved] == [(alert.alert_id, "resolved")]
