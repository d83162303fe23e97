"""Shipped queries: ``deploy/clickhouse/queries/*.sql``.

Each file is one read-only statement with ``{name}`` placeholders (rendered by
``streams.store.sql.render``). Header comments declare the parameters:

    -- @param window_id            (required)
    -- @param limit = 20           (default, a Python literal)

Every shipped query runs on ClickHouse 18.16 and chDB 26 (the store's
contract tests run each one on both engines).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from .base import DEFAULT_MIGRATIONS_DIR, Result, Store
from .errors import StoreError

QUERIES_DIR = DEFAULT_MIGRATIONS_DIR / "queries"

_PARAM = re.compile(r"^\s*--\s*@param\s+([A-Za-z_][A-Za-z0-9_]*)\s*(?:=\s*(.+?))?\s*$")

#: Marks a parameter without default.
REQUIRED = object()


def shipped_queries(directory: Path | str | None = None) -> dict[str, str]:
    """Query name (file stem) -> SQL text, sorted by name."""
    d = Path(directory) if directory is not None else QUERIES_DIR
    if not d.is_dir():
        raise StoreError(f"shipped queries directory not found: {d}")
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(d.glob("*.sql"))}


def query_params(sql: str) -> dict[str, Any]:
    """The ``-- @param`` declarations of a shipped query: name -> default
    (``REQUIRED`` when none)."""
    params: dict[str, Any] = {}
    for line in sql.splitlines():
        m = _PARAM.match(line)
        if not m:
            continue
        name, default = m.group(1), m.group(2)
        if default is None:
            params[name] = REQUIRED
        else:
            try:
                params[name] = ast.literal_eval(default)
            except (ValueError, SyntaxError) as e:
                raise StoreError(f"bad default for @param {name}: {default!r}") from e
    return params


def prepare_shipped(name: str, params: dict[str, Any], *, queries_dir: Path | str | None = None,
                    coerce: bool = False) -> tuple[str, dict[str, Any]]:
    """SQL and parameter values of shipped query ``name``: ``params`` over the declared defaults.

    ``coerce`` converts string values (from a command line) to the type of the default.
    """
    queries = shipped_queries(queries_dir)
    if name not in queries:
        raise StoreError(f"unknown shipped query {name!r}; have: {', '.join(queries)}")
    sql = queries[name]
    declared = query_params(sql)
    unknown = set(params) - set(declared)
    if unknown:
        raise StoreError(f"query {name!r} has no parameter(s) {', '.join(sorted(unknown))}")
    values = {k: v for k, v in declared.items() if v is not REQUIRED}
    for key, value in params.items():
        default = declared[key]
        if coerce and isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
            try:
                value = type(default)(value)
            except ValueError:
                raise StoreError(f"parameter {key}={value!r} is not a {type(default).__name__}") from None
        values[key] = value
    missing = [k for k, v in declared.items() if k not in values]
    if missing:
        raise StoreError(f"query {name!r} needs parameter(s) {', '.join(missing)}")
    return sql, values


def run_shipped(store: Store, name: str, *, queries_dir: Path | str | None = None,
                **params: Any) -> Result:
    """Run shipped query ``name`` read-only with ``params`` over its defaults;
    return ``Result(columns, rows)``."""
    sql, values = prepare_shipped(name, params, queries_dir=queries_dir)
    return store.query_columns(sql, values, readonly=True)
