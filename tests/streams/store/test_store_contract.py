"""Store contract: the same tests against chDB 26 and a ClickHouse 18.16 server."""

from __future__ import annotations

import datetime as dt
import math
import threading
import traceback
from typing import Any, Iterator
from unittest import mock

import numpy as np
import pytest

from streams.store import (
    ReadonlyLimits,
    Store,
    StoreError,
    StoreUnavailable,
    open_store,
)
from streams.store.queries import run_shipped, shipped_queries
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

TABLES = [
    "predictions", "reference_embeddings", "drift_windows", "sample_scores",
    "attack_labels", "alerts", "dead_letters", "predictions_inputs",
]


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    try:
        s.migrate()
        yield s
    finally:
        s.close()


# ------------------------------------------------------------------- helpers


def utc(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).replace(tzinfo=None)


def canon(v: Any) -> Any:
    """Comparable form: NaN -> 'nan', tuples/arrays -> lists, numpy scalars -> Python."""
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return [canon(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return v


STRING_NOISE = "'q\"\\\n\t√é{x}"


def make_column(ch_type: str, col: str, n: int, rng: np.random.Generator, table_i: int
                ) -> tuple[Any, list[Any]]:
    """(input column, expected Python values) for a ClickHouse type."""
    if ch_type == "String":
        if col == "raw":
            vals = [b"\xff\x00raw" + bytes([i]) if i % 2 else f"raw-{i}".encode() for i in range(n)]
            expected = [v.decode() if i % 2 == 0 else v for i, v in enumerate(vals)]
            return vals, expected
        vals = [f"{col}-{i:03d}-{STRING_NOISE}" for i in range(n)]
        return np.array(vals, dtype=object), vals
    ints = {"Int32": np.int32, "Int64": np.int64, "UInt32": np.uint32, "UInt64": np.uint64}
    if ch_type in ints:
        info = np.iinfo(ints[ch_type])
        arr = rng.integers(max(info.min, -(2**40)), min(info.max, 2**40), n).astype(ints[ch_type])
        arr[0] = info.max
        if n > 1:
            arr[1] = info.min
        return arr, [int(x) for x in arr]
    if ch_type in ("Float32", "Float64"):
        dtype = np.float32 if ch_type == "Float32" else np.float64
        arr = rng.standard_normal(n).astype(dtype)
        arr[0] = np.nan
        if n > 2:
            arr[2] = np.inf
        return arr, [float(x) for x in arr]
    if ch_type == "DateTime":
        secs = 1_700_000_000 + np.arange(n, dtype=np.int64) * 61
        if table_i % 2:  # datetime64 input for half the tables
            return secs.astype("datetime64[s]"), [utc(int(s)) for s in secs]
        return secs.astype(np.uint32), [utc(int(s)) for s in secs]
    if ch_type == "Array(Float32)":
        if table_i % 2:
            arr = rng.standard_normal((n, 5)).astype(np.float32)
            return arr, [[float(x) for x in row] for row in arr]
        rows = [rng.standard_normal(i % 4).astype(np.float32) for i in range(n)]
        return rows, [[float(x) for x in r] for r in rows]
    if ch_type == "Array(String)":
        rows = [[f"e{i}-{j}'" for j in range(i % 3)] for i in range(n)]
        return rows, rows
    raise AssertionError(f"no generator for {ch_type}")


# ---------------------------------------------------------------- migrations


@pytest.mark.parametrize("store_url", ["server"], indirect=True)
def test_workers_starting_together_apply_each_migration_once(store_url: str) -> None:
    """Four processes' stores migrate one fresh database at once (002 copies, drops and renames a table)."""
    from streams.store.base import MIGRATION_LOCK_TABLE, migration_files

    shipped = [version for version, _ in migration_files()]
    stores = [open_store(store_url) for _ in range(4)]
    applied: list[list[str]] = [[] for _ in stores]
    errors: list[str] = []
    start = threading.Barrier(len(stores))

    def run(i: int) -> None:
        try:
            start.wait()
            applied[i] = stores[i].migrate()
        except Exception:  # noqa: BLE001 - reported below
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not errors, errors[0]
        assert sorted(v for a in applied for v in a) == shipped  # each version once, by one of them
        tables = {r[0] for r in stores[0].query("SHOW TABLES")}
        assert set(TABLES) <= tables and MIGRATION_LOCK_TABLE not in tables
        assert stores[0].query("SELECT count() FROM schema_migrations FINAL") == [(len(shipped),)]
    finally:
        for st in stores:
            st.close()


@pytest.mark.parametrize("store_url", ["server"], indirect=True)
def test_a_migration_lock_left_by_a_dead_process_is_taken_over(store_url: str) -> None:
    from streams.store.base import MIGRATION_LOCK_TABLE, migration_files

    with open_store(store_url) as s:
        s._execute(f"CREATE TABLE {MIGRATION_LOCK_TABLE} (held UInt8) ENGINE = Memory", want_names=False)
        with mock.patch("streams.store.base.MIGRATION_LOCK_STALE_S", 0.5):
            wait_until(lambda: s._execute("SELECT now() - metadata_modification_time FROM system.tables WHERE "
                                          f"name = '{MIGRATION_LOCK_TABLE}'", want_names=False)[2][0][0] >= 1,
                       timeout=10, message="the lock to age")
            assert s.migrate() == [version for version, _ in migration_files()]
        assert MIGRATION_LOCK_TABLE not in {r[0] for r in s.query("SHOW TABLES")}


def test_migrate_twice_is_noop(store_url: str) -> None:
    from streams.store.base import migration_files

    shipped = [version for version, _ in migration_files()]
    assert shipped[0] == "001_init"
    with open_store(store_url) as s:
        assert s.migrate() == shipped
        assert s.migrate() == []
        assert s.applied_migrations() == shipped
        tables = {r[0] for r in s.query("SHOW TABLES")}
        assert set(TABLES) | {"schema_migrations"} <= tables
        assert s.query("SELECT count() FROM schema_migrations FINAL") == [(len(shipped),)]
    with open_store(store_url) as s:  # a new process would see the same state
        assert s.migrate() == []
        assert s.ping()


# -------------------------------------------------------------- inserts/reads


def test_insert_numpy_columns_every_table_reads_back(store: Store) -> None:
    rng = np.random.default_rng(7)
    n = 9
    for ti, table in enumerate(TABLES):
        types = store.table_columns(table)
        inputs, expected = {}, {}
        for col, ch_type in types.items():
            inputs[col], expected[col] = make_column(ch_type, col, n, rng, ti)
        assert store.insert(table, inputs) == n
        cols = list(types)
        first = cols[0]
        names, rows = store.query_columns(
            f"SELECT {', '.join('`%s`' % c for c in cols)} FROM {table} ORDER BY `{first}`")
        assert names == cols
        want = [tuple(expected[c][i] for c in cols) for i in range(n)]
        got_c, want_c = canon(rows), canon(want)
        for g, w in zip(got_c, want_c):
            for c, gv, wv in zip(cols, g, w):
                if isinstance(wv, float) and types[c] == "Float32":
                    assert gv == pytest.approx(wv, rel=1e-6), (table, c)
                else:
                    assert gv == wv, (table, c)
        assert len(rows) == n


def test_insert_partial_columns_get_defaults_and_validates(store: Store) -> None:
    store.insert("predictions", {"event_id": ["p1"], "model_id": ["m"], "ts": [1_700_000_000]})
    row = store.query("SELECT event_id, truth, uncertainty, attack, ts FROM predictions")
    assert canon(row) == [["p1", -1, "nan", "", utc(1_700_000_000)]]  # DDL defaults
    assert store.insert("predictions", {"event_id": np.array([], dtype=object)}) == 0
    with pytest.raises(StoreError, match="unknown column"):
        store.insert("predictions", {"nope": [1]})
    with pytest.raises(StoreError, match="unknown table"):
        store.insert("no_such_table", {"a": [1]})
    with pytest.raises(StoreError, match="invalid identifier"):
        store.insert("predictions; DROP TABLE alerts", {"a": [1]})


def test_replacing_merge_tree_dedups_replays(store: Store) -> None:
    n = 50
    ids = np.array([f"ev-{i}" for i in range(n)], dtype=object)
    batch = {
        "event_id": ids, "model_id": np.full(n, "m1", dtype=object),
        "ts": np.full(n, 1_700_000_000, np.uint32), "ts_ms": np.arange(n, dtype=np.uint64),
        "confidence": np.linspace(0, 1, n, dtype=np.float32),
    }
    store.insert("predictions", batch)
    store.insert("predictions", batch)  # replay after a crash
    assert store.query("SELECT count() FROM predictions FINAL") == [(n,)]
    assert store.query("SELECT uniqExact(event_id) FROM predictions") == [(n,)]
    # open and resolved rows of one alert both survive; replays collapse
    alerts = {"alert_id": ["a1", "a1"], "state": ["open", "resolved"], "ts": [10, 20],
              "ts_ms": [10_000, 20_000], "event_ids": [["ev-1"], []]}
    store.insert("alerts", alerts)
    store.insert("alerts", alerts)
    assert store.query(
        "SELECT state, count() FROM alerts FINAL GROUP BY state ORDER BY state"
    ) == [("open", 1), ("resolved", 1)]


def test_concurrent_inserts_and_queries(store: Store) -> None:
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for j in range(5):
                ids = np.array([f"t{k}-{j}-{i}" for i in range(100)], dtype=object)
                store.insert("predictions", {"event_id": ids, "model_id": ["m"] * 100,
                                             "ts_ms": np.arange(100, dtype=np.uint64)})
                store.query("SELECT count() FROM predictions")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert store.query("SELECT uniqExact(event_id) FROM predictions") == [(2000,)]


# ------------------------------------------------------------------- read-only


@pytest.mark.parametrize("sql", [
    "INSERT INTO predictions (event_id) SELECT 'x'",
    "DROP TABLE predictions",
    "SELECT 1; DROP TABLE predictions",
    "SELECT 1; SELECT 2",
    "ALTER TABLE predictions DELETE WHERE 1",
    "SET readonly = 0",
    "SELECT 1 INTO OUTFILE 'lw-outfile.csv'",
])
def test_readonly_rejects_writes(store: Store, sql: str) -> None:
    with pytest.raises(StoreError):
        store.query(sql, readonly=True)
    assert "predictions" in {r[0] for r in store.query("SHOW TABLES")}


def test_readonly_setting_blocks_writes_in_the_engine(store: Store) -> None:
    # Past the policy (streams.store.policy), the engine itself refuses (readonly=1).
    with pytest.raises(StoreError) as ei:
        store._execute("INSERT INTO predictions (event_id) SELECT 'x'", readonly=True)
    assert ei.value.code == 164
    with pytest.raises(StoreError) as ei:
        store._execute("SELECT 1 SETTINGS readonly = 0", readonly=True)
    assert ei.value.code == 164
    with pytest.raises(StoreError) as ei:
        store._execute("SELECT 1 SETTINGS max_result_rows = 0", readonly=True)
    assert ei.value.code == 164
    assert store.query("SELECT count() FROM predictions") == [(0,)]
    # and the store's own session is still writable afterwards
    store.insert("predictions", {"event_id": ["w"]})
    assert store.query("SELECT count() FROM predictions", readonly=True) == [(1,)]


def test_readonly_bounds_result_size(store_url: str) -> None:
    with open_store(store_url, readonly_limits=ReadonlyLimits(max_result_rows=10)) as s:
        assert len(s.query("SELECT number FROM system.numbers LIMIT 10", readonly=True)) == 10
        with pytest.raises(StoreError) as ei:
            s.query("SELECT number FROM system.numbers LIMIT 11", readonly=True)
        assert ei.value.code == 396
        assert len(s.query("SELECT number FROM system.numbers LIMIT 11")) == 11  # not read-only


def test_inline_insert_is_refused_with_a_pointer(store: Store) -> None:
    with pytest.raises(StoreError, match="Store.insert"):
        store.query("INSERT INTO predictions (event_id) VALUES ('x')")


# ------------------------------------------------------------------ parameters


@pytest.mark.parametrize("evil", [
    "x' OR '1'='1",
    "x'; DROP TABLE predictions; --",
    "\\'; DROP TABLE predictions; --",
    "{model_id}",
    "tab\tnew\nline\0nul é √ 日本",
    "/* */ -- '",
])
def test_parameters_are_escaped(store: Store, evil: str) -> None:
    store.insert("predictions", {"event_id": ["e1", "e2"], "model_id": [evil, "other"]})
    assert store.query("SELECT {v}", {"v": evil}) == [(evil,)]
    rows = store.query("SELECT event_id FROM predictions WHERE model_id = {v}", {"v": evil},
                       readonly=True)
    assert rows == [("e1",)]
    assert store.query("SELECT count() FROM predictions", readonly=True) == [(2,)]


def test_parameter_types(store: Store) -> None:
    row = store.query(
        # aliases: a column *name* holding non-UTF-8 bytes breaks clickhouse-driver
        "SELECT {i} AS i, {u} AS u, {f} AS f, {b} AS b, {d} AS d, has({arr}, 'b') AS h, "
        "'b' IN {tup} AS t, 'z' IN {empty} AS e, {n} IS NULL AS n",
        {"i": -5, "u": 2**64 - 1, "f": 0.25, "b": b"\xff\x01", "d": dt.datetime(2023, 11, 14, 22, 13, 20),
         "arr": ["a", "b"], "tup": ("a", "b"), "empty": (), "n": None},
    )[0]
    assert row == (-5, 2**64 - 1, 0.25, b"\xff\x01", utc(1_700_000_000), 1, 1, 0, 1)
    store.insert("predictions", {"event_id": ["e1", "e2", "e3"]})
    # JSON-borne lists after IN render as tuples (18.16 has no `x IN [..]`)
    assert store.query("SELECT count() FROM predictions WHERE event_id IN {ids}",
                       {"ids": ["e1", "e3", "zz"]}) == [(2,)]
    assert store.query("SELECT count() FROM predictions WHERE event_id NOT IN {ids}",
                       {"ids": []}) == [(3,)]


def test_errors_are_store_errors(store: Store) -> None:
    with pytest.raises(StoreError) as ei:
        store.query("SELEC 1")
    assert not isinstance(ei.value, StoreUnavailable)
    assert ei.value.code == 62
    with pytest.raises(StoreError):
        store.query("SELECT * FROM no_such_table")
    assert store.ping()


def test_closed_store_raises(store_url: str) -> None:
    s = open_store(store_url)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.query("SELECT 1")
    assert s.ping() is False


# --------------------------------------------------------------- shipped queries

T0 = 28_333_334 * 60_000  # a minute boundary (epoch ms)
M0 = T0 // 60_000


def load_fixture(store: Store) -> None:
    """A small data set for the shipped queries, every batch inserted twice (replay)."""
    preds = [  # event, model, client, offset ms, predicted
        ("a0", "mA", "c1", 1_000, 1), ("a1", "mA", "c2", 2_000, 2), ("a2", "mA", "c1", 61_000, 3),
        ("a3", "mA", "c3", 62_000, 4), ("a4", "mA", "c1", 63_000, 5), ("a5", "mA", "c1", 125_000, 6),
        ("b0", "mB", "c9", 5_000, 0), ("b1", "mB", "c9", 6_000, 0), ("b2", "mB", "c8", 70_000, 1),
        ("r0", "mA", "reference", 1_500, 1), ("r1", "mA", "reference", 1_600, 2),  # a reference batch, not traffic
    ]
    ts_ms = np.array([T0 + p[3] for p in preds], dtype=np.uint64)
    predictions = {
        "event_id": [p[0] for p in preds], "model_id": [p[1] for p in preds],
        "client_id": [p[2] for p in preds], "ts_ms": ts_ms, "ts": ts_ms // 1000,
        "predicted": np.array([p[4] for p in preds], np.int32),
        "confidence": np.full(len(preds), 0.5, np.float32),
        "attack": ["fgsm" if p[0] in ("a2", "a4") else "" for p in preds],
    }
    wins = [  # window, model, layer, end offset ms, detection rate
        ("wA1", "mA", "__combined__", 60_000, 0.2), ("wA2", "mA", "__combined__", 120_000, 0.7),
        ("wA3", "mA", "__combined__", 180_000, 0.1), ("wA4", "mA", "__combined__", 240_000, 0.9),
        ("wA5", "mA", "__combined__", 300_000, 0.95),
        ("wA1p", "mA", "penultimate", 60_000, 0.3), ("wA2p", "mA", "penultimate", 65_000, 0.5),
        ("wB1", "mB", "__combined__", 60_000, 0.6), ("wB2", "mB", "__combined__", 120_000, 0.8),
    ]
    end = np.array([T0 + w[3] for w in wins], dtype=np.uint64)
    drift = {
        "window_id": [w[0] for w in wins], "model_id": [w[1] for w in wins],
        "model_version": ["v1"] * len(wins), "layer": [w[2] for w in wins],
        "window_start_ms": end - 60_000, "window_end_ms": end, "ts": end // 1000,
        "detection_rate": np.array([w[4] for w in wins]), "p_value": np.full(len(wins), 0.01),
        "mmd2": np.full(len(wins), 0.1), "n_window": np.full(len(wins), 100, np.uint32),
    }
    scores_rows = [  # window, model, layer, event, rank, score
        ("wA4", "mA", "__combined__", "a2", 1, 3.0), ("wA4", "mA", "__combined__", "a4", 2, 2.5),
        ("wA4", "mA", "__combined__", "a3", 3, 1.0), ("wA4", "mA", "penultimate", "a3", 1, 2.8),
        ("wA4", "mA", "__combined__", "ghost", 4, 0.5), ("wB2", "mB", "__combined__", "b2", 1, 9.0),
        ("wA4", "mA", "penultimate", "a5", 2, 2.5),  # ties a4's best score
    ]
    scores = {
        "window_id": [r[0] for r in scores_rows], "model_id": [r[1] for r in scores_rows],
        "layer": [r[2] for r in scores_rows], "event_id": [r[3] for r in scores_rows],
        "rank": np.array([r[4] for r in scores_rows], np.uint32),
        "score": np.array([r[5] for r in scores_rows]), "ts": np.full(len(scores_rows), T0 // 1000 + 240),
    }
    alert_rows = [  # id, model, kind, state, severity, offset ms, client, message
        ("al1", "mA", "distribution_shift", "open", "high", 240_000, "", "drift on mA"),
        ("al1", "mA", "distribution_shift", "resolved", "high", 400_000, "", "back to normal"),
        ("al2", "mB", "probing", "open", "medium", 100_000, "c9", "probing by c9"),
        ("al3", "mA", "attack_classified", "open", "low", 50_000, "", "fgsm on a2"),
        ("al3", "mA", "attack_classified", "resolved", "low", 60_000, "", "quiet"),
    ]
    ams = np.array([T0 + a[5] for a in alert_rows], dtype=np.uint64)
    alerts = {
        "alert_id": [a[0] for a in alert_rows], "model_id": [a[1] for a in alert_rows],
        "kind": [a[2] for a in alert_rows], "state": [a[3] for a in alert_rows],
        "severity": [a[4] for a in alert_rows], "ts_ms": ams, "ts": ams // 1000,
        "client_id": [a[6] for a in alert_rows], "message": [a[7] for a in alert_rows],
        "window_id": ["wA4" if a[0] == "al1" else "" for a in alert_rows],
        "event_ids": [["a2", "a4"] if a[0] == "al1" else [] for a in alert_rows],
    }
    dl_rows = [
        ("lw.predictions", 0, 10, "decode: bad magic", 1_000),
        ("lw.predictions", 0, 11, "decode: bad magic", 2_000),
        ("lw.predictions", 1, 3, "schema: missing field", 3_000),
        ("lw.labels", 0, 1, "decode: bad magic", 4_000),
    ]
    dms = np.array([T0 + d[4] for d in dl_rows], dtype=np.uint64)
    dead = {
        "dl_id": [f"{d[0]}:{d[1]}:{d[2]}" for d in dl_rows], "topic": [d[0] for d in dl_rows],
        "partition": np.array([d[1] for d in dl_rows], np.int32),
        "offset": np.array([d[2] for d in dl_rows], np.int64), "reason": [d[3] for d in dl_rows],
        "ts_ms": dms, "ts": dms // 1000, "raw": [b"\x00\xffbad"] * len(dl_rows),
    }
    references = {
        "model_id": ["mA", "mA"], "model_version": ["v1", "v1"], "layer": ["penultimate"] * 2,
        "event_id": ["r0", "r1"], "ts_ms": np.array([T0 + 1_500, T0 + 1_600], np.uint64),
        "ts": np.array([T0 + 1_500, T0 + 1_600], np.uint64) // 1000, "predicted": np.array([1, 2], np.int32),
        "vector": [np.ones(4, np.float32), np.zeros(4, np.float32)],
    }
    for _ in range(2):
        store.insert("reference_embeddings", references)
        store.insert("predictions", predictions)
        store.insert("drift_windows", drift)
        store.insert("sample_scores", scores)
        store.insert("alerts", alerts)
        store.insert("dead_letters", dead)


def rows_of(result, *cols: str) -> list[tuple]:
    idx = [result.columns.index(c) for c in cols]
    return [tuple(canon(r[i]) for i in idx) for r in result.rows]


def check_detection_rate_by_minute(store: Store) -> None:
    r = run_shipped(store, "detection_rate_by_minute")
    got = rows_of(r, "model_id", "layer", "minute", "windows", "max_detection_rate")
    assert got == [
        ("mA", "__combined__", M0 + 1, 1, 0.2), ("mA", "__combined__", M0 + 2, 1, 0.7),
        ("mA", "__combined__", M0 + 3, 1, 0.1), ("mA", "__combined__", M0 + 4, 1, 0.9),
        ("mA", "__combined__", M0 + 5, 1, 0.95),
        ("mA", "penultimate", M0 + 1, 2, 0.5),
        ("mB", "__combined__", M0 + 1, 1, 0.6), ("mB", "__combined__", M0 + 2, 1, 0.8),
    ]
    avg = rows_of(r, "avg_detection_rate")
    assert avg[5][0] == pytest.approx(0.4)
    assert r.rows[0][r.columns.index("minute_ts")] == utc((M0 + 1) * 60)
    only_b = run_shipped(store, "detection_rate_by_minute", model_id="mB", since_ms=T0 + 100_000)
    assert rows_of(only_b, "model_id", "minute") == [("mB", M0 + 2)]


def check_drift_since(store: Store) -> None:
    r = run_shipped(store, "drift_since", threshold=0.5)
    got = rows_of(r, "model_id", "first_crossed_ms", "first_window_id", "last_below_ms",
                  "episode_since_ms", "crossing_windows", "max_detection_rate")
    assert got == [
        ("mB", T0 + 60_000, "wB1", 0, T0 + 60_000, 2, 0.8),
        ("mA", T0 + 120_000, "wA2", T0 + 180_000, T0 + 240_000, 3, 0.95),
    ]
    assert r.rows[0][r.columns.index("first_crossed")] == utc((T0 + 60_000) // 1000)
    high = run_shipped(store, "drift_since", threshold=0.92)
    assert rows_of(high, "model_id", "first_window_id", "episode_since_ms") == [
        ("mA", "wA5", T0 + 300_000)]


def check_top_suspicious_events(store: Store) -> None:
    r = run_shipped(store, "top_suspicious_events", window_id="wA4", limit=3)
    assert rows_of(r, "event_id", "score", "rank", "layer", "client_id", "predicted", "attack") == [
        ("a2", 3.0, 1, "__combined__", "c1", 3, "fgsm"),
        ("a3", 2.8, 2, "penultimate", "c3", 4, ""),
        ("a4", 2.5, 3, "__combined__", "c1", 5, "fgsm"),
    ]
    everything = run_shipped(store, "top_suspicious_events", window_id="wA4")
    assert rows_of(everything, "event_id", "client_id", "ts_ms")[-1] == ("ghost", "", 0)
    assert rows_of(everything, "event_id", "rank") == [("a2", 1), ("a3", 2), ("a4", 3), ("a5", 3), ("ghost", 4)]
    assert run_shipped(store, "top_suspicious_events", window_id="nope").rows == []
    one_layer = run_shipped(store, "top_suspicious_events", window_id="wA4", layer="penultimate")
    assert one_layer.rows and {r[0] for r in rows_of(one_layer, "layer")} == {"penultimate"}


def check_alert_history(store: Store) -> None:
    r = run_shipped(store, "alert_history")
    assert rows_of(r, "alert_id", "model_id", "kind", "status", "severity", "opened_ms",
                   "resolved_ms", "duration_ms", "message", "resolution") == [
        ("al1", "mA", "distribution_shift", "resolved", "high", T0 + 240_000, T0 + 400_000,
         160_000, "drift on mA", "back to normal"),
        ("al2", "mB", "probing", "open", "medium", T0 + 100_000, 0, 0, "probing by c9", ""),
        ("al3", "mA", "attack_classified", "resolved", "low", T0 + 50_000, T0 + 60_000, 10_000,
         "fgsm on a2", "quiet"),
    ]
    only_a = run_shipped(store, "alert_history", model_id="mA", limit=1)
    assert rows_of(only_a, "alert_id", "window_id") == [("al1", "wA4")]


def check_events_per_minute(store: Store) -> None:
    r = run_shipped(store, "events_per_minute")
    assert rows_of(r, "model_id", "minute", "events", "clients") == [
        ("mA", M0, 2, 2), ("mA", M0 + 1, 3, 2), ("mA", M0 + 2, 1, 1),
        ("mB", M0, 2, 1), ("mB", M0 + 1, 1, 1),
    ]
    assert r.rows[0][r.columns.index("minute_ts")] == utc(M0 * 60)
    window = run_shipped(store, "events_per_minute", since_ms=T0 + 60_000, until_ms=T0 + 120_000,
                         model_id="mA")
    assert rows_of(window, "minute", "events") == [(M0 + 1, 3)]


def check_dlq_reasons(store: Store) -> None:
    r = run_shipped(store, "dlq_reasons")
    assert rows_of(r, "topic", "reason", "records", "first_ms", "last_ms") == [
        ("lw.predictions", "decode: bad magic", 2, T0 + 1_000, T0 + 2_000),
        ("lw.labels", "decode: bad magic", 1, T0 + 4_000, T0 + 4_000),
        ("lw.predictions", "schema: missing field", 1, T0 + 3_000, T0 + 3_000),
    ]


SHIPPED_CHECKS = {
    "detection_rate_by_minute": check_detection_rate_by_minute,
    "drift_since": check_drift_since,
    "top_suspicious_events": check_top_suspicious_events,
    "alert_history": check_alert_history,
    "events_per_minute": check_events_per_minute,
    "dlq_reasons": check_dlq_reasons,
}


def test_every_shipped_query_returns_expected_rows(store: Store) -> None:
    assert set(shipped_queries()) == set(SHIPPED_CHECKS), "add a check for each shipped query"
    load_fixture(store)
    for name, check in SHIPPED_CHECKS.items():
        try:
            check(store)
        except Exception as e:
            raise AssertionError(f"shipped query {name} on {store.backend}: {e}") from e


def test_shipped_query_parameters(store: Store) -> None:
    with pytest.raises(StoreError, match="needs parameter"):
        run_shipped(store, "top_suspicious_events")
    with pytest.raises(StoreError, match="no parameter"):
        run_shipped(store, "dlq_reasons", nope=1)
    with pytest.raises(StoreError, match="unknown shipped query"):
        run_shipped(store, "nope")


# ------------------------------------------------------------- server only


def _format(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))


def test_server_unreachable_raises_unavailable_without_password() -> None:
    from tests.clickhouse_server import free_port

    secret = "hunter2-S3CRET"
    url = f"clickhouse://lw:{secret}@127.0.0.1:{free_port()}/x"
    with open_store(url, connect_timeout=1) as s:
        assert secret not in s.url
        assert s.ping() is False
        with pytest.raises(StoreUnavailable) as ei:
            s.query("SELECT 1")
        assert secret not in _format(ei.value)
        with pytest.raises(StoreUnavailable):
            s.insert("predictions", {"event_id": ["x"]})


def test_server_credentials_and_tls_options_pass_through(clickhouse_server) -> None:
    from tests.clickhouse_server import PASSWORD, USER

    db = "layerwatch_test_auth"
    with open_store(clickhouse_server.url_for(db), user=USER, password=PASSWORD) as s:
        # 18.16 has no currentUser(): find this very query in system.processes
        assert s.query("SELECT user, currentDatabase() FROM system.processes "
                       "WHERE query LIKE '%lw-whoami%'") == [(USER, db)]
    host = f"127.0.0.1:{clickhouse_server.tcp_port}"
    with open_store(f"clickhouse://{USER}:{PASSWORD}@{host}/{db}") as s:
        assert s.ping()
        assert PASSWORD not in s.url
    wrong = "wrong-Pa55-XYZ"
    with open_store(clickhouse_server.url_for(db), user=USER, password=wrong) as s:
        with pytest.raises(StoreError) as ei:
            s.query("SELECT 1")
        assert not isinstance(ei.value, StoreUnavailable)
        assert wrong not in _format(ei.value)
    # TLS against a plain-text port fails as "unavailable", never hangs
    with open_store(clickhouse_server.url_for(db).replace("clickhouse://", "clickhouses://"),
                    verify=False, connect_timeout=2, send_receive_timeout=3) as s:
        with pytest.raises(StoreError):
            s.query("SELECT 1")
    with open_store(clickhouse_server.url_for(db)) as s:
        s.query(f"DROP DATABASE IF EXISTS {db}")


def test_server_outage_and_recovery(clickhouse_server) -> None:
    """Stop and restart the same data dir: StoreUnavailable while down, data kept."""
    db = "layerwatch_test_outage"
    with open_store(clickhouse_server.url_for(db), connect_timeout=1) as s:
        s.migrate()
        s.insert("predictions", {"event_id": ["kept"], "model_id": ["m"]})
        clickhouse_server.stop()
        try:
            assert s.ping() is False
            with pytest.raises(StoreUnavailable):
                s.insert("predictions", {"event_id": ["lost"]})
        finally:
            clickhouse_server.start()
        assert s.query("SELECT event_id FROM predictions FINAL") == [("kept",)]
        s.query(f"DROP DATABASE IF EXISTS {db}")


# --------------------------------------------------------------- chDB only


def test_chdb_persists_and_holds_one_path(chdb_url: str, tmp_path) -> None:
    with open_store(chdb_url) as s:
        s.migrate()
        s.insert("predictions", {"event_id": ["p"], "model_id": ["m"]})
        with pytest.raises(StoreError, match="one path per process"):
            open_store(f"chdb://{tmp_path / 'other'}")
    with open_store(chdb_url) as s:
        assert s.migrate() == []
        assert s.query("SELECT event_id FROM predictions") == [("p",)]
