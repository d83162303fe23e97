"""The classify stage's pure labelling function and its handling of a missing classifier (no broker)."""

from __future__ import annotations

import asyncio
import logging
import shutil
from types import SimpleNamespace

import numpy as np

from schemas.batch import PredictionBatch
from schemas.codec import decode, labels_from_record
from streams.stages.classify import ClassifyStage, encoded_labels
from streams.rows import Delivered
from workers.classifier.model import AttackClassifier


def _batch(model: str, outputs: np.ndarray, role: str = "live") -> PredictionBatch:
    ids = [f"{model}-{i}" for i in range(len(outputs))]
    return PredictionBatch.build(model, ids, outputs=outputs, layers={}, role=role,
                                 ts_ms=np.arange(len(outputs), dtype=np.int64) + 1_700_000_000_000)


def test_label_batches_encode_with_the_codec(trained, small_dataset):
    clf = AttackClassifier.load(trained)
    calls = []
    predict = clf.predict
    clf.predict = lambda x: calls.append(len(x)) or predict(x)
    batches = [_batch("cnn", small_dataset.outputs[:5]), _batch("mlp", small_dataset.outputs[5:12]),
               _batch("odd", np.full((3, 4), 0.25, np.float32))]  # other width: left out
    records = encoded_labels(clf, batches)
    assert calls == [12]  # one predict call for the whole delivery
    assert [(model, n) for model, n, _, _ in records] == [("cnn", 5), ("mlp", 7)]
    expected = predict(small_dataset.outputs[:12])
    assert [flagged for _, _, flagged, _ in records] == [
        int((expected.p_adversarial[sl] >= 0.5).sum()) for sl in (slice(0, 5), slice(5, 12))]
    for (_, _, _, value), batch, sl in zip(records, batches, (slice(0, 5), slice(5, 12))):
        name, record = decode(value, expect="AttackLabels")
        decoded = labels_from_record(record)
        assert decoded.event_ids == batch.event_ids and decoded.classifier_version == clf.version
        assert decoded.attack_type.tolist() == expected.attack_type[sl].tolist()
        assert decoded.target_model.tolist() == expected.target_model[sl].tolist()
        np.testing.assert_array_equal(decoded.p_adversarial, expected.p_adversarial[sl])
        np.testing.assert_array_equal(decoded.target_prob, expected.target_prob[sl])
        np.testing.assert_array_equal(decoded.ts_ms, batch.ts_ms)


class _Topic:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []

    async def send(self, key: bytes, value: bytes) -> None:
        self.sent.append((key, value))


class _Counter:
    def __init__(self) -> None:
        self.counts: dict[str, float] = {}

    def labels(self, model_id: str):
        return SimpleNamespace(inc=lambda n=1: self.counts.__setitem__(model_id, self.counts.get(model_id, 0) + n))


def test_stage_waits_for_a_classifier_then_labels_live_batches(trained, small_dataset, tmp_path, caplog):
    path = tmp_path / "later" / "classifier.skops"
    runtime = SimpleNamespace(settings=SimpleNamespace(classifier_path=str(path), state_path=tmp_path),
                              topics=SimpleNamespace(labels=_Topic()), metrics=SimpleNamespace(labelled=_Counter(), flagged=_Counter()))
    stage = ClassifyStage(runtime)
    live = Delivered(_batch("cnn", small_dataset.outputs[:6]), "lw.predictions", 0, 1)
    reference = Delivered(_batch("cnn", small_dataset.outputs[:4], role="reference"), "lw.predictions", 0, 2)

    async def run() -> None:
        with caplog.at_level(logging.WARNING, logger="streams.stages.classify"):
            await stage.handle([live])
            stage._next_check = 0.0  # as if 60 s had passed
            await stage.handle([live])
        assert runtime.topics.labels.sent == []
        assert sum("no attack classifier" in r.getMessage() for r in caplog.records) == 1
        path.parent.mkdir()
        shutil.copy(trained, path)
        await stage.handle([live, reference])  # not due yet: still nothing
        assert runtime.topics.labels.sent == []
        stage._next_check = 0.0
        await stage.handle([live, reference])

    asyncio.run(run())
    sent = runtime.topics.labels.sent
    assert len(sent) == 1 and sent[0][0] == b"cnn"
    _, record = decode(sent[0][1], expect="AttackLabels")
    labels = labels_from_record(record)
    assert labels.n == 6
    assert runtime.metrics.labelled.counts == {"cnn": 6}
    assert runtime.metrics.flagged.counts == {"cnn": int((labels.p_adversarial >= 0.5).sum())}
    stage.executor.shutdown()
