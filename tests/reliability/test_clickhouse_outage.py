"""ClickHouse goes away under load: the sink holds the backlog in Kafka, retries, and loses nothing.

- worker level: the ClickHouse server is stopped for 30 s while a publisher keeps sending
  500 predictions/s. Meanwhile `/health` answers 503 "degraded", the ingest loop stops
  taking records (backpressure: it awaits the write, so at most one take of
  ``LW_SINK_BATCH_RECORDS`` is consumed after the first failure and the worker's memory
  stays flat), and when the server is back `/health` is 200 "ok" again and every event is
  in `predictions` exactly once.
- store level: a server killed in the middle of inserts raises StoreUnavailable (the
  retryable error), never a bare driver exception or a permanent StoreError, and a
  half-applied insert replayed after the restart collapses to one row per key.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
import urllib.request

import numpy as np
import pytest

from streams.client import http_json
from streams.stack import LocalStack
from tests.reliability.synthetic import MODEL, PacedPublisher, Plan, future_base, scalar
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

_run = itertools.count()
OUTAGE_S = float(os.environ.get("LW_TEST_OUTAGE_S", "30"))  # longer by hand: LW_TEST_OUTAGE_S=120


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_outage_of_30s_under_load_degrades_health_applies_backpressure_and_loses_nothing(
        broker, clickhouse_server, tmp_path) -> None:
    if not clickhouse_server.is_running():
        clickhouse_server.start()
    n = next(_run)
    prefix = f"outage{n}."
    store_url = clickhouse_server.url_for(f"lw_outage_{n}")
    # 500 predictions/s in records of 50 for 45 s: before, during and after the outage
    plan = Plan(base_ms=future_base(2000), n_batches=450, batch=50, spacing_ms=2)
    with LocalStack(state_dir=tmp_path / "stack", clickhouse_url=store_url, bootstrap=broker) as stack:
        stack.env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"layerwatch-{prefix}", "LW_TOPIC_PARTITIONS": "2",
                     "LW_AGENTS": "sink,drift,alerts", "LW_SINK_BATCH_RECORDS": "32", "LW_SINK_WITHIN_S": "0.2",
                     "LW_MAX_EVENT_SKEW_S": "7200"}  # the synthetic event times lie an hour ahead (future_base)
        worker, url = stack.start_worker()
        publisher = PacedPublisher(broker, prefix + "predictions", plan, period_s=0.1).start()
        topic_rows = "SELECT uniqExact(event_id) FROM predictions WHERE model_id = {m}"
        wait_until(lambda: scalar(url, topic_rows, m=MODEL) >= 1000, timeout=60, message="rows before the outage")

        clickhouse_server.stop()
        down_at = time.monotonic()
        wait_until(lambda: http_json(f"{url}/health")[0] == 503, timeout=20, message="/health to report degraded")
        status, health = http_json(f"{url}/health")
        assert status == 503 and health["status"] == "degraded" and "unavailable" in health["reason"], health
        consumed_at_degraded = _metric(url, "layerwatch_records_total")
        rss_at_degraded = _rss_mb(worker.process.pid)
        sent_at_degraded = publisher.sent

        observed: list[tuple[int, float, float]] = []

        def outage_over() -> bool:  # samples /health, consumption and memory until the outage has lasted 30 s
            status, _ = http_json(f"{url}/health")
            observed.append((status, _metric(url, "layerwatch_records_total"), _rss_mb(worker.process.pid)))
            return time.monotonic() - down_at >= OUTAGE_S

        wait_until(outage_over, timeout=OUTAGE_S + 30, interval=0.5)
        sent_during = publisher.sent - sent_at_degraded
        clickhouse_server.start()
        up_at = time.monotonic()
        wait_until(lambda: http_json(f"{url}/health")[0] == 200, timeout=30, message="/health back to ok")
        recovered_s = time.monotonic() - up_at
        assert http_json(f"{url}/health")[1]["status"] == "ok"
        publisher.join(timeout=120)
        total = plan.n_events
        wait_until(lambda: scalar(url, topic_rows, m=MODEL) == total, timeout=90, message=f"all {total} events")

        assert {s for s, _, _ in observed} == {503}, "health must stay degraded for the whole outage"
        consumed_during = max(c for _, c, _ in observed) - consumed_at_degraded
        assert sent_during > 100  # records kept coming ...
        assert consumed_during <= 32, consumed_during  # ... and stayed in Kafka: at most one more take was consumed
        rss_growth = max(r for _, _, r in observed) - rss_at_degraded
        assert rss_growth < 64, f"worker memory grew by {rss_growth:.0f} MiB during the outage"
        assert scalar(url, "SELECT count() FROM predictions FINAL") == total
        assert scalar(url, "SELECT uniqExact(event_id) FROM predictions") == total
        assert scalar(url, "SELECT count() FROM dead_letters FINAL") == 0
        assert _metric(url, "layerwatch_store_errors_total") >= 2  # retried with backoff, more than once
        raw = scalar(url, "SELECT count() FROM predictions")
        log_text = worker.log_path.read_text(errors="replace")
        assert "store is back; writes resumed" in log_text
        print(f"\noutage: {OUTAGE_S:.0f} s down; {total} sent, {total} landed exactly once ({raw} raw rows); "
              f"{sent_during} records published while down, {consumed_during:.0f} consumed; RSS +{rss_growth:.1f} MiB; "
              f"healthy {recovered_s:.1f} s after the server came back")


def test_server_killed_mid_insert_raises_store_unavailable_and_the_replay_collapses(clickhouse_server) -> None:
    from streams.store import StoreUnavailable, open_store

    if not clickhouse_server.is_running():
        clickhouse_server.start()
    store = open_store(clickhouse_server.url_for(f"lw_midinsert_{next(_run)}"), connect_timeout=2,
                       send_receive_timeout=10)
    try:
        store.migrate()
        rng = np.random.default_rng(0)
        n, batches = 20_000, 12
        ids = [np.array([f"ev-{b}-{i}" for i in range(n)], dtype=object) for b in range(batches)]

        def columns(b: int) -> dict:
            ts = np.full(n, 1_800_000_000, np.uint32)
            return {"event_id": ids[b], "model_id": np.full(n, "m", object), "model_version": np.full(n, "1", object),
                    "client_id": np.full(n, "c", object), "ts": ts, "ts_ms": ts.astype(np.uint64) * 1000,
                    "predicted": rng.integers(0, 10, n).astype(np.int32), "confidence": rng.random(n, np.float32),
                    "attack": np.full(n, "", object), "batch_offset": np.full(n, b, np.uint64),
                    "ingested_ms": np.zeros(n, np.uint64)}

        errors: list[BaseException] = []
        done: list[int] = []
        started = threading.Event()

        def insert_all() -> None:
            for b in range(batches):
                started.set()
                try:
                    store.insert("predictions", columns(b))
                    done.append(b)
                except BaseException as exc:  # noqa: BLE001 - classified below
                    errors.append(exc)
                    return

        t = threading.Thread(target=insert_all)
        t.start()
        started.wait(10)
        wait_until(lambda: len(done) >= 2, timeout=30, message="inserts under way")
        clickhouse_server.kill()  # SIGKILL in the middle of the inserts
        t.join(30)
        assert errors, "the inserts should have failed while the server was dead"
        assert all(isinstance(e, StoreUnavailable) for e in errors), [repr(e) for e in errors]
        with pytest.raises(StoreUnavailable):
            store.insert("predictions", columns(0))
        clickhouse_server.start()
        for b in range(batches):  # the sink's retry: the same rows again, whatever landed before
            store.insert("predictions", columns(b))
        assert store.query("SELECT count() FROM predictions FINAL")[0][0] == n * batches
        assert store.query("SELECT uniqExact(event_id) FROM predictions")[0][0] == n * batches
        assert store.query("SELECT count() FROM predictions")[0][0] >= n * batches
    finally:
        store.close()
        if not clickhouse_server.is_running():
            clickhouse_server.start()
