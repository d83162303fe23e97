"""Nothing acked that was not done, with a real worker, broker and store: every row counted.

One worker (``tests/reliability/faulty_worker.py``: the real worker plus a stage that fails
on cue) on a store whose ``predictions`` table refuses model ``poison`` (a materialized
column that throws, on chDB and on the ClickHouse server). Then:

- a step whose stage fails twice is retried and handled once; a step whose stage always
  fails is dead-lettered with the stage's error, record by record;
- a step holding a record the store refuses: that record is dead-lettered with the
  store's reason, the other records of the step are stored and reach the stages;
- every event is in ``predictions`` exactly once (FINAL and raw counts), every event but
  the refused one reached the stage exactly once, and ``dead_letters`` holds exactly the
  doomed and the refused records.
"""

from __future__ import annotations

import itertools
import json
import re
import urllib.request

import numpy as np
import pytest

from schemas import encode_batch
from streams.client import http_json
from streams.stack import LocalStack
from streams.store import open_store
from tests.reliability.synthetic import make_batch, producer, query, scalar
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

_run = itertools.count()


def _send(bootstrap: str, topic: str, batches: list[tuple[str, list[str]]]) -> None:
    rng = np.random.default_rng(7)
    p = producer(bootstrap)
    for model, ids in batches:
        ts = np.full(len(ids), 1_700_000_000_000, np.int64)
        p.send(topic, key=model.encode(), value=encode_batch(make_batch(ids, ts, rng, model_id=model)))
    p.flush()
    p.close()


def _metric(url: str, name: str, label: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.findall(rf'^{name}\{{[^}}]*"{re.escape(label)}"[^}}]*\}} (\S+)$', text, re.MULTILINE)
    return sum(float(v) for v in found)


def test_failing_stage_and_refused_rows_lose_and_double_nothing(broker, store_url, tmp_path) -> None:
    prefix = f"loss{next(_run)}."
    topic = prefix + "predictions"
    store = open_store(store_url)
    store.migrate()
    # the store refuses any row of model "poison" (a materialized column that throws; both backends)
    store.query("ALTER TABLE predictions ADD COLUMN poison_guard UInt8 "
                "MATERIALIZED throwIf(model_id = 'poison')")
    store.close()  # chDB: one process per path; the worker opens it next
    stage_log = tmp_path / "stage.jsonl"
    stage_log.touch()

    def handled() -> list[str]:
        return [e for line in stage_log.read_text().splitlines() for e in json.loads(line)]

    with LocalStack(state_dir=tmp_path / "stack", clickhouse_url=store_url, bootstrap=broker) as stack:
        stack.env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"layerwatch-{prefix}", "LW_TOPIC_PARTITIONS": "1",
                     "LW_AGENTS": "sink,flaky", "LW_TEST_STAGE_LOG": str(stage_log),
                     "LW_SINK_WITHIN_S": "1.5"}  # records sent in one flush make one step
        _, url = stack.start_worker(module="tests.reliability.faulty_worker")

        good = [("good", [f"g{b}-{i}" for i in range(10)]) for b in range(3)]
        _send(broker, topic, good)
        wait_until(lambda: len(handled()) == 30, timeout=60, message="the good step through the stage")

        flaky = [("flaky", [f"f{i}" for i in range(10)])]
        _send(broker, topic, flaky)
        wait_until(lambda: len(handled()) == 40, timeout=60, message="the flaky step after two retries")

        doomed = [("doomed", [f"d{i}" for i in range(10)])]
        _send(broker, topic, doomed)
        wait_until(lambda: scalar(url, "SELECT count() FROM dead_letters FINAL") == 1, timeout=60,
                   message="the doomed record in dead_letters")

        mixed = [("mixed", [f"m{i}" for i in range(5)]), ("poison", [f"p{i}" for i in range(5)]),
                 ("mixed", [f"m{i}" for i in range(5, 10)])]
        _send(broker, topic, mixed)  # one producer flush: one step
        wait_until(lambda: scalar(url, "SELECT count() FROM dead_letters FINAL") == 2, timeout=60,
                   message="the refused record in dead_letters")
        wait_until(lambda: len(handled()) == 50, timeout=60, message="the mixed step's stored records")

        sent = {e for _, ids in good + flaky + doomed + mixed for e in ids}
        stored = {e for m, ids in good + flaky + doomed + mixed if m != "poison" for e in ids}
        # predictions: each stored event exactly once, not even a raw duplicate; the refused ones absent
        assert scalar(url, "SELECT count() FROM predictions FINAL") == len(stored) == 60
        assert scalar(url, "SELECT count() FROM predictions") == 60
        assert {r[0] for r in query(url, "SELECT event_id FROM predictions FINAL")} == stored
        # the stage: every stored event once, except the doomed step's; the mixed step's stored records together
        steps = [json.loads(line) for line in stage_log.read_text().splitlines()]
        assert sorted(steps[-1]) == sorted(e for m, ids in mixed if m == "mixed" for e in ids)
        seen = handled()
        assert len(seen) == len(set(seen)) == 50
        assert set(seen) == stored - {e for _, ids in doomed for e in ids}
        # dead letters: the doomed record (stage error) and the refused one (store error), nothing else
        dead = query(url, "SELECT topic, reason FROM dead_letters FINAL ORDER BY offset")
        assert [d[0] for d in dead] == [topic, topic]
        assert "stage flaky failed 3 times" in dead[0][1] and "injected failure (doomed)" in dead[0][1]
        assert "store refused" in dead[1][1] and "predictions" in dead[1][1]
        assert sent - stored == {e for m, ids in mixed if m == "poison" for e in ids}
        # metrics: 2 + 3 stage failures, 5 refused rows, 2 dead letters
        assert _metric(url, "layerwatch_stage_retries_total", "flaky") == 5
        assert _metric(url, "layerwatch_rows_rejected_total", "predictions") == 5
        assert _metric(url, "layerwatch_dead_letters_total", topic) == 2
        status, health = http_json(f"{url}/health")
        assert status == 200 and health["status"] == "ok", health
