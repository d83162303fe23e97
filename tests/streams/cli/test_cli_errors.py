"""A newcomer's careless hour (issue 20), each case as the `layerwatch` subprocess a user runs.

Every error is one line on stderr that names the culprit, with a non-zero exit and no
traceback (unless --debug). Most cases fail before any service is needed; the cases that
read the store while a worker holds it use the session broker.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from streams.broker import free_port

ROOT = Path(__file__).resolve().parents[3]


def layerwatch(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 120.0) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LW_")}
    full_env.update({"PYTHONPATH": str(ROOT), "LW_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
                     "LW_WEB_PORT": str(free_port())})
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], env=full_env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line(run: subprocess.CompletedProcess, *culprits: str, code: int = 2) -> str:
    """Exit ``code``, stderr exactly one line without a traceback, naming every culprit."""
    lines = run.stderr.strip().splitlines()
    assert run.returncode == code, (run.returncode, run.stderr[-2000:])
    assert len(lines) == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    return lines[0]


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """An existing, migrated, empty chDB store (created in a child: chDB holds one path per process)."""
    path = tmp_path / "store"
    subprocess.run([sys.executable, "-c", "import sys; from streams.store import open_store; "
                    "s = open_store('chdb://' + sys.argv[1]); s.migrate(); s.close()", str(path)],
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, timeout=120)
    return path


@pytest.mark.parametrize("args, culprits", [
    (["serve", "--no-publish", "--models", "doesnotexist"], ["--models doesnotexist", "cnn, resnet, mlp"]),
    (["serve", "--no-publish", "--preprocess", "junk"], ["--preprocess junk", "bitdepth"]),
    (["serve", "--no-publish", "--port", "70000"], ["--port", "70000"]),
    (["simulate", "--rate", "-5"], ["--rate", "-5"]),
    (["simulate", "--models", "nope"], ["--models nope"]),
    (["study", "layers", "--model", "nope"], ["--model nope"]),
    (["query", "@drift_since", "-p", "layer"], ["'layer'", "NAME=VALUE"]),
    (["query", "SELECT 1 FORMAT TSV"], ["FORMAT", "--format"]),
    (["query", "@no_such_query"], ["no_such_query"]),
    (["worker", "--agents", "sink,bogus"], ["bogus"]),
])
def test_bad_arguments_are_one_line(args, culprits) -> None:
    assert_one_line(layerwatch(*args), *culprits)


@pytest.mark.parametrize("command, variable, value, culprit", [
    ("worker", "LW_WINDOW_SIZE_S", "-5", "LW_WINDOW_SIZE_S=-5.0"),
    ("config", "LW_WINDOW_SIZE_S", "-5", "LW_WINDOW_SIZE_S=-5.0"),
    ("config", "LW_WINDOW_STEP_S", "30", "LW_WINDOW_STEP_S=30.0"),
    ("worker", "LW_WEB_PORT", "0", "LW_WEB_PORT=0"),
    ("config", "LW_ALERT_DETECTION_RATE", "1.5", "LW_ALERT_DETECTION_RATE=1.5"),
    ("config", "LW_TOPIC_PARTITIONS", "four", "LW_TOPIC_PARTITIONS='four'"),
])
def test_bad_settings_name_the_variable(command, variable, value, culprit) -> None:
    assert_one_line(layerwatch(command, env={variable: value}), culprit)


def test_serve_on_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = assert_one_line(layerwatch("serve", "--no-publish", "--port", str(port)), f"127.0.0.1:{port}", "--port")
    assert "in use" in line


def test_simulate_against_a_dead_server() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert_one_line(layerwatch("simulate", "--url", url, "--phases", "clean:1"), url, "layerwatch serve")


def test_commands_that_need_the_broker_say_so() -> None:
    port = free_port()
    for args in (["reference"], ["worker"], ["serve", "--port", str(free_port())]):
        assert_one_line(layerwatch(*args, env={"LW_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"}), f"127.0.0.1:{port}")


def test_a_typo_in_the_store_path_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "stor"
    for args in (["query", "SELECT 1"], ["report", "--out", str(tmp_path / "r")]):
        assert_one_line(layerwatch(*args, env={"LW_CLICKHOUSE_URL": f"chdb://{missing}"}), str(missing))
    assert not missing.exists()


def test_report_of_an_unknown_model(store_dir: Path, tmp_path: Path) -> None:
    run = layerwatch("report", "--model", "nope", "--out", str(tmp_path / "r"),
                     env={"LW_CLICKHOUSE_URL": f"chdb://{store_dir}", "LW_STATE_DIR": str(tmp_path / "state")})
    assert_one_line(run, "--model nope")


def test_a_store_held_without_a_worker(store_dir: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from streams.store import open_store; "
                               "s = open_store('chdb://' + sys.argv[1]); s.ping(); print('held', flush=True); "
                               "sys.stdin.read()", str(store_dir)],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        run = layerwatch("query", "SELECT 1", env={"LW_CLICKHOUSE_URL": f"chdb://{store_dir}"})
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # chDB itself may print its lock error on stderr before ours: the last line is layerwatch's
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert str(store_dir) in last and "no worker answers" in last and "LW_WEB_PORT" in last, last


def test_debug_shows_the_traceback() -> None:
    run = layerwatch("--debug", "query", "@drift_since", "-p", "layer")
    assert run.returncode == 2 and "Traceback" in run.stderr and "NAME=VALUE" in run.stderr.splitlines()[-1]
    run = layerwatch("query", "@drift_since", "-p", "layer", env={"LW_LOG_LEVEL": "debug"})
    assert run.returncode == 2 and "Traceback" in run.stderr


def test_help_shows_the_defaults() -> None:
    run = layerwatch("simulate", "--help")
    assert run.returncode == 0
    text = " ".join(run.stdout.split())
    for default in ("(default: http://127.0.0.1:8080)", "(default: 50.0)", "(default: 4)", "(default: 0)"):
        assert default in text, default


def test_config_shows_effective_values(tmp_path: Path) -> None:
    run = layerwatch("config", env={"LW_STATE_DIR": str(tmp_path / "state"), "LW_WEB_TOKEN": "s3cret"})
    assert run.returncode == 0, run.stderr
    assert f'"classifier_path": "{tmp_path / "state" / "classifier" / "classifier.skops"}"' in run.stdout
    assert "s3cret" not in run.stdout


# ------------------------------------------------------------- with a worker holding the store


def first_line(process: subprocess.Popen, timeout: float) -> str:
    """The first line ``process`` prints on stdout ("" when it exits or stays silent for ``timeout`` s)."""
    import select

    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline() if ready else ""


@pytest.mark.integration
def test_store_readers_go_through_the_worker(broker: str, tmp_path: Path) -> None:
    """query and report work while a worker holds the chDB path; the worker says it is ready, in plain text."""
    store, port = tmp_path / "store", free_port()
    env = {"LW_KAFKA_BOOTSTRAP": broker, "LW_CLICKHOUSE_URL": f"chdb://{store}", "LW_WEB_PORT": str(port),
           "LW_STATE_DIR": str(tmp_path / "state"), "LW_APP_ID": f"cli-errors-{port}"}
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LW_")}
    full_env.update(env, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    worker = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=full_env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = first_line(worker, timeout=180.0)
        if not ready.startswith("layerwatch worker ready: dashboard http://127.0.0.1:"):
            worker.terminate()
            raise AssertionError(f"no ready line: {ready!r}; stderr: {worker.communicate(timeout=60)[1][-3000:]}")
        assert f":{port}/" in ready
        run = layerwatch("query", "SELECT count() FROM predictions", "--format", "csv", env=env)
        assert run.returncode == 0 and run.stdout.split() == ["count()", "0"], run.stderr
        run = layerwatch("query", "SELECT nosuchcolumn FROM predictions", env=env)
        assert_one_line(run, "nosuchcolumn")
        run = layerwatch("report", "--model", "nope", "--out", str(tmp_path / "r"), env=env)
        assert_one_line(run, "--model nope")
        run = layerwatch("report", "--out", str(tmp_path / "r"), env=env)
        assert run.returncode == 2 and "no figure written" in run.stderr.strip().splitlines()[-1], run.stderr
        assert "Cannot lock" not in run.stderr + run.stdout
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=60)
    assert "\x1b[" not in err, err[-2000:]  # no terminal control codes when not on a terminal
    assert "Idempotence will be disabled" not in err
    assert not re.search(r"^\S+ \S+ INFO (faust|mode|aiokafka)", err, re.M), err[-2000:]
