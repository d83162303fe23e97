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
        if name == "DriftResult":
            layer, model, window = record["layer"], record["model_id"], record["window_id"]
            top = [s["event_id"] for s in record["top_samples"]]
            if layer == COMBINED:
                await self.hub.publish(rules.on_drift(model, window, record["window_end_ms"],
                                                      record["detection_rate"], top))
            elif layer == COUNT:
                await self.hub.publish(rules.on_count(model, window, record["window_end_ms"], record["p_value"],
                                                      int(record["mmd2"]), record["n_window"], top))
            elif layer.startswith(CLIENT_PREFIX):
                await self.hub.publish(rules.on_client(model, layer[len(CLIENT_PREFIX):], window,
                                                       record["window_end_ms"], record["p_value"],
                                                       int(record["mmd2"]), record["n_window"], top))
        elif name == "AttackLabels":
            for verdict in self.tally.add(labels_from_record(record)):
                await self.hub.publish(rules.on_labels(*verdict))
