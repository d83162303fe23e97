"""What the alerts agent does with each record of ``lw.drift`` and ``lw.labels``: feed the rules, publish transitions."""

from __future__ import annotations

from typing import Any

from schemas.batch import CLIENT_PREFIX, COMBINED, COUNT
from schemas.codec import labels_from_record
from streams.alerts.hub import AlertHub
from streams.alerts.tally import LabelTally


class AlertFeed:
    """Turns decoded result records into rule calls: the combined and count drift rows per window, the
    heavy-client rows, classifier verdicts per bucket."""

    def __init__(self, hub: AlertHub, label_bucket_ms: int):
        self.hub = hub
        self.tally = LabelTally(step_ms=label_bucket_ms)

    async def handle(self, name: str, record: dict[str, Any]) -> None:
        rules = self.hub.rules
        if name == "DriftResult" and record["layer"] == COMBINED:
            top = [s["event_id"] for s in record["top_samples"]]
            await self.hub.publish(rules.on_drift(record["model_id"], record["window_id"], record["window_end_ms"],
                                                  record["detection_rate"], top))
        elif name == "DriftResult" and record["layer"] == COUNT:
            top = [s["event_id"] for s in record["top_samples"]]
            await self.hub.publish(rules.on_count(record["model_id"], record["window_id"], record["window_end_ms"],
                                                  record["p_value"], int(record["mmd2"]), record["n_window"], top))
        elif name == "DriftResult" and record["layer"].startswith(CLIENT_PREFIX):
            top = [s["event_id"] for s in record["top_samples"]]
            await self.hub.publish(rules.on_client(record["model_id"], record["layer"][len(CLIENT_PREFIX):],
                                                   record["window_id"], record["window_end_ms"], record["p_value"],
                                                   int(record["mmd2"]), record["n_window"], top))
        elif name == "AttackLabels":
            for verdict in self.tally.add(labels_from_record(record)):
                await self.hub.publish(rules.on_labels(*verdict))
