"""What one worker process holds, declared in one place: the :class:`Runtime`.

:meth:`Runtime.create` builds all of it from the settings: the store and its writer, the
metrics, the Faust topics, the alert hub with its sinks, the detection stages that
``settings.agents`` asks for, and the recovery that rebuilds their state after a
(re)start. Nothing else adds to it; the Faust agents in :mod:`streams.app` and the web
views in :mod:`streams.web` only read it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from schemas.codec import Limits, encode
from streams.event_guard import EventGuard
from streams.kafka import TOPICS
from streams.metrics import Metrics
from streams.settings import Settings
from streams.stages.base import Stage
from streams.store import Store
from streams.writer import StoreWriter

if TYPE_CHECKING:
    from streams.alerts import AlertHub
    from streams.recovery import Recovery
    from streams.stages.drift import DriftStage
    from streams.window_tests import WindowTests

log = logging.getLogger(__name__)

AGENTS = ("sink", "drift", "windows", "classify", "probing", "alerts", "test")
#: shortcuts: ``all`` is one process doing everything; ``ingest`` and ``test`` split the window tests off
ROLES = {
    "all": frozenset({"sink", "drift", "classify", "probing", "alerts"}),
    "ingest": frozenset({"sink", "windows", "classify", "probing", "alerts"}),
    "test": frozenset({"test"}),
}
#: the agents that consume lw.predictions
INGEST_AGENTS = frozenset({"sink", "drift", "windows", "classify", "probing"})


@dataclass
class Topics:
    """The Faust topics a worker reads and writes (names from ``settings.topic``)."""

    predictions: Any
    by_model: Any  # lw.predictions-by-model: records forwarded to their model's home partition (streams/repartition.py)
    drift: Any
    labels: Any
    alerts: Any
    actions: Any
    dlq: Any
    windows: Any

    @classmethod
    def create(cls, app: Any, settings: Settings) -> "Topics":
        return cls(**{name.replace("predictions-by-model", "by_model"): app.topic(
            settings.topic(name), key_serializer="raw", value_serializer="raw", partitions=settings.topic_partitions)
            for name in TOPICS})


class Health:
    """Named problems of one process; ``/health`` is "degraded" while any is set."""

    def __init__(self) -> None:
        self._problems: dict[str, str] = {}

    def fail(self, source: str, reason: str) -> None:
        self._problems[source] = reason[:300]

    def clear(self, source: str) -> None:
        self._problems.pop(source, None)

    def reasons(self) -> list[str]:
        return [f"{source}: {reason}" for source, reason in self._problems.items()]


def parse_agents(spec: str) -> frozenset[str]:
    """A comma list of agent names and role shortcuts (all, ingest, test); unknown names are an error naming them.

    Example:
        >>> sorted(parse_agents("ingest"))
        ['alerts', 'classify', 'probing', 'sink', 'windows']
    """
    names = {a.strip() for a in spec.split(",") if a.strip()} or {"all"}
    unknown = sorted(names - set(AGENTS) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown agent(s) {', '.join(unknown)}; choose from {', '.join(ROLES)} "
                         f"or {', '.join(AGENTS)}")
    agents = frozenset().union(*(ROLES.get(n, {n}) for n in names))
    if {"drift", "windows"} <= agents:
        raise ValueError("agents drift and windows exclude each other: drift tests windows in this process, "
                         "windows publishes them to the test workers (--agents test)")
    return agents


@dataclass
class Runtime:
    """Everything the agents, stages and views of one worker process share."""

    settings: Settings
    store: Store
    writer: StoreWriter
    metrics: Metrics
    limits: Limits
    agents: frozenset[str]
    topics: Topics
    health_board: Health = field(default_factory=Health)
    alerts: "AlertHub | None" = None
    drift: "DriftStage | None" = None
    stages: list[Stage] = field(default_factory=list)
    recovery: "Recovery | None" = None
    window_tests: "WindowTests | None" = None
    guard: EventGuard | None = None  # clamps future event times, refuses layer-shape changes (ingest and recovery)

    @classmethod
    def create(cls, app: Any, settings: Settings, store: Store) -> "Runtime":
        """The runtime of ``settings``: stages from ``settings.agents``, alert sinks from ``settings.alert_sinks``."""
        from streams.alerts import AlertHub, build_sinks
        from streams.recovery import Recovery
        from streams.stages import build_stages

        metrics = Metrics()
        runtime = cls(
            settings=settings, store=store, writer=StoreWriter(store, metrics), metrics=metrics,
            limits=Limits(max_record_bytes=settings.max_record_bytes, max_rows=settings.max_batch_rows,
                          max_dim=settings.max_dim),
            agents=parse_agents(settings.agents), topics=Topics.create(app, settings),
            guard=EventGuard(settings.max_event_skew_s, on_clamped=lambda m, n: metrics.clamped.labels(m).inc(n)),
        )
        runtime.alerts = AlertHub.from_settings(settings, build_sinks(runtime), metrics)
        runtime.stages = build_stages(runtime)
        runtime.drift = next((s for s in runtime.stages if s.name == "drift"), None)  # type: ignore[assignment]
        runtime.recovery = Recovery(runtime)
        if "test" in runtime.agents:
            from streams.window_tests import WindowTests

            runtime.window_tests = WindowTests(runtime)
        return runtime

    def health(self) -> dict[str, Any]:
        """The ``/health`` body: "ok", or "degraded" with every current reason."""
        reasons = self.health_board.reasons()
        if self.writer.degraded_reason:
            reasons.insert(0, self.writer.degraded_reason)
        reasons += [f"{s.name}: {r}" for s in self.stages if (r := s.health())]
        return {"status": "degraded" if reasons else "ok", "reason": "; ".join(reasons), "agents": sorted(self.agents)}

    async def dead_letter(self, record: dict[str, Any]) -> None:
        """Send one DeadLetter record to ``lw.dlq`` (the results sink stores it) and count it."""
        log.warning("dead letter %s:%s:%s: %s", record["topic"], record["partition"], record["offset"], record["reason"])
        self.metrics.dlq.labels(record["topic"]).inc()
        key = f"{record['topic']}:{record['partition']}:{record['offset']}".encode()
        await self.topics.dlq.send(key=key, value=encode("DeadLetter", record))

    async def start(self) -> None:
        for stage in self.stages:
            await stage.start()
        if self.window_tests is not None:
            await self.window_tests.start()

    async def stop(self) -> None:
        """Stop the stages and close the alert sinks (called once, when the app shuts down)."""
        for stage in self.stages:
            try:
                await stage.stop()
            except Exception:  # noqa: BLE001 - stop the others all the same
                log.exception("stopping stage %s failed", stage.name)
        if self.window_tests is not None:
            await self.window_tests.stop()
        if self.alerts is not None:
            await self.alerts.close()
