"""The Alertmanager sink against Debian's prometheus-alertmanager: an alert opens there, stays open, resolves."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

import pytest

from streams.alerts.alertmanager import AlertmanagerSink, alertmanager_alert, alertname, rfc3339
from streams.alerts.rules import AlertEvent
from tests.deploy.tools import alertmanager, get_json
from tests.waiting import wait_until


def _event(state: str, ts_ms: int, alert_id: str = "distribution_shift/cnn/cnn@1:0-10000") -> AlertEvent:
    return AlertEvent(alert_id, ts_ms, "cnn", "distribution_shift", state, "critical",
                      window_id="cnn@1:0-10000", event_ids=("e1", "e2"), message=f"shift on cnn ({state})")


def _parse(ts: str) -> float:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def test_postable_alert_fields() -> None:
    opened = 1_700_000_000_000
    alert = alertmanager_alert(_event("open", opened).to_record(), opened, opened + 5000, resend_s=60)
    assert alert["labels"] == {"alertname": "LayerwatchDistributionShift", "service": "layerwatch", "model_id": "cnn",
                               "kind": "distribution_shift", "severity": "critical",
                               "alert_id": "distribution_shift/cnn/cnn@1:0-10000"}
    assert alert["annotations"]["summary"] == "shift on cnn (open)"
    assert alert["annotations"]["window_id"] == "cnn@1:0-10000" and alert["annotations"]["event_ids"] == "e1, e2"
    assert alert["startsAt"] == rfc3339(opened)
    assert _parse(alert["endsAt"]) == pytest.approx((opened + 5000) / 1000 + 240)
    resolved = alertmanager_alert(_event("resolved", opened + 90_000).to_record(), opened, opened + 95_000, resend_s=60)
    assert resolved["startsAt"] == rfc3339(opened) and resolved["endsAt"] == rfc3339(opened + 90_000)
    assert alertname("attack_classified") == "LayerwatchAttackClassified"


@pytest.mark.integration
def test_alert_opens_and_resolves_in_alertmanager(tmp_path: Path) -> None:
    dead: list[dict] = []

    async def dead_letter(record: dict) -> None:
        dead.append(record)

    def alerts(base: str) -> list[dict]:
        return [a for a in get_json(f"{base}/api/v2/alerts") if a["labels"].get("service") == "layerwatch"]

    with alertmanager(tmp_path / "am") as base:
        async def scenario() -> tuple[list[dict], list[dict], list[dict]]:
            sink = AlertmanagerSink(base, resend_s=1.0, dead_letter=dead_letter)
            opened_ms = int(time.time() * 1000) - 30_000
            await sink.send(_event("open", opened_ms))
            first = await asyncio.to_thread(wait_until, lambda: alerts(base), 30, 0.2, "the alert in Alertmanager")
            # re-pushed every resend_s: endsAt moves forward while the alert is open
            ends = _parse(first[0]["endsAt"])
            later = await asyncio.to_thread(wait_until, lambda: [a for a in alerts(base) if _parse(a["endsAt"]) > ends + 0.5],
                                            30, 0.2, "a re-push extending endsAt")
            await sink.send(_event("resolved", int(time.time() * 1000)))
            await asyncio.to_thread(wait_until, lambda: not alerts(base), 30, 0.2, "the alert resolved in Alertmanager")
            await sink.close()
            return first, later, alerts(base)

        first, later, after = asyncio.run(scenario())
    alert = first[0]
    assert alert["labels"]["alertname"] == "LayerwatchDistributionShift" and alert["labels"]["model_id"] == "cnn"
    assert alert["status"]["state"] == "active"
    assert alert["annotations"]["summary"] == "shift on cnn (open)"
    assert abs(_parse(alert["startsAt"]) - (time.time() - 30)) < 30  # startsAt is when it opened, not the push
    assert later and after == [] and dead == []


@pytest.mark.integration
def test_a_refused_alert_is_dead_lettered_with_the_status(tmp_path: Path) -> None:
    dead: list[dict] = []

    async def dead_letter(record: dict) -> None:
        dead.append(record)

    with alertmanager(tmp_path / "am") as base:
        async def scenario() -> None:
            # a path Alertmanager does not serve answers 404: not retried, dead-lettered at once
            sink = AlertmanagerSink(base + "/nowhere", resend_s=60, attempts=3, backoff_s=0.05, dead_letter=dead_letter)
            await sink.send(_event("open", int(time.time() * 1000)))
            await asyncio.to_thread(wait_until, lambda: dead, 30, 0.1, "a dead letter")
            await sink.close()

        asyncio.run(scenario())
    assert dead[0]["topic"] == "sink:alertmanager"
    assert "HTTP 404" in dead[0]["reason"] and "distribution_shift/cnn/cnn@1:0-10000" in dead[0]["reason"]


@pytest.mark.integration
def test_alerts_still_open_after_a_restart_are_pushed_again(tmp_path: Path) -> None:
    from streams.alerts.hub import AlertHub
    from streams.alerts.rules import AlertRules
    from streams.metrics import Metrics

    with alertmanager(tmp_path / "am") as base:
        async def scenario() -> list[dict]:
            sink = AlertmanagerSink(base, resend_s=60)
            hub = AlertHub(AlertRules(), [sink], Metrics())
            opened = _event("open", int(time.time() * 1000) - 60_000)
            assert hub.restore([opened]) == 1  # what recovery does with the stored transitions
            found = await asyncio.to_thread(
                wait_until, lambda: [a for a in get_json(f"{base}/api/v2/alerts") if a["labels"].get("service")],
                30, 0.2, "the restored alert in Alertmanager")
            await sink.close()
            return found

        found = asyncio.run(scenario())
    assert [a["labels"]["alert_id"] for a in found] == ["distribution_shift/cnn/cnn@1:0-10000"]
