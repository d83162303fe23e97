"""Windows stay whole across workers whatever the producer's partitioner: records are routed by model.

Windows are per model, so every record of a model must be consumed by one worker. Layerwatch's
own producers key records by model id with kafka-python's default partitioner (murmur2, as
the Java client), but a third-party producer may partition otherwise (librdkafka's default
``consistent_random`` puts ``cnn``, ``mlp``, ``resnet`` on partitions 1, 2, 3 where murmur2 puts
them on 0, 0, 2; a producer without keys spreads a model over all partitions). With several
workers, one model's events would then be split and each worker would test part of a window.

So, Faust ``group_by`` style: a model's **home** partition is murmur2(model id) mod the
partition count. The ingest agent decodes a step's records; a record of ``lw.predictions``
that arrived on another partition than its model's home is not processed there but forwarded,
raw, to the home partition of the internal topic ``lw.predictions-by-model``, which the same
agent consumes. Faust's assignor gives a worker the same partition numbers of every topic it
subscribes to with the same partition count, so the home partition of both topics belongs to
one worker, and every record of a model ends there. Records already on their home partition
(all of them with layerwatch's producers) are processed where they are: no extra hop.
``layerwatch_records_forwarded_total`` counts the forwarded records per model.
"""

from __future__ import annotations

from typing import Sequence

from streams.rows import Delivered


def murmur2_partition(key: bytes, partitions: int) -> int:
    """kafka-python's (and the Java client's) default partition of a key."""
    from kafka.partitioner.default import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


class Router:
    """The home partition of each model, and the records of a step that must move there."""

    def __init__(self, partitions: int, source_topic: str):
        self.partitions = int(partitions)
        self.source_topic = source_topic
        self._home: dict[str, int] = {}

    def home(self, model_id: str) -> int:
        p = self._home.get(model_id)
        if p is None:
            p = self._home[model_id] = murmur2_partition(model_id.encode(), self.partitions)
        return p

    def split(self, good: Sequence[Delivered]) -> tuple[list[Delivered], list[tuple[Delivered, int]]]:
        """(records to process here, (record, home partition) to forward): only records of the source topic
        move; records of the internal topic are at home by construction."""
        here: list[Delivered] = []
        away: list[tuple[Delivered, int]] = []
        for d in good:
            home = self.home(d.batch.model_id)
            if d.topic == self.source_topic and d.partition != home:
                away.append((d, home))
            else:
                here.append(d)
        return here, away
