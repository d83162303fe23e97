"""ClickHouse server backend: clickhouse-driver over the native protocol.

clickhouse-driver is synchronous and a ``Client`` is not thread-safe, so each
thread gets its own pair of clients (``threading.local``): a plain one for
queries and one with ``use_numpy`` for inserts, whose numeric and String
columns then go out as numpy buffers (``execute(..., columnar=True)``).
Array columns have no numpy path in the driver; they are handed over as
Python lists. Clients connect lazily, so a store can be opened while the
server is down; every call then raises ``StoreUnavailable`` until it is back
(the driver reconnects by itself on the next call).
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from typing import Any

import numpy as np

from . import sql as _sql
from .base import ReadonlyLimits, Store, columns_sql, datetimes_to_utc
from .columns import ArrayData, Column
from .errors import StoreError, StoreUnavailable, redact

log = logging.getLogger(__name__)

# Server error codes that mean "try again later" rather than "your request is wrong".
_RETRYABLE_CODES = {
    202,  # TOO_MANY_SIMULTANEOUS_QUERIES
    209,  # SOCKET_TIMEOUT
    210,  # NETWORK_ERROR
    242,  # TABLE_IS_READ_ONLY
    425,  # SYSTEM_ERROR
}
_UTC_NAMES = {"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Universal", "Zulu", "Etc/Universal", "Etc/Zulu",
              "GMT", "Etc/GMT", ""}


class _ArrayWarningFilter(logging.Filter):
    """Silence the driver's per-insert 'NumPy support is not implemented for Array(...)'."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "NumPy support is not implemented" not in record.getMessage()


logging.getLogger("clickhouse_driver.columns.service").addFilter(_ArrayWarningFilter())


class ClickHouseStore(Store):
    """Store on a ClickHouse server (``clickhouse://`` / ``clickhouses://`` URLs)."""

    backend = "clickhouse"

    def __init__(
        self,
        host: str,
        port: int,
        database: str,
        *,
        user: str = "default",
        password: str = "",
        secure: bool = False,
        verify: bool = True,
        ca_certs: str | None = None,
        connect_timeout: float = 5.0,
        send_receive_timeout: float = 300.0,
        compression: bool | str = False,
        url: str,
        readonly_limits: ReadonlyLimits | None = None,
        migrations_dir: Any = None,
    ) -> None:
        super().__init__(url=url, readonly_limits=readonly_limits, migrations_dir=migrations_dir)
        _sql.quote_identifier(database)
        self.host, self.port, self.database = host, int(port), database
        self._secrets = [password] if password else []
        self._client_kwargs: dict[str, Any] = dict(
            host=host,
            port=int(port),
            user=user or "default",
            password=password or "",
            secure=bool(secure),
            verify=bool(verify),
            connect_timeout=connect_timeout,
            send_receive_timeout=send_receive_timeout,
            sync_request_timeout=min(5.0, send_receive_timeout),
            compression=compression,
            client_name="layerwatch",
        )
        if ca_certs:
            self._client_kwargs["ca_certs"] = ca_certs
        self._local = threading.local()
        self._all_clients: list[Any] = []
        self._lock = threading.Lock()
        self._db_ready = False
        self._closed = False

    # ---------------------------------------------------------------- clients

    def _new_client(self, database: str, numpy: bool = False) -> Any:
        from clickhouse_driver import Client

        settings = {"use_numpy": True} if numpy else {}
        client = Client(database=database, settings=settings, **self._client_kwargs)
        with self._lock:
            self._all_clients.append(client)
        return client

    def _ensure_database(self) -> None:
        """Create the database if missing (once per store; again after an
        UNKNOWN_DATABASE error, e.g. a server whose data was wiped)."""
        if self._db_ready:
            return
        from clickhouse_driver import Client

        boot = Client(database="", **self._client_kwargs)
        try:
            with self._errors():
                exists = boot.execute(
                    "SELECT count() FROM system.databases WHERE name = "
                    + _sql.quote_string(self.database)
                )[0][0]
                if not exists:
                    boot.execute(f"CREATE DATABASE IF NOT EXISTS {_sql.quote_identifier(self.database)}")
        finally:
            boot.disconnect()
        self._db_ready = True

    def _client(self, numpy: bool = False) -> Any:
        if self._closed:
            raise StoreError(f"store {self.url} is closed")
        attr = "writer" if numpy else "reader"
        client = getattr(self._local, attr, None)
        if client is None:
            self._ensure_database()
            client = self._new_client(self.database, numpy=numpy)
            setattr(self._local, attr, client)
        return client

    # ----------------------------------------------------------------- errors

    def _errors(self) -> "_ErrorMapper":
        return _ErrorMapper(self)

    # -------------------------------------------------------------- execution

    def _execute(self, sql: str, *, readonly: bool = False, want_names: bool = True
                 ) -> tuple[list[str], list[str], list[tuple]]:
        settings = self.readonly_limits.settings() if readonly else None
        with self._errors():
            client = self._client()
            rows, cols = client.execute(sql, with_column_types=True, settings=settings)
            tz = _server_timezone(client)
        names = [c[0] for c in cols]
        types = [c[1] for c in cols]
        if rows:
            rows = datetimes_to_utc(rows, types, None if tz in _UTC_NAMES else tz)
        return names, types, rows

    def _insert_columns(self, table: str, n_rows: int, columns: list[Column]) -> None:
        data = [_driver_column(c, n_rows) for c in columns]
        query = f"INSERT INTO {_sql.quote_table(table)} {columns_sql(columns)} VALUES"
        with self._errors():
            self._client(numpy=True).execute(query, data, columnar=True, types_check=False)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            clients, self._all_clients = self._all_clients, []
        for c in clients:
            try:
                c.disconnect()
            except Exception:  # noqa: BLE001 - closing must not raise
                pass


class _ErrorMapper:
    """Context manager turning driver / socket errors into StoreError /
    StoreUnavailable with the password removed from the message."""

    def __init__(self, store: ClickHouseStore) -> None:
        self.store = store

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, StoreError) or not isinstance(exc, Exception):
            return False
        from clickhouse_driver import errors as cd

        secrets = self.store._secrets
        where = f"{self.store.host}:{self.store.port}"
        text = redact(str(exc).strip() or type(exc).__name__, secrets)
        code = getattr(exc, "code", None)
        if code == 81:  # UNKNOWN_DATABASE: create it again on the next call
            self.store._db_ready = False
        if isinstance(exc, (cd.NetworkError, cd.SocketTimeoutError, cd.UnexpectedPacketFromServerError,
                            EOFError, socket.timeout, ConnectionError, OSError)):
            err: StoreError = StoreUnavailable(
                f"ClickHouse server {where} unavailable: {text}", code=code
            )
        elif isinstance(exc, cd.ServerException):
            detail = redact(str(getattr(exc, "message", "") or text), secrets).strip()
            first = detail.splitlines()[0] if detail else text
            first = re.sub(r"\s*Stack trace:.*$", "", first)
            cls = StoreUnavailable if code in _RETRYABLE_CODES else StoreError
            err = cls(f"ClickHouse error {code}: {first}", code=code)
        else:
            err = StoreError(f"ClickHouse client error: {type(exc).__name__}: {text}", code=code)
        cause_text = str(exc)
        if any(s and s in cause_text for s in secrets):
            raise err from None
        raise err from exc


def _server_timezone(client: Any) -> str:
    info = getattr(client.connection, "server_info", None)
    if info is None:
        return "UTC"
    try:
        return info.get_timezone() or "UTC"
    except Exception:  # noqa: BLE001
        return getattr(info, "timezone", "UTC") or "UTC"


def _driver_column(col: Column, n_rows: int) -> Any:
    """The canonical column in the form the numpy-enabled driver writes fastest."""
    data = col.data
    if isinstance(data, ArrayData):
        lists = data.to_lists()
        out = np.empty(n_rows, dtype=object)
        for i, row in enumerate(lists):
            out[i] = row
        return out
    if isinstance(data, np.ndarray):
        return data
    out = np.empty(n_rows, dtype=object)
    for i, v in enumerate(data):
        out[i] = v
    return out
