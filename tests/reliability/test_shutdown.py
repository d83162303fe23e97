"""Clean shutdown, tested by pid: SIGTERM or SIGINT stops a layerwatch process and everything it started
within 10 s; the worker commits its offsets and frees its port and the chDB lock; the model server publishes
what it still held; SIGKILL of the demo's process leaves no child running (streams/shutdown.py)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from streams.broker import broker_answers, free_port
from streams.client import http_json
from streams.stack import LocalStack
from tests.reliability.processes import alive, cmdline, descendants, port_free
from tests.reliability.synthetic import publish_reference, scalar
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

BOUND_S = 10.0
_run = itertools.count()


def _stopped_within(pids: set[int], since: float, bound: float = BOUND_S) -> float:
    """Seconds from ``since`` until none of ``pids`` lives; fails past ``bound``."""
    wait_until(lambda: not any(alive(p) for p in pids), timeout=bound + 5, interval=0.05,
               message=f"processes {sorted(pids)} to exit")
    elapsed = time.monotonic() - since
    assert elapsed <= bound, f"stopped after {elapsed:.1f} s"
    return elapsed


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]), **extra)


def test_worker_sigterm_commits_offsets_and_frees_port_and_chdb_lock(broker, chdb_url, tmp_path) -> None:
    from streams.recovery import committed_offsets
    from streams.settings import Settings

    prefix = f"stop{next(_run)}."
    group = f"layerwatch-{prefix}"
    with LocalStack(state_dir=tmp_path / "stack", clickhouse_url=chdb_url, bootstrap=broker) as stack:
        stack.env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": group, "LW_TOPIC_PARTITIONS": "2",
                     "LW_AGENTS": "sink"}
        worker, url = stack.start_worker()
        port = int(url.rsplit(":", 1)[1])
        sent = publish_reference(broker, prefix + "predictions", n=200)  # 4 records
        wait_until(lambda: scalar(url, "SELECT count() FROM predictions") == len(sent), timeout=60,
                   message="the records in the store")
        pid = worker.process.pid
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        elapsed = _stopped_within({pid} | descendants(pid), started)
        assert worker.process.wait() == 0
        print(f"\nworker stopped {elapsed:.2f} s after SIGTERM")
        assert port_free(port)

        from aiokafka import TopicPartition

        settings = Settings(kafka_bootstrap=broker)
        tps = [TopicPartition(prefix + "predictions", p) for p in range(2)]
        committed = asyncio.run(committed_offsets(settings, group, tps))
        assert sum(o or 0 for o in committed.values()) == 4, committed  # every record consumed is committed

        # the chDB lock is free: another process opens the path and sees every row
        path = chdb_url.removeprefix("chdb://")
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from streams.store import open_store; s = open_store(sys.argv[1]); "
             "print(s.query('SELECT count() FROM predictions')[0][0]); s.close()", chdb_url],
            env=_env(), capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, probe.stderr[-2000:]
        assert int(probe.stdout.strip()) == len(sent), (path, probe.stdout)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_broker_command_stops_with_its_tansu_child(signum, tmp_path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "broker", "--listen", f"127.0.0.1:{port}"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: broker_answers(f"127.0.0.1:{port}", timeout=0.5), timeout=30, message="the broker")
        children = descendants(proc.pid)
        assert any("tansu" in cmdline(c) for c in children), [cmdline(c) for c in children]
        started = time.monotonic()
        proc.send_signal(signum)
        _stopped_within({proc.pid} | children, started)
        assert proc.wait() == 128 + signum
        assert port_free(port)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_sigint_publishes_what_it_held(broker, demo_state, tmp_path) -> None:
    from kafka import KafkaConsumer, TopicPartition

    from schemas.codec import decode

    prefix = f"stopserve{next(_run)}."
    port = free_port()
    with LocalStack(state_dir=demo_state, log_dir=tmp_path, bootstrap=broker) as stack:
        stack.env = {"LW_TOPIC_PREFIX": prefix, "LW_TOPIC_PARTITIONS": "1"}
        server = stack.spawn("server", ["serve", "--port", str(port), "--models", "mlp"])
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_json(f"{base}/health", timeout=1.0)[0] == 200, timeout=120,
                   message="the model server")
        n = 0
        for i in range(5):  # fewer than flush_every: they wait for the flush timer or the stop
            body = json.dumps({"inputs": [[0.1 * (i % 10)] * 64] * 3}).encode()
            request = urllib.request.Request(f"{base}/predict?model=mlp", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as resp:
                n += len(json.loads(resp.read())["labels"])
        pid = server.process.pid
        started = time.monotonic()
        os.kill(pid, signal.SIGINT)
        _stopped_within({pid} | descendants(pid), started)
        assert port_free(port)

    consumer = KafkaConsumer(bootstrap_servers=broker, group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=3000)
    tp = TopicPartition(prefix + "predictions", 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    events = sum(len(decode(r.value)[1]["event_ids"]) for r in consumer)
    consumer.close()
    assert events == n == 15


def _demo(demo_state: Path, tmp_path: Path) -> subprocess.Popen:
    env = _env(LW_STATE_DIR=str(demo_state))
    return subprocess.Popen([sys.executable, "-m", "streams.cli", "demo", "--phases", "clean:120"], env=env,
                            cwd=tmp_path, stdout=open(tmp_path / "demo.log", "wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def _demo_running(proc: subprocess.Popen, log: Path) -> set[int]:
    """The demo's processes once the broker, the worker and the model server are all up."""
    def up() -> set[int]:
        if proc.poll() is not None:
            raise AssertionError(f"demo exited {proc.returncode}: {log.read_text(errors='replace')[-3000:]}")
        kids = descendants(proc.pid)
        commands = " ".join(cmdline(k) for k in kids)
        ready = "model server" in log.read_text(errors="replace")
        return kids if ready and "tansu" in commands and " worker" in commands and " serve" in commands else set()

    return wait_until(up, timeout=180, interval=0.2, message="the demo's broker, worker and model server")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_demo_stops_every_process_it_started(signum, demo_state, demo_classifier, tmp_path) -> None:
    proc = _demo(demo_state, tmp_path)
    try:
        kids = _demo_running(proc, tmp_path / "demo.log")
        started = time.monotonic()
        proc.send_signal(signum)
        elapsed = _stopped_within({proc.pid} | kids, started)
        print(f"\ndemo and {len(kids)} children stopped {elapsed:.2f} s after {signal.Signals(signum).name}")
        assert proc.wait() == (128 + signum if signum != signal.SIGKILL else -signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        for k in descendants(proc.pid):
            os.kill(k, signal.SIGKILL)
