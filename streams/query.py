"""`layerwatch query`: read-only SQL through the worker's API when it owns the chDB path, else directly."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from streams.client import WorkerClient
from streams.settings import Settings


def resolve_sql(sql: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """'@name' names a shipped query in deploy/clickhouse/queries; its declared defaults fill in."""
    if not sql.startswith("@"):
        return sql, params
    from streams.store.queries import prepare_shipped

    return prepare_shipped(sql[1:], params, coerce=True)


def run_query(settings: Settings, sql: str, params: dict[str, Any] | None = None) -> tuple[list[str], list[list]]:
    """Column names and rows of a read-only query against the configured store."""
    sql, params = resolve_sql(sql, params or {})
    worker = WorkerClient.from_settings(settings)
    if settings.clickhouse_url.startswith("chdb://") and worker.answers():
        return worker.query(sql, params)
    from streams.store import open_store_from_settings
    from streams.writer import jsonable

    store = open_store_from_settings(settings)
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
