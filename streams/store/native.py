"""Decode ClickHouse ``Native`` format bytes into Python rows.

chDB returns results as bytes in a format of our choice. ``Native`` carries
every column's ClickHouse type, and decoding it with clickhouse-driver's own
column readers yields exactly the Python values the server backend returns
(datetime for DateTime, lists for arrays, str for UTF-8 strings and bytes
otherwise, ...), so both backends satisfy one contract. Arrow output would
lose types (a DateTime arrives as a bare uint32).

The ``Native`` output of ``FORMAT Native`` is written for protocol revision 0:
no block info, no per-column serialization flags, types as names.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


class _ServerInfo:
    """The bits of clickhouse-driver's ServerInfo that column readers consult."""

    used_revision = 0
    timezone = "UTC"
    session_timezone = None
    name = "chDB"

    def get_timezone(self) -> str:
        return "UTC"


@lru_cache(maxsize=1)
def _context() -> Any:
    from clickhouse_driver import Client
    from clickhouse_driver.context import Context

    ctx = Context()
    ctx.server_info = _ServerInfo()
    ctx.settings = {}
    # The driver's own defaults (strings_encoding, use_numpy=False, ...), taken
    # from an unconnected client so new driver versions keep working.
    settings = dict(Client("localhost").connection.context.client_settings)
    settings["use_numpy"] = False
    ctx.client_settings = settings
    return ctx


def decode_native(payload: bytes) -> tuple[list[str], list[str], list[tuple]]:
    """(names, types, rows) of a ``FORMAT Native`` payload (one or more blocks).

    An empty payload (a statement without result, or zero rows) gives three
    empty lists. Column names that are not UTF-8 (an expression holding
    binary literals) are decoded with replacement characters.
    """
    from clickhouse_driver.bufferedreader import CompressedBufferedReader
    from clickhouse_driver.columns.service import read_column
    from clickhouse_driver.varint import read_varint

    if not payload:
        return [], [], []
    chunks = [payload]

    def read_block() -> bytes:
        if chunks:
            return chunks.pop()
        raise EOFError("truncated Native payload")

    buf = CompressedBufferedReader(read_block, len(payload))
    ctx = _context()
    names: list[str] = []
    types: list[str] = []
    rows: list[tuple] = []
    while chunks or buf.position < buf.current_buffer_size:
        # Block at revision 0: n_columns, n_rows, then per column name, type, data.
        n_columns = read_varint(buf)
        n_rows = read_varint(buf)
        block_names, block_types, data = [], [], []
        for _ in range(n_columns):
            block_names.append(buf.read(read_varint(buf)).decode("utf-8", "replace"))
            block_types.append(buf.read(read_varint(buf)).decode("utf-8"))
            if n_rows:
                data.append(read_column(ctx, block_types[-1], n_rows, buf))
        if not names:
            names, types = block_names, block_types
        if n_rows:
            rows.extend(zip(*data))
    return names, types, rows
