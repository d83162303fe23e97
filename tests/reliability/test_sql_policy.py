"""Read-only means read-only: the SQL policy refuses every hostile query on both stores and
through a worker's `/api/query`, and lets every legitimate one (the dashboard's, the report's,
the shipped queries) run on ClickHouse 18.16 and chDB.

The corpus is in tests/reliability/sql_corpus.py. The worker test runs on chDB, the default
store and the one whose engine lives in the worker's process; the server worker gets the
same corpus in test_security.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from streams.store import ReadonlyLimits, StoreError, open_store
from streams.store.policy import QueryRefused, check_query
from tests.reliability.sql_corpus import HOSTILE, LEGIT, code_queries

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]


def _hostname_text() -> str:
    try:
        return Path("/etc/hostname").read_text().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


# ============================================================ the policy (pure)


def test_the_corpus_is_large_enough() -> None:
    assert len(HOSTILE) >= 40 and len({q for q, _ in HOSTILE}) == len(HOSTILE)
    assert len(code_queries()) >= 20  # the harvest finds the dashboard's, report's and shipped queries


@pytest.mark.parametrize("sql,reason", HOSTILE, ids=[f"h{i:02d}" for i in range(len(HOSTILE))])
def test_hostile_query_is_refused_with_one_clear_line(sql: str, reason: str) -> None:
    with pytest.raises(QueryRefused) as refused:
        check_query(sql)
    message = str(refused.value)
    assert message.startswith("refused: ") and reason in message, message
    assert "\n" not in message and len(message) < 300


@pytest.mark.parametrize("sql", LEGIT + [q for _, q in code_queries()])
def test_legitimate_query_passes_unchanged_but_for_comments(sql: str) -> None:
    out = check_query(sql)
    assert out and "--" not in out and not out.endswith(";")


def test_file_error_names_the_function() -> None:
    with pytest.raises(QueryRefused, match=r"^refused: function file\(\) reads outside layerwatch's tables$"):
        check_query("SELECT file('/etc/hostname')")
    with pytest.raises(QueryRefused, match=r"^refused: table function file\(\) reads outside layerwatch's tables$"):
        check_query("SELECT * FROM file('/etc/hostname', 'TSV', 'x String')")


# ============================================================ both stores, directly


def test_both_stores_refuse_the_corpus_and_run_the_legitimate_queries(store_url: str) -> None:
    secret = _hostname_text()
    with open_store(store_url) as store:
        store.migrate()
        store.insert("predictions", {"event_id": ["e1"], "model_id": ["cnn"], "ts_ms": [1_700_000_000_000],
                                     "ts": [1_700_000_000]})
        for sql, reason in HOSTILE:
            with pytest.raises(StoreError) as refused:
                store.query_columns(sql, readonly=True)
            assert reason in str(refused.value) and secret not in str(refused.value), (sql, str(refused.value))
        failures = []
        for where, sql in [("legit", q) for q in LEGIT] + code_queries():
            try:
                store.query_columns(sql, readonly=True)
            except StoreError as exc:
                failures.append(f"{where}: {exc} :: {sql[:120]}")
        assert not failures, "\n".join(failures)
        assert store.query("SELECT count() FROM predictions", readonly=True) == [(1,)]


def test_limits_apply_underneath_on_both_stores(store_url: str) -> None:
    limits = ReadonlyLimits(max_memory_usage=64 * 1024 * 1024, max_rows_to_read=1_000_000, max_result_rows=10)
    with open_store(store_url, readonly_limits=limits) as store:
        with pytest.raises(StoreError, match=r"(?i)memory"):
            store.query("SELECT length(groupArray(range(1000))) FROM (SELECT number FROM system.numbers LIMIT 200000)",
                        readonly=True)
        with pytest.raises(StoreError, match=r"(?i)limit for rows|rows to read|too many rows"):
            store.query("SELECT count() FROM system.numbers WHERE number < 2000000", readonly=True)
        with pytest.raises(StoreError, match=r"(?i)limit for result|more than"):
            store.query("SELECT number FROM system.numbers LIMIT 11", readonly=True)
        assert store.query("SELECT sum(number) FROM (SELECT number FROM system.numbers LIMIT 1000)",
                           readonly=True) == [(499500,)]
        # the writer's path has no such limits
        assert store.query("SELECT count() FROM (SELECT number FROM system.numbers LIMIT 2000000)") == [(2000000,)]


# ============================================================ a worker's /api/query and the CLI


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=env["LW_STATE_DIR"])


@pytest.mark.integration
def test_worker_api_and_cli_refuse_the_corpus_on_chdb(broker, tmp_path) -> None:
    """Also the worker half of test_secrets.py: it runs at debug level with planted secrets, and
    none appears in its log, /health, /metrics or answers."""
    import secrets
    import urllib.request

    from streams.broker import free_port
    from streams.stack import LocalStack, http_json, wait_for

    hostname = _hostname_text()
    token, sasl_pw, ch_pw, hook_tok = (f"{p}-{secrets.token_hex(6)}" for p in ("tok", "sasl", "chpw", "hook"))
    prefix = f"sqlp{os.getpid() % 10_000}."
    url_store = f"chdb://{tmp_path / 'store'}"
    env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"layerwatch-{prefix}", "LW_AGENTS": "sink", "LW_WEB_TOKEN": token,
           "LW_KAFKA_SASL_USERNAME": "lw", "LW_KAFKA_SASL_PASSWORD": sasl_pw, "LW_CLICKHOUSE_PASSWORD": ch_pw,
           "LW_WEBHOOK_URL": f"http://127.0.0.1:{free_port()}/hook?token={hook_tok}"}
    answers = []
    with LocalStack(state_dir=tmp_path / "stack", clickhouse_url=url_store, bootstrap=broker, env=env) as stack:
        port = free_port()
        worker = stack.spawn("worker", ["worker", "--loglevel", "debug"], LW_WEB_PORT=str(port))
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_json(f"{url}/health", timeout=1.0)[0] in (200, 503), 90, "worker /health",
                 alive=worker.check)
        for sql, reason in HOSTILE:
            status, body = http_json(f"{url}/api/query", {"sql": sql, "params": {}}, token=token, timeout=30)
            assert status == 400 and reason in body.get("error", ""), (sql, status, body)
            answers.append(str(body))
        for sql in LEGIT:
            status, body = http_json(f"{url}/api/query", {"sql": sql, "params": {}}, token=token, timeout=30)
            assert status == 200, (sql, status, body)
        answers.append(str(http_json(f"{url}/health")[1]))
        request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            answers.append(resp.read().decode())
        cli_env = {**os.environ, **env, "LW_KAFKA_BOOTSTRAP": broker, "LW_STATE_DIR": str(tmp_path),
                   "LW_CLICKHOUSE_URL": url_store, "LW_WEB_PORT": str(port), "PYTHONPATH": str(ROOT)}
        via_worker = _cli(["query", "SELECT file('/etc/hostname')"], cli_env)
        worker.check()
        worker.stop()
        log_text = worker.log_path.read_text(errors="replace")
    direct = _cli(["query", "SELECT file('/etc/hostname')"], {**cli_env, "LW_CLICKHOUSE_URL": f"chdb://{tmp_path / 'other'}"})
    for run in (via_worker, direct):
        assert run.returncode == 2 and "refused: function file()" in run.stderr, (run.stdout, run.stderr)
        answers.append(run.stdout + run.stderr)
    text = "\n".join(answers)
    assert hostname not in text
    leaks = [s for s in (token, sasl_pw, ch_pw, hook_tok) if s in text + log_text]
    assert not leaks and "DEBUG" in log_text.upper(), leaks
