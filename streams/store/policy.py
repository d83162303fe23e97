"""What a read-only query may do: one SELECT over layerwatch's own tables, parsed, not pattern-matched.

``readonly=1`` in ClickHouse stops writes and settings changes, but not reads outside the
database: the scalar ``file()`` reads any file the engine's process can read (chDB runs in
the worker's process), and table functions (``url``, ``s3``, ``remote``, ``mysql`` …) reach
other systems. So every read-only query is parsed with sqlglot's ClickHouse dialect and
checked against an allow-list before it reaches the engine:

- exactly one statement, a SELECT (WITH, UNION/INTERSECT/EXCEPT of selects, subqueries,
  joins, ARRAY JOIN allowed);
- every table read is one of layerwatch's tables (the ``CREATE TABLE`` statements of
  ``deploy/clickhouse/*.sql``), a CTE of the query or one of :data:`SYSTEM_TABLES`; every
  table function (``numbers(10)`` too: ClickHouse 18.16 refuses them all in readonly mode,
  so both engines behave alike) and every other database-qualified name is refused;
- no scalar function of :data:`DENIED_FUNCTIONS` (those that read files, dictionaries or
  other tables by name, or stall the engine);
- no ``SETTINGS``, ``FORMAT`` or ``INTO OUTFILE`` clause;
- anything sqlglot cannot parse is refused (fail closed).

What runs is the text that was checked, with its comments removed by the store's own lexer
(``streams.store.sql``) before both the check and the engine see it. sqlglot's printed SQL
is not run: it rewrites joins into a syntax ClickHouse 18.16 rejects. To leave no room for
the two parsers to read the same text differently, characters that only matter to one
lexer (``$`` heredocs, ``#`` comments, backslashes, braces and anything outside printable
ASCII) are refused outside string literals and quoted identifiers.
Refusals raise :class:`QueryRefused` with one line starting ``refused:``.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Iterable

from .errors import StoreError

#: Tables of the ``system`` database a query may read: constant or generated rows, nothing
#: about other databases, users, settings or the host.
SYSTEM_TABLES = frozenset({"one", "numbers", "numbers_mt", "zeros", "zeros_mt"})


#: Scalar functions (lower case) that read outside the query's tables or stall the engine.
DENIED_FUNCTIONS = frozenset({
    "file", "url", "s3", "hdfs", "remote", "remotesecure", "cluster", "clusterallreplicas", "mysql",
    "postgresql", "jdbc", "odbc", "executable", "input", "azureblobstorage", "gcs", "deltalake",
    "hudi", "mongodb", "redis", "sqlite", "dictionary", "urlcluster", "filecluster", "s3cluster",
    "hdfscluster", "merge", "view", "loop", "joinget", "joingetornull", "hascolumnintable",
    "catboostevaluate", "modelevaluate", "showcertificate", "getclienthttpheader", "sleep",
    "sleepeachrow", "filesystemavailable", "filesystemcapacity", "filesystemunreserved",
    "getsetting", "getserversetting", "getmacro", "currentuser", "currentprofiles", "currentroles",
    "enabledprofiles", "enabledroles", "defaultprofiles", "defaultroles", "addresstoline",
    "addresstolinewithinlines", "addresstosymbol", "demangle", "tcpport",
})
#: Name prefixes refused like DENIED_FUNCTIONS (dictGet*, dictHas …: dictionaries can be backed
#: by files, URLs, other databases; iceberg*, azure*: lakes).
DENIED_PREFIXES = ("dict", "iceberg", "azure", "s3", "hdfs", "remote", "mysql", "postgres")

# Outside literals: only printable ASCII without the characters one lexer reads differently from the other.
_ODD_CHARACTER = re.compile(r"[^\x20-\x7E\t\n\r]|[$#\\{}]")

_CREATE_TABLE = re.compile(
    r"\bCREATE\s+(?:TABLE|VIEW|MATERIALIZED\s+VIEW)\s+(?:IF\s+NOT\s+EXISTS\s+)?`?([A-Za-z_][A-Za-z0-9_]*)`?",
    re.IGNORECASE,
)

log = logging.getLogger(__name__)


class QueryRefused(StoreError):
    """A read-only query that the policy does not allow; the message says why in one line."""


def _refuse(reason: str) -> QueryRefused:
    return QueryRefused(f"refused: {reason}")


@functools.lru_cache(maxsize=8)
def own_tables(migrations_dir: str | None = None) -> frozenset[str]:
    """Tables (and views) created by the migrations in ``migrations_dir`` (default: deploy/clickhouse)."""
    from .base import DEFAULT_MIGRATIONS_DIR, MIGRATIONS_TABLE, migration_files

    names = {MIGRATIONS_TABLE}
    for _version, path in migration_files(Path(migrations_dir) if migrations_dir else DEFAULT_MIGRATIONS_DIR):
        names.update(_CREATE_TABLE.findall(path.read_text(encoding="utf-8")))
    return frozenset(names)


def check_query(sql: str, tables: Iterable[str] | None = None) -> str:
    """The ClickHouse SQL to run for ``sql`` when the read-only policy allows it; else QueryRefused.

    ``tables`` are the names a query may read (default: :func:`own_tables`).
    """
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import ErrorLevel, SqlglotError

    from . import sql as _sql

    allowed = frozenset(tables) if tables is not None else own_tables()
    try:
        texts = _sql.split_statements(sql)
    except StoreError as exc:
        raise _refuse(f"cannot parse the query ({exc})") from None
    if not texts:
        raise _refuse("the query is empty")
    if len(texts) > 1:
        raise _refuse(f"one statement only, got {len(texts)}")
    sql = texts[0]
    for kind, text in _sql._segments(sql):
        bad = _ODD_CHARACTER.search(text) if kind == "code" else None
        if bad:
            raise _refuse(f"character {bad.group(0)!r} outside a string literal")
    sqlglot_log = logging.getLogger("sqlglot")
    level = sqlglot_log.level
    sqlglot_log.setLevel(logging.ERROR)  # "falling back to parsing as a Command" is refused below anyway
    try:
        statements = [s for s in sqlglot.parse(sql, read="clickhouse", error_level=ErrorLevel.RAISE) if s is not None]
    except SqlglotError as exc:
        raise _refuse(f"cannot parse the query ({_first_line(exc)})") from None
    except (RecursionError, ValueError, TypeError) as exc:
        raise _refuse(f"cannot parse the query ({type(exc).__name__})") from None
    finally:
        sqlglot_log.setLevel(level)
    if not statements:
        raise _refuse("the query is empty")
    if len(statements) > 1:
        raise _refuse(f"one statement only, got {len(statements)}")
    tree = statements[0]
    if not isinstance(tree, (exp.Select, exp.SetOperation, exp.Subquery)):
        raise _refuse(f"only SELECT queries are allowed, got {_statement_kind(tree)}")
    ctes = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
    for node in tree.walk():
        _check_node(node, allowed, ctes, exp)
    return sql


def _check_node(node: object, allowed: frozenset[str], ctes: set[str], exp: object) -> None:
    e = exp  # sqlglot.expressions, imported lazily by check_query
    if isinstance(node, (e.Insert, e.Delete, e.Update, e.Create, e.Drop, e.Alter, e.Command, e.Set,
                         e.Merge, e.Into, e.Describe, e.Use, e.Kill, e.Transaction)):
        raise _refuse(f"only SELECT queries are allowed, got {_statement_kind(node)}")
    if isinstance(node, e.Expression):
        if node.args.get("settings"):
            raise _refuse("SETTINGS clauses are not allowed (limits are set by layerwatch)")
        if node.args.get("format"):
            raise _refuse("FORMAT clauses are not allowed (results come back as rows)")
    if isinstance(node, e.Table):
        _check_table(node, allowed, ctes, e)
    elif isinstance(node, e.In) and node.args.get("field") is not None:
        field = node.args["field"]  # `x IN name`: ClickHouse reads the table `name`
        if not isinstance(field, e.Column) or field.args.get("catalog"):
            raise _refuse("IN takes a list or a subquery")
        _check_table_name(field.name, field.table or None, allowed, ctes)
    elif isinstance(node, e.Func):
        name = _function_name(node, e)
        if name.lower() in DENIED_FUNCTIONS or name.lower().startswith(DENIED_PREFIXES):
            raise _refuse(f"function {name}() reads outside layerwatch's tables")


def _check_table(table: object, allowed: frozenset[str], ctes: set[str], e: object) -> None:
    source = table.this
    if isinstance(source, e.Func):
        name = _function_name(source, e)
        raise _refuse(f"table function {name}() reads outside layerwatch's tables")
    if not isinstance(source, e.Identifier) or table.args.get("catalog"):
        raise _refuse(f"unsupported table source {table.sql(dialect='clickhouse')[:80]}")
    _check_table_name(source.name, table.db or None, allowed, ctes)


def _check_table_name(name: str, db: str | None, allowed: frozenset[str], ctes: set[str]) -> None:
    if db is None and (name in allowed or name in ctes):
        return
    if db == "system" and name in SYSTEM_TABLES:
        return
    shown = f"{db}.{name}" if db else name
    raise _refuse(f"table {shown} is not one of layerwatch's tables")


def _function_name(func: object, e: object) -> str:
    if isinstance(func, e.Anonymous):
        this = func.this
        return this.name if isinstance(this, e.Identifier) else str(this)
    return func.sql_name()


def _statement_kind(node: object) -> str:
    key = getattr(node, "key", type(node).__name__)
    if key == "command":
        return str(node.this).upper()
    return key.upper()


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:200]
