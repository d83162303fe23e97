"""The alert hub: owns the rules, sends their transitions to every sink and keeps the alert metrics."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

from streams.alerts.rules import AlertEvent, AlertRules
from streams.alerts.sinks import AlertSink

log = logging.getLogger(__name__)


class AlertHub:
    """Debounced alert rules plus their destinations.

    ``ready`` is cleared while recovery restores the open alerts after a (re)start
    (:meth:`pause` / :meth:`restore` / :meth:`resume`), so no result is judged against
    rules that have not been restored yet.
    """

    def __init__(self, rules: AlertRules, sinks: Sequence[AlertSink], metrics: Any):
        self.rules, self.sinks, self.metrics = rules, list(sinks), metrics
        self.ready = asyncio.Event()
        self.ready.set()

    @classmethod
    def from_settings(cls, settings: Any, sinks: Sequence[AlertSink], metrics: Any) -> "AlertHub":
        rules = AlertRules(detection_threshold=settings.alert_detection_rate, consecutive=settings.alert_consecutive,
                           clear_windows=settings.alert_clear_windows,
                           adversarial_share=settings.alert_adversarial_share, count_alpha=settings.count_alpha,
                           window_step_ms=int(settings.window_step_s * 1000))
        return cls(rules, sinks, metrics)

    def pause(self) -> None:
        self.ready.clear()

    def resume(self) -> None:
        self.ready.set()

    def restore(self, events: Sequence[AlertEvent]) -> int:
        """Replay stored transitions into the rules (oldest first); returns how many alerts are open.

        The open-alerts gauge is set from the result, so it survives a restart too.
        """
        n = self.rules.restore(events)
        still_open = list(self.rules.open_alerts())
        for event in still_open:
            self.metrics.open_alerts.labels(event.model_id, event.kind).inc()
        for sink in self.sinks:  # sinks that hold state at their destination (Alertmanager) pick them up again
            keep_open = getattr(sink, "keep_open", None)
            if keep_open is not None:
                keep_open(still_open)
        return n

    async def publish(self, events: Sequence[AlertEvent]) -> None:
        """Count each transition and send it to every sink, in order."""
        for event in events:
            gauge = self.metrics.open_alerts.labels(event.model_id, event.kind)
            gauge.inc() if event.state == "open" else gauge.dec()
            self.metrics.alerts.labels(event.model_id, event.kind, event.state).inc()
            log.log(logging.WARNING if event.state == "open" else logging.INFO, "alert %s: %s", event.state,
                    event.message)
            for sink in self.sinks:
                await sink.send(event)

    async def close(self) -> None:
        for sink in self.sinks:
            try:
                await sink.close()
            except Exception:  # noqa: BLE001 - one sink's failure must not keep the others from closing
                log.exception("closing alert sink %s failed", sink.name)
