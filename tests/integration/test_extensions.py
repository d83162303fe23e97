"""The documented extension points, used as a newcomer would: a drift test and an alert sink in files of
their own, chosen by settings alone, run by a worker against the real broker and store.

The plugin code is taken from docs/architecture.md ("Add a drift test", "Add an alert sink"),
so the documentation cannot drift from what works.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from streams.stack import LocalStack
from tests.reliability.synthetic import Plan, PacedPublisher, publish_reference, scalar
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration]

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def documented_files() -> dict[str, str]:
    """``python`` blocks of the architecture doc whose first line is ``# <file>.py``."""
    blocks = re.findall(r"```python\n(# (\w+\.py)\n.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    return {name: code for code, name in blocks}


def test_a_drift_test_and_an_alert_sink_added_by_settings_run_in_a_worker(broker, chdb_url, tmp_path) -> None:
    files = documented_files()
    assert {"my_drift_test.py", "my_alert_sink.py"} <= set(files), sorted(files)
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for name, code in files.items():
        (plugins / name).write_text(code)
    sink_file = tmp_path / "alerts.jsonl"
    prefix = "ext."
    repo = str(Path(__file__).resolve().parents[2])
    with LocalStack(state_dir=tmp_path / "stack", clickhouse_url=chdb_url, bootstrap=broker) as stack:
        stack.env = {
            "LW_TOPIC_PREFIX": prefix, "LW_APP_ID": "layerwatch-ext", "LW_WINDOW_SIZE_S": "2", "LW_WINDOW_STEP_S": "1",
            "LW_DRIFT_TEST": "my_drift_test:fit", "LW_ALERT_SINKS": "kafka,my_alert_sink:factory",
            "MY_ALERT_SINK_FILE": str(sink_file),
            "PYTHONPATH": os.pathsep.join([str(plugins), repo, os.environ.get("PYTHONPATH", "")]),
        }
        _, url = stack.start_worker()
        publish_reference(broker, prefix + "predictions", n=200)
        wait_until(lambda: scalar(url, "SELECT count() FROM reference_embeddings FINAL") == 200, timeout=60,
                   message="the reference in the store")
        plan = Plan(base_ms=int(__import__("time").time() * 1000), n_batches=80, batch=10, spacing_ms=20,
                    shift_from_ms=0, shift=2.0)
        publisher = PacedPublisher(broker, prefix + "predictions", plan, period_s=0.05).start()
        publisher.join(timeout=60)
        wait_until(lambda: scalar(url, "SELECT count() FROM drift_windows FINAL WHERE device = 'mean-shift'") >= 3,
                   timeout=60, message="windows tested by the documented drift test")
        wait_until(lambda: sink_file.exists() and any(json.loads(line)["state"] == "open" and
                                                      json.loads(line)["kind"] == "distribution_shift"
                                                      for line in sink_file.read_text().splitlines()),
                   timeout=60, message="the alert delivered to the documented sink")
        other_tests = scalar(url, "SELECT count() FROM drift_windows FINAL WHERE device != 'mean-shift'")
        # the kafka sink's path to the store (lw.alerts, the results sink, a write) is longer than the file's
        wait_until(lambda: scalar(url, "SELECT count() FROM alerts FINAL WHERE state = 'open' "
                                       "AND kind = 'distribution_shift'") >= 1, timeout=30,
                   message="the alert stored through the kafka sink")
        stored = scalar(url, "SELECT count() FROM alerts FINAL WHERE state = 'open'")
    assert other_tests == 0  # the configured test replaced MMD, it did not run beside it
    delivered = [json.loads(line) for line in sink_file.read_text().splitlines()]
    # the shifted events may also open an attack_classified alert (the per-event score): both reach the sink
    assert any(a["kind"] == "distribution_shift" and a["model_id"] == "synth" and a["state"] == "open"
               for a in delivered), delivered
    assert stored >= 1  # the kafka sink, listed beside it, still stored the alert
