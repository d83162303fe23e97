"""examples/fastapi_app.py as a user runs it: uvicorn process, real broker, real worker and ClickHouse (chDB).

The reference is published by the example's own ``publish_reference`` (what its
``reference`` command runs), in the test process; clean then shifted HTTP traffic goes to
the uvicorn process; the rows, the tested windows and one
distribution-shift alert are then read back from the store through the worker's API.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from streams.broker import free_port
from streams.stack import LocalStack, http_json
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fastapi_app.py"
WINDOW_S, STEP_S, RATE, BATCH, SECONDS = 4, 2, 100, 10, 8


def _query(url: str, sql: str) -> list[list]:
    status, body = http_json(f"{url}/api/query", {"sql": sql}, timeout=30)
    assert status == 200, body
    return body["rows"]


def _post(url: str, rows: np.ndarray, client: str) -> dict:
    request = urllib.request.Request(url, data=json.dumps({"inputs": rows.tolist()}).encode(),
                                     headers={"Content-Type": "application/json", "X-Client-Id": client})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _send(url: str, x: np.ndarray, seconds: float, rng: np.random.Generator) -> tuple[int, int, int]:
    """RATE events/s in requests of BATCH rows for ``seconds``; returns (start_ms, end_ms, events)."""
    start_ms, sent, started = int(time.time() * 1000), 0, time.monotonic()
    for i in range(int(seconds * RATE / BATCH)):
        rows = x[rng.integers(len(x), size=BATCH)]
        labels = _post(url, rows, client=f"client-{i % 4}")["labels"]
        assert len(labels) == BATCH and set(labels) <= {0, 1, 2, 3}
        sent += BATCH
        pause = started + (i + 1) * BATCH / RATE - time.monotonic()  # pacing, not synchronisation
        if pause > 0:
            time.sleep(pause)
    return start_ms, int(time.time() * 1000), sent


def test_fastapi_app_is_monitored_end_to_end(broker: str, chdb_url: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"fx{uuid.uuid4().hex[:6]}."
    env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"layerwatch-{prefix}", "LW_WINDOW_SIZE_S": str(WINDOW_S),
           "LW_WINDOW_STEP_S": str(STEP_S), "LW_AGENTS": "sink,drift,alerts", "LW_REFERENCE_BOOTSTRAP": "200",
           "EXAMPLE_MODEL_PATH": str(tmp_path / "mlp.pt")}
    with LocalStack(state_dir=tmp_path / "stack", clickhouse_url=chdb_url, bootstrap=broker, env=env) as stack:
        for key, value in {**env, "LW_KAFKA_BOOTSTRAP": broker}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.syspath_prepend(str(EXAMPLE.parent))
        example = _example_module("fastapi_app")  # trains the model once and saves it for the server
        port = free_port()
        log = open(tmp_path / "uvicorn.log", "wb")
        app = subprocess.Popen([sys.executable, "-m", "uvicorn", "fastapi_app:app", "--app-dir", str(EXAMPLE.parent),
                                "--port", str(port), "--log-level", "warning"],
                               env={**stack.child_env(), "PYTHONPATH": str(ROOT),
                                    "LW_TRUST_CLIENT_ID_HEADER": "true"}, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            _, url = stack.start_worker()
            assert example.publish_reference() == 1000  # what `python examples/fastapi_app.py reference` does
            example.monitor.close()
            wait_until(lambda: _query(url, "SELECT count() FROM reference_embeddings FINAL "
                                           "WHERE model_id = 'tabular-mlp'")[0][0] == 1000,
                       timeout=60, message="the reference in ClickHouse")
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: http_json(f"{base}/health", timeout=1)[0] == 200, timeout=60,
                       message="uvicorn serving the example")
            x_test = _example_module("tabular").dataset()["test"][0]
            rng = np.random.default_rng(1)
            clean = _send(f"{base}/predict", x_test, SECONDS, rng)
            shifted = _send(f"{base}/predict", x_test + 1.5, SECONDS, rng)  # every feature moved by 1.5 sd
            stats = wait_until(lambda: (s := http_json(f"{base}/health")[1]["monitor"])["sent"] == clean[2] + shifted[2]
                               and s, timeout=30, message="the monitor to deliver everything")
            assert stats["dropped"] == stats["failed"] == 0
        finally:
            app.terminate()
            app.wait(30)
        app_log = (tmp_path / "uvicorn.log").read_text()
        assert app.returncode in (0, -signal.SIGTERM) and "Traceback" not in app_log, app_log  # uvicorn re-raises SIGTERM

        total = clean[2] + shifted[2]
        served = ("SELECT client_id, count() FROM predictions FINAL WHERE model_id = 'tabular-mlp' "
                  "AND client_id != 'reference' GROUP BY client_id ORDER BY client_id")  # reference events are stored too
        wait_until(lambda: sum(n for _, n in _query(url, served)) == total, timeout=60,
                   message="every served prediction in ClickHouse")
        assert _query(url, served) == [[f"client-{i}", total // 4] for i in range(4)]

        def windows() -> list[list]:
            return _query(url, "SELECT window_start_ms, window_end_ms, detection_rate FROM drift_windows FINAL "
                               "WHERE model_id = 'tabular-mlp' AND layer = 'penultimate' ORDER BY window_end_ms")

        wait_until(lambda: windows() and windows()[-1][1] >= shifted[1] - STEP_S * 1000, timeout=60,
                   message="windows up to the end of the traffic")
        rows = np.array(windows(), dtype=np.float64)
        start, end, rate = rows[:, 0], rows[:, 1], rows[:, 2]
        in_clean = (start >= clean[0]) & (end <= clean[1])
        in_shift = (start >= shifted[0]) & (end <= shifted[1])
        assert in_clean.sum() >= 2 and in_shift.sum() >= 2
        assert rate[in_clean].max() <= 0.3, rate[in_clean]
        assert rate[in_shift].min() >= 0.9, rate[in_shift]
        alerts = wait_until(lambda: _query(url, "SELECT alert_id, ts_ms FROM alerts FINAL WHERE model_id = 'tabular-mlp' "
                                                "AND kind = 'distribution_shift' AND state = 'open'"),
                            timeout=60, message="the distribution-shift alert")
        assert len(alerts) == 1 and shifted[0] <= alerts[0][1]

        # onboarding without code: a reference computed offline, and a model that has none yet
        rng = np.random.default_rng(2)
        np.savez(tmp_path / "offline.npz", outputs=rng.dirichlet(np.ones(3), size=300).astype(np.float32),
                 penultimate=rng.normal(size=(300, 16)).astype(np.float32), truth=rng.integers(0, 3, 300))
        done = subprocess.run([sys.executable, "-m", "streams.cli", "reference", "--model-id", "offline",
                               "--model-version", "2", "--from", str(tmp_path / "offline.npz")],
                              env=stack.child_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "offline v2: 300 reference events published" in done.stdout, done.stderr
        from layerwatch import Monitor

        sent_from = int(time.time() * 1000)
        with Monitor(None, "newcomer", actions=False) as newcomer, \
                Monitor(None, "bootstrapped", actions=False) as bootstrapped:  # LW_* from the environment
            newcomer.observe(rng.normal(size=(60, 3)), {"penultimate": rng.normal(size=(60, 8))}, client_id="n")
            for _ in range(5):  # 250 events: LW_REFERENCE_BOOTSTRAP=200 makes its first 200 the reference
                bootstrapped.observe(rng.normal(size=(50, 3)), {"penultimate": rng.normal(size=(50, 8))})
            assert newcomer.flush(timeout=30) and bootstrapped.flush(timeout=30)
        sent_to = int(time.time() * 1000)

        def models() -> dict:
            status, body = http_json(f"{url}/api/models", timeout=30)
            assert status == 200, body
            return {m["model_id"]: m for m in body["models"]}

        seen = wait_until(lambda: (m := models()) and {"offline", "newcomer", "bootstrapped"} <= set(m)
                          and m["offline"]["versions"][0]["reference"]
                          # the source row lands after the reference rows: wait for both
                          and (m["bootstrapped"]["versions"][0]["reference"] or {}).get("source") == "bootstrap"
                          and m, timeout=60, message="the models overview to list every model")
        (tab,) = seen["tabular-mlp"]["versions"]
        assert (tab["version"], tab["status"], tab["events"]) == ("1", "monitored", total)
        assert tab["reference"]["rows"] == 1000 and tab["reference"]["source"] == "published"
        assert {"name": "penultimate", "dim": 32, "reference_rows": 1000} in tab["layers"]
        assert tab["last_window"]["end_ms"] >= shifted[1] - STEP_S * 1000 and seen["tabular-mlp"]["open_alerts"] == 1
        (off,) = seen["offline"]["versions"]
        assert (off["version"], off["status"], off["reference"]["rows"], off["events"]) == ("2", "monitored", 300, 0)
        (new,) = seen["newcomer"]["versions"]
        assert (new["status"], new["events"], new["reference"]) == ("awaiting reference", 60, None)
        (boot,) = seen["bootstrapped"]["versions"]
        ref = boot["reference"]
        assert (boot["status"], boot["events"], ref["rows"], ref["source"]) == ("monitored", 250, 200, "bootstrap")
        assert sent_from <= ref["from_ms"] <= ref["to_ms"] <= sent_to
        assert _query(url, "SELECT uniqExact(event_id) FROM reference_embeddings WHERE model_id = 'bootstrapped'") == [[200]]
        cli = subprocess.run([sys.executable, "-m", "streams.cli", "models", "--json"],  # via the worker's API
                             env=stack.child_env(LW_WEB_PORT=url.rsplit(":", 1)[1]), capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0 and {m["model_id"] for m in json.loads(cli.stdout)} >= {"tabular-mlp", "offline",
                                                                                           "newcomer"}, cli.stderr


def _example_module(name: str):
    """A module of examples/ (imported by path: examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLE.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
