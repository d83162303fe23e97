"""Alerts: debounced rules (rules.py), the hub that sends their transitions (hub.py) to sinks (sinks.py, webhook.py)."""

from streams.alerts.hub import AlertHub
from streams.alerts.rules import AlertEvent, AlertRules
from streams.alerts.sinks import AlertSink, KafkaSink, build_sinks

__all__ = ["AlertEvent", "AlertHub", "AlertRules", "AlertSink", "KafkaSink", "build_sinks"]
