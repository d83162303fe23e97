"""A Tansu broker that kcat (librdkafka) can talk to, for the foreign-client test.

librdkafka 2.0.2 (Debian's kcat) opens every connection with ApiVersions v3 and cannot
parse Tansu's v3 answer ("Protocol read buffer underflow for ApiVersion v3 at 274/279"),
and it ignores ``api.version.request=false`` for brokers >= 0.10. So the broker here
listens on one port and advertises another, where a small relay forwards every byte
both ways, except that it answers librdkafka's (client id ``rdkafka``) ApiVersions
requests of v3 and above itself with the standard "UNSUPPORTED_VERSION, use up to v2"
reply; librdkafka then asks again with v2, which Tansu answers correctly. Every other
client goes through the relay untouched.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
from pathlib import Path

from streams.broker import broker_answers, free_port, tansu_binary
from tests.waiting import wait_until

_API_VERSIONS = 18
_UNSUPPORTED_VERSION = 35


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class KcatCompatibleBroker:
    """Tansu on a private port behind a relay on the advertised (bootstrap) port."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.inner_port, self.port = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._server: socket.socket | None = None
        self._stop = threading.Event()

    def __enter__(self) -> KcatCompatibleBroker:
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.5)
        threading.Thread(target=self._accept, daemon=True).start()
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{self.inner_port}",
             "--advertised-listener-url", f"tcp://{self.bootstrap}", "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_until(lambda: self.process.poll() is not None or broker_answers(self.bootstrap, timeout=0.5),
                       timeout=20, message="the Tansu broker behind the relay")
        except TimeoutError:
            pass
        if self.process.poll() is not None or not broker_answers(self.bootstrap, timeout=0.5):
            self.__exit__()
            raise RuntimeError("the Tansu broker behind the relay did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.inner_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while True:
                head = _recv_exact(client, 4)
                if head is None:
                    break
                body = _recv_exact(client, struct.unpack(">i", head)[0])
                if body is None:
                    break
                api_key, version, correlation = struct.unpack_from(">hhi", body)
                (id_len,) = struct.unpack_from(">h", body, 8)
                client_id = body[10:10 + id_len] if id_len > 0 else b""
                if api_key == _API_VERSIONS and version >= 3 and client_id.startswith(b"rdkafka"):
                    reply = struct.pack(">ihihhh", correlation, _UNSUPPORTED_VERSION, 1, _API_VERSIONS, 0, 2)
                    client.sendall(struct.pack(">i", len(reply)) + reply)
                    continue
                upstream.sendall(head + body)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _responses(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while chunk := upstream.recv(1 << 16):
                client.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.close()
                except OSError:
                    pass
