"""Prometheus metrics of one worker, in a registry of its own (so tests can build several apps).

Names follow the Prometheus conventions: the unit in the name (``_seconds``, ``_records``,
``_ratio``), ``_total`` on counters, and bounded label sets: ``model_id`` and ``layer``
(one series per tapped layer of a served model), plus small fixed enumerations (topic,
table, stage, alert kind and state, sink, action). Never an event or client id.
docs/operations.md lists every metric and the rules in deploy/prometheus/rules.yml that
read them; a rename here must be made there too (tests/deploy/test_prometheus.py checks).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

#: ``p_adversarial`` at or above this marks an event as flagged by the attack classifier.
FLAGGED_P = 0.5


class Metrics:
    """Every metric the worker exposes on `/metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("layerwatch_events_total", "Predictions consumed", ["model_id", "role"], registry=r)
        self.records = Counter("layerwatch_records_total", "Kafka records consumed", ["topic"], registry=r)
        self.last_ingest = Gauge("layerwatch_last_ingest_timestamp_seconds",
                                 "Unix time the ingest agent last consumed a prediction record", registry=r)
        self.consumer_lag = Gauge(
            "layerwatch_consumer_lag_records",
            "Records of the topic not yet committed by this worker's consumer group, summed over its "
            "assigned partitions (NaN: unknown, the broker's answer is not trustworthy)", ["topic"], registry=r)
        self.dlq = Counter("layerwatch_dead_letters_total", "Records sent to the dead-letter topic", ["topic"], registry=r)
        self.rows = Counter("layerwatch_rows_written_total", "Rows written to ClickHouse", ["table"], registry=r)
        self.store_errors = Counter("layerwatch_store_errors_total", "Failed store writes (retried)", registry=r)
        self.rows_rejected = Counter("layerwatch_rows_rejected_total",
                                     "Rows the store refused (their records were dead-lettered)", ["table"], registry=r)
        self.stage_retries = Counter("layerwatch_stage_retries_total", "Ingest steps retried after a stage failed",
                                     ["stage"], registry=r)
        self.store_up = Gauge("layerwatch_store_up", "1 when the last store write succeeded", registry=r)
        self.window_keys = Gauge("layerwatch_window_keys", "Model versions with windows in this worker", registry=r)
        self.window_bytes = Gauge("layerwatch_window_bytes", "Bytes held by open windows in this worker", registry=r)
        self.detection_rate = Gauge(
            "layerwatch_detection_ratio", "LADIS detection rate (0..1) of the last window tested",
            ["model_id", "layer"], registry=r,
        )
        self.p_value = Gauge("layerwatch_p_value", "Permutation p-value of the last window tested",
                             ["model_id", "layer"], registry=r)
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
        self.forwarded = Counter("layerwatch_records_forwarded_total",
                                 "Records forwarded to their model's home partition (repartition)", ["model_id"],
                                 registry=r)
        self.probing_seconds = Counter("layerwatch_probing_seconds_total", "Time the probing detector spent scoring",
                                       registry=r)
        self.probing_rows = Counter("layerwatch_probing_rows_total", "Predictions the probing detector scored",
                                    registry=r)
        self.untested = Counter(
            "layerwatch_windows_untested_total", "Closed windows not tested (no reference yet, layers missing, test failed)",
            ["model_id", "reason"], registry=r)
        self.test_batch = Histogram("layerwatch_drift_test_batch_windows", "Windows tested together in one batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.drift_queue = Gauge("layerwatch_drift_queue_windows", "Closed windows waiting for a test", registry=r)
        self.references_preload = Gauge("layerwatch_references_preload_pending",
                                        "References a test worker still has to load for its assigned partitions",
                                        registry=r)
        self.hidden_fits = Gauge("layerwatch_hidden_fits_pending",
                                 "References whose hidden-attack tests are being fitted (no count rows yet)", registry=r)
        self.test_seconds = Histogram(
            "layerwatch_window_test_duration_seconds", "Wall time of one window's drift tests",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r,
        )
        self.labelled = Counter("layerwatch_events_labelled_total", "Events labelled by the attack classifier", ["model_id"], registry=r)
        self.flagged = Counter("layerwatch_events_flagged_total",
                               f"Events the attack classifier flags as adversarial (p_adversarial >= {FLAGGED_P})",
                               ["model_id"], registry=r)
        self.probing = Counter("layerwatch_probing_detections_total",
                               "Clients flagged for probing (near-identical queries)", ["model_id"], registry=r)
        self.open_alerts = Gauge("layerwatch_alerts_open", "Alerts currently open", ["model_id", "kind"], registry=r)
        self.alerts = Counter("layerwatch_alert_transitions_total", "Alert transitions (open, resolved)",
                              ["model_id", "kind", "state"], registry=r)
        self.delivery_failures = Counter("layerwatch_alert_delivery_failures_total",
                                         "Alert transitions a sink gave up delivering (dead-lettered)", ["sink"], registry=r)
        self.actions = Counter("layerwatch_actions_total", "Actions published for the model server", ["action"], registry=r)

    def by_model(self, counter: Counter) -> dict[str, float]:
        """A counter's value per ``model_id`` label (summed over its other labels)."""
        out: dict[str, float] = {}
        for metric in counter.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and "model_id" in sample.labels:
                    out[sample.labels["model_id"]] = out.get(sample.labels["model_id"], 0.0) + sample.value
        return out

    def render(self) -> bytes:
        return generate_latest(self.registry)
