"""SQL text helpers shared by both store backends.

One parameter renderer for both engines: a ClickHouse server as old as 18.16
has no server-side query parameters, and chDB's ``{name:Type}`` parameters do
not exist there, so values are rendered client-side as escaped literals.

Placeholder syntax: ``{name}`` (an identifier in braces) anywhere outside
string literals, quoted identifiers and comments. Rendering is a single pass,
so a value that itself contains ``{other}`` is never substituted again.

Values render as:

- ``None`` -> ``NULL``; ``bool`` -> ``1`` / ``0``
- ``int`` / numpy integers -> the number; ``float`` -> ``repr`` (``nan``, ``inf``, ``-inf``)
- ``str`` -> ``'...'`` with backslash escapes (quotes, backslashes, control characters)
- ``bytes`` -> ``'...'`` with ``\\xHH`` escapes for anything not printable ASCII
- ``datetime`` -> ``toDateTime(<epoch seconds>)`` (naive values are taken as UTC)
- ``date`` -> ``toDate('YYYY-MM-DD')``
- ``list`` / numpy array -> array literal ``[a, b]`` (for ``has({ids}, x)``)
- ``tuple`` / ``set`` / ``frozenset`` -> ``(a, b)``; an empty one renders as
  ``(NULL)``, which matches nothing
- right after ``IN`` (``x IN {ids}``, ``x NOT IN {ids}``) any sequence renders
  as a tuple: ClickHouse 18.16 rejects ``x IN [a, b]``, and parameters that
  arrive as JSON can only be lists
"""

from __future__ import annotations

import calendar
import datetime as _dt
import math
import re
from decimal import Decimal
from typing import Any, Iterator, Mapping

import numpy as np

from .errors import StoreError

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_AFTER_IN = re.compile(r"\bIN\s*$", re.IGNORECASE)

# Statements that return rows (the chDB backend asks Arrow for the column names of an empty result).
READ_KEYWORDS = ("SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS")


# --------------------------------------------------------------------------- lexing


def _segments(sql: str) -> Iterator[tuple[str, str]]:
    """Split SQL into (kind, text) pieces: kind is 'code', 'string', 'ident',
    'comment' or 'semicolon'. Unterminated quotes raise StoreError."""
    i, n = 0, len(sql)
    start = 0
    while i < n:
        c = sql[i]
        if c in "'\"`":
            if i > start:
                yield "code", sql[start:i]
            j = i + 1
            while True:
                if j >= n:
                    raise StoreError(f"unterminated quote {c} in SQL")
                d = sql[j]
                if d == "\\":
                    j += 2
                    continue
                if d == c:
                    if j + 1 < n and sql[j + 1] == c:  # doubled quote
                        j += 2
                        continue
                    break
                j += 1
            yield ("string" if c == "'" else "ident"), sql[i : j + 1]
            i = start = j + 1
        elif c == "-" and sql.startswith("--", i):
            if i > start:
                yield "code", sql[start:i]
            j = sql.find("\n", i)
            j = n if j < 0 else j
            yield "comment", sql[i:j]
            i = start = j
        elif c == "/" and sql.startswith("/*", i):
            if i > start:
                yield "code", sql[start:i]
            j = sql.find("*/", i + 2)
            if j < 0:
                raise StoreError("unterminated /* comment in SQL")
            yield "comment", sql[i : j + 2]
            i = start = j + 2
        elif c == ";":
            if i > start:
                yield "code", sql[start:i]
            yield "semicolon", ";"
            i = start = i + 1
        else:
            i += 1
    if start < n:
        yield "code", sql[start:]


def strip_comments(sql: str) -> str:
    """The SQL without comments (string literals untouched)."""
    return "".join(" " if k == "comment" else t for k, t in _segments(sql)).strip()


def split_statements(sql: str) -> list[str]:
    """Split a script on ';' outside literals and comments; drop comments and
    empty statements."""
    out: list[str] = []
    cur: list[str] = []
    for kind, text in _segments(sql):
        if kind == "semicolon":
            stmt = "".join(cur).strip()
            if stmt:
                out.append(stmt)
            cur = []
        elif kind == "comment":
            cur.append(" ")
        else:
            cur.append(text)
    stmt = "".join(cur).strip()
    if stmt:
        out.append(stmt)
    return out


def placeholders(sql: str) -> set[str]:
    """Names of the ``{name}`` placeholders in the SQL."""
    names: set[str] = set()
    for kind, text in _segments(sql):
        if kind == "code":
            names.update(_PLACEHOLDER.findall(text))
    return names


# ------------------------------------------------------------------------ rendering


_ESCAPES = {
    "\\": "\\\\",
    "'": "\\'",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\0": "\\0",
    "\b": "\\b",
    "\f": "\\f",
}


def quote_string(value: str) -> str:
    """A ClickHouse string literal for ``value`` (backslash-escaped)."""
    out = []
    for ch in value:
        esc = _ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\x%02X" % ord(ch))
        else:
            out.append(ch)
    return "'" + "".join(out) + "'"


def quote_bytes(value: bytes) -> str:
    """A ClickHouse string literal holding exactly these bytes."""
    out = []
    for b in value:
        ch = chr(b)
        if 0x20 <= b < 0x7F and ch not in "\\'":
            out.append(ch)
        else:
            out.append("\\x%02X" % b)
    return "'" + "".join(out) + "'"


def quote_identifier(name: str) -> str:
    """Backquote an identifier (table or column name) after validating it."""
    if not isinstance(name, str) or not _IDENT.fullmatch(name):
        raise StoreError(f"invalid identifier {name!r}")
    return f"`{name}`"


def quote_table(name: str) -> str:
    """Backquote a table name, optionally qualified as ``db.table``."""
    parts = name.split(".") if isinstance(name, str) else [name]
    if len(parts) > 2:
        raise StoreError(f"invalid table name {name!r}")
    return ".".join(quote_identifier(p) for p in parts)


def _epoch_seconds(value: _dt.datetime) -> int:
    if value.tzinfo is None:
        return calendar.timegm(value.timetuple())
    return int(math.floor(value.timestamp()))


def render_value(value: Any) -> str:
    """Render one Python value as a ClickHouse literal (see module docstring)."""
    if value is None:
        return "NULL"
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise StoreError(f"cannot render non-finite Decimal {value}")
        return str(value)
    if isinstance(value, (str, np.str_)):
        return quote_string(str(value))
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        return quote_bytes(bytes(value))
    if isinstance(value, np.datetime64):
        value = value.astype("datetime64[s]").astype(np.int64)
        return f"toDateTime({int(value)})"
    if isinstance(value, _dt.datetime):
        return f"toDateTime({_epoch_seconds(value)})"
    if isinstance(value, _dt.date):
        return f"toDate('{value.isoformat()}')"
    if isinstance(value, (list, np.ndarray)):
        items = value.tolist() if isinstance(value, np.ndarray) else value
        return "[" + ", ".join(render_value(v) for v in items) + "]"
    if isinstance(value, (tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        if not items:
            return "(NULL)"
        return "(" + ", ".join(render_value(v) for v in items) + ")"
    raise StoreError(f"cannot render a parameter of type {type(value).__name__}")


def render(sql: str, params: Mapping[str, Any] | None = None) -> str:
    """Substitute ``{name}`` placeholders with escaped literals.

    Raises StoreError naming any placeholder without a value. Parameters that
    the SQL does not use are ignored.
    """
    params = params or {}
    missing: set[str] = set()
    out: list[str] = []

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in params:
            missing.add(name)
            return m.group(0)
        value = params[name]
        if isinstance(value, (list, np.ndarray)) and _AFTER_IN.search(m.string, 0, m.start()):
            value = tuple(value.tolist() if isinstance(value, np.ndarray) else value)
        return render_value(value)

    for kind, text in _segments(sql):
        out.append(_PLACEHOLDER.sub(sub, text) if kind == "code" else text)
    if missing:
        raise StoreError("missing query parameter(s): " + ", ".join(sorted(missing)))
    return "".join(out)


# ------------------------------------------------------------------------- read-only


def first_keyword(sql: str) -> str:
    """Upper-cased first word of the statement (comments and parentheses skipped)."""
    m = re.match(r"[\s(]*([A-Za-z]+)", strip_comments(sql))
    return m.group(1).upper() if m else ""


def is_read_statement(sql: str) -> bool:
    """True when the statement starts like a query that returns rows."""
    return first_keyword(sql) in READ_KEYWORDS


def check_readonly(sql: str) -> str:
    """The statement to run for a read-only query, or StoreError (``QueryRefused``) saying why not.

    The query is parsed and checked by ``streams.store.policy`` (one SELECT over layerwatch's
    tables, no table function or scalar function that reads outside them, no SETTINGS,
    FORMAT or INTO OUTFILE); the engines then also run it with ``readonly=1`` and the
    store's limits.
    """
    from .policy import check_query

    return check_query(sql)


def has_inline_data(sql: str) -> bool:
    """True for an INSERT that carries its rows in the text (VALUES / FORMAT),
    as opposed to INSERT ... SELECT."""
    if first_keyword(sql) != "INSERT":
        return False
    code = " ".join(t for k, t in _segments(sql) if k == "code").upper()
    return not re.search(r"\bSELECT\b", code)
