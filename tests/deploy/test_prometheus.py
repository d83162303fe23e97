"""deploy/prometheus: the rules pass promtool, name only metrics a worker exports, and Prometheus scrapes a live worker."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from streams.demo import publish_round_trip
from streams.metrics import Metrics
from streams.stack import LocalStack
from tests.deploy.tools import binary, get_json, instant_query, prometheus
from tests.waiting import wait_until

PROM_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def test_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = binary("promtool")
    check = subprocess.run([promtool, "check", "rules", "rules.yml"], cwd=PROM_DIR, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", "rules_test.yml"], cwd=PROM_DIR, capture_output=True, text=True)
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr
    config = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=PROM_DIR, capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr


def _exported_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def test_rules_name_only_metrics_the_worker_exports() -> None:
    rules = yaml.safe_load((PROM_DIR / "rules.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = {name for expr in exprs for name in re.findall(r"(?<![:\w])(layerwatch_\w+)", expr)}
    assert used, "the rules read no layerwatch metric"
    exported = _exported_names()
    assert used <= exported, f"rules read metrics no worker exports: {sorted(used - exported)}"


def test_rules_name_layer_labels_the_worker_exports() -> None:
    """The worker labels its combined and count rows `__combined__` and `__count__` (schemas.batch)."""
    from schemas.batch import COMBINED, COUNT, PENULTIMATE

    named = set(re.findall(r'layer!?="([^"]+)"', (PROM_DIR / "rules.yml").read_text()))
    assert named and named <= {COMBINED, COUNT, PENULTIMATE}, named


def test_metric_names_follow_prometheus_conventions() -> None:
    for family in Metrics().registry.collect():
        assert family.name.startswith("layerwatch_")
        if family.type == "histogram":  # a unit in the name: time, size, or a count of windows
            assert family.name.endswith(("_seconds", "_bytes", "_windows")), family.name
        labels = {label for s in family.samples for label in s.labels}
        assert not labels & {"event_id", "client_id", "window_id", "alert_id"}, family.name


@pytest.mark.integration
@pytest.mark.slow
def test_prometheus_scrapes_a_live_worker(broker: str, tmp_path: Path) -> None:
    prefix = "prom17."
    with LocalStack(state_dir=tmp_path / "stack", bootstrap=broker,
                    env={"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": "layerwatch-prom17", "LW_LAG_INTERVAL_S": "1",
                         "LW_AGENTS": "sink"}) as stack:
        _, worker = stack.start_worker()
        port = worker.rsplit(":", 1)[1]
        shutil.copy(PROM_DIR / "rules.yml", tmp_path / "rules.yml")
        config = (
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: ['{tmp_path / 'rules.yml'}']\n"
            f"scrape_configs:\n  - job_name: layerwatch\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        )
        with prometheus(config, tmp_path / "prometheus") as prom:
            sent = publish_round_trip(broker, prefix + "predictions", n_batches=5, seed=3)

            def events() -> float:
                result = instant_query(prom, 'sum(layerwatch_events_total{job="layerwatch",model_id="synthetic"})')
                return float(result[0]["value"][1]) if result else -1.0

            wait_until(lambda: events() == len(sent), timeout=90, interval=0.5,
                       message=f"Prometheus reads {len(sent)} events from the worker")
            assert float(instant_query(prom, 'up{job="layerwatch"}')[0]["value"][1]) == 1.0

            def lag() -> list[dict]:  # caught up: a true lag of 0 (not negative, not unknown)
                return [r for r in instant_query(prom, f'layerwatch_consumer_lag_records{{topic="{prefix}predictions"}}')
                        if r["value"][1] == "0"]

            wait_until(lag, timeout=60, interval=0.5, message="consumer lag 0 through Prometheus")
            rules = get_json(f"{prom}/api/v1/rules")["data"]["groups"]
            assert sum(len(g["rules"]) for g in rules) == len(
                [r for g in yaml.safe_load((PROM_DIR / "rules.yml").read_text())["groups"] for r in g["rules"]])
