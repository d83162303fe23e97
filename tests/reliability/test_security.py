"""Security guarantees: bearer token, read-only bounded SQL, credentials pass through, no unpickling, no leaked secret.

Unit level (no services): Kafka SSL/SASL settings reach kafka-python, Faust (and through
it aiokafka) and the recovery's aiokafka clients; ClickHouse user/password/TLS reach the
driver; model files refuse pickled objects (``weights_only=True``); classifier files
refuse types outside the allow-list; no loader in the code base unpickles.

Service level: a worker with ``LW_WEB_TOKEN`` on the ClickHouse server, logged in as the
`layerwatch` user with its password and logging at debug level: `/metrics` and
`/api/query` answer 401 without the token and 200 with it; writes, DDL, multi-statement,
table functions and settings overrides are refused through the API and through
`layerwatch query` (directly and through the worker); results are bounded in rows and
time; a wrong password fails with a message that does not contain it; and no secret
(token, passwords) appears in the worker's log, the CLI's stderr or `layerwatch config`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from streams.settings import Settings
from tests.reliability.sql_corpus import HOSTILE

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = [
    "INSERT INTO predictions (event_id) VALUES ('x')",
    "INSERT INTO predictions SELECT * FROM predictions",
    "DROP TABLE predictions",
    "ALTER TABLE predictions DELETE WHERE 1",
    "TRUNCATE TABLE predictions",
    "CREATE TABLE pwned (a UInt8) ENGINE = Memory",
    "RENAME TABLE predictions TO p2",
    "OPTIMIZE TABLE predictions FINAL",
    "SELECT 1; DROP TABLE predictions",
    "SELECT 1; SELECT 2",
    "/* comment */ DROP TABLE predictions",
    "SET readonly = 0",
    "SELECT count() FROM predictions SETTINGS readonly = 0",
    "SELECT 1 SETTINGS max_result_rows = 0",
    "SELECT * FROM file('/etc/hostname', 'TSV', 'x String')",
    "SELECT * FROM url('http://127.0.0.1:1/', 'TSV', 'x String')",
    "SELECT 1 INTO OUTFILE '/tmp/lw-pwned'",
    "KILL QUERY WHERE 1",
    "SYSTEM SHUTDOWN",
]


# ============================================================ credentials pass through (unit)


def test_kafka_sasl_ssl_settings_reach_every_kafka_client() -> None:
    import certifi
    from faust.auth import SASLCredentials
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from streams.app import faust_settings
    from streams.kafka import aiokafka_config, kafka_python_config

    s = Settings(kafka_bootstrap="k1:9093,k2:9093", kafka_security_protocol="SASL_SSL",
                 kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="lw", kafka_sasl_password="s3cret-sasl",
                 kafka_ssl_cafile=certifi.where())
    kp = kafka_python_config(s)
    assert kp == {"bootstrap_servers": ["k1:9093", "k2:9093"], "security_protocol": "SASL_SSL",
                  "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "lw",
                  "sasl_plain_password": "s3cret-sasl", "ssl_cafile": certifi.where()}
    from faust.types.auth import (
        to_credentials,  # what Faust's conf does with broker_credentials
    )

    creds = to_credentials(faust_settings(s)["broker_credentials"])
    assert isinstance(creds, SASLCredentials)
    auth = credentials_to_aiokafka_auth(creds)  # what Faust hands aiokafka
    assert auth["security_protocol"] == "SASL_SSL" and auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("lw", "s3cret-sasl")
    assert auth["ssl_context"] is not None
    assert "s3cret-sasl" not in repr(creds) and "s3cret-sasl" not in repr(s)
    ak = aiokafka_config(s)
    assert ak["security_protocol"] == "SASL_SSL" and ak["sasl_plain_password"] == "s3cret-sasl"
    assert ak["ssl_context"] is not None
    assert s.safe_dict()["kafka_sasl_password"] == "***"

    plain = Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u", kafka_sasl_password="p")
    assert credentials_to_aiokafka_auth(to_credentials(faust_settings(plain)["broker_credentials"]))["security_protocol"] == "SASL_PLAINTEXT"
    tls = Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=certifi.where())
    assert credentials_to_aiokafka_auth(to_credentials(faust_settings(tls)["broker_credentials"]))["security_protocol"] == "SSL"
    assert kafka_python_config(tls)["ssl_cafile"] == certifi.where()
    assert "broker_credentials" not in faust_settings(Settings())


def test_clickhouse_credentials_and_tls_reach_the_driver() -> None:
    import certifi

    from streams.store import open_store_from_settings

    s = Settings(clickhouse_url="clickhouse://ch.example:9440/lw", clickhouse_user="lw",
                 clickhouse_password="s3cret-ch", clickhouse_secure=True, clickhouse_ca_certs=certifi.where())
    store = open_store_from_settings(s)  # connects lazily
    try:
        kw = store._client_kwargs
        assert (kw["user"], kw["password"], kw["secure"], kw["ca_certs"]) == ("lw", "s3cret-ch", True, certifi.where())
        assert (store.host, store.port, store.database) == ("ch.example", 9440, "lw")
        assert "s3cret-ch" not in repr(store) and "s3cret-ch" not in store.url
    finally:
        store.close()
    in_url = open_store_from_settings(Settings(clickhouse_url="clickhouses://u:p%40ss@h/db"))
    try:
        assert in_url._client_kwargs["password"] == "p@ss" and in_url._client_kwargs["secure"] is True
        assert "p@ss" not in in_url.url and "p%40ss" not in in_url.url
    finally:
        in_url.close()


# ============================================================ no unpickling (unit)


class _Evil:
    """Unpickling this runs code: it creates the file named in the marker."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_model_file_with_a_pickled_object_is_refused(tmp_path) -> None:
    import torch

    from workers.inference.models import ARCHITECTURES, _load_cached, model_paths

    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    pt, js = model_paths(tmp_path, "cnn")
    pt.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"conv.weight": torch.zeros(1), "payload": _Evil()}, buf)
    pt.write_bytes(buf.getvalue())
    js.write_text(json.dumps({"version": ARCHITECTURES["cnn"].version, "seed": 0, "val_accuracy": 1.0,
                              "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}))
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported global"):
        _load_cached(tmp_path, "cnn", 0, torch.device("cpu"))
    assert not marker.exists(), "the pickled object ran while loading"


def test_classifier_file_with_an_untrusted_type_is_refused(tmp_path) -> None:
    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    from workers.classifier.model import (
        FORMAT,
        AttackClassifier,
        UntrustedClassifierError,
    )

    path = tmp_path / "classifier.skops"
    path.write_bytes(sio.dumps({"format": FORMAT, "meta": "{}", "estimators": {"x": FunctionTransformer(func=os.system)},
                                "classes": {}}))
    with pytest.raises(UntrustedClassifierError):
        AttackClassifier.load(path)


def test_no_loader_in_the_code_base_unpickles() -> None:
    bad = {
        r"torch\.load\((?![^)]*weights_only\s*=\s*True)": "torch.load without weights_only=True",
        r"\bpickle\.loads?\(": "pickle", r"\bjoblib\.load\(": "joblib", r"\bdill\.loads?\(": "dill",
        r"allow_pickle\s*=\s*True": "np.load(allow_pickle=True)", r"(?<!`)\btrusted\s*=\s*True": "skops trusted=True",  # (docstrings quote it in ``...``)
        r"\bcloudpickle\b": "cloudpickle",
    }
    found = []
    for package in ("schemas", "streams", "workers"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text(errors="replace")
            for pattern, what in bad.items():
                for m in re.finditer(pattern, text):
                    found.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {what}")
    assert not found, "\n".join(found)


# ============================================================ services


def _get(url: str, token: str = "") -> int:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=env.get("LW_STATE_DIR"))


@pytest.mark.integration
@pytest.mark.reliability
def test_worker_api_token_readonly_bounds_and_no_secret_in_logs(broker, clickhouse_server, tmp_path) -> None:
    from streams.broker import free_port
    from streams.client import http_json
    from streams.stack import LocalStack, wait_for
    from streams.store import StoreError, open_store_from_settings
    from tests.clickhouse_server import PASSWORD, USER

    if not clickhouse_server.is_running():
        clickhouse_server.start()
    token, wrong_pw, sasl_pw, hook = (f"{p}-{secrets.token_hex(8)}" for p in ("tok", "wrongpw", "saslpw", "hook"))
    secret_strings = [token, wrong_pw, sasl_pw, hook, PASSWORD]
    db = f"lw_security_{secrets.token_hex(3)}"
    url_db = clickhouse_server.url_for(db)

    # -- a real login with the layerwatch user's password works; a wrong one fails without echoing it
    good = Settings(clickhouse_url=url_db, clickhouse_user=USER, clickhouse_password=PASSWORD)
    store = open_store_from_settings(good)
    try:
        store.migrate()
        assert store.query("SELECT 1") == [(1,)]  # (18.16 has no currentUser(); the wrong password below fails)
    finally:
        store.close()
    bad = open_store_from_settings(good.replace(clickhouse_password=wrong_pw))
    try:
        with pytest.raises(StoreError) as failed:
            bad.query("SELECT 1")
        chain, exc = [], failed.value
        while exc is not None:
            chain.append(repr(exc))
            exc = exc.__cause__ or exc.__context__
        text = " ".join(chain)
        assert re.search(r"(?i)password|authenticat", text), text
        assert wrong_pw not in text and PASSWORD not in text
    finally:
        bad.close()

    prefix = f"sec{secrets.token_hex(2)}."
    env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"layerwatch-{prefix}", "LW_CLICKHOUSE_USER": USER,
           "LW_WEB_TOKEN": token, "LW_KAFKA_SASL_USERNAME": "lw", "LW_KAFKA_SASL_PASSWORD": sasl_pw,
           "LW_WEBHOOK_TOKEN": hook, "LW_AGENTS": "sink,alerts"}
    with LocalStack(state_dir=tmp_path / "stack", clickhouse_url=url_db, bootstrap=broker, env=env) as stack:
        # -- a worker with the wrong password: it fails, and says why without the password
        failing = stack.spawn("worker-wrong-password", ["worker", "--loglevel", "debug"],
                              LW_CLICKHOUSE_PASSWORD=wrong_pw, LW_WEB_PORT=str(free_port()))
        failing.process.wait(timeout=120)
        assert failing.process.returncode != 0
        failed_log = failing.log_path.read_text(errors="replace")
        assert re.search(r"(?i)password|authenticat", failed_log), failed_log[-2000:]

        # -- the real one, at debug level
        port = free_port()
        worker = stack.spawn("worker", ["worker", "--loglevel", "debug"], LW_CLICKHOUSE_PASSWORD=PASSWORD,
                             LW_WEB_PORT=str(port))
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_json(f"{url}/health", timeout=1.0)[0] in (200, 503), 90, "worker /health",
                 alive=worker.check)
        for path in ("/metrics",):
            assert _get(url + path) == 401 and _get(url + path, "wrong-token") == 401
            assert _get(url + path, token) == 200
        assert _get(url + "/health") == 200  # open for load balancers
        q = {"sql": "SELECT count() FROM predictions", "params": {}}
        assert http_json(f"{url}/api/query", q)[0] == 401
        assert http_json(f"{url}/api/query", q, token="wrong-token")[0] == 401
        status, body = http_json(f"{url}/api/query", q, token=token)
        assert status == 200 and body["rows"] == [[0]]

        for sql in FORBIDDEN:
            status, body = http_json(f"{url}/api/query", {"sql": sql, "params": {}}, token=token)
            assert status == 400 and body.get("error"), (sql, status, body)
        for sql, reason in HOSTILE:  # the SQL policy's corpus (test_sql_policy.py runs it on a chDB worker)
            status, body = http_json(f"{url}/api/query", {"sql": sql, "params": {}}, token=token)
            assert status == 400 and reason in body.get("error", ""), (sql, status, body)
        status, body = http_json(f"{url}/api/query", {"sql": "SELECT number FROM system.numbers LIMIT 200000"},
                                 token=token)
        assert status == 400 and re.search(r"(?i)limit for result|more than", body["error"]), body
        assert http_json(f"{url}/api/query", {"sql": "x" * 30_000}, token=token)[0] == 400

        # -- `layerwatch query`: directly on the server, and through the worker's API (a chdb:// URL + a worker)
        cli_env = {**os.environ, **env, "LW_KAFKA_BOOTSTRAP": broker, "LW_STATE_DIR": str(tmp_path),
                   "LW_CLICKHOUSE_URL": url_db, "LW_CLICKHOUSE_PASSWORD": PASSWORD,
                   "LW_WEB_PORT": url.rsplit(":", 1)[1], "PYTHONPATH": str(ROOT)}
        via_api = {**cli_env, "LW_CLICKHOUSE_URL": f"chdb://{tmp_path / 'unused'}"}
        ok = _cli(["query", "SELECT count() FROM predictions", "--format", "csv"], via_api)
        assert ok.returncode == 0 and ok.stdout.strip().endswith("0"), ok.stderr
        stderr = ok.stderr
        for sql in ("DROP TABLE predictions", "INSERT INTO predictions (event_id) VALUES ('x')",
                    "ALTER TABLE predictions DELETE WHERE 1", "SELECT 1; DROP TABLE predictions"):
            for where in (cli_env, via_api):
                r = _cli(["query", sql], where)
                assert r.returncode == 2 and r.stderr.strip(), (sql, r.returncode, r.stdout, r.stderr)
                stderr += r.stderr
        no_token = _cli(["query", "SELECT 1"], {**via_api, "LW_WEB_TOKEN": ""})
        assert no_token.returncode == 2 and "401" in no_token.stderr
        wrong = _cli(["query", "SELECT 1"], {**cli_env, "LW_CLICKHOUSE_PASSWORD": wrong_pw})
        assert wrong.returncode == 2 and re.search(r"(?i)password|authenticat", wrong.stderr), wrong.stderr
        config = _cli(["config"], {**cli_env, "LW_CLICKHOUSE_PASSWORD": wrong_pw})
        stderr += no_token.stderr + wrong.stderr + wrong.stdout + config.stdout + config.stderr
        assert json.loads(config.stdout)["clickhouse_password"] == "***"
        status, body = http_json(f"{url}/api/query", q, token=token)
        assert status == 200 and body["rows"] == [[0]], "the table survived"
        worker.stop()
        worker_log = worker.log_path.read_text(errors="replace")

    leaks = [(where, s) for where, text in (("worker log", worker_log), ("failed worker log", failed_log),
                                             ("cli", stderr)) for s in secret_strings if s in text]
    assert not leaks, leaks
