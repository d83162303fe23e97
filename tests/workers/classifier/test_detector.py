"""The per-event detector on synthetic arrays: features, heads, operating point, skops round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from workers.classifier.detector import (
    FORMAT,
    Detector,
    UntrustedClassifierError,
    attack_family,
    fit_detector,
    fit_reference_detector,
)
from workers.classifier.features import ClassGaussian, output_stats

C, D, D_SHALLOW = 3, 6, 4


class Smuggled:
    """A type no detector file may contain."""

    def __init__(self) -> None:
        self.payload = "anything"


def _events(n: int, rng: np.random.Generator, attack: str | None = None) -> dict:
    """Clean rows: class Gaussians in the embedding, a shallow layer tied to the class, outputs from a linear head.

    Attacked rows: the shallow layer carries extra noise ("the first convolutions still see the
    perturbation"), the embedding moves towards another class and off its Gaussian.
    """
    means = np.eye(C, D) * 4.0
    y = rng.integers(0, C, n)
    emb = means[y] + rng.normal(size=(n, D))
    shallow = np.eye(C, D_SHALLOW)[y] * 2.0 + rng.normal(size=(n, D_SHALLOW)) * 0.5
    if attack is not None:
        strength = {"pgd": 3.0, "fgm": 1.5, "square": 2.0}[attack]
        shallow = shallow + rng.normal(size=(n, D_SHALLOW)) * strength
        emb = 0.5 * emb + 0.5 * means[(y + 1) % C] + rng.normal(size=(n, D)) * 1.5
    logits = emb @ np.eye(D, C) * 1.5
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    out = {"outputs": p.astype(np.float32), "embeddings": emb.astype(np.float32),
           "layers": {"shallow": shallow.astype(np.float32)}}
    if attack is not None:
        out["attack"] = np.full(n, attack)
    return out


def _merge(parts: list[dict]) -> dict:
    return {"outputs": np.concatenate([p["outputs"] for p in parts]),
            "embeddings": np.concatenate([p["embeddings"] for p in parts]),
            "layers": {"shallow": np.concatenate([p["layers"]["shallow"] for p in parts])},
            "attack": np.concatenate([p["attack"] for p in parts])}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    clean = _events(600, rng)
    adv = _merge([_events(200, rng, a) for a in ("pgd", "fgm", "square")])
    test_clean = _events(1000, rng)
    test_adv = _merge([_events(300, rng, a) for a in ("pgd", "fgm", "square")])
    return clean, adv, test_clean, test_adv


@pytest.fixture(scope="module")
def detector(data):
    clean, adv, _, _ = data
    return fit_detector(clean, adv, model_id="digits", model_version="3", target_fpr=0.05)


def _auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos]))


def test_mahalanobis_features_match_a_direct_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + 3.0
    labels = rng.integers(0, 3, 300)
    g = ClassGaussian.fit(x, labels, 3, k=4, bank_size=50, shrinkage=0.0)
    # the fitted model, recomputed by hand: class means, pooled within-class covariance
    means = np.stack([x[labels == c].mean(0) for c in range(3)])
    resid = x - means[labels]
    precision = np.linalg.inv(resid.T @ resid / (len(x) - 1))
    q = rng.normal(size=(7, 5)) + 3.0
    pred = np.array([0, 1, 2, 0, 1, 2, 0])
    diff = q[:, None, :] - means[None]
    d2 = np.einsum("ncd,de,nce->nc", diff, precision, diff)
    f = g.features(q, pred)
    np.testing.assert_allclose(f[:, 0], np.sqrt(d2[np.arange(7), pred]), rtol=1e-3)
    np.testing.assert_allclose(f[:, 1], np.sqrt(d2.min(1)), rtol=1e-3)
    np.testing.assert_allclose(f[:, 2], f[:, 0] - f[:, 1], atol=1e-3)
    np.testing.assert_array_equal(f[:, 3], d2.argmin(1) != pred)
    # k-NN: mean whitened distance to the 4 nearest bank rows (brute force)
    z = (q.astype(np.float32) - g.centre) @ g.whiten
    bank_d = np.sqrt(((z[:, None, :] - g.bank_w[None]) ** 2).sum(-1))
    np.testing.assert_allclose(f[:, 4], np.sqrt((np.sort(bank_d, 1)[:, :4] ** 2).mean(1)), rtol=1e-3)
    np.testing.assert_allclose(f[:, 5], np.linalg.norm(q, axis=1), rtol=1e-5)


def test_output_stats_margin_entropy_energy():
    p = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]], dtype=np.float32)
    s = output_stats(p)
    np.testing.assert_allclose(s[:, 0], [np.log(0.7 / 0.2), 0.0], atol=1e-5)
    np.testing.assert_allclose(s[:, 1], [-(p[0] * np.log(p[0])).sum(), np.log(3)], rtol=1e-5)
    z = np.log(p) - np.log(p).mean(1, keepdims=True)  # centred logits
    np.testing.assert_allclose(s[:, 2], -np.log(np.exp(z).sum(1)), rtol=1e-5)


def test_supervised_detector_separates_and_holds_its_false_positive_rate(data, detector):
    _, _, test_clean, test_adv = data
    s_clean = detector.score(**test_clean)
    s_adv = detector.score(test_adv["outputs"], test_adv["embeddings"], test_adv["layers"])
    assert s_clean.shape == (1000,) and s_clean.dtype == np.float32
    assert ((s_clean >= 0) & (s_clean <= 1)).all()
    assert _auroc(s_clean, s_adv) > 0.95
    assert (s_clean >= 0.5).mean() <= 0.10  # target 5% on clean out-of-fold rows
    assert (s_adv >= 0.5).mean() > 0.5
    labels = detector.predict(test_adv["outputs"], test_adv["embeddings"], test_adv["layers"])
    flagged = labels.p_adversarial >= 0.5
    assert labels.kind == "supervised"
    assert set(labels.attack_type[flagged].tolist()) <= {"pgd", "fgm", "square"}
    assert set(labels.attack_type[~flagged].tolist()) <= {"clean"}
    assert set(labels.family[flagged].tolist()) <= {"linf_gradient", "l2_gradient", "black_box_query"}
    assert (labels.attack_type[flagged] == test_adv["attack"][flagged]).mean() > 0.5


def test_unsupervised_score_from_the_reference_alone(data):
    clean, _, test_clean, test_adv = data
    ref = fit_reference_detector(clean, target_fpr=0.05, model_id="other")
    assert not ref.supervised
    s_clean, s_adv = ref.score(**test_clean), ref.score(**{k: test_adv[k] for k in ("outputs", "embeddings", "layers")})
    assert _auroc(s_clean, s_adv) > 0.9
    assert (s_clean >= 0.5).mean() <= 0.10
    labels = ref.predict(**test_clean)
    assert labels.kind == "unsupervised" and set(labels.attack_type.tolist()) <= {"clean", "unknown"}
    with pytest.raises(ValueError, match="no supervised head"):
        ref.score(**test_clean, kind="supervised")


def test_applies_only_to_its_model_and_version(detector):
    assert detector.applies_to("digits", "3") and detector.applies_to("digits")
    assert not detector.applies_to("digits", "4") and not detector.applies_to("other", "3")


def test_skops_round_trip_and_allow_list(data, detector, tmp_path):
    import skops.io as sio

    _, _, test_clean, _ = data
    path = detector.save(tmp_path / "det.skops")
    loaded = Detector.load(path)
    np.testing.assert_array_equal(loaded.score(**test_clean), detector.score(**test_clean))
    assert json.loads(path.with_suffix(".json").read_text())["model_id"] == "digits"
    blob = sio.dumps({"format": FORMAT, "extra": Smuggled()})
    (tmp_path / "bad.skops").write_bytes(blob)
    with pytest.raises(UntrustedClassifierError, match="Smuggled"):
        Detector.load(tmp_path / "bad.skops")


def test_bad_input_gives_one_clear_error(data, detector):
    clean, adv, test_clean, _ = data
    with pytest.raises(ValueError, match="'embeddings'"):
        fit_detector({"outputs": clean["outputs"]}, adv)
    with pytest.raises(ValueError, match="shallow"):
        detector.score(test_clean["outputs"], test_clean["embeddings"])
    with pytest.raises(ValueError, match="embeddings must be"):
        detector.score(test_clean["outputs"], test_clean["embeddings"][:5], test_clean["layers"])


def test_attack_families():
    assert attack_family(np.array(["pgd", "cw", "fgm", "square", "mine"])).tolist() == [
        "linf_gradient", "minimal_perturbation", "l2_gradient", "black_box_query", "mine"]


def test_bank_applies_supervised_heads_only_where_fitted(data, detector):
    from workers.classifier.bank import DetectorBank

    clean, _, test_clean, test_adv = data
    bank = DetectorBank({"digits": detector}, target_fpr=0.05)
    layers = {"penultimate": test_clean["embeddings"], **test_clean["layers"]}
    assert bank.label("digits", "3", test_clean["outputs"], layers).kind == "supervised"
    # another version of the model, or another model: no label until a reference exists
    assert bank.label("digits", "4", test_clean["outputs"], layers) is None
    assert bank.label("other", "1", test_clean["outputs"], layers) is None
    # a reference stored as (layers, top-1 class): the unsupervised score, near its target FPR on clean events
    bank.set_reference("other", "1", {"penultimate": clean["embeddings"], **clean["layers"]},
                       clean["outputs"].argmax(1), C)
    labels = bank.label("other", "1", test_clean["outputs"], layers)
    assert labels.kind == "unsupervised" and (labels.p_adversarial >= 0.5).mean() <= 0.10
    adv_layers = {"penultimate": test_adv["embeddings"], **test_adv["layers"]}
    flagged_adv = (bank.label("other", "1", test_adv["outputs"], adv_layers).p_adversarial >= 0.5).mean()
    assert flagged_adv > 0.5
    # a batch without the layers the detector needs is not labelled
    assert bank.label("other", "1", test_clean["outputs"], {"penultimate": test_clean["embeddings"]}) is None
