"""Run Debian's Prometheus and Alertmanager binaries for a test, on free loopback ports."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from streams.broker import free_port
from tests.waiting import wait_until


def binary(name: str) -> str:
    """The path of ``name`` on PATH; skips the test when it is not installed (.ci/run installs it)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install {name})")
    return path


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def running(args: list[str], ready_url: str, log_path: Path, timeout: float = 60.0) -> Iterator[subprocess.Popen]:
    """Start ``args``, wait until ``ready_url`` answers 200, stop the process on exit (its log in ``log_path``)."""
    log = open(log_path, "ab")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    try:
        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"{args[0]} exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            with urllib.request.urlopen(ready_url, timeout=2) as resp:
                return resp.status == 200

        wait_until(ready, timeout=timeout, interval=0.2, message=f"{Path(args[0]).name} ready")
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def prometheus(config: str, workdir: Path) -> Iterator[str]:
    """A Prometheus server with ``config`` (YAML text, written to ``workdir``); yields its base URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(config)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [binary("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"]
    with running(args, f"{url}/-/ready", workdir / "prometheus.log"):
        yield url


@contextlib.contextmanager
def alertmanager(workdir: Path, config: str = "route:\n  receiver: default\nreceivers:\n  - name: default\n") -> Iterator[str]:
    """An Alertmanager (no notification receivers, one cluster-less instance); yields its base URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "alertmanager.yml").write_text(config)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [binary("prometheus-alertmanager"), f"--config.file={workdir / 'alertmanager.yml'}",
            f"--storage.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address="]
    with running(args, f"{url}/-/ready", workdir / "alertmanager.log"):
        yield url


def instant_query(base: str, expr: str) -> list[dict[str, Any]]:
    """The result vector of a PromQL instant query through Prometheus' HTTP API."""
    body = get_json(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    assert body["status"] == "success", body
    return body["data"]["result"]
