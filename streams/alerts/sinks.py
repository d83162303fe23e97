"""Alert destinations: the ``AlertSink`` protocol, the Kafka sink and how sinks are built from settings.

Every alert transition the hub publishes goes to each configured sink. ``LW_ALERT_SINKS``
lists them: built-in names (``kafka``: the ``lw.alerts`` topic, which the results sink
stores in ClickHouse; ``webhook``: JSON POSTs to ``LW_WEBHOOK_URL``; ``alertmanager``: Alertmanager's v2 API at
``LW_ALERTMANAGER_URL``) or your own as
``package.module:factory``. A factory is called with the worker's runtime and returns a
sink, or None when the sink is not configured (the webhook without a URL).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol, runtime_checkable

from schemas.codec import encode
from streams.alerts.rules import AlertEvent
from streams.plugins import load, names

log = logging.getLogger(__name__)

BUILTIN_SINKS = {
    "kafka": "streams.alerts.sinks:KafkaSink",
    "webhook": "streams.alerts.webhook:webhook_sink",
    "alertmanager": "streams.alerts.alertmanager:alertmanager_sink",
}


@runtime_checkable
class AlertSink(Protocol):
    """A destination of alert transitions.

    ``send`` is awaited on the worker's event loop for every transition, in order; a sink
    that talks to a slow service queues internally and delivers from its own task, so one
    destination never holds up another. ``close`` delivers or gives up on what is queued.
    Optionally, ``keep_open(events)`` is called with the alerts still open after a restart
    (their openings), for a sink whose destination must keep hearing about them.
    """

    name: str

    async def send(self, event: AlertEvent) -> None: ...

    async def close(self) -> None: ...


SinkFactory = Callable[[Any], "AlertSink | None"]


class KafkaSink:
    """Publishes each transition as an Avro ``Alert`` record to ``lw.alerts``, keyed by model id."""

    name = "kafka"

    def __init__(self, runtime: Any):
        self.topic = runtime.topics.alerts

    async def send(self, event: AlertEvent) -> None:
        await self.topic.send(key=event.model_id.encode(), value=encode("Alert", event.to_record()))

    async def close(self) -> None:
        return None


def build_sinks(runtime: Any) -> list[AlertSink]:
    """The sinks ``LW_ALERT_SINKS`` names, in order, leaving out the unconfigured ones."""
    sinks: list[AlertSink] = []
    for spec in names(runtime.settings.alert_sinks):
        factory: Any = load(spec, BUILTIN_SINKS, "LW_ALERT_SINKS")
        sink = factory(runtime)
        if sink is not None:
            sinks.append(sink)
    log.info("alert sinks: %s", ", ".join(s.name for s in sinks) or "none")
    return sinks
