"""Windows of revoked partitions are dropped on rebalance: two workers, memory measured before and after.

Worker A alone consumes 8 models over 2 partitions and holds every model's open windows
(event time one hour ahead: no window closes). Worker B joins the group; after the
rebalance A holds the windows of the models of its remaining partition only, and its
window memory (``layerwatch_window_bytes``) falls in proportion; B holds the others
(rebuilt by recovery from the committed offsets). The RSS of A is printed beside them:
numpy returns small arrays to the allocator, not always to the OS.
"""

from __future__ import annotations

import itertools
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from schemas import encode_batch
from streams.stack import LocalStack
from tests.reliability.synthetic import future_base, make_batch, producer
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

_run = itertools.count()
MODELS = [f"model-{i}" for i in range(8)]


def _gauges(url: str, *names: str) -> tuple[float, ...]:
    """Several gauges from one scrape, so they describe the same moment (-1 when absent)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = [re.findall(rf"^{name} (\S+)$", text, re.MULTILINE) for name in names]
    return tuple(float(f[0]) if f else -1.0 for f in found)


def _gauge(url: str, name: str) -> float:
    return _gauges(url, name)[0]


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1))


def _partition(key: str, n: int = 2) -> int:
    from kafka.partitioner.default import murmur2

    return (murmur2(key.encode()) & 0x7FFFFFFF) % n


def test_revoked_partitions_windows_are_dropped(broker, chdb_url, tmp_path) -> None:
    by_partition = {p: [m for m in MODELS if _partition(m) == p] for p in (0, 1)}
    assert all(by_partition.values()), by_partition  # both partitions carry models
    prefix = f"rebal{next(_run)}."
    topic = prefix + "predictions"
    base = future_base(2000)
    with LocalStack(state_dir=tmp_path / "stack", clickhouse_url=chdb_url, bootstrap=broker) as stack:
        stack.env = {"LW_TOPIC_PREFIX": prefix, "LW_APP_ID": f"layerwatch-{prefix}", "LW_TOPIC_PARTITIONS": "2",
                     "LW_AGENTS": "sink,drift", "LW_WINDOW_SIZE_S": "4", "LW_WINDOW_STEP_S": "2",
                     "LW_WINDOW_MAX_SAMPLES": "400"}
        a, url_a = stack.start_worker("worker-a")
        rng = np.random.default_rng(3)
        p = producer(broker)
        for m in MODELS:  # 3 s of event time per model: 2 open windows each, nothing closes
            for k in range(3):
                ids = [f"{m}-{k}-{i}" for i in range(100)]
                ts = base + k * 1000 + np.arange(100, dtype=np.int64) * 10
                p.send(topic, key=m.encode(), value=encode_batch(make_batch(ids, ts, rng, model_id=m)))
        p.flush()
        p.close()
        wait_until(lambda: _gauge(url_a, "layerwatch_window_keys") == len(MODELS), timeout=60,
                   message="worker A holding every model's windows")
        bytes_before, rss_before = _gauge(url_a, "layerwatch_window_bytes"), _rss_kib(a.process.pid)

        # chDB is one process per path: B gets its own store (the test looks at windows, not rows)
        _, url_b = stack.start_worker("worker-b", LW_CLICKHOUSE_URL=f"chdb://{tmp_path / 'store-b'}")

        per_key = bytes_before / len(MODELS)
        seen: dict[str, float] = {}

        def settled() -> bool:
            # a rebalance can come in several rounds (revoke all, assign, recover): wait for the split
            # to hold A's remaining models' windows, not for a moment in between
            ka, bytes_a = _gauges(url_a, "layerwatch_window_keys", "layerwatch_window_bytes")
            kb = _gauge(url_b, "layerwatch_window_keys")
            seen.update(keys_a=ka, bytes_a=bytes_a, keys_b=kb)
            # open windows differ a little in size between models; without the drop A would keep all of them
            return (1 <= ka < len(MODELS) and ka + kb == len(MODELS)
                    and abs(bytes_a - per_key * ka) <= 0.15 * per_key * ka)

        wait_until(settled, timeout=90, message="A to hold only its remaining models' windows")
        keys_a, bytes_after, rss_after = seen["keys_a"], seen["bytes_a"], _rss_kib(a.process.pid)
        assert keys_a in (len(by_partition[0]), len(by_partition[1]))
        assert bytes_after == pytest.approx(per_key * keys_a, rel=0.15)
        print(f"\nworker A window memory: {bytes_before / 1024:.0f} KiB for {len(MODELS)} models before B joined, "
              f"{bytes_after / 1024:.0f} KiB for {keys_a:.0f} after the rebalance; "
              f"RSS {rss_before / 1024:.1f} MiB -> {rss_after / 1024:.1f} MiB")
