"""The Alertmanager alert sink: layerwatch alerts pushed to Alertmanager's v2 API.

Every transition is POSTed to ``<LW_ALERTMANAGER_URL>/api/v2/alerts`` as one alert:
labels ``alertname`` (``Layerwatch`` + the kind in CamelCase, e.g.
``LayerwatchDistributionShift``), ``model_id``, ``kind``, ``severity``, ``alert_id`` and
``service=layerwatch``; annotations ``summary`` (the alert's message), ``description`` and
what evidence there is (``window_id``, ``client_id``, ``event_ids``); ``startsAt`` the time
the alert opened. An open alert's ``endsAt`` lies ``4 × resend_s`` ahead, and open alerts
are re-pushed every ``resend_s``: Alertmanager resolves an alert by itself when its
``endsAt`` passes without an update, so a worker that dies leaves no alert open forever,
while a live one keeps its alerts firing. A resolution is pushed with ``endsAt`` = the time
it resolved, which resolves the alert in Alertmanager at once. After a worker restart the
alerts the recovered rules still hold open are pushed again at once (``keep_open``).

Delivery, retries and dead letters are the webhook sink's (:class:`WebhookSink`): 429 and
5xx answers and connection errors are retried with backoff (honouring ``Retry-After``),
other 4xx answers and transitions still failing after the last attempt are dead-lettered
(``lw.dlq``, topic ``sink:alertmanager``). A failed re-push is only logged: the next one
tries again.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from typing import Any, Callable, Sequence

from streams.alerts.rules import AlertEvent
from streams.alerts.webhook import WebhookSink

log = logging.getLogger(__name__)

API_PATH = "/api/v2/alerts"
#: An open alert's endsAt lies this many re-push intervals ahead (as Prometheus does).
ENDS_AFTER_RESENDS = 4
_REPUSH = "_repush"


def rfc3339(ts_ms: float) -> str:
    """UTC RFC 3339 timestamp with milliseconds, as Alertmanager expects.

    Example:
        >>> rfc3339(1_700_000_000_123)
        '2023-11-14T22:13:20.123Z'
    """
    moment = _dt.datetime.fromtimestamp(ts_ms / 1000, tz=_dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def alertname(kind: str) -> str:
    """``distribution_shift`` → ``LayerwatchDistributionShift``."""
    return "Layerwatch" + "".join(part.capitalize() for part in kind.split("_"))


def alertmanager_alert(record: dict[str, Any], opened_ms: int, now_ms: float, resend_s: float,
                       generator_url: str = "") -> dict[str, Any]:
    """The Alertmanager v2 ``postableAlert`` for one Alert record.

    ``opened_ms`` is when the alert opened (the resolution carries its own time);
    an open alert ends ``ENDS_AFTER_RESENDS × resend_s`` after ``now_ms`` unless re-pushed.
    """
    labels = {"alertname": alertname(record["kind"]), "service": "layerwatch", "model_id": record["model_id"],
              "kind": record["kind"], "severity": record["severity"], "alert_id": record["alert_id"]}
    annotations = {"summary": record["message"] or f"{record['kind']} on model {record['model_id']}",
                   "description": f"layerwatch {record['kind']} alert {record['alert_id']} ({record['state']})"}
    for key in ("window_id", "client_id"):
        if record.get(key):
            annotations[key] = record[key]
    if record.get("event_ids"):
        annotations["event_ids"] = ", ".join(record["event_ids"][:20])
    if record["state"] == "resolved":
        ends_ms = max(record["ts_ms"], opened_ms)
    else:
        ends_ms = now_ms + ENDS_AFTER_RESENDS * resend_s * 1000
    alert = {"labels": labels, "annotations": annotations, "startsAt": rfc3339(opened_ms), "endsAt": rfc3339(ends_ms)}
    if generator_url:
        alert["generatorURL"] = generator_url
    return alert


class AlertmanagerSink(WebhookSink):
    """Pushes alert transitions to one Alertmanager and re-pushes the open ones (see the module doc)."""

    def __init__(self, url: str, *, resend_s: float = 60.0, generator_url: str = "", token: str = "",
                 timeout_s: float = 5.0, attempts: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 queue_size: int = 1000, dead_letter: Callable[[dict[str, Any]], Any] | None = None,
                 on_failure: Callable[[], None] | None = None, name: str = "alertmanager"):
        super().__init__(url.rstrip("/") + API_PATH, token=token, timeout_s=timeout_s, attempts=attempts,
                         backoff_s=backoff_s, max_backoff_s=max_backoff_s, queue_size=queue_size,
                         dead_letter=dead_letter, on_failure=on_failure, name=name)
        self.resend_s, self.generator_url = resend_s, generator_url
        self.open: dict[str, dict[str, Any]] = {}  # alert_id -> the record that opened it
        self.repush_task: Any = None

    def body(self, record: dict[str, Any]) -> bytes:
        opened = self.open.get(record["alert_id"], record)["ts_ms"] if record["state"] == "open" else record.get(
            "_opened_ms", record["ts_ms"])
        alert = alertmanager_alert(record, opened, time.time() * 1000, self.resend_s, self.generator_url)
        return json.dumps([alert]).encode()

    async def send(self, event: AlertEvent) -> None:
        import asyncio

        record = event.to_record()
        if event.state == "open":
            self.open.setdefault(event.alert_id, record)
        else:
            opening = self.open.pop(event.alert_id, None)
            record["_opened_ms"] = opening["ts_ms"] if opening else record["ts_ms"]
        if self.repush_task is None:
            self.repush_task = asyncio.get_running_loop().create_task(self._repush_forever())
        await self._enqueue(record)

    async def _enqueue(self, record: dict[str, Any]) -> None:
        import asyncio

        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._deliver_forever())
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            await self._give_up(record, f"{self.name} queue full")

    def keep_open(self, events: Sequence[AlertEvent]) -> None:
        """After a restart: the alerts the rules still hold open are pushed now and re-pushed from then on."""
        import asyncio

        for event in events:
            self.open.setdefault(event.alert_id, event.to_record())
        if self.open and self.repush_task is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a tool replaying alerts): the re-push starts with the next send
                return
            self.repush_task = loop.create_task(self._repush_forever(first_now=True))

    async def _repush_forever(self, first_now: bool = False) -> None:
        import asyncio

        if not first_now:
            await asyncio.sleep(self.resend_s)
        while True:
            for record in list(self.open.values()):
                await self._enqueue({**record, _REPUSH: True})
            await asyncio.sleep(self.resend_s)  # a timer: Alertmanager expires alerts that are not re-sent

    async def _give_up(self, record: dict[str, Any], reason: str) -> None:
        if record.get(_REPUSH):
            log.warning("re-push of open alert %s not delivered (next in %.0f s): %s", record["alert_id"],
                        self.resend_s, reason)
            return
        clean = {k: v for k, v in record.items() if not k.startswith("_")}
        await super()._give_up(clean, reason)

    async def close(self, timeout_s: float = 5.0) -> None:
        if self.repush_task is not None:
            self.repush_task.cancel()
        await super().close(timeout_s)


def alertmanager_sink(runtime: Any) -> AlertmanagerSink | None:
    """The ``alertmanager`` sink from settings (None when ``LW_ALERTMANAGER_URL`` is empty)."""
    s = runtime.settings
    if not s.alertmanager_url:
        return None
    return AlertmanagerSink(s.alertmanager_url, resend_s=s.alertmanager_resend_s, token=s.alertmanager_token,
                            timeout_s=s.alertmanager_timeout_s, attempts=s.alertmanager_attempts,
                            generator_url=s.alertmanager_generator_url, dead_letter=runtime.dead_letter,
                            on_failure=runtime.metrics.delivery_failures.labels("alertmanager").inc)
