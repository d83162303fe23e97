"""Store contract: read-only queries run beside the writes, not in front of them, and within a memory bound.

Both backends: a slow read-only query on one thread does not hold up inserts on another
(chDB: a read-only session per thread, never the writer's lock; the server: a connection
per thread), and an aggregation past ``max_memory_usage`` fails alone, the store goes on.
"""

from __future__ import annotations

import threading
from typing import Iterator

import numpy as np
import pytest

from streams.store import ReadonlyLimits, Store, StoreError, open_store

pytestmark = [pytest.mark.reliability]


def _rows(start: int, n: int) -> dict:
    ids = [f"e{i:08d}" for i in range(start, start + n)]
    return {"event_id": ids, "model_id": ["m"] * n, "ts": np.full(n, 1_700_000_000, np.int64)}


def _store(url: str, limits: ReadonlyLimits) -> Store:
    s = open_store(url, readonly_limits=limits)
    s.migrate()
    return s


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with _store(store_url, ReadonlyLimits(max_execution_time=3)) as s:
        yield s


@pytest.fixture
def small_store(store_url: str) -> Iterator[Store]:
    with _store(store_url, ReadonlyLimits(max_memory_usage=8 * 1024 * 1024)) as s:
        yield s


def test_a_slow_query_does_not_hold_up_inserts(store: Store) -> None:
    store.insert("predictions", _rows(0, 300_000))
    running, outcome = threading.Event(), {}

    def slow_query() -> None:
        running.set()
        try:  # 12 s of sleeping, at most 2.6 s per block of 65536 rows: stopped by max_execution_time after 3 s
            # the backend hook under the SQL policy (which refuses sleepEachRow): read-only session, limits on
            store._execute("SELECT max(sleepEachRow(0.00004) + length(event_id)) FROM predictions", readonly=True)
            outcome["error"] = None
        except StoreError as exc:
            outcome["error"] = exc
        finally:
            running.clear()

    reader = threading.Thread(target=slow_query)
    reader.start()
    running.wait(5)
    during = 0
    for k in range(5):
        store.insert("predictions", _rows(1_000_000 + 100 * k, 100))
        during += running.is_set()  # this insert returned while the query was still running
    reader.join(30)
    assert during >= 1, f"every insert waited for the query ({outcome})"
    assert isinstance(outcome["error"], StoreError) and outcome["error"].code == 159, outcome  # TIMEOUT_EXCEEDED
    assert store.query("SELECT count() FROM predictions") == [(300_500,)]


def test_an_aggregation_past_the_memory_limit_fails_alone(small_store: Store) -> None:
    store = small_store
    store.insert("predictions", _rows(0, 300_000))
    with pytest.raises(StoreError) as err:
        store.query("SELECT uniqExact(event_id), groupArray(event_id) FROM predictions", readonly=True)
    assert err.value.code == 241 or "memory" in str(err.value).lower(), err.value  # MEMORY_LIMIT_EXCEEDED
    assert store.query("SELECT count() FROM predictions", readonly=True) == [(300_000,)]
    store.insert("predictions", _rows(300_000, 10))
    assert store.query("SELECT count() FROM predictions") == [(300_010,)]
