"""Starting and stopping the local stack: embedded broker plus layerwatch child processes.

Used by `layerwatch demo`, the integration tests and the benchmarks, so that all of
them run the same processes a user would start by hand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from streams.broker import EmbeddedBroker, free_port
from streams.client import http_json
from streams.shutdown import CHILDREN_TIMEOUT_S, die_with_parent


class StackError(RuntimeError):
    """A child process failed to start or died."""


def wait_for(predicate: Callable[[], bool], timeout: float, message: str, interval: float = 0.1,
             alive: Callable[[], None] | None = None) -> None:
    """Poll ``predicate`` until true; ``alive`` may raise when a watched process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if alive is not None:
            alive()
        time.sleep(interval)
    raise StackError(f"timed out after {timeout:.0f} s waiting for {message}")


@dataclass
class Child:
    """A layerwatch subcommand running as a child process."""

    name: str
    process: subprocess.Popen
    log_path: Path

    def check(self) -> None:
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            raise StackError(f"{self.name} exited with code {self.process.returncode}:\n{tail}")

    def terminate(self) -> None:
        """SIGTERM: the child stops cleanly (commits, flushes) within its own bound."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = CHILDREN_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout`` seconds."""
        self.terminate()
        self.wait_or_kill(time.monotonic() + timeout)

    def wait_or_kill(self, deadline: float) -> None:
        try:
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass
class LocalStack:
    """An embedded broker (unless a bootstrap is given) and layerwatch processes sharing one environment."""

    state_dir: Path
    log_dir: Path | None = None
    clickhouse_url: str | None = None
    bootstrap: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    broker: EmbeddedBroker | None = None
    children: list[Child] = field(default_factory=list)

    def start_broker(self) -> str:
        if self.bootstrap is None:
            log_dir = self.log_dir or self.state_dir
            log_dir.mkdir(parents=True, exist_ok=True)
            self.broker = EmbeddedBroker(log_path=log_dir / "tansu.log").start()
            self.bootstrap = self.broker.bootstrap
        return self.bootstrap

    def child_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["LW_KAFKA_BOOTSTRAP"] = self.start_broker()
        env["LW_STATE_DIR"] = str(self.state_dir)
        env.setdefault("LW_CLICKHOUSE_URL", self.clickhouse_url or f"chdb://{self.state_dir / 'store'}")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def spawn(self, name: str, args: list[str], module: str = "streams.cli", **env: str) -> Child:
        """Start `layerwatch <args>` with the stack's environment; output goes to <log_dir>/<name>.log.

        The child gets SIGTERM when this process dies, however it dies (streams/shutdown.py).
        ``module`` is the ``python -m`` entry point (tests start a worker with a fault injected).
        """
        log_dir = self.log_dir or self.state_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        log = open(log_path, "ab")
        process = subprocess.Popen([sys.executable, "-m", module, *args], env=self.child_env(**env),
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=die_with_parent)  # dies with us, even when we are SIGKILLed
        log.close()
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def start_worker(self, name: str = "worker", web_port: int | None = None, timeout: float = 90.0,
                     module: str = "streams.cli", **env: str) -> tuple[Child, str]:
        """Start a worker and wait until its /health answers; returns the child and its base URL."""
        port = web_port or free_port()
        child = self.spawn(name, ["worker"], module=module, LW_WEB_PORT=str(port), **env)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_json(f"{url}/health", timeout=1.0)[0] in (200, 503), timeout, f"{name} /health",
                 alive=child.check)
        return child, url

    def stop(self, timeout: float = CHILDREN_TIMEOUT_S) -> None:
        """Stop every child at once (each commits or flushes to the broker), then the broker.

        A child still running after ``timeout`` seconds is killed.
        """
        deadline = time.monotonic() + timeout
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.wait_or_kill(deadline)
        self.children.clear()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
            self.bootstrap = None

    def __enter__(self) -> "LocalStack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
