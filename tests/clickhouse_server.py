"""Run a real ClickHouse server as a child process for tests.

Debian's ``clickhouse-server`` (18.16, in /usr/sbin) or, when only the single
``clickhouse`` binary exists, ``clickhouse server``. The server gets a minimal
config in a temp dir: 127.0.0.1 only, free TCP and HTTP ports, data and tmp
paths under the dir, a users.xml with ``default`` (empty password), a
``readonly`` user/profile and ``layerwatch`` (password ``PASSWORD``) for the
credential tests. The packaged service scripts are not used.

``stop()`` / ``start()`` keep the data dir and the ports, so a test can take
the server away and bring it back with its data (outage tests).

    with ClickHouseServer() as server:
        store = open_store(server.url)

Run by hand: ``python tests/clickhouse_server.py`` prints the URL and waits.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import urllib.request
from pathlib import Path

try:
    from tests.waiting import wait_until
except ImportError:  # run as a script, or tests/ itself on sys.path
    from waiting import wait_until  # type: ignore[no-redef]

USER = "layerwatch"
PASSWORD = "lw-test-pa55word"

_CONFIG = """<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>{dir}/log/clickhouse-server.log</log>
        <errorlog>{dir}/log/clickhouse-server.err.log</errorlog>
        <size>100M</size>
        <count>2</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <tcp_port>{tcp_port}</tcp_port>
    <http_port>{http_port}</http_port>
    <path>{dir}/data/</path>
    <tmp_path>{dir}/tmp/</tmp_path>
    <user_files_path>{dir}/user_files/</user_files_path>
    <format_schema_path>{dir}/format_schemas/</format_schema_path>
    <users_config>{dir}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <max_connections>256</max_connections>
    <max_concurrent_queries>64</max_concurrent_queries>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mlock_executable>false</mlock_executable>
</yandex>
"""

_USERS = """<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <max_memory_usage>2000000000</max_memory_usage>
            <max_threads>2</max_threads>
            <!-- idle connections notice a shutdown within 1 s (default 10 s) -->
            <poll_interval>1</poll_interval>
        </default>
        <readonly>
            <readonly>1</readonly>
        </readonly>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
        <readonly>
            <password></password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>readonly</profile>
            <quota>default</quota>
        </readonly>
        <{user}>
            <password>{password}</password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </{user}>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_server_command() -> list[str] | None:
    """The command that runs a ClickHouse server, or None when not installed.

    ``LW_CLICKHOUSE_SERVER_BIN`` overrides; /usr/sbin is searched too (it is
    not on a normal user's PATH).
    """
    env = os.environ.get("LW_CLICKHOUSE_SERVER_BIN")
    if env:
        return [env] if not env.endswith("/clickhouse") else [env, "server"]
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/usr/local/bin"])
    exe = shutil.which("clickhouse-server", path=search)
    if exe:
        return [exe]
    exe = shutil.which("clickhouse", path=search)
    if exe:
        return [exe, "server"]
    return None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask the kernel to SIGKILL the server if the test process dies."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


class ClickHouseServer:
    """A clickhouse-server child process with its own config, data and ports."""

    def __init__(self, workdir: str | Path | None = None, *, database: str = "layerwatch_test",
                 startup_timeout: float = 30.0, command: list[str] | None = None) -> None:
        cmd = command or find_server_command()
        if not cmd:
            raise FileNotFoundError("no clickhouse-server (or clickhouse) binary found")
        self.command = cmd
        self._own_dir = workdir is None
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="lw-clickhouse-"))
        self.database = database
        self.startup_timeout = startup_timeout
        self.host = "127.0.0.1"
        self.tcp_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.tcp_port:
            self.http_port = free_port()
        self.user, self.password = USER, PASSWORD
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._write_config()
        atexit.register(self.stop)

    # ------------------------------------------------------------------ config

    def _write_config(self) -> None:
        for sub in ("data", "tmp", "user_files", "format_schemas", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "config.xml"
        self.config_path.write_text(_CONFIG.format(
            dir=self.dir, tcp_port=self.tcp_port, http_port=self.http_port))
        (self.dir / "users.xml").write_text(_USERS.format(user=USER, password=PASSWORD))

    # -------------------------------------------------------------------- URLs

    @property
    def url(self) -> str:
        """``clickhouse://127.0.0.1:PORT/<database>`` (user ``default``, no password)."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """The store URL of another database on this server."""
        return f"clickhouse://{self.host}:{self.tcp_port}/{database}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    # ---------------------------------------------------------------- lifecycle

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ping(self) -> bool:
        """True when the HTTP interface answers ``/ping``."""
        try:
            with urllib.request.urlopen(self.http_url + "/ping", timeout=1.0) as r:
                return r.status == 200 and r.read().strip() == b"Ok."
        except OSError:
            return False

    def start(self) -> "ClickHouseServer":
        """Start the server (no-op when running) and wait until it answers."""
        with self._lock:
            if self.is_running():
                return self
            out = open(self.dir / "log" / "stdout.log", "ab")
            main = threading.current_thread() is threading.main_thread()
            self._proc = subprocess.Popen(
                [*self.command, f"--config-file={self.config_path}"],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # PDEATHSIG fires when the forking *thread* ends: only from the main thread.
                preexec_fn=_die_with_parent if main else None,
            )
            out.close()
            proc = self._proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise _ServerExited(proc.returncode)
            return self.ping()

        try:
            wait_until(ready, timeout=self.startup_timeout, interval=0.05,
                       message=f"clickhouse-server on {self.http_url} to answer /ping")
        except _ServerExited as e:
            self.stop()
            raise RuntimeError(
                f"clickhouse-server exited with code {e.args[0]}:\n{self.log_tail()}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL), as a crash would."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> "ClickHouseServer":
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and delete its directory if this object created it."""
        self.stop()
        atexit.unregister(self.stop)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        chunks = []
        for name in ("stdout.log", "clickhouse-server.err.log"):
            p = self.dir / "log" / name
            if p.exists():
                text = p.read_text(errors="replace").splitlines()[-lines:]
                chunks.append(f"--- {name}\n" + "\n".join(text))
        return "\n".join(chunks)

    def __enter__(self) -> "ClickHouseServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<ClickHouseServer {self.url} {state}>"


class _ServerExited(BaseException):
    """Raised from the readiness check when the child died. A BaseException so
    that wait_until (which retries on Exception) stops at once."""


if __name__ == "__main__":
    with ClickHouseServer() as server:
        print(server.url, "http:", server.http_url, "dir:", server.dir, flush=True)
        try:
            server._proc.wait()
        except KeyboardInterrupt:
            pass
