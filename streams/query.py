"""`layerwatch query`: read-only SQL through the worker's API when it owns the chDB path, else directly."""

from __future__ import annotations

import csv
import io
import json
import urllib.error
import urllib.request
from typing import Any

from streams.settings import Settings
from streams.store import StoreError


def worker_url(settings: Settings) -> str:
    return f"http://{settings.web_host}:{settings.web_port}"


def worker_answers(settings: Settings, timeout: float = 1.0) -> bool:
    """True when a layerwatch worker answers /health on the configured web port."""
    try:
        with urllib.request.urlopen(f"{worker_url(settings)}/health", timeout=timeout) as resp:
            return "status" in json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:  # 503 = degraded, still a worker
        return exc.code == 503
    except (OSError, ValueError):
        return False


def resolve_sql(sql: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """'@name' names a shipped query in deploy/clickhouse/queries; its declared defaults fill in."""
    if not sql.startswith("@"):
        return sql, params
    from streams.store.queries import prepare_shipped

    return prepare_shipped(sql[1:], params, coerce=True)


def run_query(settings: Settings, sql: str, params: dict[str, Any] | None = None) -> tuple[list[str], list[list]]:
    """Column names and rows of a read-only query against the configured store."""
    sql, params = resolve_sql(sql, params or {})
    if settings.clickhouse_url.startswith("chdb://") and worker_answers(settings):
        return _query_worker(settings, sql, params)
    from streams.store import open_store_from_settings
    from streams.writer import jsonable

    store = open_store_from_settings(settings)
    try:
        names, rows = store.query_columns(sql, params, readonly=True)
    finally:
        store.close()
    return list(names), [[jsonable(v) for v in row] for row in rows]


def _query_worker(settings: Settings, sql: str, params: dict[str, Any]) -> tuple[list[str], list[list]]:
    body = json.dumps({"sql": sql, "params": params}).encode()
    request = urllib.request.Request(f"{worker_url(settings)}/api/query", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    if settings.web_token:
        request.add_header("Authorization", f"Bearer {settings.web_token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            result = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}").get("error", exc.reason)
        raise StoreError(f"query refused by the worker ({exc.code}): {detail}") from None
    return result["columns"], result["rows"]


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
