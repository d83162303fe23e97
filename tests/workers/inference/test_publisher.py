"""Publisher round trips through the real embedded broker (Tansu), record splitting, delivery errors."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.codec import decode_batch
from tests.workers.inference.conftest import consume_all
from workers.inference.publisher import Publisher, PublishError, auto_compression

pytestmark = pytest.mark.integration


def _events(records: list) -> int:
    return sum(decode_batch(r.value).n for r in records)


def test_round_trip_equals_what_was_sent(broker, topic):
    rng = np.random.default_rng(0)
    n = 50
    outputs = rng.dirichlet(np.ones(10), size=n).astype(np.float32)
    layers = {"penultimate": rng.normal(size=(n, 64)).astype(np.float32),
              "block2": rng.normal(size=(n, 32)).astype(np.float16)}
    inputs = rng.random((n, 64), dtype=np.float32)
    truth = rng.integers(0, 10, n)
    attack = ["pgd" if i % 2 else "" for i in range(n)]
    with Publisher(broker, "cnn", model_version="7", topic=topic) as publisher:
        ids = publisher.publish(outputs, layers, client_ids=[f"c{i % 3}" for i in range(n)], ts_ms=123456,
                                truth=truth, attack=attack, inputs=inputs,
                                uncertainty=np.linspace(0, 1, n, dtype=np.float32))
        publisher.flush()
        assert (publisher.sent_events, publisher.sent_records, publisher.errors) == (n, 1, 0)
    assert publisher.compression == auto_compression() == "zstd"
    records = consume_all(broker, topic, lambda rs: _events(rs) >= n)
    assert len(records) == 1 and records[0].key == b"cnn"
    batch = decode_batch(records[0].value)
    assert (batch.model_id, batch.model_version, batch.role) == ("cnn", "7", "live")
    assert batch.event_ids == ids and len(set(ids)) == n and all(len(i) == 32 for i in ids)
    assert batch.client_ids == [f"c{i % 3}" for i in range(n)]
    assert (batch.ts_ms == 123456).all()
    np.testing.assert_array_equal(batch.outputs, outputs)
    np.testing.assert_array_equal(batch.predicted, outputs.argmax(1))
    assert list(batch.layers) == ["penultimate", "block2"]
    np.testing.assert_array_equal(batch.layers["penultimate"], layers["penultimate"])
    assert batch.layers["block2"].dtype == np.float16
    np.testing.assert_array_equal(batch.layers["block2"], layers["block2"])
    np.testing.assert_array_equal(batch.inputs, inputs)
    np.testing.assert_array_equal(batch.truth, truth)
    assert batch.attack == attack
    np.testing.assert_array_equal(batch.uncertainty, np.linspace(0, 1, n, dtype=np.float32))


def test_large_batches_are_split_below_max_message_bytes(broker, topic):
    rng = np.random.default_rng(1)
    n = 700
    outputs = rng.dirichlet(np.ones(10), size=n).astype(np.float32)
    layers = {"penultimate": rng.normal(size=(n, 64)).astype(np.float32)}
    limit = 40_000
    with Publisher(broker, "mlp", topic=topic, role="reference", max_message_bytes=limit,
                   compression="none") as publisher:
        parts = publisher.encode(publisher.build(outputs, layers))
        assert len(parts) > 1 and all(len(p) < limit for p in parts)
        ids = publisher.publish(outputs, layers)
        publisher.flush()
        assert publisher.sent_events == n and publisher.sent_records == len(parts)
    records = consume_all(broker, topic, lambda rs: _events(rs) >= n)
    assert all(len(r.value) < limit for r in records)
    batches = sorted((decode_batch(r.value) for r in records), key=lambda b: ids.index(b.event_ids[0]))
    assert all(b.role == "reference" for b in batches)
    assert [e for b in batches for e in b.event_ids] == ids
    np.testing.assert_array_equal(np.concatenate([b.layers["penultimate"] for b in batches]), layers["penultimate"])
    # one prediction above the limit cannot be split
    with Publisher(broker, "mlp", topic=topic, max_message_bytes=2048) as small:
        with pytest.raises(ValueError, match="one prediction"):
            small.publish(outputs[:1], {"penultimate": np.zeros((1, 1024), np.float32)})


def test_delivery_failures_are_counted_and_raised_by_flush(topic):
    from streams.broker import (
        EmbeddedBroker,  # tests may use streams/; workers/ may not
    )

    own = EmbeddedBroker().start()
    try:
        publisher = Publisher(own.bootstrap, "cnn", topic=topic, delivery_timeout_ms=1500, request_timeout_ms=500,
                              retries=0, linger_ms=0)
        publisher.publish(np.eye(10, dtype=np.float32)[:2], {"penultimate": np.ones((2, 4), np.float32)})
        publisher.flush()
        assert publisher.sent_events == 2
        own.process.kill()  # the broker dies: the next record cannot be delivered
        own.process.wait()
        publisher.publish(np.eye(10, dtype=np.float32)[:3], {"penultimate": np.ones((3, 4), np.float32)})
        with pytest.raises(PublishError, match="1 record"):
            publisher.flush(timeout=20)
        assert publisher.errors == 1 and publisher.sent_events == 2 and publisher.in_flight == 0
        publisher.flush()  # the failure was reported once
        publisher.producer.close(timeout=0)
    finally:
        own.stop()


def test_a_record_the_producer_refuses_raises_at_once(broker):
    with Publisher(broker, "cnn", topic="not a legal topic!") as publisher:
        with pytest.raises(PublishError, match="could not hand a record"):
            publisher.publish(np.eye(10, dtype=np.float32)[:2], {"penultimate": np.ones((2, 4), np.float32)})
        assert publisher.errors == 1 and publisher.sent_records == 0
        with pytest.raises(PublishError, match="1 record"):
            publisher.flush()


def test_bad_arguments_fail_before_sending(broker, topic):
    with pytest.raises(ValueError, match="role"):
        Publisher(broker, "cnn", role="shadow")
    with Publisher(broker, "cnn", topic=topic) as publisher:
        with pytest.raises(Exception, match="layers"):
            publisher.publish(np.eye(10, dtype=np.float32)[:2], {})
        assert publisher.sent_records == 0
