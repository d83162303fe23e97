"""`layerwatch demo` as a user runs it: the summary tells the detection story."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_summary_tells_the_story(demo_state, demo_classifier, tmp_path) -> None:
    summary_path = tmp_path / "summary.json"
    env = dict(os.environ, LW_STATE_DIR=str(demo_state), LW_WEB_TOKEN="demo-token", PYTHONUNBUFFERED="1")
    run = subprocess.run([sys.executable, "-m", "streams.cli", "demo", "--summary", str(summary_path)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    phases = summary["phases"]
    assert [p["attack"] for p in phases] == ["clean", "pgd", "clean", "fgsm"]
    for phase in phases:
        assert phase["windows"] >= 2, phase
        if phase["attack"] == "clean":
            assert phase["detection_rate_mean"] <= 0.15, phase
        else:  # the median: the window that straddles the attack's start counts for it with a lower rate
            assert phase["detection_rate_median"] >= 0.9 and phase["detection_rate_max"] >= 0.9, phase
    shift = [a for a in summary["alerts"] if a["kind"] == "distribution_shift"]
    for phase in phases[1::2]:
        inside = [a for a in shift if phase["start_ms"] <= a["opened_ms"] <= phase["end_ms"] + 6000]
        assert len(inside) == 1 and inside[0]["model_id"] == phase["target"], (phase, shift)
    assert len(shift) == 2
    assert all(a["window_id"] for a in shift), shift  # the window that opened each alert, for "which requests"
    assert "prober-0" in summary["throttled_clients"]
    assert summary["events_stored"] == summary["events_published"] > 5000
    assert summary["dashboard_url"].startswith("http://127.0.0.1:")
