"""The store interface: one small API over a ClickHouse server and chDB.

Both backends share everything but the transport: parameter rendering
(``streams.store.sql``), input normalisation (``streams.store.columns``),
the migrator and the read-only guard live here; a backend implements
``_execute`` (run one statement, return names, types and rows),
``_insert_columns`` (ship normalised columns), ``ping`` and ``close``.
"""

from __future__ import annotations

import abc
import contextlib
import datetime as _dt
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

from . import sql as _sql
from .columns import Column, normalize
from .errors import StoreError

#: The schema directory of a source checkout: deploy/clickhouse/NNN_*.sql.
DEFAULT_MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "clickhouse"

MIGRATIONS_TABLE = "schema_migrations"
#: Held (it exists) while one process applies migrations: workers starting together must not run
#: the same migration at once (002 copies, drops and renames a table).
MIGRATION_LOCK_TABLE = "schema_migrations_lock"
MIGRATION_LOCK_WAIT_S = 120.0  # how long a process waits for another's migrations
MIGRATION_LOCK_STALE_S = 300.0  # a lock this old was left by a process that died mid-migration
_TABLE_EXISTS = 57

log = logging.getLogger(__name__)
_MIGRATION_FILE = re.compile(r"^(\d+)_[A-Za-z0-9_\-]+\.sql$")


class Result(NamedTuple):
    """Column names and rows of a query; unpacks as ``names, rows``."""

    columns: list[str]
    rows: list[tuple]


@dataclass(frozen=True)
class ReadonlyLimits:
    """Bounds applied to ``query(..., readonly=True)``."""

    max_result_rows: int = 100_000
    max_result_bytes: int = 256 * 1024 * 1024
    max_execution_time: int = 30  # seconds
    max_memory_usage: int = 1024 * 1024 * 1024  # bytes per query (an aggregation past it fails, the worker lives)
    max_rows_to_read: int = 1_000_000_000
    max_threads: int = 1  # a user query takes one core; ingestion keeps the other

    def settings(self) -> dict[str, Any]:
        """ClickHouse settings enforcing these limits (readonly last: nothing can change them after it)."""
        return {
            "max_result_rows": int(self.max_result_rows),
            "max_result_bytes": int(self.max_result_bytes),
            "result_overflow_mode": "throw",
            "max_execution_time": int(self.max_execution_time),
            "timeout_overflow_mode": "throw",
            "max_memory_usage": int(self.max_memory_usage),
            "max_rows_to_read": int(self.max_rows_to_read),
            "read_overflow_mode": "throw",
            "max_threads": int(self.max_threads),
            "readonly": 1,
        }


def migration_files(directory: Path | str | None = None) -> list[tuple[str, Path]]:
    """(version, path) of every ``NNN_*.sql`` in ``directory``, in numeric order.

    The version is the file name without ``.sql`` (e.g. ``001_init``).
    """
    d = Path(directory) if directory is not None else DEFAULT_MIGRATIONS_DIR
    if not d.is_dir():
        raise StoreError(f"migrations directory not found: {d}")
    found = []
    for p in d.iterdir():
        m = _MIGRATION_FILE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p.stem, p))
    found.sort()
    return [(version, path) for _, version, path in found]


class Store(abc.ABC):
    """A ClickHouse-compatible store. Thread-safe; errors raise ``StoreError``
    (``StoreUnavailable`` when a server cannot be reached)."""

    #: 'clickhouse' or 'chdb'
    backend: str = ""
    #: String columns may arrive at ``_insert_columns`` as pyarrow arrays (see ``columns.normalize``)
    arrow_strings: bool = False

    def __init__(self, *, url: str, readonly_limits: ReadonlyLimits | None = None,
                 migrations_dir: Path | str | None = None) -> None:
        self.url = url  # never holds a password (see open_store)
        self.readonly_limits = readonly_limits or ReadonlyLimits()
        self.migrations_dir = Path(migrations_dir) if migrations_dir else None
        self._types_cache: dict[str, dict[str, str]] = {}
        self._types_lock = threading.Lock()
        self._migrate_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ backend hooks

    @abc.abstractmethod
    def _execute(self, sql: str, *, readonly: bool = False, want_names: bool = True
                 ) -> tuple[list[str], list[str], list[tuple]]:
        """Run one rendered statement; return (names, types, rows).

        With ``readonly`` the engine runs it with ``ReadonlyLimits.settings()``.
        """

    @abc.abstractmethod
    def _insert_columns(self, table: str, n_rows: int, columns: list[Column]) -> None:
        """Insert normalised columns (all of length ``n_rows``) into ``table``."""

    def ping(self) -> bool:
        """True when the store answers a trivial query."""
        try:
            return self._execute("SELECT 1", want_names=False)[2] == [(1,)]
        except StoreError:
            return False

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections / the embedded session. Idempotent."""

    # ------------------------------------------------------------------ queries

    def query(self, sql: str, params: Mapping[str, Any] | None = None, *,
              readonly: bool = False) -> list[tuple]:
        """Run one statement with ``{name}`` parameters; return its rows.

        ``readonly=True`` accepts only one SELECT over layerwatch's tables
        (``streams.store.policy``; else ``QueryRefused``) and runs it with
        ``readonly=1`` and the store's ``ReadonlyLimits`` (result rows/bytes,
        rows read, memory, execution time).
        DateTime values come back as naive UTC datetimes; String values as str,
        or bytes when not valid UTF-8.
        """
        return self._run(sql, params, readonly, want_names=False).rows

    def query_columns(self, sql: str, params: Mapping[str, Any] | None = None, *,
                      readonly: bool = False) -> Result:
        """Like ``query`` but also returns the column names: ``Result(columns, rows)``."""
        return self._run(sql, params, readonly, want_names=True)

    def _run(self, sql: str, params: Mapping[str, Any] | None, readonly: bool,
             want_names: bool) -> Result:
        rendered = _sql.render(sql, params)
        if readonly:
            rendered = _sql.check_readonly(rendered)
        elif _sql.has_inline_data(rendered):
            # The native protocol answers INSERT ... VALUES with a request for
            # data blocks; the driver would wait until its timeout.
            raise StoreError("INSERT with inline VALUES/FORMAT data: use Store.insert()")
        names, _types, rows = self._execute(rendered, readonly=readonly, want_names=want_names)
        if readonly and len(rows) > self.readonly_limits.max_result_rows:
            raise StoreError(
                f"read-only query returned more than {self.readonly_limits.max_result_rows} rows"
            )
        return Result(list(names), rows)

    # ------------------------------------------------------------------ inserts

    def table_columns(self, table: str, *, refresh: bool = False) -> dict[str, str]:
        """Column name -> ClickHouse type of ``table`` (cached)."""
        with self._types_lock:
            cached = self._types_cache.get(table)
        if cached is not None and not refresh:
            return cached
        if "." in table:
            db, name = table.split(".", 1)
            where = f"database = {_sql.quote_string(db)} AND table = {_sql.quote_string(name)}"
        else:
            where = f"database = currentDatabase() AND table = {_sql.quote_string(table)}"
        _, _, rows = self._execute(
            f"SELECT name, type FROM system.columns WHERE {where}", want_names=False
        )
        if not rows:
            raise StoreError(f"unknown table {table!r} (did migrate() run?)")
        types = {str(name): str(typ) for name, typ in rows}
        with self._types_lock:
            self._types_cache[table] = types
        return types

    def insert(self, table: str, columns: Mapping[str, Any]) -> int:
        """Insert rows given column-wise (numpy arrays or lists); return the row count.

        Columns not given take their defaults. ``Array(Float32)`` columns take a
        2-D float32 array (one row per value) or a sequence of 1-D arrays.
        ``DateTime`` takes epoch seconds, datetime64 or datetime objects (naive
        = UTC). Inserts into ReplacingMergeTree tables are idempotent per key.
        """
        _sql.quote_table(table)
        types = self.table_columns(table)
        n, cols = normalize(table, types, columns, arrow=self.arrow_strings)
        if n == 0:
            return 0
        self._insert_columns(table, n, cols)
        return n

    # --------------------------------------------------------------- migrations

    def migrate(self, directory: Path | str | None = None) -> list[str]:
        """Apply ``NNN_*.sql`` files not yet recorded in ``schema_migrations``, in
        order; return the versions applied now (empty when up to date)."""
        files = migration_files(directory or self.migrations_dir)
        with self._migrate_lock, self._migration_lock():
            self._execute(
                f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} "
                "(version String, applied_at DateTime) "
                "ENGINE = ReplacingMergeTree() ORDER BY version",
                want_names=False,
            )
            _, _, rows = self._execute(
                f"SELECT DISTINCT version FROM {MIGRATIONS_TABLE}", want_names=False
            )
            done = {r[0] for r in rows}
            applied: list[str] = []
            for version, path in files:
                if version in done:
                    continue
                for stmt in _sql.split_statements(path.read_text(encoding="utf-8")):
                    try:
                        self._execute(stmt, want_names=False)
                    except StoreError as e:
                        raise type(e)(f"migration {version} failed: {e}", code=e.code) from e
                now = int(_dt.datetime.now(_dt.timezone.utc).timestamp())
                self.insert(MIGRATIONS_TABLE, {"version": [version], "applied_at": [now]})
                applied.append(version)
                with self._types_lock:
                    self._types_cache.clear()
            return applied

    @contextlib.contextmanager
    def _migration_lock(self) -> Any:
        """Hold the database's migration lock: creating a table is atomic, so one process at a time
        succeeds; the others wait for it to drop the table (and take over a lock left by a dead one)."""
        deadline = time.monotonic() + MIGRATION_LOCK_WAIT_S
        while True:
            try:
                self._execute(f"CREATE TABLE {MIGRATION_LOCK_TABLE} (held UInt8) ENGINE = Memory", want_names=False)
                break
            except StoreError as e:
                if e.code != _TABLE_EXISTS:
                    raise
            try:
                _, _, rows = self._execute(
                    "SELECT now() - metadata_modification_time FROM system.tables WHERE database = currentDatabase() "
                    f"AND name = '{MIGRATION_LOCK_TABLE}'", want_names=False)
            except StoreError:
                rows = [(0,)]
            if not rows:  # dropped meanwhile: try again at once
                continue
            age = float(rows[0][0])
            if age > MIGRATION_LOCK_STALE_S:
                log.warning("taking over the migration lock, held for %.0f s by a process that did not finish", age)
                self._execute(f"DROP TABLE IF EXISTS {MIGRATION_LOCK_TABLE}", want_names=False)
                continue
            if time.monotonic() > deadline:
                raise StoreError(f"another process has been applying migrations for {age:.0f} s "
                                 f"(table {MIGRATION_LOCK_TABLE}); try again when it is done")
            time.sleep(0.2)  # polling the other process's lock: nothing here to wait on
        try:
            yield
        finally:
            self._execute(f"DROP TABLE IF EXISTS {MIGRATION_LOCK_TABLE}", want_names=False)

    def applied_migrations(self) -> list[str]:
        """Versions recorded in ``schema_migrations``, sorted."""
        _, _, rows = self._execute(
            f"SELECT DISTINCT version FROM {MIGRATIONS_TABLE} ORDER BY version", want_names=False
        )
        return [r[0] for r in rows]


def datetimes_to_utc(rows: list[tuple], types: Sequence[str], naive_tz: str | None
                     ) -> list[tuple]:
    """Make DateTime values naive UTC, the store's contract on both backends.

    clickhouse-driver's decoders return naive values in the server's time zone
    (``naive_tz``; None when that is UTC) and aware values for columns typed
    ``DateTime('Zone')``. Only DateTime / Nullable(DateTime) columns are touched.
    """
    idx = [i for i, t in enumerate(types)
           if t.startswith("DateTime") or t.startswith("Nullable(DateTime")]
    if not idx or not rows:
        return rows
    needs = naive_tz is not None or any(
        "DateTime(" in types[i] and "DateTime64" not in types[i] for i in idx) or any(
        isinstance(rows[0][i], _dt.datetime) and rows[0][i].tzinfo is not None for i in idx)
    if not needs:
        return rows
    import pytz

    tz = pytz.timezone(naive_tz) if naive_tz else None
    utc = _dt.timezone.utc

    def conv(v: Any) -> Any:
        if not isinstance(v, _dt.datetime):
            return v
        if v.tzinfo is not None:
            return v.astimezone(utc).replace(tzinfo=None)
        if tz is not None:
            return tz.localize(v).astimezone(utc).replace(tzinfo=None)
        return v

    out = []
    for r in rows:
        r = list(r)
        for i in idx:
            r[i] = conv(r[i])
        out.append(tuple(r))
    return out


def columns_sql(columns: Sequence[Column]) -> str:
    """``(`a`, `b`)`` for an INSERT column list."""
    return "(" + ", ".join(_sql.quote_identifier(c.name) for c in columns) + ")"
