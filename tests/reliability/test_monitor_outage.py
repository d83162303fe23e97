"""Monitor with the broker gone: the serving path keeps answering, memory stays bounded, drops are counted."""

from __future__ import annotations

import uuid

import pytest
import torch
from torch import nn

from layerwatch import Monitor, load_settings
from streams.broker import EmbeddedBroker
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def test_broker_stopped_mid_stream_bounds_queue_and_in_flight(tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        settings = load_settings(env={"LW_KAFKA_BOOTSTRAP": broker.bootstrap,
                                      "LW_TOPIC_PREFIX": f"o{uuid.uuid4().hex[:8]}."})
        monitor = Monitor(net, "outage", settings=settings, actions=False, batch_rows=16, queue_rows=64)
        wait_until(lambda: monitor.stats()["connected"], timeout=30, message="the monitor to connect")
        with torch.inference_mode():
            monitor(torch.randn(2, 8))
            assert monitor.flush(timeout=30)  # the first send waits for the topic's metadata
            for _ in range(39):
                monitor(torch.randn(2, 8))
            assert monitor.flush(timeout=30)
            before = monitor.stats()  # a busy machine may already have dropped a few of these 80 rows
            assert before["sent"] + before["dropped"] == 80 and before["sent"] >= 2 and before["in_flight"] == 0
            broker.stop()
            for _ in range(600):
                out = monitor(torch.randn(2, 8))
                assert out.shape == (2, 3)
                stats = monitor.stats()
                assert stats["queued"] <= 64 and stats["in_flight"] <= 64 + 16, stats
    wait_until(lambda: monitor.stats()["dropped"] > 0, timeout=10, message="drops while the broker is down")
    stats = monitor.close(timeout=0.5)
    assert stats["sent"] == before["sent"]
    assert stats["queued"] == 0
    # every row is accounted for: sent, dropped from the queue, failed or still unacknowledged at close
    assert stats["sent"] + stats["dropped"] + stats["failed"] + stats["in_flight"] == 80 + 1200
