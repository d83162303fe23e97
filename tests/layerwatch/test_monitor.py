"""Monitor: exact outputs, micro-batches on the real broker, drop-oldest when Kafka is away, actions, reference."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import torch
from torch import nn

from layerwatch import Monitor, load_settings, top1
from schemas.codec import decode_batch, encode
from streams.broker import free_port
from tests.waiting import wait_until
from tests.workers.inference.conftest import consume_all

HEAVY = ("faust", "chdb", "clickhouse_driver", "art", "plotly", "matplotlib")


class Net(nn.Module):
    """A small MLP whose forward returns a tuple, to check the output is passed through untouched."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.head(h), h.sum(dim=1)


def _settings(bootstrap: str, prefix: str | None = None):
    prefix = prefix or f"t{uuid.uuid4().hex[:10]}."
    return load_settings(env={"LW_KAFKA_BOOTSTRAP": bootstrap, "LW_TOPIC_PREFIX": prefix})


def _dead_bootstrap() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


def test_import_and_use_do_not_pull_in_the_worker_stack() -> None:
    code = f"""
import sys, torch, layerwatch
from layerwatch import Monitor, LayerTap, MMDTester, load_settings, top1
net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
m = Monitor(net, "light", bootstrap="{_dead_bootstrap()}", actions=True)
top1(m(torch.ones(3, 4)))
m.observe(torch.ones(2, 2), {{"penultimate": torch.ones(2, 8)}})
m.close(timeout=0.2)
print([name for name in {HEAVY!r} if name in sys.modules])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_returns_exactly_what_the_model_returns_and_queues_rows() -> None:
    net = Net().eval()
    x = torch.randn(5, 12)
    monitor = Monitor(net, "exact", bootstrap=_dead_bootstrap(), actions=False)
    try:
        with torch.inference_mode():
            got, want = monitor(x, client_id="a"), net(x)
        assert isinstance(got, tuple) and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        with torch.no_grad():  # the caller's grad mode is kept: no inference tensors forced on it
            got = monitor(x)
        assert not got[0].is_inference()
        assert top1(got) == want[0].argmax(dim=1).tolist() == top1(want[0].numpy())
        assert monitor.stats()["queued"] == 10
    finally:
        monitor.close(timeout=0.2)
    assert not monitor.tap.attached  # close() leaves the model as it was


def test_full_queue_drops_the_oldest_rows_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    net = Net().eval()
    monitor = Monitor(net, "full", bootstrap=_dead_bootstrap(), actions=False, batch_rows=8, queue_rows=40)
    caplog.set_level(logging.WARNING, logger="layerwatch.monitor")
    try:
        with torch.inference_mode():
            for _ in range(100):
                monitor(torch.randn(3, 12))
        stats = monitor.stats()
        assert stats["queued"] + stats["dropped"] == 300
        assert 38 <= stats["queued"] <= 40 and stats["sent"] == 0 and not stats["connected"]
        kept = [e.n for e in monitor._queue]
        assert sum(kept) == stats["queued"]
        assert len([r for r in caplog.records if "dropped the oldest" in r.message]) == 1
    finally:
        final = monitor.close(timeout=0.2)
    assert final["dropped"] == 300 and final["queued"] == 0  # never connected: everything queued is lost


def test_observe_checks_its_layers() -> None:
    monitor = Monitor(None, "onnx", bootstrap=_dead_bootstrap(), actions=False)
    try:
        monitor.observe(np.zeros((2, 3), np.float32), {"pool": np.ones((2, 6, 4, 4), np.float32)})
        with pytest.raises(ValueError, match="differ"):
            monitor.observe(np.zeros((2, 3), np.float32), {"other": np.ones((2, 6), np.float32)})
        with pytest.raises(ValueError, match="do not match"):
            monitor.observe(np.zeros((2, 3), np.float32), {"pool": np.ones((2, 5), np.float32)})
        with pytest.raises(ValueError, match="request_ids"):
            monitor.observe(np.zeros((2, 3), np.float32), {"pool": np.ones((2, 6), np.float32)}, request_ids=["x"])
        with pytest.raises(TypeError, match="no model"):
            monitor(torch.ones(1, 3))
        assert monitor.stats()["queued"] == 2
    finally:
        monitor.close(timeout=0.2)


@pytest.mark.integration
def test_threads_and_asyncio_publish_every_row_once_in_micro_batches(broker: str) -> None:
    settings = _settings(broker)
    net = Net().eval()
    monitor = Monitor(net, "mlp", model_version="7", bootstrap=broker, settings=settings, actions=False,
                      batch_rows=64, max_age_ms=50)
    expected: dict[str, str] = {}
    lock = threading.Lock()

    def serve(client: str, calls: int) -> None:
        rng = np.random.default_rng(abs(hash(client)) % 1000)
        for i in range(calls):
            ids = [f"{client}-{i}-{k}" for k in range(2)]
            with torch.inference_mode():
                monitor(torch.from_numpy(rng.normal(size=(2, 12)).astype(np.float32)), client_id=client,
                        request_ids=ids)
            with lock:
                expected.update({r: client for r in ids})

    async def serve_async() -> None:
        async def one(i: int) -> None:
            await asyncio.to_thread(serve, f"async{i}", 20)
            with torch.inference_mode():  # and straight from the event loop
                monitor(torch.zeros(1, 12), client_id="loop", request_ids=[f"loop-{i}"])
            expected[f"loop-{i}"] = "loop"

        await asyncio.gather(*(one(i) for i in range(3)))

    threads = [threading.Thread(target=serve, args=(f"thread{i}", 50)) for i in range(4)]
    for t in threads:
        t.start()
    asyncio.run(serve_async())
    for t in threads:
        t.join()
    assert monitor.flush(timeout=30)
    stats = monitor.close()
    total = 4 * 50 * 2 + 3 * 20 * 2 + 3
    assert len(expected) == total and stats["sent"] == total and stats["dropped"] == stats["failed"] == 0

    records = consume_all(broker, settings.topic("predictions"),
                          lambda rs: sum(decode_batch(r.value).n for r in rs) >= total)
    batches = [decode_batch(r.value) for r in records]
    assert len(batches) < total / 8  # micro-batches, not a record per call
    assert all(r.key == b"mlp" for r in records)
    seen = {e: c for b in batches for e, c in zip(b.event_ids, b.client_ids)}
    assert sum(b.n for b in batches) == total and seen == expected
    b = batches[0]
    assert (b.model_id, b.model_version, b.role) == ("mlp", "7", "live")
    assert b.layers["penultimate"].dtype == np.float16 and b.layers["penultimate"].shape[1] == 16
    np.testing.assert_allclose(b.outputs.sum(axis=1), 1.0, rtol=1e-5)  # softmax of the logits
    assert (np.diff(np.concatenate([b.ts_ms for b in batches])) >= -1000).all()


class Embedder(nn.Module):
    """Returns (logits, features) where the features are the head's own input (an embedding service)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.head(h), h


class ClsHead(nn.Module):
    """A transformer-style head: the classifier reads the first token of (n, seq, d) hidden states."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, 0])


def test_a_penultimate_view_of_a_larger_tensor_is_copied_not_kept() -> None:
    """Queued rows must not keep a model's whole hidden state alive (memory bounded by the queue)."""
    monitor = Monitor(ClsHead().eval(), "cls", bootstrap=_dead_bootstrap(), actions=False)
    try:
        with torch.inference_mode():
            monitor(torch.randn(4, 128, 8))
        (entry,) = list(monitor._queue)
        assert entry.rows.shape == (4, 3 + 8)  # outputs, then the penultimate, copied together
        assert entry.rows.untyped_storage().nbytes() == entry.rows.numel() * entry.rows.element_size()
    finally:
        monitor.close(timeout=0.2)


@pytest.mark.integration
def test_published_rows_are_what_the_model_computed_even_if_the_caller_changes_them(broker: str) -> None:
    """The tap holds the penultimate matrix by reference during the forward pass; it is copied before
    monitor() returns, so what the caller does with the tensors it gets back changes nothing."""
    settings = _settings(broker)
    net = Embedder().eval()
    x = torch.randn(5, 6)
    with torch.inference_mode():
        logits, features = net(x)
    with Monitor(net, "embed", bootstrap=broker, settings=settings, actions=False, layer_dtype="float32",
                 output_fn=None) as monitor:
        with torch.inference_mode():
            out, feats = monitor(x)
            out.zero_()  # the caller reuses what it got back, in place
            feats.mul_(-1.0)
        assert monitor.flush(timeout=30)
    (record,) = consume_all(broker, settings.topic("predictions"), lambda rs: len(rs) >= 1)
    batch = decode_batch(record.value)
    np.testing.assert_allclose(batch.outputs, logits.numpy(), rtol=1e-6)
    np.testing.assert_allclose(batch.layers["penultimate"], features.numpy(), rtol=1e-6)


@pytest.mark.integration
def test_reference_from_a_dataloader_and_observe_without_a_model(broker: str) -> None:
    settings = _settings(broker)
    net = Net().eval()
    data = torch.utils.data.TensorDataset(torch.randn(70, 12), torch.arange(70) % 4)
    with Monitor(net, "ref", bootstrap=broker, settings=settings, actions=False) as monitor:
        assert monitor.publish_reference(torch.utils.data.DataLoader(data, batch_size=32)) == 70
    with Monitor(None, "ext", bootstrap=broker, settings=settings, actions=False, output_fn=None) as external:
        probs = np.full((3, 2), 0.5, np.float32)
        external.observe(probs, {"embedding": torch.ones(3, 5)}, client_id=["a", "b", "c"])
        assert external.flush(timeout=30)
    records = consume_all(broker, settings.topic("predictions"),
                          lambda rs: sum(decode_batch(r.value).n for r in rs) >= 73)
    batches = [decode_batch(r.value) for r in records]
    reference = [b for b in batches if b.model_id == "ref"]
    assert {b.role for b in reference} == {"reference"} and sum(b.n for b in reference) == 70
    assert np.concatenate([b.truth for b in reference]).tolist() == (np.arange(70) % 4).tolist()
    (ext,) = [b for b in batches if b.model_id == "ext"]
    assert ext.client_ids == ["a", "b", "c"] and np.allclose(ext.outputs, 0.5) and ext.layers["embedding"].shape == (3, 5)


@pytest.mark.integration
def test_decision_follows_the_actions_topic(broker: str) -> None:
    from kafka import KafkaProducer

    settings = _settings(broker)
    with Monitor(Net().eval(), "guarded", bootstrap=broker, settings=settings) as monitor:
        assert monitor.decision("mallory") == "allow"
        producer = KafkaProducer(bootstrap_servers=broker)
        until = int(time.time() * 1000) + 60_000
        for client, action in (("mallory", "block"), ("trudy", "throttle")):
            record = {"client_id": client, "action": action, "until_ms": until, "reason": "test", "model_id": "guarded"}
            producer.send(settings.topic("actions"), encode("Action", record)).get(timeout=10)
        producer.close()
        wait_until(lambda: monitor.decision("mallory") == "block", timeout=20, message="the block action")
        assert monitor.decision("trudy") == "throttle" and monitor.decision("alice") == "allow"
        assert monitor.stats()["actions"] == "running"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.integration
def test_cuda_tensors(broker: str) -> None:
    settings = _settings(broker)
    net = Net().cuda().eval()
    with Monitor(net, "gpu", bootstrap=broker, settings=settings, actions=False) as monitor:
        with torch.inference_mode():
            out = monitor(torch.randn(4, 12, device="cuda"))
        assert out[0].is_cuda and monitor.flush(timeout=30)
    records = consume_all(broker, settings.topic("predictions"), lambda rs: len(rs) >= 1)
    assert decode_batch(records[0].value).n == 4


def test_bad_arguments_fail_in_one_line() -> None:
    with pytest.raises(ValueError, match="model_id"):
        Monitor(Net(), "", bootstrap=_dead_bootstrap(), actions=False)
    with pytest.raises(ValueError, match="output_fn"):
        Monitor(Net(), "x", bootstrap=_dead_bootstrap(), actions=False, output_fn="sigmoid")
    with pytest.raises(KeyError, match="no module named"):
        Monitor(Net(), "x", layers=["nope"], bootstrap=_dead_bootstrap(), actions=False)
    json.dumps(Monitor.__init__.__doc__ or "")  # the docstring exists and is text
