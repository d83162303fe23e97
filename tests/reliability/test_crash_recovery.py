"""SIGKILL the worker in the middle of a stream, restart it: every event, window and alert exactly once.

The stream (tests/reliability/synthetic.py) carries 30 s of event time (50 events/s in
batches of 10, published at twice real time), clean / shifted / clean, with 4 s windows
every 2 s. The worker is killed with SIGKILL once the distribution-shift alert is open
(rows landed, windows open, offsets committed a moment ago); the publisher goes on, as
inference servers would, so a backlog builds while the worker is down (Tansu holds the
dead member's partitions until its session times out); the worker is restarted on the
same chDB path and consumer group, and the stream finishes. Then:

- `predictions`: every event once (FINAL count == uniqExact == events sent);
- `drift_windows`: each planned window exactly once — on its own or inside one
  coalesced window — and every window tested on its own holds exactly the events of its
  span, including the windows that were open at the crash (rebuilt by streams/recovery.py);
- `alerts`: one distribution_shift alert, opened before the crash and resolved after
  it under the same id (rules restored by streams/recovery.py).
"""

from __future__ import annotations

import itertools
import re

import pytest

from streams.client import http_json
from streams.stack import LocalStack
from tests.reliability.synthetic import (
    MODEL,
    PacedPublisher,
    Plan,
    future_base,
    publish_reference,
    query,
    scalar,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

_run = itertools.count()
SIZE_MS, STEP_MS = 4000, 2000


def _combined_windows(url: str) -> list[list]:
    return query(url, "SELECT window_id, window_start_ms, window_end_ms, n_window, detection_rate FROM drift_windows "
                      "FINAL WHERE model_id = {m} AND layer = '__combined__' ORDER BY window_start_ms, window_end_ms",
                 m=MODEL)


def test_sigkill_mid_stream_then_restart_keeps_everything_exactly_once(broker, chdb_url, tmp_path) -> None:
    prefix = f"crash{next(_run)}."
    topic = prefix + "predictions"
    base = future_base(STEP_MS)
    # 150 batches x 10 events, 20 ms apart: 30 s of event time; shifted between 6 s and 20 s
    plan = Plan(base_ms=base, n_batches=150, batch=10, spacing_ms=20, shift_from_ms=6000, shift_to_ms=20000, shift=1.0)
    closer = Plan(base_ms=base + 40_000, n_batches=1, batch=10, spacing_ms=1)  # moves the watermark past the last window
    with LocalStack(state_dir=tmp_path / "stack", clickhouse_url=chdb_url, bootstrap=broker) as stack:
        stack.env = {
            "LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"layerwatch-{prefix}", "LW_TOPIC_PARTITIONS": "2",
            "LW_MAX_EVENT_SKEW_S": "7200",  # the synthetic event times lie an hour ahead (synthetic.future_base)
            "LW_WINDOW_SIZE_S": str(SIZE_MS / 1000), "LW_WINDOW_STEP_S": str(STEP_MS / 1000),
            "LW_WINDOW_MAX_SAMPLES": "256", "LW_WINDOW_MIN_SAMPLES": "50", "LW_MMD_PERMUTATIONS": "50",
            "LW_DETECTION_REPEATS": "10", "LW_DETECTION_M": "50", "LW_AGENTS": "sink,drift,alerts",
        }
        worker, url = stack.start_worker()
        reference = publish_reference(broker, topic, n=200)
        wait_until(lambda: scalar(url, "SELECT count() FROM reference_embeddings FINAL") == len(reference),
                   timeout=60, message="the reference in ClickHouse")

        publisher = PacedPublisher(broker, topic, plan, period_s=0.1).start()  # event time runs 2x the wall clock
        wait_until(lambda: scalar(url, "SELECT count() FROM alerts FINAL WHERE state = 'open'") >= 1,
                   timeout=60, message="the shift alert to open before the crash")
        landed_before = scalar(url, "SELECT uniqExact(event_id) FROM predictions WHERE model_id = {m}", m=MODEL)
        windows_before = len(_combined_windows(url))
        consumed_before = _records_consumed(url)
        worker.kill()  # SIGKILL, mid-stream; the publisher goes on, as inference servers would
        sent_at_crash = publisher.sent
        assert 0 < landed_before - len(reference) < plan.n_events

        worker, url = stack.start_worker(name="worker")  # same LW_APP_ID, same chDB path (released by the kill)
        publisher.join(timeout=120)
        stack_producer_ids = publish_closer(broker, topic, closer)

        total = len(reference) + plan.n_events + closer.n_events
        wait_until(lambda: scalar(url, "SELECT uniqExact(event_id) FROM predictions") == total,
                   timeout=90, message=f"{total} predictions")
        n_windows = 2 + (plan.n_events * plan.spacing_ms - STEP_MS) // STEP_MS  # starts -2 s .. 28 s: 16
        expected = {(base + k * STEP_MS, base + k * STEP_MS + SIZE_MS) for k in range(-1, n_windows - 1)}

        def all_windows_tested() -> bool:
            spans = [(int(r[1]), int(r[2])) for r in _combined_windows(url)]
            return all(any(s <= a and b <= e for s, e in spans) for a, b in expected)

        wait_until(all_windows_tested, timeout=90, message="every planned window tested")
        wait_until(lambda: scalar(url, "SELECT count() FROM alerts FINAL WHERE state = 'resolved'") >= 1,
                   timeout=60, message="the alert to resolve after the restart")

        # -- predictions: each event exactly once, whatever was replayed
        assert scalar(url, "SELECT count() FROM predictions FINAL") == total
        assert scalar(url, "SELECT uniqExact(event_id) FROM predictions") == total
        raw_rows = scalar(url, "SELECT count() FROM predictions")
        n_records = 4 + plan.n_batches + 1  # reference, stream, closer
        replayed = consumed_before + _records_consumed(url) - n_records  # at least this many were consumed twice

        # -- windows: every planned window exactly once, alone or inside one coalesced window
        rows = _combined_windows(url)
        ids = [r[0] for r in rows]
        assert len(ids) == len(set(ids))
        # penultimate and combined rows (count rows start once a reference's hidden-attack fit is done)
        assert scalar(url, "SELECT count() FROM drift_windows FINAL WHERE layer IN ('penultimate', '__combined__')") \
            == 2 * len(rows)
        for a, b in expected:
            holders = [r for r in rows if int(r[1]) <= a and b <= int(r[2])]
            assert len(holders) == 1, (a - base, b - base, holders)
        singles = [r for r in rows if (int(r[1]), int(r[2])) in expected]
        for window_id, start, end, n_window, _ in singles:
            assert n_window == plan.events_in(int(start), int(end)), (window_id, n_window)
        # the backlog of the downtime closes many windows at once: they are still tested one by one
        assert len(singles) == len(expected) == len(rows), f"coalesced windows: {ids}"

        # -- the rebuild happened and fed the windows open at the crash
        log_text = worker.log_path.read_text(errors="replace")
        rebuilt = [tuple(map(int, m)) for m in re.findall(
            r"window recovery: (\d+) partition\(s\), (\d+) records, (\d+) events .*?; (\d+) window\(s\) open", log_text)]
        assert rebuilt and rebuilt[-1][2] > 0 and rebuilt[-1][3] >= 1, log_text[-3000:]

        # -- alerts: one distribution_shift alert, open + resolved under the same id
        alerts = query(url, "SELECT alert_id, state FROM alerts FINAL WHERE kind = 'distribution_shift' ORDER BY state")
        assert [a[1] for a in alerts] == ["open", "resolved"] and alerts[0][0] == alerts[1][0], alerts
        assert scalar(url, "SELECT count() FROM dead_letters FINAL") == 0
        status, health = http_json(f"{url}/health")
        assert status == 200 and health["status"] == "ok"
        print(f"\ncrash test: sent {total} events ({sent_at_crash} of {plan.n_batches} batches before the kill), "
              f"{landed_before} landed before it, {windows_before} windows tested before it; after: "
              f"{scalar(url, 'SELECT count() FROM predictions FINAL')} rows FINAL ({raw_rows} raw rows), "
              f"{len(rows)} windows ({len(singles)} single), {replayed} records replayed (at least), "
              f"rebuild {rebuilt[-1]}, alerts {alerts}, closer {stack_producer_ids}")


def _records_consumed(url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return int(sum(float(v) for v in re.findall(r'^layerwatch_records_total\{[^}]*predictions"\} (\S+)$', text, re.MULTILINE)))


def publish_closer(bootstrap: str, topic: str, closer: Plan) -> int:
    """One batch far ahead in event time, so the watermark closes the stream's last windows."""
    import numpy as np

    from schemas import encode_batch
    from tests.reliability.synthetic import make_batch, producer

    p = producer(bootstrap)
    p.send(topic, key=MODEL.encode(), value=encode_batch(
        make_batch([f"closer-{i}" for i in range(closer.batch)], closer.ts(0), np.random.default_rng(5))))
    p.flush()
    p.close()
    return closer.n_events
