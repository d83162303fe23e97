"""Unit tests of the shared SQL helpers (no engine needed)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from streams.store import StoreError, open_store
from streams.store.base import ReadonlyLimits, migration_files
from streams.store.columns import ArrayData, normalize
from streams.store.queries import REQUIRED, query_params, shipped_queries
from streams.store.sql import (
    check_readonly,
    has_inline_data,
    placeholders,
    render,
    render_value,
    split_statements,
)


def test_render_values() -> None:
    assert render_value(None) == "NULL"
    assert render_value(True) == "1"
    assert render_value(np.int64(-3)) == "-3"
    assert render_value(np.uint64(2**64 - 1)) == str(2**64 - 1)
    assert render_value(0.5) == "0.5"
    assert render_value(float("nan")) == "nan"
    assert render_value(float("-inf")) == "-inf"
    assert render_value("it's") == r"'it\'s'"
    assert render_value("a\\b\nc") == r"'a\\b\nc'"
    assert render_value(b"\xff'\x00") == r"'\xFF\x27\x00'"
    assert render_value(dt.datetime(2023, 11, 14, 22, 13, 20)) == "toDateTime(1700000000)"
    aware = dt.datetime(2023, 11, 14, 23, 13, 20, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert render_value(aware) == "toDateTime(1700000000)"
    assert render_value(dt.date(2024, 1, 2)) == "toDate('2024-01-02')"
    assert render_value(["a", 1]) == "['a', 1]"
    assert render_value(np.array([1, 2])) == "[1, 2]"
    assert render_value(("a", "b")) == "('a', 'b')"
    assert render_value(()) == "(NULL)"
    with pytest.raises(StoreError):
        render_value(object())


def test_render_placeholders_outside_literals_only() -> None:
    sql = "SELECT {a}, '{a}', `{a}` -- {a}\n FROM t WHERE x = {b}"
    assert placeholders(sql) == {"a", "b"}
    out = render(sql, {"a": "{b}", "b": 2})
    # single pass: the value "{b}" is not substituted again
    assert out == "SELECT '{b}', '{a}', `{a}` -- {a}\n FROM t WHERE x = 2"
    with pytest.raises(StoreError, match="missing query parameter.*b"):
        render("SELECT {b}", {})
    assert render("SELECT {'k': 1}", {}) == "SELECT {'k': 1}"  # map literal untouched
    # after IN a list becomes a tuple (18.16 rejects `x IN [..]`; JSON params are lists)
    assert render("SELECT x IN {a}, has({a}, x), y NOT in {e}, JOIN {a}", {"a": ["p", "q"], "e": []}) == (
        "SELECT x IN ('p', 'q'), has(['p', 'q'], x), y NOT in (NULL), JOIN ['p', 'q']")


def test_split_statements_respects_quotes_and_comments() -> None:
    script = """
    -- a comment; with a semicolon
    CREATE TABLE a (s String DEFAULT ';');
    /* block; comment */ SELECT 'x;y', "q;id";
    ;
    """
    stmts = split_statements(script)
    assert stmts == ["CREATE TABLE a (s String DEFAULT ';')", "SELECT 'x;y', \"q;id\""]
    with pytest.raises(StoreError, match="unterminated"):
        split_statements("SELECT 'abc")


@pytest.mark.parametrize("sql", [
    "SELECT 1", "  with x AS (SELECT 1) SELECT * FROM x", "(SELECT 1)", "-- hello\nSELECT 1;", "SELECT ';' AS s",
])
def test_check_readonly_accepts(sql: str) -> None:
    assert check_readonly(sql)


@pytest.mark.parametrize("sql,match", [
    ("INSERT INTO predictions SELECT 1", "got INSERT"),
    ("DROP TABLE predictions", "got DROP"),
    ("SELECT 1; DROP TABLE predictions", "one statement"),
    ("SELECT 1; SELECT 2", "one statement"),
    ("SET readonly = 0", "got SET"),
    ("ALTER TABLE predictions DELETE WHERE 1", "got ALTER"),
    ("SELECT 1 INTO OUTFILE '/tmp/x'", "cannot parse"),
    ("SHOW TABLES", "got SHOW"),
    ("", "empty"),
    ("-- only a comment", "empty"),
])
def test_check_readonly_rejects(sql: str, match: str) -> None:
    with pytest.raises(StoreError, match=match):
        check_readonly(sql)


def test_injection_stays_literal() -> None:
    evil = "x'; DROP TABLE predictions; --"
    rendered = render("SELECT count() FROM predictions WHERE model_id = {m}", {"m": evil})
    assert check_readonly(rendered) == rendered  # still one SELECT statement
    assert has_inline_data("INSERT INTO t VALUES (1)")
    assert not has_inline_data("INSERT INTO t SELECT 1")


def test_normalize_columns() -> None:
    types = {"s": "String", "t": "DateTime", "v": "Array(Float32)", "u": "UInt64", "f": "Float32",
             "tags": "Array(String)"}
    n, cols = normalize("x", types, {
        "s": ["a", b"\xff", None],
        "t": np.array(["2023-11-14T22:13:20", "1970-01-01T00:00:01", "1970-01-01T00:00:02"],
                      dtype="datetime64[s]"),
        "v": [np.ones(2, np.float32), [], np.zeros(1)],
        "u": [1, 2, 2**64 - 1],
        "f": np.array([0.5, np.nan, 1.0]),
        "tags": [["a"], [], ["b", "c"]],
    })
    assert n == 3
    c = {col.name: col for col in cols}
    assert c["s"].data.tolist() == ["a", b"\xff", ""] and c["s"].has_bytes
    assert c["t"].data.dtype == np.uint32 and c["t"].data.tolist() == [1700000000, 1, 2]
    assert isinstance(c["v"].data, ArrayData) and c["v"].data.to_lists() == [[1.0, 1.0], [], [0.0]]
    assert c["u"].data.dtype == np.uint64 and int(c["u"].data[2]) == 2**64 - 1
    assert c["f"].data.dtype == np.float32 and np.isnan(c["f"].data[1])
    assert c["tags"].data.to_lists() == [["a"], [], ["b", "c"]]
    with pytest.raises(StoreError, match="unknown column"):
        normalize("x", types, {"nope": [1]})
    with pytest.raises(StoreError, match="differ in length"):
        normalize("x", types, {"u": [1], "f": [1.0, 2.0]})
    with pytest.raises(StoreError, match="non-integral"):
        normalize("x", types, {"u": [1.5]})


def test_open_store_urls_and_redaction(tmp_path) -> None:
    from streams.store import redact_url
    from streams.store.clickhouse import ClickHouseStore

    assert redact_url("clickhouse://u:secret@h:9000/db") == "clickhouse://u:***@h:9000/db"
    s = open_store("clickhouses://u:secret@example.invalid/db?verify=0&connect_timeout=2")
    try:
        assert isinstance(s, ClickHouseStore)
        assert s.port == 9440 and s.database == "db"
        assert s._client_kwargs["secure"] is True and s._client_kwargs["verify"] is False
        assert s._client_kwargs["password"] == "secret"
        assert "secret" not in s.url and "secret" not in repr(s)
    finally:
        s.close()
    s = open_store("clickhouse://h/db", password="pw", secure=True, ca_certs="/x.pem")
    try:
        assert s.port == 9440 and s._client_kwargs["secure"] is True  # TLS default port
        assert s._client_kwargs["ca_certs"] == "/x.pem"
    finally:
        s.close()
    with pytest.raises(StoreError, match="unsupported store URL") as ei:
        open_store("postgres://u:topsecret@h/db")
    assert "topsecret" not in str(ei.value)
    with pytest.raises(StoreError, match="needs a path"):
        open_store("chdb://")


def test_shipped_query_files_parse() -> None:
    queries = shipped_queries()
    assert set(queries) >= {
        "detection_rate_by_minute", "drift_since", "top_suspicious_events",
        "alert_history", "events_per_minute", "dlq_reasons",
    }
    for name, sql in queries.items():
        declared = query_params(sql)
        assert placeholders(sql) == set(declared), name
        check_readonly(render(sql, {k: (0 if v is REQUIRED else v) for k, v in declared.items()}))
    assert query_params(queries["top_suspicious_events"])["window_id"] is REQUIRED
    assert [v for v, _ in migration_files()][0] == "001_init"
    assert ReadonlyLimits().settings()["readonly"] == 1


def test_open_store_from_settings_passes_fields(tmp_path) -> None:
    from types import SimpleNamespace

    from streams.store import open_store_from_settings

    settings = SimpleNamespace(clickhouse_url="clickhouse://u:urlpw@h:9001/db", clickhouse_user="",
                               clickhouse_password="setpw", clickhouse_secure=True,
                               clickhouse_ca_certs="/ca.pem")
    s = open_store_from_settings(settings)
    try:
        kw = s._client_kwargs
        assert (kw["user"], kw["password"], kw["secure"], kw["ca_certs"], kw["port"]) == (
            "u", "setpw", True, "/ca.pem", 9001)
        assert "urlpw" not in s.url and "setpw" not in s.url
    finally:
        s.close()
