"""Hostile and legitimate read-only queries shared by the SQL policy tests.

HOSTILE: (query, a fragment the refusal must contain). Every one must be refused by the
policy on both stores and through `/api/query`. LEGIT: queries a user, the dashboard or the
report sends; each must run on ClickHouse 18.16 and chDB 26 against the migrated schema.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOSTNAME = "/etc/hostname"
FILE_TSV = f"file('{HOSTNAME}', 'TSV', 'x String')"

OUTSIDE = "reads outside layerwatch's tables"
NOT_OURS = "is not one of layerwatch's tables"
ONLY_SELECT = "only SELECT"
PARSE = "cannot parse"
ODD = "outside a string literal"

HOSTILE: list[tuple[str, str]] = [
    # the scalar file(), however it is spelled or hidden
    (f"SELECT file('{HOSTNAME}')", "function file()"),
    (f"select FILE('{HOSTNAME}')", "function FILE()"),
    (f"SELECT FiLe('{HOSTNAME}') AS h", "function FiLe()"),
    (f"SELECT `file`('{HOSTNAME}')", "function file()"),
    (f'SELECT "file"(\'{HOSTNAME}\')', "function file()"),
    (f"SELECT /* hi */ file /* there */ ('{HOSTNAME}')", "function file()"),
    (f"SELECT -- line comment\n file('{HOSTNAME}')", "function file()"),
    ("SELECT file('/etc/' || 'hostname')", "function file()"),
    ("SELECT file(concat('/etc/', 'host', 'name'))", "function file()"),
    (f"SELECT length(file('{HOSTNAME}')) AS n", "function file()"),
    (f"SELECT x FROM (SELECT file('{HOSTNAME}') AS x)", "function file()"),
    (f"WITH (SELECT file('{HOSTNAME}')) AS h SELECT h", "function file()"),
    (f"WITH file('{HOSTNAME}') AS h SELECT h", "function file()"),
    (f"SELECT count() FROM predictions WHERE event_id IN (SELECT file('{HOSTNAME}'))", "function file()"),
    (f"SELECT arrayMap(x -> file(x), ['{HOSTNAME}'])", "function file()"),
    (f"(SELECT file('{HOSTNAME}'))", "function file()"),
    (f"SELECT 1 UNION ALL SELECT file('{HOSTNAME}')", "function file()"),
    (f"SELECT if(1, file('{HOSTNAME}'), '') AS h FROM system.one", "function file()"),
    # table functions in every position
    (f"SELECT * FROM {FILE_TSV}", "table function file()"),
    (f"SELECT * FROM {FILE_TSV.upper()}", "table function FILE()"),
    (f"WITH t AS (SELECT * FROM {FILE_TSV}) SELECT * FROM t", "table function file()"),
    (f"SELECT count() FROM predictions WHERE event_id IN (SELECT x FROM {FILE_TSV})", "table function file()"),
    (f"SELECT count() FROM predictions WHERE event_id GLOBAL IN (SELECT x FROM {FILE_TSV})", "table function file()"),
    (f"SELECT count() FROM predictions AS p ANY LEFT JOIN {FILE_TSV} AS f ON p.event_id = f.x", "table function file()"),
    ("SELECT * FROM predictions, url('http://127.0.0.1:1/', 'TSV', 'x String')", "table function url()"),
    ("SELECT * FROM url('http://127.0.0.1:1/', 'TSV', 'x String')", "table function url()"),
    ("SELECT * FROM s3('http://127.0.0.1:1/b/k', 'TSV', 'x String')", "table function s3()"),
    ("SELECT * FROM remote('127.0.0.1', system.one)", "table function remote()"),
    ("SELECT * FROM remoteSecure('127.0.0.1', system.one)", "table function remoteSecure()"),
    ("SELECT * FROM cluster('default', system.one)", "table function cluster()"),
    ("SELECT * FROM mysql('127.0.0.1:1', 'db', 't', 'u', 'p')", "table function mysql()"),
    ("SELECT * FROM postgresql('127.0.0.1:1', 'db', 't', 'u', 'p')", "table function postgresql()"),
    ("SELECT * FROM jdbc('jdbc:x', 't')", "table function jdbc()"),
    ("SELECT * FROM odbc('DSN=x', 't')", "table function odbc()"),
    (f"SELECT * FROM executable('cat {HOSTNAME}', 'TSV', 'x String')", "table function executable()"),
    ("SELECT * FROM hdfs('hdfs://127.0.0.1:1/x', 'TSV', 'x String')", "table function hdfs()"),
    ("SELECT * FROM merge(currentDatabase(), '.*')", "table function merge()"),
    ("SELECT * FROM input('x String')", "table function input()"),
    ("SELECT * FROM dictionary('d')", "dictionary"),
    ("SELECT * FROM sqlite('/tmp/x.db', 't')", "table function sqlite()"),
    ("SELECT * FROM iceberg('http://127.0.0.1:1/x')", "table function iceberg()"),
    ("SELECT * FROM deltaLake('http://127.0.0.1:1/x')", "table function deltaLake()"),
    (f"SELECT * FROM fileCluster('c', '{HOSTNAME}')", "table function fileCluster()"),
    ("SELECT * FROM generateRandom('a UInt8') LIMIT 1", "table function generateRandom()"),
    ("SELECT * FROM numbers(10)", "table function numbers()"),
    # scalar functions that reach dictionaries or other tables, or stall the engine
    ("SELECT dictGet('d', 'x', toUInt64(1))", "function dictGet()"),
    ("SELECT dictGetString('d', 'x', toUInt64(1))", "function dictGetString()"),
    ("SELECT joinGet('t', 'x', 1)", "function joinGet()"),
    ("SELECT hasColumnInTable('system', 'users', 'name')", "function hasColumnInTable()"),
    ("SELECT sleep(3)", "function sleep()"),
    # tables that are not layerwatch's
    ("SELECT * FROM system.users", NOT_OURS),
    ("SELECT * FROM system.tables", NOT_OURS),
    ("SELECT name, value FROM system.settings", NOT_OURS),
    ("SELECT * FROM `system`.`users`", NOT_OURS),
    ('SELECT * FROM "system"."tables"', NOT_OURS),
    ("SELECT * FROM other_db.predictions", NOT_OURS),
    ("SELECT * FROM secrets", NOT_OURS),
    ("SELECT 1 WHERE 'x' IN system.users", NOT_OURS),
    ("SELECT count() FROM predictions WHERE event_id IN (SELECT name FROM system.users)", NOT_OURS),
    # clauses that write, reformat or change the limits
    ("SELECT 1 INTO OUTFILE '/tmp/lw-pwned'", PARSE),
    ("SELECT 1 FROM system.one INTO OUTFILE '/tmp/lw-pwned' FORMAT TSV", PARSE),
    ("SELECT 1 FORMAT TSV", "FORMAT"),
    ("SELECT count() FROM predictions SETTINGS readonly = 0", "SETTINGS"),
    ("select 1 settings max_memory_usage = 0", "SETTINGS"),
    ("SELECT x FROM (SELECT 1 AS x SETTINGS max_result_rows = 0)", "SETTINGS"),
    # more than one statement, or not a SELECT
    ("SELECT 1; SELECT 2", "one statement"),
    ("SELECT 1; DROP TABLE predictions", "one statement"),
    ("SELECT 1;\n-- x\n;DROP TABLE predictions", "one statement"),
    ("DROP TABLE predictions", ONLY_SELECT),
    ("INSERT INTO predictions (event_id) VALUES ('x')", ONLY_SELECT),
    ("INSERT INTO predictions SELECT * FROM predictions", ONLY_SELECT),
    ("ALTER TABLE predictions DELETE WHERE 1", ONLY_SELECT),
    ("SET readonly = 0", ONLY_SELECT),
    ("SHOW TABLES", ONLY_SELECT),
    ("DESCRIBE TABLE predictions", ONLY_SELECT),
    ("EXPLAIN SELECT 1", ONLY_SELECT),
    ("KILL QUERY WHERE 1", "refused: "),
    ("SYSTEM SHUTDOWN", ONLY_SELECT),
    # lexer tricks: text one parser could read as a literal or comment and the other as code
    (f"SELECT $$ ', file('{HOSTNAME}'), ' $$", ODD),
    (f"SELECT 1 # , file('{HOSTNAME}')", ODD),
    (f"SELECT \\u0066ile('{HOSTNAME}')", ODD),
    (f"SELECT \uff46\uff49\uff4c\uff45('{HOSTNAME}')", ODD),  # fullwidth letters
    (f"SELECT fil\u0435('{HOSTNAME}')", ODD),  # Cyrillic e
    ("SELECT {p:String}", ODD),
    ("SELECT 'unterminated", "unterminated"),
    ("SELECT 1 /* unterminated", "unterminated"),
    ("", "empty"),
    ("  -- only a comment\n", "empty"),
]

LEGIT: list[str] = [
    "SELECT 1",
    "select count() from predictions",
    "SELECT count() FROM predictions;",
    "(SELECT 1)",
    "SELECT -- a comment\n 1 /* another */",
    "SELECT model_id, count() AS n FROM predictions FINAL GROUP BY model_id ORDER BY n DESC LIMIT 5",
    "WITH (SELECT max(window_end_ms) FROM drift_windows) AS last SELECT count() FROM drift_windows WHERE window_end_ms >= last",
    "WITH 10 AS k SELECT k * 2",
    "SELECT count() FROM predictions WHERE event_id IN (SELECT event_id FROM sample_scores)",
    "SELECT count() FROM predictions WHERE event_id IN ('a', 'b')",
    "SELECT p.event_id FROM predictions AS p ANY LEFT JOIN attack_labels AS a USING (event_id) LIMIT 1",
    "SELECT 'file(/etc/hostname) $ # \\\\ {x}' AS s",
    "SELECT 1 AS file",
    "SELECT count() FROM predictions AS file",
    "SELECT `model_id` FROM `predictions` LIMIT 1",
    "SELECT * FROM system.one",
    "SELECT number FROM system.numbers LIMIT 3",
    "SELECT 1 UNION ALL SELECT 2",
    "SELECT toDateTime(0) AS t, intDiv(10, 3) AS d, arrayMap(x -> x * 2, [1, 2]) AS a",
    "SELECT arrayJoin([1, 2, 3]) AS x",
    "SELECT reason FROM dead_letters WHERE reason LIKE '%#%$%' LIMIT 1",
    "SELECT version, applied_at FROM schema_migrations ORDER BY version",
    "SELECT uniqExact(window_id) FROM drift_windows FINAL WHERE layer = '__combined__'",
    "SELECT alert_id, argMax(state, ts_ms) AS s FROM alerts GROUP BY alert_id HAVING s = 'open'",
]


def code_queries() -> list[tuple[str, str]]:
    """(where, rendered SQL) of every SELECT/WITH literal in streams/ (store/statements.py holds most)
    and of the shipped queries: what the dashboard, report, demo and recovery send as read-only."""
    from streams.store.queries import REQUIRED, query_params, shipped_queries
    from streams.store.sql import placeholders, render

    def value(name: str) -> object:
        if name.endswith(("ids", "models")):
            return ["a", "b"]
        return "x" if re.search(r"id|layer|model|^[mvlc]$", name) else 1

    out = []
    for name, sql in shipped_queries().items():
        declared = query_params(sql)
        out.append((f"queries/{name}", render(sql, {k: (value(k) if v is REQUIRED else v) for k, v in declared.items()})))
    for path in sorted((ROOT / "streams").rglob("*.py")):
        if "store" in path.parts and path.name != "statements.py":  # the rest of the store package: DDL, fragments
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.match(r"\s*(SELECT|WITH)\s", node.value):
                sql = node.value
                out.append((f"{path.relative_to(ROOT)}:{node.lineno}", render(sql, {p: value(p) for p in placeholders(sql)})))
    return out
