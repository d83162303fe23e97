"""Shared fixtures for the inference tests: demo models trained once per session, Kafka helpers.

The broker fixture comes from ``tests/plugins/broker.py`` (``pytest -p tests.plugins.broker``
until the lead registers it in tests/conftest.py).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.waiting import wait_until


def demo_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One state dir per session (shared by every test package), demo models trained into it once."""
    from workers.inference.models import load_demo_models

    path = tmp_path_factory.getbasetemp() / "layerwatch-state"
    load_demo_models(path, progress=False)  # trains on first use, loads from the cache afterwards
    return path


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_state_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def demo_models(state_dir: Path) -> dict:
    from workers.inference.models import load_demo_models

    return load_demo_models(state_dir, progress=False)


@pytest.fixture
def topic() -> str:
    """A fresh topic name per test, so tests never read each other's records."""
    return f"test.{uuid.uuid4().hex[:12]}"


def consume_all(bootstrap: str, topic: str, expected: Callable[[list], bool], timeout: float = 15.0) -> list:
    """Read a topic from the start (manual assign of every partition, no group) until ``expected(records)``."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", fetch_max_wait_ms=100)
    try:
        wait_until(lambda: bool(consumer.partitions_for_topic(topic)), timeout=timeout,
                   message=f"topic {topic} never appeared")
        partitions = consumer.partitions_for_topic(topic)
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        records: list = []

        def more() -> bool:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            return expected(records)

        wait_until(more, timeout=timeout, interval=0.01, message=f"expected records never arrived on {topic}")
        return records
    finally:
        consumer.close()


def http(url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         method: str | None = None) -> tuple[int, dict, Any]:
    """(status, headers, parsed JSON body) of one request; HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, dict(exc.headers), json.loads(raw) if raw else None


def post_json(url: str, inputs: Any, headers: dict[str, str] | None = None) -> tuple[int, dict, Any]:
    return http(url, json.dumps({"inputs": inputs}).encode(), {"Content-Type": "application/json", **(headers or {})})
