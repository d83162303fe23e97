"""No secret in any output: settings, logs, `/health`, error messages, tracebacks.

Unit level: the one masking function (streams.secrets.mask) on URLs, query strings, bearer
headers and registered values; `Settings` repr and `safe_dict`; log records and their
tracebacks after `install`.

Process level: distinctive secrets (a password inside LW_CLICKHOUSE_URL, the web token, the
SASL password, a webhook URL with a password and a token) are set, then `layerwatch config`,
`layerwatch query` against an unreachable server and with a malformed URL, and a worker that
cannot reach its store are run; all their output is searched for the secrets. A worker that
runs at debug level with planted secrets (its log, /health, /metrics, refused queries) is
checked in test_sql_policy.py, which starts one anyway.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from streams import secrets as lw_secrets
from streams.settings import Settings

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]


def test_mask_hides_url_passwords_query_tokens_bearer_and_registered_values() -> None:
    lw_secrets.register(["registered-s3cret"])
    text = ("clickhouse://bob:pa55-word@db:9000/lw and https://h/x?a=1&token=abc123&b=2 "
            "Authorization: Bearer eyJhbGciOi.x-y_z and registered-s3cret and registered%2Ds3cret")
    masked = lw_secrets.mask(text)
    for secret in ("pa55-word", "abc123", "eyJhbGciOi.x-y_z", "registered-s3cret"):
        assert secret not in masked, masked
    assert "clickhouse://bob:***@db:9000/lw" in masked and "a=1&token=***&b=2" in masked
    assert lw_secrets.mask_data({"reason": ["x://u:p4ss@h"], "n": 1}) == {"reason": ["x://u:***@h"], "n": 1}
    assert lw_secrets.mask("nothing secret here: 127.0.0.1:9092") == "nothing secret here: 127.0.0.1:9092"


def test_settings_show_effective_values_with_secrets_masked(tmp_path) -> None:
    s = Settings(clickhouse_url="clickhouse://bob:pa55-word@db:9000/lw", web_token="tok-1234",
                 webhook_url="https://hooks.example/x?token=hook-tok", state_dir=str(tmp_path))
    shown = s.safe_dict()
    assert shown["clickhouse_url"] == "clickhouse://bob:***@db:9000/lw"
    assert shown["webhook_url"] == "https://hooks.example/x?token=***" and shown["web_token"] == "***"
    assert shown["classifier_path"] == str(tmp_path / "classifier" / "classifier.skops")
    assert Settings(classifier_path="/m/c.skops").safe_dict()["classifier_path"] == "/m/c.skops"
    for secret in ("pa55-word", "tok-1234", "hook-tok"):
        assert secret not in repr(s) and secret not in json.dumps(shown)
    assert s.clickhouse_url.endswith("pa55-word@db:9000/lw")  # the value itself is untouched


def test_log_records_and_their_tracebacks_are_masked() -> None:
    lw_secrets.install(Settings(kafka_sasl_password="sasl-pw-9876", clickhouse_url="clickhouse://u:url-pw-5432@h/db"))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("lw-test-masking")
    log.addHandler(handler)
    try:
        log.warning("connecting with %s to %s", "sasl-pw-9876", "clickhouse://u:url-pw-5432@h/db")
        try:
            raise RuntimeError("login failed for clickhouse://u:url-pw-5432@h/db")
        except RuntimeError:
            log.exception("store failed")
    finally:
        log.removeHandler(handler)
    out = stream.getvalue()
    assert "connecting with *** to clickhouse://u:***@h/db" in out and "RuntimeError" in out
    assert "sasl-pw-9876" not in out and "url-pw-5432" not in out


# ============================================================ processes


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run([sys.executable, "-m", "streams.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=env["LW_STATE_DIR"])
    return f"$ {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"


def _get(url: str, token: str = "", body: dict | None = None) -> str:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.read().decode(errors="replace")


@pytest.mark.integration
def test_no_secret_in_any_output_of_a_run(broker, tmp_path) -> None:
    from streams.broker import free_port

    store_pw, token, sasl_pw, hook_pw, hook_tok = (f"{p}-{secrets.token_hex(6)}" for p in
                                                   ("urlpw", "webtok", "saslpw", "hookpw", "hooktok"))
    planted = [store_pw, token, sasl_pw, hook_pw, hook_tok]
    dead_port = free_port()  # nothing listens there
    prefix = f"sec{secrets.token_hex(2)}."
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LW_STATE_DIR": str(tmp_path), "LW_KAFKA_BOOTSTRAP": broker,
           "LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"layerwatch-{prefix}", "LW_WEB_TOKEN": token,
           "LW_KAFKA_SASL_USERNAME": "lw", "LW_KAFKA_SASL_PASSWORD": sasl_pw, "LW_AGENTS": "sink,alerts",
           "LW_WEBHOOK_URL": f"http://hook:{hook_pw}@127.0.0.1:{dead_port}/alerts?token={hook_tok}",
           "LW_CLICKHOUSE_URL": f"clickhouse://lwuser:{store_pw}@127.0.0.1:{dead_port}/lw"}
    outputs = []
    config = _run(["config"], env)
    outputs.append(config)
    shown = json.loads(config.split("\n", 1)[1].rsplit("\n", 2)[0])
    assert shown["clickhouse_url"] == f"clickhouse://lwuser:***@127.0.0.1:{dead_port}/lw"
    assert shown["classifier_path"] == str(Path(tmp_path) / "classifier" / "classifier.skops")
    query = _run(["query", "SELECT 1"], env)
    assert "unavailable" in query and " -> 2" in query, query
    outputs.append(query)
    outputs.append(_run(["query", "SELECT 1"], {**env, "LW_CLICKHOUSE_URL": f"clickhouse://u:{store_pw}@127.0.0.1:notaport/db"}))
    failed_worker = _run(["worker", "--loglevel", "debug"], {**env, "LW_WEB_PORT": str(free_port())}, timeout=180)
    assert " -> 0\n" not in failed_worker and "unavailable" in failed_worker, failed_worker[-2000:]
    outputs.append(failed_worker)

    text = "\n".join(outputs)
    leaks = [s for s in planted if s in text]
    assert not leaks, (leaks, text[-3000:])
