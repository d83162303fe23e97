"""Windows published by an ingest worker, tested by a pool of test workers (issue: tests on GPU workers).

Real services: the Tansu broker, a ClickHouse server, one `--agents ingest` worker and two
`--agents test` workers as child processes. One test worker is killed (SIGKILL) while the
stream runs: every window the ingest worker published still gets exactly one drift row
per layer under FINAL, and the shifted model still opens its alert.
"""

from __future__ import annotations

import itertools
import re
import time
import urllib.request

import pytest

from streams.stack import LocalStack
from tests.reliability.synthetic import PacedPublisher, Plan, publish_reference, scalar
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_run = itertools.count()


def counter(url: str, name: str) -> int:
    """A counter of a worker's /metrics, summed over its labels (-1 when the worker does not answer)."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return -1
    return int(sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)))


def test_an_ingest_worker_and_two_test_workers_one_killed_test_every_window_once(broker, clickhouse_server,
                                                                                 tmp_path) -> None:
    prefix = f"split{next(_run)}."
    database = f"layerwatch_split_{next(_run)}_{int(time.time())}"
    with LocalStack(state_dir=tmp_path / "stack", clickhouse_url=clickhouse_server.url_for(database),
                    bootstrap=broker) as stack:
        stack.env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"lw-{prefix}", "LW_WINDOW_SIZE_S": "2",
                     "LW_WINDOW_STEP_S": "1", "LW_MMD_PERMUTATIONS": "100", "LW_DETECTION_REPEATS": "20",
                     "LW_TEST_BATCH_WINDOWS": "4"}
        _, ingest = stack.start_worker("ingest", LW_AGENTS="ingest")
        publish_reference(broker, prefix + "predictions", n=200)
        wait_until(lambda: scalar(ingest, "SELECT count() FROM reference_embeddings FINAL") == 200, timeout=60,
                   message="the reference in the store")
        pool = [stack.start_worker(name, LW_AGENTS="test") for name in ("tests-a", "tests-b")]

        def preloaded() -> list[int]:  # per test worker: references it loaded on assignment (-1: not done yet)
            found = [re.findall(r"references preloaded for (\d+) model version", c.log_path.read_text(errors="replace"))
                     for c, _ in pool]
            return [int(f[-1]) if f else -1 for f in found]

        # before any window exists, the worker owning the model's home partition has loaded its reference
        wait_until(lambda: sorted(preloaded()) == [0, 1], timeout=60, message="the reference preloaded by one worker")
        owner = pool[preloaded().index(1)][0]
        assert "reference for " in owner.log_path.read_text(errors="replace")
        base = int(time.time() * 1000)
        plan = Plan(base_ms=base, n_batches=150, batch=10, spacing_ms=20, shift_from_ms=15_000, shift=2.0)
        publisher = PacedPublisher(broker, prefix + "predictions", plan, period_s=0.1).start()
        wait_until(lambda: scalar(ingest, "SELECT uniqExact(window_id) FROM drift_windows") >= 3, timeout=90,
                   message="the first windows tested by the pool")
        tested = [counter(url, "layerwatch_windows_tested_total") for _, url in pool]
        (victim, _), (_, survivor) = pool if tested[0] > 0 else pool[::-1]  # kill the one holding the partition
        victim.kill()
        before = counter(survivor, "layerwatch_windows_tested_total")
        publisher.join(timeout=120)
        # every window the ingest worker published ends with a combined drift row
        wait_until(lambda: counter(ingest, "layerwatch_windows_published_total") > 10 and counter(ingest, "layerwatch_windows_published_total") == scalar(
            ingest, "SELECT uniqExact(window_id) FROM drift_windows WHERE layer = '__combined__'"),
            timeout=120, message="a drift row for every published window")
        rows = scalar(ingest, "SELECT count() FROM drift_windows FINAL WHERE layer = '__combined__'")
        distinct = scalar(ingest, "SELECT uniqExact(window_id) FROM drift_windows WHERE layer = '__combined__'")
        wait_until(lambda: scalar(ingest, "SELECT count() FROM alerts FINAL WHERE kind = 'distribution_shift' "
                                          "AND state = 'open'") >= 1, timeout=60, message="the shift alert")
        after = counter(survivor, "layerwatch_windows_tested_total")
    assert max(tested) > 0 and after > before  # the survivor took over the killed worker's partition
    assert rows == distinct  # exactly one row per window, including those re-tested after the kill
