"""Synthetic streams for the reliability tests: a seeded model, a paced publisher, API helpers.

Event times are explicit (``base + i * spacing``) and lie one hour ahead of the wall
clock, so windows close on the event-time watermark only (``close_idle`` runs on the
wall clock and never reaches them): what the windows hold is a function of the stream,
not of how fast the worker happened to be. The Kafka record timestamps stay the send
time, which is what the window rebuild bounds its read by. Workers fed these streams need
``LW_MAX_EVENT_SKEW_S`` above an hour, or the event guard clamps the times to the send time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
from kafka import KafkaProducer

from schemas import PredictionBatch, encode_batch
from streams.client import http_json

MODEL = "synth"
DIM = 32
CLASSES = 10


def future_base(step_ms: int, ahead_s: float = 3600.0) -> int:
    """An event-time origin ``ahead_s`` in the future, aligned to the window step."""
    t = int((time.time() + ahead_s) * 1000)
    return (t // step_ms) * step_ms


def make_batch(ids: list[str], ts_ms: np.ndarray, rng: np.random.Generator, *, shift: float = 0.0,
               role: str = "live", model_id: str = MODEL) -> PredictionBatch:
    """n predictions of the synthetic model: N(shift, I) penultimate activations, softmax outputs."""
    n = len(ids)
    logits = rng.normal(size=(n, CLASSES)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pen = (rng.normal(size=(n, DIM)) + shift).astype(np.float32)
    return PredictionBatch.build(model_id, ids, probs, {"penultimate": pen}, role=role,
                                 client_ids=[f"c{i % 7}" for i in range(n)], ts_ms=np.asarray(ts_ms, np.int64))


def producer(bootstrap: str) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=bootstrap, linger_ms=2, acks=1, max_request_size=8 * 1024 * 1024)


def publish_reference(bootstrap: str, topic: str, n: int = 200, seed: int = 99) -> list[str]:
    """Clean role=reference events of the synthetic model (ReferenceCache needs enough of them)."""
    rng = np.random.default_rng(seed)
    p = producer(bootstrap)
    ids: list[str] = []
    now = int(time.time() * 1000)
    for start in range(0, n, 50):
        chunk = [f"ref-{i}" for i in range(start, min(n, start + 50))]
        p.send(topic, key=MODEL.encode(), value=encode_batch(
            make_batch(chunk, np.full(len(chunk), now, np.int64), rng, role="reference")))
        ids += chunk
    p.flush()
    p.close()
    return ids


@dataclass
class Plan:
    """A fixed-rate stream: ``n_batches`` of ``batch`` events, event spacing ``spacing_ms``, shifted where asked."""

    base_ms: int
    n_batches: int
    batch: int = 10
    spacing_ms: int = 20
    shift_from_ms: int | None = None  # event-time offsets [from, to) carry shifted activations
    shift_to_ms: int | None = None
    shift: float = 1.0

    @property
    def n_events(self) -> int:
        return self.n_batches * self.batch

    def ts(self, i: int) -> np.ndarray:
        """Event times of batch i."""
        k = np.arange(i * self.batch, (i + 1) * self.batch, dtype=np.int64)
        return self.base_ms + k * self.spacing_ms

    def ids(self, i: int) -> list[str]:
        return [f"e{j:07d}" for j in range(i * self.batch, (i + 1) * self.batch)]

    def shifted(self, i: int) -> bool:
        if self.shift_from_ms is None:
            return False
        t = int(self.ts(i)[0]) - self.base_ms
        return self.shift_from_ms <= t < (self.shift_to_ms or 1 << 62)

    def events_in(self, start_ms: int, end_ms: int) -> int:
        """How many planned events have start <= ts < end."""
        ts = self.base_ms + np.arange(self.n_events, dtype=np.int64) * self.spacing_ms
        return int(((ts >= start_ms) & (ts < end_ms)).sum())


@dataclass
class PacedPublisher:
    """Publishes a Plan from a thread at a fixed rate (``period_s`` per batch); pausable."""

    bootstrap: str
    topic: str
    plan: Plan
    period_s: float = 0.2
    seed: int = 1
    sent: int = 0  # batches handed to the producer
    running: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.running.set()
        self._thread = threading.Thread(target=self._run, name="paced-publisher", daemon=True)
        self._done = threading.Event()

    def start(self) -> PacedPublisher:
        self._thread.start()
        return self

    def _run(self) -> None:
        rng = np.random.default_rng(self.seed)
        p = producer(self.bootstrap)
        try:
            next_at = time.monotonic()
            for i in range(self.plan.n_batches):
                if not self.running.is_set():
                    self.running.wait()
                    next_at = time.monotonic()  # resume at the same rate, no burst to catch up
                now = time.monotonic()
                if now < next_at:
                    time.sleep(next_at - now)  # pacing the stream, not synchronisation
                next_at = max(next_at, time.monotonic()) + self.period_s
                batch = make_batch(self.plan.ids(i), self.plan.ts(i), rng,
                                   shift=self.plan.shift if self.plan.shifted(i) else 0.0)
                p.send(self.topic, key=MODEL.encode(), value=encode_batch(batch)).get(timeout=30)
                self.sent = i + 1
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc
        finally:
            p.close()
            self._done.set()

    def pause(self) -> None:
        self.running.clear()

    def resume(self) -> None:
        self.running.set()

    def join(self, timeout: float) -> None:
        if not self._done.wait(timeout):
            raise TimeoutError("publisher did not finish")
        if self.error is not None:
            raise self.error


def query(url: str, sql: str, token: str = "", **params) -> list[list]:
    """Rows of a read-only query through the worker's API (asserts HTTP 200)."""
    status, body = http_json(f"{url}/api/query", {"sql": sql, "params": params}, token=token, timeout=30)
    assert status == 200, (status, body)
    return body["rows"]


def scalar(url: str, sql: str, token: str = "", **params) -> int:
    """First cell of a query; -1 when the worker does not answer (for wait_until predicates)."""
    status, body = http_json(f"{url}/api/query", {"sql": sql, "params": params}, token=token, timeout=30)
    return int(body["rows"][0][0]) if status == 200 and body.get("rows") else -1
