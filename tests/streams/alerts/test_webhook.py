"""The webhook sink against a real local HTTP receiver: Slack format, retries, Retry-After, dead letters."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from streams.alerts.rules import AlertEvent
from streams.alerts.webhook import WebhookSink

EVENT = AlertEvent("probing/cnn/mallory@5", 5_000, "cnn", "probing", "open", "warning", client_id="mallory",
                   event_ids=("e1", "e2"), message="probing on model cnn by mallory")


class Receiver:
    """An aiohttp server on a free loopback port answering each POST with the next scripted (status, headers)."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]):
        self.script, self.requests = list(script), []  # type: ignore[var-annotated]
        self.arrived: list[float] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.json()))
        self.arrived.append(time.monotonic())
        status, headers = self.script.pop(0) if self.script else (200, {})
        return web.Response(status=status, headers=headers, text="ok" if status < 300 else "no")

    async def __aenter__(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def _deliver(script: list[tuple[int, dict[str, str]]], **options: Any) -> tuple[Receiver, WebhookSink, list[dict]]:
    dead: list[dict] = []

    async def dead_letter(record: dict) -> None:
        dead.append(record)

    async with Receiver(script) as receiver:
        sink = WebhookSink(receiver.url, dead_letter=dead_letter, **options)
        await sink.send(EVENT)
        await sink.close(timeout_s=30)
    return receiver, sink, dead


def test_slack_format_posts_text_and_blocks() -> None:
    receiver, sink, dead = asyncio.run(_deliver([], format="slack", token="s3cret"))
    assert sink.delivered == 1 and dead == []
    headers, body = receiver.requests[0]
    assert headers["Content-Type"] == "application/json" and headers["Authorization"] == "Bearer s3cret"
    assert body["text"] == ":warning: [open] probing on model cnn by mallory"
    section, facts = body["blocks"]
    assert section == {"type": "section", "text": {"type": "mrkdwn", "text": body["text"]}}
    fields = [f["text"] for f in facts["fields"]]
    assert "*model*\ncnn" in fields and "*client*\nmallory" in fields and "*top events*\ne1, e2" in fields
    assert all(f["type"] == "mrkdwn" for f in facts["fields"])


def test_json_format_posts_the_alert_record() -> None:
    receiver, _, _ = asyncio.run(_deliver([]))
    assert receiver.requests[0][1] == EVENT.to_record()


def test_500_and_429_are_retried_honouring_retry_after_then_delivered() -> None:
    receiver, sink, dead = asyncio.run(_deliver([(500, {}), (429, {"Retry-After": "1"})], backoff_s=0.05))
    assert [json.dumps(b, sort_keys=True) for _, b in receiver.requests] == [json.dumps(EVENT.to_record(), sort_keys=True)] * 3
    assert sink.delivered == 1 and sink.failed == 0 and dead == []
    first, second, third = receiver.arrived
    assert second - first < 1.0  # the 500: plain backoff (0.05 s)
    assert third - second >= 0.95  # the 429 asked for 1 s, more than the backoff (0.1 s)


def test_401_is_dead_lettered_at_once_with_its_status() -> None:
    receiver, sink, dead = asyncio.run(_deliver([(401, {})], backoff_s=0.05))
    assert len(receiver.requests) == 1  # not retried: a 401 does not get better
    assert sink.failed == 1 and len(dead) == 1
    assert dead[0]["topic"] == "sink:webhook"
    assert "HTTP 401" in dead[0]["reason"] and "probing/cnn/mallory@5" in dead[0]["reason"]
    assert json.loads(dead[0]["raw"]) == EVENT.to_record()


def test_still_failing_after_the_last_attempt_is_dead_lettered() -> None:
    receiver, sink, dead = asyncio.run(_deliver([(503, {})] * 3, attempts=3, backoff_s=0.01))
    assert len(receiver.requests) == 3 and sink.delivered == 0
    assert "failed 3 times" in dead[0]["reason"] and "HTTP 503" in dead[0]["reason"]


def test_a_webhook_secret_in_the_path_stays_out_of_dead_letters() -> None:
    secret = "abcdefghijklmnopqrstuvwx"

    async def run() -> list[dict]:
        dead: list[dict] = []

        async def dead_letter(record: dict) -> None:
            dead.append(record)

        async with Receiver([]) as receiver:  # it serves /hook only: this path answers 404
            sink = WebhookSink(receiver.url.replace("/hook", f"/services/T1/B2/{secret}"), dead_letter=dead_letter)
            await sink.send(EVENT)
            await sink.close(timeout_s=30)
        return dead

    dead = asyncio.run(run())
    assert len(dead) == 1 and "HTTP 404" in dead[0]["reason"]
    assert secret not in dead[0]["reason"] and "/services/T1/B2/***" in dead[0]["reason"]
