"""Consumer lag that is true, or reported as unknown.

Lag is the log end offset minus the group's committed offset. The usual source of the end
offset, a ListOffsets request (``end_offsets``), cannot be trusted on the embedded Tansu
broker: for a partition whose last record batch holds several records it answers the
batch's *first* offset + 1 (a partition holding 15 records in one batch answers 1), so a
lag computed from it goes negative. The high watermark that the broker returns with every
Fetch response is right on Tansu and on Kafka, and the worker's consumer already keeps it
per assigned partition: that is the end offset used here. A partition whose high
watermark is not known yet (no fetch answered), whose group has no committed offset (unless it is empty), or
whose end is below the committed offset (a broker answering wrongly) has an unknown lag,
and a topic with any unknown partition reports NaN rather than a made-up number.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger(__name__)


def partition_lag(end: int | None, committed: int | None) -> int | None:
    """Records between the committed offset and the end offset; None when either is unknown or they contradict.

    An empty partition (end 0) has no lag even before the group committed anything.

    Example:
        >>> partition_lag(15, 2), partition_lag(1, 2), partition_lag(None, 2), partition_lag(15, None), partition_lag(0, None)
        (13, None, None, None, 0)
    """
    if end == 0 and committed is None:
        return 0
    if end is None or committed is None or end < 0 or committed < 0 or end < committed:
        return None
    return end - committed


def topic_lags(tps: Iterable[Any], end: Callable[[Any], int | None],
               committed: Callable[[Any], int | None]) -> dict[str, float]:
    """Lag per topic over ``tps`` (objects with ``.topic``): the sum of partition lags, NaN when any is unknown."""
    out: dict[str, float] = {}
    for tp in tps:
        lag = partition_lag(end(tp), committed(tp))
        out[tp.topic] = out.get(tp.topic, 0.0) + (math.nan if lag is None else lag)
    return out


def faust_lags(app: Any, topics: Iterable[str]) -> dict[str, float]:
    """Lag per topic of the worker's consumer: Fetch high watermarks against Faust's committed offsets."""
    consumer = app.consumer
    wanted = set(topics)

    def end(tp: Any) -> int | None:
        try:
            return consumer.highwater(tp)
        except Exception:  # noqa: BLE001 - consumer not started or partition not assigned: unknown
            return None

    committed: Mapping[Any, int | None] = consumer._committed_offset  # Faust keeps the next offset to read
    tps = [tp for tp in consumer.assignment() if tp.topic in wanted]
    lags = topic_lags(tps, end, committed.get)
    for topic in wanted - set(lags):
        lags[topic] = 0.0  # no partition of it assigned here: nothing for this worker to catch up on
    return lags


async def report_lag_forever(app: Any, gauge: Any, topics: Iterable[str], interval_s: float) -> None:
    """Set ``gauge{topic}`` from :func:`faust_lags` every ``interval_s`` (NaN while unknown)."""
    topics = list(topics)
    while True:
        try:
            for topic, lag in faust_lags(app, topics).items():
                gauge.labels(topic).set(lag)
        except Exception as exc:  # noqa: BLE001 - a metric must never stop the worker
            log.debug("consumer lag not read: %r", exc)
            for topic in topics:
                gauge.labels(topic).set(math.nan)
        await asyncio.sleep(interval_s)  # a timer: the gauge is sampled, not event-driven
