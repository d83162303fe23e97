"""The classify stage's pure labelling function and its handling of missing detectors (no broker)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from schemas.batch import PredictionBatch
from schemas.codec import decode, labels_from_record
from streams.rows import Delivered
from streams.stages.classify import ClassifyStage, encoded_labels
from tests.workers.classifier.test_detector import C, _events, _merge
from workers.classifier.bank import DetectorBank
from workers.classifier.detector import fit_detector


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(11)
    clean = _events(500, rng)
    adv = _merge([_events(150, rng, a) for a in ("pgd", "fgm", "square")])
    det = fit_detector(clean, adv, model_id="digits", model_version="3", target_fpr=0.05)
    return det, clean, _events(64, rng), _events(64, rng, "pgd")


def _batch(model: str, ev: dict, version: str = "3", role: str = "live") -> PredictionBatch:
    n = len(ev["outputs"])
    return PredictionBatch.build(model, [f"{model}-{role}-{i}" for i in range(n)], outputs=ev["outputs"],
                                 layers={"penultimate": ev["embeddings"], **ev["layers"]}, role=role,
                                 model_version=version, ts_ms=np.arange(n, dtype=np.int64) + 1_700_000_000_000)


def test_labels_say_which_score_each_model_got(synthetic):
    det, clean, live_clean, live_adv = synthetic
    bank = DetectorBank({"digits": det})
    batches = [_batch("digits", live_clean), _batch("digits", live_adv), _batch("digits", live_clean, version="4"),
               _batch("other", live_clean, version="1")]
    records = encoded_labels(bank, batches)
    assert [(m, n) for m, n, _, _ in records] == [("digits", 64), ("digits", 64)]  # v4 and "other": no reference yet
    decoded = [labels_from_record(decode(v, expect="AttackLabels")[1]) for _, _, _, v in records]
    assert [f for _, _, f, _ in records] == [int((d.p_adversarial >= 0.5).sum()) for d in decoded]
    assert {d.score_kind for d in decoded} == {"supervised"}
    assert decoded[0].features_version == det.meta["features_version"] and decoded[0].classifier_version == det.version
    expected = det.predict(live_adv["outputs"], live_adv["embeddings"], live_adv["layers"])
    np.testing.assert_array_equal(decoded[1].p_adversarial, expected.p_adversarial)
    assert decoded[1].family.tolist() == expected.family.tolist()
    assert (decoded[1].p_adversarial >= 0.5).mean() > (decoded[0].p_adversarial >= 0.5).mean()
    # once "other" has a clean reference it gets the unsupervised score
    bank.set_reference("other", "1", {"penultimate": clean["embeddings"], **clean["layers"]},
                       clean["outputs"].argmax(1), C)
    records = encoded_labels(bank, batches[3:])
    back = labels_from_record(decode(records[0][3], expect="AttackLabels")[1])
    assert back.score_kind == "unsupervised" and set(back.family.tolist()) <= {"clean", "unknown"}


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


def test_stage_labels_only_models_with_a_detector(synthetic, tmp_path, caplog):
    det, _, live_clean, _ = synthetic
    runtime = SimpleNamespace(settings=SimpleNamespace(state_path=tmp_path, reference_max=1000),
                              topics=SimpleNamespace(labels=_Topic()),
                              metrics=SimpleNamespace(labelled=_Counter(), flagged=_Counter()))
    stage = ClassifyStage(runtime)
    digits = Delivered(_batch("digits", live_clean), "lw.predictions", 0, 1)
    other = Delivered(_batch("other", live_clean, version="1"), "lw.predictions", 0, 2)

    async def run() -> None:
        await stage.handle([digits, other])
        assert runtime.topics.labels.sent == []  # no detector file, no reference: nothing labelled
        det.save(stage.path / "digits.skops")
        stage._next_check = 0.0  # as if 60 s had passed
        await stage.handle([digits, other])

    with caplog.at_level(logging.INFO, logger="streams.stages.classify"):
        asyncio.run(run())
    sent = runtime.topics.labels.sent
    assert [k for k, _ in sent] == [b"digits"]
    assert labels_from_record(decode(sent[0][1], expect="AttackLabels")[1]).score_kind == "supervised"
    assert runtime.metrics.labelled.counts == {"digits": 64}
    flagged = (labels_from_record(decode(sent[0][1], expect="AttackLabels")[1]).p_adversarial >= 0.5).sum()
    assert runtime.metrics.flagged.counts == {"digits": int(flagged)}
    assert any("digits" in r.getMessage() and "loaded" in r.getMessage() for r in caplog.records)
    stage.executor.shutdown()


def _model_events(rng: np.random.Generator, means: np.ndarray, mix: np.ndarray, n: int) -> dict:
    """Clean events of one synthetic model: class Gaussians (correlated noise) in two layers, softmax head."""
    y = rng.integers(0, len(means), n)
    emb = means[y] + rng.normal(size=(n, means.shape[1])) @ mix
    shallow = np.tanh(emb[:, : means.shape[1] // 2] + rng.normal(size=(n, means.shape[1] // 2)) * 0.3)
    logits = emb[:, : len(means)] * 2.0
    p = np.exp(logits - logits.max(1, keepdims=True))
    return {"outputs": (p / p.sum(1, keepdims=True)).astype(np.float32), "embeddings": emb.astype(np.float32),
            "layers": {"shallow": shallow.astype(np.float32)}}


def test_no_attack_classified_alert_on_clean_models_the_detector_was_not_fitted_for(synthetic):
    from streams.alerts.rules import AlertRules
    from streams.alerts.tally import LabelTally
    from streams.stages.classify import label_batches

    det, *_ = synthetic
    bank = DetectorBank({"digits": det})
    rules, tally, opened, labelled = AlertRules(), LabelTally(step_ms=10_000), [], 0
    rng = np.random.default_rng(5)
    for m in range(30):  # the scene: 30 models that are not demo models, no attack at all
        classes, dim = int(rng.integers(3, 11)), int(rng.integers(8, 33))
        means = rng.normal(size=(classes, dim)) * 3.0
        mix = np.eye(dim) + rng.normal(size=(dim, dim)) * 0.2
        ref = _model_events(rng, means, mix, 400)
        bank.set_reference(f"m{m}", "1", {"penultimate": ref["embeddings"], **ref["layers"]},
                           ref["outputs"].argmax(1), ref["outputs"].shape[1])
        for k in range(20):  # 20 micro-batches of 64 live events, 5 s apart: ten 10 s buckets
            ev = _model_events(rng, means, mix, 64)
            batch = PredictionBatch.build(f"m{m}", [f"m{m}-{k}-{i}" for i in range(64)], outputs=ev["outputs"],
                                          layers={"penultimate": ev["embeddings"], **ev["layers"]},
                                          ts_ms=np.full(64, 1_700_000_000_000 + 5_000 * k, np.int64))
            for lb in label_batches(bank, [batch]):
                labelled += lb.n
                for verdict in tally.add(lb):
                    opened += [e for e in rules.on_labels(*verdict) if e.state == "open"]
    assert labelled == 30 * 20 * 64
    assert opened == []
