"""chDB backend: the ClickHouse engine in-process, persisted at a path.

Facts that shape it (chDB 4.4 / chdb-core 26.9):

- One process can hold one chDB path at a time ("EmbeddedServer already
  initialized with path ..."), and another process cannot open a path in use
  (``status`` file lock). Several sessions on the same path are fine: this
  store keeps a writer session and, lazily, a read-only session.
- ``async_insert`` is on by default: each session turns it off so a read right
  after a write sees the rows.
- Inserts go as ``INSERT ... SELECT ... FROM Python(<arrow table>)``. The
  streaming ``send_insert(..., 'ArrowStream')`` is as fast but swallows the
  engine's errors: a row refused by a CHECK constraint or a cast is dropped
  while ``finish()`` reports it written (chDB 4.4; tests/reliability/
  test_no_silent_loss.py). ``Python(name)`` finds ``name`` by walking Python
  frames, so the table is bound under a name unique to the call (another
  thread's insert can never be picked up). A pandas DataFrame would turn NaN
  into NULL (then 0): the table is Arrow.
- Results come back in ``Native`` format and are decoded by clickhouse-driver's
  column readers (``streams.store.native``), so both backends return the same
  Python values.
- ``SET readonly = 1`` is per session and cannot be undone from inside, so the
  read-only sessions are separate and configured once with the limits.
- Sessions on one path run queries at the same time (the engine releases the
  GIL): each thread that reads gets its own read-only session, and reads never
  wait for the writer's lock, so a 30 s query does not stall inserts
  (bench/query_isolation.py).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import sql as _sql
from .base import ReadonlyLimits, Store, columns_sql, datetimes_to_utc
from .columns import ArrayData, Column
from .errors import StoreError, error_code
from .native import decode_native

_insert_ids = itertools.count()

_SESSION_SETTINGS = (
    "SET async_insert = 0",
    "SET session_timezone = 'UTC'",
)


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """Capture what native code writes on fd 2 inside the block (chDB's engine logs there, not to Python).

    Yields a function returning the captured text; nothing reaches the terminal, so a
    failed open is reported once, in the StoreError's message.
    """
    text = {"value": ""}
    with tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: text["value"]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text["value"] = sink.read(4000).decode("utf-8", "replace").strip()


class ChdbStore(Store):
    """Store on chDB persisted at ``path`` (``chdb://PATH`` URLs)."""

    backend = "chdb"
    arrow_strings = True

    def __init__(self, path: str | Path, *, url: str, readonly_limits: ReadonlyLimits | None = None,
                 migrations_dir: Any = None) -> None:
        super().__init__(url=url, readonly_limits=readonly_limits, migrations_dir=migrations_dir)
        self.path = Path(path).expanduser().resolve()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create chDB directory {self.path}: {e}") from e
        self._lock = threading.RLock()  # the writer session
        self._session = self._open_session()
        self._ro_local = threading.local()  # this thread's (session, lock) for read-only queries
        self._ro_sessions: list[tuple[Any, threading.Lock]] = []
        self._ro_guard = threading.Lock()
        self._closed = False

    # --------------------------------------------------------------- sessions

    def _open_session(self, extra: tuple[str, ...] = ()) -> Any:
        from chdb import session as chs

        try:
            with _stderr_captured() as printed:
                session = chs.Session(str(self.path))
        except Exception as e:  # noqa: BLE001 - chDB raises RuntimeError subclasses
            # chDB prints the real cause (e.g. "Cannot lock file .../status") on fd 2 and raises a vaguer error
            msg = " ".join(f"{printed()} {e}".split())
            if "already initialized with path" in msg:
                raise StoreError(
                    f"chDB can hold one path per process and another one is open: {msg}",
                    code=error_code(msg),
                ) from e
            if "Cannot lock file" in msg:
                raise StoreError(
                    f"chDB path {self.path} is in use by another process "
                    f"(one process per path): {msg}",
                    code=error_code(msg),
                ) from e
            raise StoreError(f"cannot open chDB at {self.path}: {msg}", code=error_code(msg)) from e
        try:
            for stmt in _SESSION_SETTINGS + extra:
                session.query(stmt)
        except Exception as e:  # noqa: BLE001
            session.close()
            raise StoreError(f"cannot configure chDB session: {e}", code=error_code(str(e))) from e
        return session

    def _readonly_session(self) -> tuple[Any, threading.Lock]:
        """This thread's read-only session and its lock (held while it runs and while it closes)."""
        entry = getattr(self._ro_local, "entry", None)
        if entry is None:
            limits = self.readonly_limits.settings()
            stmts = tuple(f"SET {k} = {_sql.render_value(v)}" for k, v in limits.items())
            entry = (self._open_session(stmts), threading.Lock())
            with self._ro_guard:
                self._check_open()
                self._ro_sessions.append(entry)
            self._ro_local.entry = entry
        return entry

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.url} is closed")

    # -------------------------------------------------------------- execution

    def _execute(self, sql: str, *, readonly: bool = False, want_names: bool = True
                 ) -> tuple[list[str], list[str], list[tuple]]:
        if readonly:  # this thread's own session: never waits for the writer
            self._check_open()
            session, lock = self._readonly_session()
        else:
            session, lock = self._session, self._lock
        with lock:
            self._check_open()
            try:
                payload = session.query(sql, "Native").bytes()
            except Exception as e:  # noqa: BLE001
                msg = str(e).strip()
                code = error_code(msg)
                first = msg.splitlines()[0] if msg else type(e).__name__
                first = re.sub(r"^Code:\s*\d+\.\s*", "", first)
                raise StoreError(f"chDB error {code}: {first}" if code else f"chDB error: {first}",
                                 code=code) from e
            try:
                names, types, rows = decode_native(payload)
            except Exception as e:  # noqa: BLE001 - a type the driver cannot read
                if not _sql.is_read_statement(sql):
                    raise StoreError(f"cannot decode chDB result: {e}") from e
                return self._execute_arrow(session, sql)
            rows = datetimes_to_utc(rows, types, None)
            if not names and want_names and _sql.is_read_statement(sql):
                # Zero rows: Native output is empty; ask Arrow for the names.
                table = session.query(sql, "ArrowTable")
                names = list(table.schema.names)
                types = [str(t) for t in table.schema.types]
            return names, types, rows

    @staticmethod
    def _execute_arrow(session: Any, sql: str) -> tuple[list[str], list[str], list[tuple]]:
        table = session.query(sql, "ArrowTable")
        cols = [c.to_pylist() for c in table.columns]
        rows = list(zip(*cols)) if cols else []
        return list(table.schema.names), [str(t) for t in table.schema.types], rows

    def _insert_columns(self, table: str, n_rows: int, columns: list[Column]) -> None:
        import pyarrow as pa

        arrow = pa.table({c.name: _arrow_column(c) for c in columns})
        name = f"_lw_insert_{next(_insert_ids)}"
        names = columns_sql(columns)
        query = f"INSERT INTO {_sql.quote_table(table)} {names} SELECT {names[1:-1]} FROM Python({name})"
        with self._lock:
            self._check_open()
            globals()[name] = arrow  # Python(name) looks the table up in this module's globals
            try:
                self._session.query(query)
            except Exception as e:  # noqa: BLE001
                msg = str(e).strip()
                raise StoreError(f"chDB insert into {table!r} failed: {msg.splitlines()[0] if msg else e}",
                                 code=error_code(msg)) from e
            finally:
                del globals()[name]

    def close(self) -> None:
        with self._lock, self._ro_guard:
            if self._closed:
                return
            self._closed = True
            entries, self._ro_sessions = self._ro_sessions, []
            for session, lock in [*entries, (self._session, self._lock)]:
                with lock:  # a read in flight finishes first
                    try:
                        session.close()
                    except Exception:  # noqa: BLE001 - closing must not raise
                        pass
            self._session = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def _arrow_column(col: Column) -> Any:
    """The canonical column as a pyarrow array ClickHouse casts to its type."""
    import pyarrow as pa

    data = col.data
    if isinstance(data, (pa.Array, pa.ChunkedArray)):  # String columns normalised to Arrow already
        return data
    if isinstance(data, ArrayData):
        inner_is_str = isinstance(data.values, np.ndarray) and data.values.dtype == object
        if inner_is_str:
            values = pa.array(data.values, type=_string_type(data.values))
        elif isinstance(data.values, np.ndarray):
            values = pa.array(data.values)
        else:
            values = pa.array(list(data.values))
        if data.offsets[-1] < 2**31:
            return pa.ListArray.from_arrays(pa.array(data.offsets.astype(np.int32)), values)
        return pa.LargeListArray.from_arrays(pa.array(data.offsets), values)
    if isinstance(data, np.ndarray):
        if data.dtype == object:
            return pa.array(data, type=pa.binary() if col.has_bytes else pa.string())
        return pa.array(data)
    return pa.array(list(data))


def _string_type(values: np.ndarray) -> Any:
    import pyarrow as pa

    return pa.binary() if any(isinstance(v, bytes) for v in values) else pa.string()
