"""Features, the three heads, and the skops round trip with its allow-list."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from workers.classifier.model import (
    ALLOWED_TYPES,
    FORMAT,
    AttackClassifier,
    UntrustedClassifierError,
    feature_names,
    output_features,
)


class Smuggled:
    """A type no classifier file may contain."""

    def __init__(self) -> None:
        self.payload = "anything"


def test_features_are_vectorised_and_named():
    p = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]], dtype=np.float32)
    x = output_features(p)
    names = feature_names(3)
    assert x.shape == (2, len(names)) and x.dtype == np.float32
    col = {n: x[:, i] for i, n in enumerate(names)}
    np.testing.assert_allclose(col["sorted_p0"], [0.7, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(col["margin"], [0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(col["entropy"], [-(p[0] * np.log(p[0])).sum(), np.log(3)], rtol=1e-5)
    np.testing.assert_allclose(col["logit_gap0"], [np.log(0.7 / 0.2), 0.0], atol=1e-5)
    np.testing.assert_allclose(col["p2"], [0.1, 1 / 3], rtol=1e-6)
    with pytest.raises(ValueError, match="10"):
        output_features(p, n_classes=10)


def test_predict_gives_three_heads_per_row(trained, small_dataset):
    clf = AttackClassifier.load(trained)
    labels = clf.predict(small_dataset.outputs[:37])
    assert len(labels) == 37
    assert labels.p_adversarial.dtype == np.float32
    assert ((labels.p_adversarial >= 0) & (labels.p_adversarial <= 1)).all()
    assert set(labels.attack_type.tolist()) <= {"clean", "fgsm", "pgd"}
    assert set(labels.target_model.tolist()) <= {"cnn", "mlp"}
    assert ((labels.attack_prob > 0) & (labels.attack_prob <= 1)).all()
    assert ((labels.target_prob > 0) & (labels.target_prob <= 1)).all()
    # the fast forest path gives scikit-learn's numbers
    forest = clf.estimators["forest"]
    reference = forest.predict_proba(output_features(small_dataset.outputs[:37]))
    raw = clf.raw_proba(small_dataset.outputs[:37])
    for i, head in enumerate(("adversarial", "attack_type", "target_model")):
        np.testing.assert_allclose(raw[head][:, forest.classes_[i]], reference[i], atol=1e-6)
    # flagged (p >= 0.5) exactly when the raw score passes the calibrated threshold
    assert np.array_equal(labels.p_adversarial >= 0.5, raw["adversarial"][:, 1] > clf.raw_threshold)


def test_skops_round_trip_is_identical(trained, small_dataset, tmp_path):
    clf = AttackClassifier.load(trained)
    sidecar = json.loads(trained.with_suffix(".json").read_text())
    assert sidecar["version"] == clf.version and sidecar["feature_spec"]["n_classes"] == 10
    assert set(sidecar["trusted_types"]) <= ALLOWED_TYPES
    path = clf.save(tmp_path / "copy.skops")
    again = AttackClassifier.load(path)
    a, b = clf.predict(small_dataset.outputs), again.predict(small_dataset.outputs)
    for field in ("p_adversarial", "attack_type", "attack_prob", "target_model", "target_prob"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert again.version == clf.version and again.spec == clf.spec


def test_load_passes_an_explicit_trusted_list(trained, monkeypatch):
    import skops.io as sio

    seen = []
    real = sio.loads

    def spy(data, trusted=None):
        seen.append(trusted)
        return real(data, trusted=trusted)

    monkeypatch.setattr(sio, "loads", spy)
    AttackClassifier.load(trained)
    assert seen and isinstance(seen[0], list) and set(seen[0]) <= ALLOWED_TYPES


@pytest.mark.parametrize("intruder, name", [(Smuggled(), "Smuggled"),
                                            (collections.OrderedDict(a=1), "collections.OrderedDict")])
def test_files_with_other_types_are_refused(trained, tmp_path, intruder, name):
    import skops.io as sio

    clf = AttackClassifier.load(trained)
    payload = {"format": FORMAT, "estimators": clf.estimators,
               "classes": {k: v.tolist() for k, v in clf.classes.items()}, "meta": json.dumps(clf.meta),
               "extra": intruder}
    path = tmp_path / "crafted.skops"
    path.write_bytes(sio.dumps(payload))
    with pytest.raises(UntrustedClassifierError, match=name):
        AttackClassifier.load(path)


def test_other_kinds_fit_and_predict(small_dataset):
    ds = small_dataset
    for kind, params in (("et", {"n_estimators": 10}), ("hgb", {"max_iter": 5})):
        clf = AttackClassifier(kind, calibration_folds=2, **params).fit(
            ds.outputs, ds.adversarial, ds.attack, ds.target_model, groups=ds.source_index)
        labels = clf.predict(ds.outputs[:5])
        assert len(labels) == 5 and clf.version.startswith(f"{kind}-")
    with pytest.raises(ValueError, match="unknown classifier kind"):
        AttackClassifier("svm")
