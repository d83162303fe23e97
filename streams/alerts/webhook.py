"""The webhook alert sink: each transition POSTed as JSON, delivered means a 2xx answer.

Deliveries run in a background task from a bounded queue, so a slow receiver never holds
up the alert rules. A 2xx answer is delivered. 429 and 5xx answers, timeouts and refused
connections are retried with capped exponential backoff, waiting at least what a
``Retry-After`` header asks (capped at ``MAX_RETRY_AFTER_S``). Any other 4xx will not
get better by retrying: the alert is dead-lettered at once (``lw.dlq`` and the
``dead_letters`` table, reason naming the status), as is one still failing after the
last attempt, or one that finds the queue full.

``format`` ``json`` posts the ``Alert`` record as it is; ``slack`` posts a Slack
incoming-webhook message (``text`` and ``blocks``) built from it.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import time
import zlib
from typing import Any, Callable
from urllib.parse import urlsplit

from streams.alerts.rules import AlertEvent

log = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 60.0
RETRY_STATUSES = frozenset({408, 425, 429})


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date); None when absent or bad.

    Example:
        >>> retry_after_s("3"), retry_after_s("soon")
        (3.0, None)
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def retryable(status: int) -> bool:
    """Whether an HTTP status may succeed on a later attempt (429, 408, 425 and every 5xx)."""
    return status >= 500 or status in RETRY_STATUSES


def endpoint(url: str) -> str:
    """The URL for log lines and dead-letter reasons: no credentials, query or fragment, and
    path segments of 16 characters or more (the secret of a Slack or Discord webhook URL) masked.

    Example:
        >>> endpoint("https://user:pw@hooks.slack.com/services/T0001/B0002/abcdefghijklmnopqrstuvwx?x=1")
        'https://hooks.slack.com/services/T0001/B0002/***'
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    path = "/".join("***" if len(segment) >= 16 else segment for segment in parts.path.split("/"))
    return f"{parts.scheme}://{host}{port}{path}"


def slack_message(record: dict[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook body (``text`` fallback plus ``blocks``) for one Alert record.

    Example:
        >>> body = slack_message({"alert_id": "a", "ts_ms": 0, "model_id": "cnn", "kind": "probing",
        ...     "state": "open", "severity": "warning", "window_id": "", "event_ids": [], "client_id": "c1",
        ...     "message": "probing on model cnn"})
        >>> body["text"]
        ':warning: [open] probing on model cnn'
    """
    icon = {"critical": ":rotating_light:", "warning": ":warning:"}.get(record["severity"], ":white_check_mark:")
    text = f"{icon} [{record['state']}] {record['message']}"
    facts = [("model", record["model_id"]), ("kind", record["kind"]), ("severity", record["severity"]),
             ("alert", record["alert_id"])]
    if record.get("window_id"):
        facts.append(("window", record["window_id"]))
    if record.get("client_id"):
        facts.append(("client", record["client_id"]))
    if record.get("event_ids"):
        facts.append(("top events", ", ".join(record["event_ids"][:5])))
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "section", "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{v}"} for k, v in facts]},
        ],
    }


FORMATS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"json": lambda record: record, "slack": slack_message}


class WebhookSink:
    """POSTs alert transitions to one URL from a background task (see the module doc)."""

    def __init__(self, url: str, *, token: str = "", timeout_s: float = 5.0, format: str = "json",
                 attempts: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0, queue_size: int = 1000,
                 dead_letter: Callable[[dict[str, Any]], Any] | None = None, on_failure: Callable[[], None] | None = None,
                 name: str = "webhook"):
        if format not in FORMATS:
            raise ValueError(f"webhook format {format!r}: choose from {', '.join(FORMATS)}")
        self.name, self.url, self.token, self.timeout_s = name, url, token, timeout_s
        self.format, self.attempts, self.backoff_s, self.max_backoff_s = format, attempts, backoff_s, max_backoff_s
        self.dead_letter, self.on_failure = dead_letter, on_failure
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=queue_size)
        self.task: asyncio.Task | None = None
        self.delivered = 0
        self.failed = 0

    async def send(self, event: AlertEvent) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._deliver_forever())
        record = event.to_record()
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            await self._give_up(record, f"{self.name} queue full")

    async def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued (up to ``timeout_s``), then stop."""
        if self.task is None:
            return
        try:
            await asyncio.wait_for(self.queue.join(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("%s %s: %d alert(s) still queued at shutdown", self.name, endpoint(self.url), self.queue.qsize())
        self.task.cancel()

    def body(self, record: dict[str, Any]) -> bytes:
        """The POST body for one Alert record, in this sink's format."""
        return json.dumps(FORMATS[self.format](record)).encode()

    async def _deliver_forever(self) -> None:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s), headers=headers) as session:
            while True:
                record = await self.queue.get()
                try:
                    await self._deliver(session, record)
                finally:
                    self.queue.task_done()

    async def _deliver(self, session: Any, record: dict[str, Any]) -> None:
        import aiohttp

        body = self.body(record)
        backoff, problem = self.backoff_s, ""
        for attempt in range(1, self.attempts + 1):
            wait = backoff
            try:
                async with session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as resp:
                    if 200 <= resp.status < 300:
                        self.delivered += 1
                        return
                    problem = f"HTTP {resp.status} {resp.reason or ''}".strip()
                    if not retryable(resp.status):
                        await self._give_up(record, f"{self.name} {endpoint(self.url)} answered {problem}")
                        return
                    asked = retry_after_s(resp.headers.get("Retry-After"))
                    if asked is not None:
                        wait = max(wait, min(asked, MAX_RETRY_AFTER_S))
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if attempt < self.attempts:
                await asyncio.sleep(wait)  # retry backoff
                backoff = min(backoff * 2, self.max_backoff_s)
        await self._give_up(record, f"{self.name} {endpoint(self.url)} failed {self.attempts} times, last: {problem}")

    async def _give_up(self, record: dict[str, Any], reason: str) -> None:
        self.failed += 1
        log.warning("alert %s (%s) not delivered: %s", record["alert_id"], record["state"], reason)
        if self.on_failure is not None:
            self.on_failure()
        if self.dead_letter is not None:
            await self.dead_letter(delivery_dead_letter(self.name, record, reason))


def delivery_dead_letter(sink: str, record: dict[str, Any], reason: str) -> dict[str, Any]:
    """A DeadLetter record for an alert a sink could not deliver: topic ``sink:<name>``, a stable offset."""
    offset = zlib.crc32(f"{record['alert_id']}|{record['state']}".encode())
    return {"topic": f"sink:{sink}", "partition": 0, "offset": offset, "ts_ms": int(time.time() * 1000),
            "reason": f"{reason} (alert {record['alert_id']}, {record['state']})"[:2000],
            "raw": json.dumps(record).encode()}


def webhook_sink(runtime: Any) -> WebhookSink | None:
    """The ``webhook`` sink from settings (None when ``LW_WEBHOOK_URL`` is empty)."""
    s = runtime.settings
    if not s.webhook_url:
        return None
    metrics = runtime.metrics
    return WebhookSink(s.webhook_url, token=s.webhook_token, timeout_s=s.webhook_timeout_s, format=s.webhook_format,
                       attempts=s.webhook_attempts, dead_letter=runtime.dead_letter,
                       on_failure=metrics.delivery_failures.labels("webhook").inc)
