"""Serving defences driven by the actions topic: per-client token buckets and throttle/block actions.

The worker's probing stage publishes ``Action`` records (client_id, action
throttle|block|clear, until_ms, reason, model_id; "" = every model) to ``lw.actions``.
Every inference server (the demo model server, any server holding a ``Monitor``) runs
one :class:`ActionListener` that reads every partition of that topic by manual
assignment, no consumer group (every server must see every action; Tansu gives groups
no assignment), from the start of the topic, so a restarted server honours actions
still in force. The listener feeds a :class:`ClientPolicy`, which answers "block",
"throttle" or None for a client and model, and keeps the per-client token buckets.

When the broker is not reachable the listener retries with backoff (the serving path
never waits for it); ``error`` holds the last connection failure until it connects.

``workers/`` does not import ``streams/``: bootstrap address and client settings are arguments.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

from schemas.codec import CodecError, decode

log = logging.getLogger("layerwatch.actions")

ALLOW = "allow"  # decision() when no action is in force; the others are the action names


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- client policy: token buckets + actions -----------------------------------------------------


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class ClientPolicy:
    """Per-client token buckets and the actions in force (thread-safe: actions arrive on a thread).

    ``rate`` (predictions per second) and ``burst`` apply to every client; a throttled
    client gets ``throttle_rate`` / ``throttle_burst`` until the action expires. ``rate``
    None or 0 disables rate limiting (throttle actions still apply).
    """

    def __init__(self, rate: float | None = None, burst: float = 0.0, throttle_rate: float = 2.0,
                 throttle_burst: float = 4.0, max_clients: int = 100_000):
        self.rate = rate or None
        self.burst = float(burst)
        self.throttle_rate = float(throttle_rate)
        self.throttle_burst = float(throttle_burst)
        self.max_clients = max_clients
        self._buckets: dict[str, _Bucket] = {}
        self._actions: dict[tuple[str, str], tuple[str, int, str]] = {}  # (client, model) -> (kind, until, reason)
        self._lock = threading.Lock()
        self.actions_applied = 0

    def apply(self, action: Mapping[str, Any]) -> None:
        """Record one decoded Action (throttle | block | clear)."""
        client = str(action["client_id"])
        model = str(action.get("model_id") or "")
        kind = action["action"]
        with self._lock:
            self.actions_applied += 1
            if kind == "clear":
                for key in [k for k in self._actions if k[0] == client and (not model or k[1] == model)]:
                    del self._actions[key]
                self._buckets.pop(client, None)
                return
            until = int(action["until_ms"])
            if until <= _now_ms():  # already over (e.g. replayed from the start of the topic)
                return
            self._actions[(client, model)] = (kind, until, str(action.get("reason", "")))

    def action_for(self, client: str, model: str, now_ms: int | None = None) -> str | None:
        """'block', 'throttle' or None for this client and model right now (expired actions are dropped)."""
        now_ms = _now_ms() if now_ms is None else now_ms
        found = None
        with self._lock:
            if not self._actions:
                return None
            for key in ((client, ""), (client, model)):
                entry = self._actions.get(key)
                if entry is None:
                    continue
                if entry[1] <= now_ms:
                    del self._actions[key]
                    continue
                if entry[0] == "block":
                    return "block"
                found = "throttle"
        return found

    def decision(self, client: str, model: str = "") -> str:
        """``"allow"``, ``"throttle"`` or ``"block"`` for this client and model right now."""
        return self.action_for(client, model) or ALLOW

    def in_force(self, now_ms: int | None = None) -> dict[str, str]:
        """Clients under an unexpired action: client id -> 'throttle' or 'block'."""
        now_ms = _now_ms() if now_ms is None else now_ms
        with self._lock:
            out: dict[str, str] = {}
            for (client, _model), (kind, until, _reason) in self._actions.items():
                if until > now_ms and out.get(client) != "block":
                    out[client] = kind
            return out

    def take(self, client: str, cost: float, throttled: bool, now: float | None = None) -> float:
        """Take ``cost`` tokens; returns 0.0 when allowed, else the seconds to wait before retrying."""
        rate = self.throttle_rate if throttled else self.rate
        burst = self.throttle_burst if throttled else self.burst
        if rate is None:
            return 0.0
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._prune(now)
            bucket = self._buckets[client] = _Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if cost > burst:
            return max(1.0, cost / rate)
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        return (cost - bucket.tokens) / rate

    def _prune(self, now: float) -> None:
        """Forget clients whose bucket has refilled (they are indistinguishable from new clients)."""
        rate = self.rate or 0.0
        full = [c for c, b in self._buckets.items() if b.tokens + (now - b.stamp) * rate >= self.burst]
        for c in full:
            del self._buckets[c]
        if len(self._buckets) >= self.max_clients:  # still full: drop the oldest half
            for c, _ in sorted(self._buckets.items(), key=lambda kv: kv[1].stamp)[: len(self._buckets) // 2]:
                del self._buckets[c]


class ActionListener(threading.Thread):
    """Consume the actions topic (every partition, manual assign, no group) into a ClientPolicy."""

    def __init__(self, bootstrap: str, topic: str, policy: ClientPolicy, client_config: Mapping[str, Any] | None = None,
                 poll_ms: int = 200):
        super().__init__(name="layerwatch-actions", daemon=True)
        self.bootstrap = bootstrap
        self.topic = topic
        self.policy = policy
        self.client_config = dict(client_config or {})
        self.poll_ms = poll_ms
        self.stopping = threading.Event()
        self.assigned = threading.Event()
        self.received = 0
        self.invalid = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                self._consume()
                return
            except Exception as exc:  # broker down or gone: retry, the serving path does not wait
                if self.error is None:
                    log.warning("actions listener: %s; retrying in the background", exc)
                self.error = exc
                self.assigned.clear()
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _consume(self) -> None:
        """Connect, wait for the topic, read it from the start until ``stopping`` is set."""
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap.split(","),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
            **self.client_config,
        )
        try:
            while not self.stopping.is_set():
                partitions = consumer.partitions_for_topic(self.topic)
                if partitions:
                    break
                self.stopping.wait(0.5)  # the topic does not exist yet: look again
            else:
                return
            consumer.assign([TopicPartition(self.topic, p) for p in sorted(partitions)])
            consumer.seek_to_beginning()
            self.error = None
            self.assigned.set()
            while not self.stopping.is_set():
                for records in consumer.poll(timeout_ms=self.poll_ms).values():
                    for record in records:
                        self._handle(record.value)
        finally:
            consumer.close()

    def _handle(self, value: bytes | None) -> None:
        self.received += 1
        try:
            _, action = decode(value or b"", expect="Action")
        except CodecError as exc:
            self.invalid += 1
            log.warning("ignored an undecodable action record: %s", exc)
            return
        self.policy.apply(action)

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        self.join(timeout)
