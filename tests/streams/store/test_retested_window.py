"""Store contract: a re-tested window replaces its top-k in sample_scores under FINAL (both backends).

A window is tested again after a restart (recovery re-tests windows whose result did not
land) or after a coalesced backlog; the second test's most suspicious events may differ.
The rows come from the results sink's own column building (``streams.app.result_rows``).
"""

from __future__ import annotations

from typing import Iterator

import pytest

from streams.app import result_rows
from streams.store import Store, open_store

pytestmark = [pytest.mark.reliability]

TOP_K = 5


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    try:
        s.migrate()
        yield s
    finally:
        s.close()


def drift_record(window_id: str, layer: str, events: list[str], scores: list[float]) -> dict:
    return {
        "window_id": window_id, "model_id": "m", "model_version": "1", "layer": layer,
        "window_start_ms": 1_700_000_000_000, "window_end_ms": 1_700_000_010_000, "n_reference": 500,
        "n_window": 200, "mmd2": 0.1, "p_value": 0.01, "detection_rate": 0.9, "alpha": 0.05, "bandwidth": 1.0,
        "n_permutations": 100, "compute_ms": 5.0, "device": "cpu",
        "top_samples": [{"event_id": e, "score": s} for e, s in zip(events, scores)],
    }


def write(store: Store, records: list[dict]) -> None:
    for table, columns in result_rows([("DriftResult", r) for r in records]).items():
        store.insert(table, columns)


def test_retested_window_replaces_its_top_k_under_final(store: Store) -> None:
    first = [f"a{i}" for i in range(TOP_K)]
    second = [f"b{i}" for i in range(TOP_K)]  # a different top-k: no event in common
    write(store, [drift_record("w1", "penultimate", first, [9.0 - i for i in range(TOP_K)]),
                  drift_record("w2", "penultimate", ["z0", "z1"], [1.0, 0.5])])
    write(store, [drift_record("w1", "penultimate", second, [5.0 - i for i in range(TOP_K)])])

    rows = store.query("SELECT rank, event_id, score FROM sample_scores FINAL WHERE window_id = 'w1' "
                       "AND layer = 'penultimate' ORDER BY rank")
    assert [r[1] for r in rows] == second and [r[0] for r in rows] == list(range(1, TOP_K + 1))
    assert [r[2] for r in rows] == [5.0 - i for i in range(TOP_K)]
    # the other window is untouched, and the drift row itself is one row under FINAL
    assert store.query("SELECT event_id FROM sample_scores FINAL WHERE window_id = 'w2' ORDER BY rank") == \
        [("z0",), ("z1",)]
    assert store.query("SELECT count() FROM drift_windows FINAL WHERE window_id = 'w1'") == [(1,)]

