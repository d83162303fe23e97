"""`layerwatch query`: read-only SQL through the worker's API when it owns the chDB path, else directly."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from streams.client import WorkerClient
from streams.settings import Settings


def resolve_sql(sql: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """'@name' names a shipped query in deploy/clickhouse/queries; its declared defaults fill in."""
    if not sql.startswith("@"):
        return sql, params
    from streams.store.queries import prepare_shipped

    return prepare_shipped(sql[1:], params, coerce=True)


class WorkerStore:
    """The read side of a store, answered by the worker that holds the chDB path.

    Offers ``query`` and ``query_columns`` as :class:`streams.store.Store` does (read-only),
    so code written against a store (``layerwatch report``) runs unchanged while a worker
    holds the path: chDB opens one path in one process only.
    """

    def __init__(self, client: WorkerClient):
        self.client = client
        self.url = f"the worker at {client.url}"

    def query_columns(self, sql: str, params: dict[str, Any] | None = None, *, readonly: bool = True
                      ) -> tuple[list[str], list[list]]:
        return self.client.query(sql, params or {})

    def query(self, sql: str, params: dict[str, Any] | None = None, *, readonly: bool = True) -> list[tuple]:
        return [tuple(row) for row in self.client.query(sql, params or {})[1]]

    def close(self) -> None:
        pass


def chdb_store_path(settings: Settings) -> Path | None:
    """The directory of a ``chdb://`` store URL (None for a ClickHouse server)."""
    from streams.store import _chdb_path

    url = settings.clickhouse_url
    return _chdb_path(url).resolve() if url.startswith("chdb://") else None


def open_reader(settings: Settings) -> Any:
    """A store to read from: the worker's API when a worker holds the chDB path, else the store itself.

    A chDB path that does not exist is an error (a typo would otherwise create a new,
    empty store); so is a path another process holds when no worker answers at
    ``LW_WEB_HOST:LW_WEB_PORT``.
    """
    from streams.store import StoreError, open_store_from_settings

    path = chdb_store_path(settings)
    if path is not None:
        worker = WorkerClient.from_settings(settings)
        if worker.answers():
            return WorkerStore(worker)
        if not path.is_dir():
            raise StoreError(f"no store at {path} (LW_CLICKHOUSE_URL={settings.clickhouse_url}): check the path; "
                             "`layerwatch worker` creates the store when it starts")
    try:
        return open_store_from_settings(settings)
    except StoreError as exc:
        if path is not None and "lock" in str(exc).lower():
            raise StoreError(f"the store {path} is held by another process and no worker answers at "
                             f"http://{settings.web_host}:{settings.web_port}: if a worker holds it, set LW_WEB_PORT "
                             "(and LW_WEB_HOST) to that worker's; else stop the process that holds it") from None
        raise


def run_query(settings: Settings, sql: str, params: dict[str, Any] | None = None) -> tuple[list[str], list[list]]:
    """Column names and rows of a read-only query against the configured store."""
    from streams.writer import jsonable

    from streams.store.sql import check_readonly, render

    sql, params = resolve_sql(sql, params or {})
    check_readonly(render(sql, params))  # refused before any store is opened (the store checks again)
    store = open_reader(settings)
    try:
        names, rows = store.query_columns(sql, params, readonly=True)
    finally:
        store.close()
    return list(names), [[jsonable(v) for v in row] for row in rows]


def format_result(names: list[str], rows: list[list], fmt: str = "table") -> str:
    """Render rows as a table, JSON lines or CSV."""
    if fmt == "json":
        return "\n".join(json.dumps(dict(zip(names, row))) for row in rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(names)
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    from rich.console import Console
    from rich.table import Table

    table = Table(*names, show_lines=False)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    console.print(table)
    console.print(f"{len(rows)} row(s)")
    return console.file.getvalue().rstrip("\n")
