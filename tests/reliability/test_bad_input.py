"""Bad input never crashes or stalls the worker: each bad record ends in lw.dlq / dead_letters with a reason.

1. In process: hypothesis draws 2400 bad records (tests/reliability/badinput.py: random
   bytes, truncations, byte flips, oversized, NaN/Inf, wrong dimensions and shapes,
   unknown schema ids / other schemas / bad magic, unknown models); ``decode_records``
   (the ingest agent's decoder) must turn every one into a dead letter with a reason and
   never raise.
2. Through the broker: all of them are produced to lw.predictions interleaved with valid
   batches (gzip, lz4, zstd and uncompressed producers), plus an empty (tombstone)
   record and raw lines from a foreign client (kcat: snappy, zstd, lz4). The
   worker (``LW_MODELS`` = the one synthetic model) must land every valid event exactly
   once, dead-letter every bad record once (by topic/partition/offset) with a reason of
   its kind, and keep answering `/health`; a valid record sent last lands too (no stall).
"""

from __future__ import annotations

import itertools
import subprocess
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from schemas import encode_batch
from streams.ingest import decode_records
from streams.client import http_json
from streams.stack import LocalStack
from tests.reliability.badinput import LIMIT_ENV, LIMITS, REASONS, bad_records
from tests.reliability.kcat_broker import KcatCompatibleBroker
from tests.reliability.synthetic import MODEL, make_batch, query, scalar
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

N_BAD = 2400
_run = itertools.count()


def draw_bad_records(n: int) -> list[tuple[str, bytes]]:
    """``n`` bad records drawn by hypothesis (derandomized: the same set on every run)."""
    out: list[tuple[str, bytes]] = []

    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(bad_records)
    def collect(case: tuple[str, bytes]) -> None:
        kind, raw = case
        good, dead = decode_records([(raw, "t", 0, 0)], LIMITS, frozenset({MODEL}))  # must not raise
        if good:  # a byte flip inside float data, say, leaves a valid record: not a bad one
            assert kind in ("flipped", "random"), (kind, raw[:80])
            return
        assert len(dead) == 1 and dead[0]["reason"], (kind, dead)
        if REASONS[kind]:
            assert REASONS[kind] in dead[0]["reason"], (kind, dead[0]["reason"])
        out.append(case)

    collect()
    return out


def test_codec_turns_every_fuzzed_record_into_a_reasoned_dead_letter() -> None:
    cases = draw_bad_records(N_BAD)
    kinds = Counter(k for k, _ in cases)
    assert len(cases) >= 0.9 * N_BAD and set(kinds) == set(REASONS), kinds


def test_worker_dead_letters_fuzzed_records_and_lands_the_valid_ones(chdb_url, tmp_path) -> None:
    from kafka import KafkaProducer

    cases = draw_bad_records(N_BAD)
    prefix = f"fuzz{next(_run)}."
    topic = prefix + "predictions"
    rng = np.random.default_rng(11)
    # a broker of its own, behind a relay that lets kcat (librdkafka 2.0.2) talk to Tansu
    with KcatCompatibleBroker(log_path=tmp_path / "tansu.log") as kafka, \
            LocalStack(state_dir=tmp_path / "stack", clickhouse_url=chdb_url, bootstrap=kafka.bootstrap) as stack:
        broker = kafka.bootstrap
        stack.env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"layerwatch-{prefix}", "LW_TOPIC_PARTITIONS": "2",
                     "LW_AGENTS": "sink,drift,probing,alerts", **LIMIT_ENV}
        worker, url = stack.start_worker()
        producers = [KafkaProducer(bootstrap_servers=broker, compression_type=c, linger_ms=5,
                                   max_request_size=4 * 1024 * 1024) for c in (None, "gzip", "lz4", "zstd")]
        kind_of: dict[str, str] = {}  # dl_id -> kind
        futures = []
        valid_ids: list[str] = []
        for i, (kind, raw) in enumerate(cases):
            p = producers[i % len(producers)]
            futures.append((kind, p.send(topic, key=f"k{i % 13}".encode(), value=raw)))
            if i % 12 == 0:  # a valid batch every 12 bad records
                ids = [f"ok-{i}-{j}" for j in range(5)]
                batch = make_batch(ids, np.full(5, 1_900_000_000_000 + i, np.int64), rng)
                p.send(topic, key=MODEL.encode(), value=encode_batch(batch))
                valid_ids += ids
        futures.append(("tombstone", producers[0].send(topic, key=b"tomb", value=None)))
        for p in producers:
            p.flush()
        for kind, f in futures:
            md = f.get(timeout=30)
            kind_of[f"{topic}:{md.partition}:{md.offset}"] = kind
        foreign = [b"hello from a foreign client", b'{"json": "not avro"}', b"\x00\x00\x00\x00"]
        for codec in ("snappy", "zstd", "lz4"):
            subprocess.run(["kcat", "-P", "-b", broker, "-t", topic, "-z", codec], input=b"\n".join(foreign) + b"\n",
                           check=True, timeout=30, capture_output=True)
        n_dead = len(kind_of) + 3 * len(foreign)

        def counts() -> tuple[int, int]:
            return (scalar(url, "SELECT uniqExact(event_id) FROM predictions"),
                    scalar(url, "SELECT count() FROM dead_letters FINAL"))

        wait_until(lambda: counts() == (len(valid_ids), n_dead), timeout=150,
                   message=f"{len(valid_ids)} valid events and {n_dead} dead letters")
        # no stall: a valid record after all that still lands
        last = make_batch(["last-0", "last-1"], np.full(2, 1_900_000_000_999, np.int64), rng)
        producers[0].send(topic, key=MODEL.encode(), value=encode_batch(last)).get(timeout=30)
        for p in producers:
            p.close()
        wait_until(lambda: scalar(url, "SELECT uniqExact(event_id) FROM predictions") == len(valid_ids) + 2,
                   timeout=60, message="the last valid record")

        assert scalar(url, "SELECT count() FROM predictions FINAL") == len(valid_ids) + 2
        assert scalar(url, "SELECT count() FROM predictions FINAL WHERE model_id != {m}", m=MODEL) == 0
        rows = query(url, "SELECT dl_id, reason FROM dead_letters FINAL")
        reasons = dict((r[0], r[1]) for r in rows)
        assert all(reasons.values()), "every dead letter has a reason"
        for dl_id, kind in kind_of.items():
            assert dl_id in reasons, (dl_id, kind)
            want = REASONS.get(kind) or ("empty record" if kind == "tombstone" else "")
            assert want in reasons[dl_id], (kind, reasons[dl_id])
        foreign_reasons = [r for dl, r in reasons.items() if dl not in kind_of]
        assert len(foreign_reasons) == 3 * len(foreign)
        status, health = http_json(f"{url}/health")
        assert status == 200 and health["status"] == "ok"
        worker.check()  # still running
        by_kind = Counter(kind_of.values())
        print(f"\nfuzz: {len(cases)} hypothesis records {dict(by_kind)} + {3 * len(foreign)} kcat lines; "
              f"{len(valid_ids) + 2} valid events landed once, {len(rows)} dead letters")


def test_undecodable_records_on_the_results_topics_are_dead_lettered(broker, chdb_url, tmp_path) -> None:
    """The results sink reads lw.drift, lw.labels and lw.alerts: a record it cannot decode there is dead-lettered
    with its topic, partition, offset and reason, and valid results around it still land."""
    from kafka import KafkaProducer

    from schemas.codec import encode
    from streams.alerts.rules import AlertEvent

    prefix = f"results{next(_run)}."
    with LocalStack(state_dir=tmp_path / "stack", clickhouse_url=chdb_url, bootstrap=broker) as stack:
        stack.env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"layerwatch-{prefix}"}
        _, url = stack.start_worker()
        producer = KafkaProducer(bootstrap_servers=broker)
        sent = {}
        for name in ("drift", "labels", "alerts"):
            meta = producer.send(prefix + name, key=b"m", value=b"\x00\x00\x00\x00\x02 not avro").get(timeout=30)
            sent[f"{meta.topic}:{meta.partition}:{meta.offset}"] = name
        good = AlertEvent("distribution_shift/m/w1", 1_000, "m", "distribution_shift", "open", "warning",
                          window_id="w1", message="after the bad records")
        producer.send(prefix + "alerts", key=b"m", value=encode("Alert", good.to_record())).get(timeout=30)
        producer.close()
        wait_until(lambda: scalar(url, "SELECT count() FROM dead_letters FINAL") == 3, timeout=60,
                   message="three dead letters")
        wait_until(lambda: scalar(url, "SELECT count() FROM alerts FINAL") == 1, timeout=60,
                   message="the valid alert after them")
        rows = query(url, "SELECT dl_id, reason FROM dead_letters FINAL ORDER BY dl_id")
    assert {r[0] for r in rows} == set(sent)
    assert all(r[1] for r in rows)
