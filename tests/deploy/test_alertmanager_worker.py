"""A worker's distribution-shift alert reaches Debian's Alertmanager through the `alertmanager` sink, and resolves there."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kafka import KafkaProducer

from schemas import encode
from streams.stack import LocalStack
from tests.deploy.tools import alertmanager, get_json
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PREFIX = "am17."


def drift_record(k: int, rate: float, start_ms: int) -> dict:
    end = start_ms + k * 5_000
    return {"window_id": f"cnn:1:{end - 10_000}:{end}", "model_id": "cnn", "model_version": "1", "layer": "__combined__",
            "window_start_ms": end - 10_000, "window_end_ms": end, "n_reference": 500, "n_window": 60, "mmd2": rate / 50,
            "p_value": 0.001 if rate > 0.5 else 0.6, "detection_rate": rate, "alpha": 0.05, "bandwidth": 1.0,
            "n_permutations": 200, "compute_ms": 5.0, "device": "cpu", "top_samples": []}


def send(bootstrap: str, records: list[dict]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for r in records:
        producer.send(PREFIX + "drift", key=b"cnn", value=encode("DriftResult", r))
    producer.flush()
    producer.close()


def test_worker_alert_opens_and_resolves_in_alertmanager(broker: str, tmp_path: Path) -> None:
    with alertmanager(tmp_path / "am") as am, LocalStack(state_dir=tmp_path / "stack", bootstrap=broker) as stack:
        stack.env = {"LW_TOPIC_PREFIX": PREFIX, "LW_APP_ID": "layerwatch-am17", "LW_AGENTS": "alerts",
                     "LW_ALERT_SINKS": "alertmanager", "LW_ALERTMANAGER_URL": am, "LW_ALERTMANAGER_RESEND_S": "5"}
        child, _ = stack.start_worker()
        start = int(time.time() * 1000) - 120_000

        def ours() -> list[dict]:
            return [a for a in get_json(f"{am}/api/v2/alerts") if a["labels"].get("service") == "layerwatch"]

        send(broker, [drift_record(k, 0.95, start) for k in (1, 2, 3)])  # 2 consecutive windows open it
        opened = wait_until(ours, timeout=90, interval=0.5, message="the worker's alert in Alertmanager")
        labels = opened[0]["labels"]
        assert labels["alertname"] == "LayerwatchDistributionShift" and labels["model_id"] == "cnn"
        assert labels["severity"] in ("warning", "critical") and labels["alert_id"].startswith("distribution_shift/cnn/")
        assert opened[0]["status"]["state"] == "active"
        assert "detection rate 0.95" in opened[0]["annotations"]["summary"]

        send(broker, [drift_record(k, 0.05, start) for k in (4, 5)])  # 2 clean windows resolve it
        wait_until(lambda: not ours(), timeout=90, interval=0.5, message="the alert resolved in Alertmanager")
        child.check()
