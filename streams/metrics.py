"""Prometheus metrics of one worker, in a registry of its own (so tests can build several apps)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


class Metrics:
    """Every metric the worker exposes on `/metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("layerwatch_events_total", "Predictions consumed", ["model_id", "role"], registry=r)
        self.records = Counter("layerwatch_records_total", "Kafka records consumed", ["topic"], registry=r)
        self.dlq = Counter("layerwatch_dead_letters_total", "Records sent to the dead-letter topic", ["topic"], registry=r)
        self.rows = Counter("layerwatch_rows_written_total", "Rows written to ClickHouse", ["table"], registry=r)
        self.store_errors = Counter("layerwatch_store_errors_total", "Failed store writes (retried)", registry=r)
        self.rows_rejected = Counter("layerwatch_rows_rejected_total",
                                     "Rows the store refused (their records were dead-lettered)", ["table"], registry=r)
        self.stage_retries = Counter("layerwatch_stage_retries_total", "Ingest steps retried after a stage failed",
                                     ["stage"], registry=r)
        self.store_up = Gauge("layerwatch_store_up", "1 when the last store write succeeded", registry=r)
        self.detection_rate = Gauge(
            "layerwatch_detection_rate", "LADIS detection rate of the last window", ["model_id", "layer"], registry=r
        )
        self.p_value = Gauge("layerwatch_p_value", "Permutation p-value of the last window", ["model_id", "layer"], registry=r)
        self.windows = Counter("layerwatch_windows_tested_total", "Windows tested", ["model_id"], registry=r)
        self.clamped = Counter("layerwatch_events_clamped_total",
                               "Events whose time was ahead of their record's by more than LW_MAX_EVENT_SKEW_S, clamped",
                               ["model_id"], registry=r)
        self.late = Counter("layerwatch_events_late_total", "Live events that arrived after their windows closed",
                            ["model_id"], registry=r)
        self.coalesced = Counter(
            "layerwatch_windows_coalesced_total", "Windows merged into a later one because tests fell behind", ["model_id"], registry=r
        )
        self.windows_published = Counter("layerwatch_windows_published_total",
                                         "Closed windows published to lw.windows for the test workers", ["model_id"],
                                         registry=r)
        self.windows_downsampled = Counter("layerwatch_windows_downsampled_total",
                                           "Published windows sampled down to fit LW_MAX_WINDOW_BYTES", ["model_id"],
                                           registry=r)
        self.test_seconds = Histogram(
            "layerwatch_test_seconds", "Wall time of one window's MMD tests",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r,
        )
        self.labelled = Counter("layerwatch_events_labelled_total", "Events labelled by the attack classifier", ["model_id"], registry=r)
        self.open_alerts = Gauge("layerwatch_open_alerts", "Alerts currently open", ["model_id", "kind"], registry=r)
        self.alerts = Counter("layerwatch_alerts_total", "Alert transitions", ["model_id", "kind", "state"], registry=r)
        self.webhook_failures = Counter("layerwatch_webhook_failures_total", "Webhook deliveries that failed after retries", registry=r)
        self.actions = Counter("layerwatch_actions_total", "Actions published for the model server", ["action"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
