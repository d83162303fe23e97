"""Demo data split, demo models (training, cache, predict), defences (preprocessing, MC-dropout)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workers.inference.data import demo_split
from workers.inference.defences import (
    bit_depth_reduce,
    mc_dropout_uncertainty,
    median_blur,
    parse_preprocess,
)
from workers.inference.models import (
    DETECTOR_LAYERS,
    MODEL_NAMES,
    layer_names,
    load_demo_models,
    model_paths,
    weights_hash,
)


def test_split_is_fixed_stratified_and_read_only():
    a, b = demo_split(0), demo_split(0)
    assert a is b
    sizes = [len(a.y_train), len(a.y_val), len(a.y_test)]
    assert sum(sizes) == 1797 and sizes == [1078, 359, 360]
    assert a.x_train.shape == (1078, 1, 8, 8) and a.x_train.dtype == np.float32
    assert 0.0 <= a.x_test.min() and a.x_test.max() <= 1.0
    for y in (a.y_train, a.y_val, a.y_test):  # stratified: every class in every part, balanced
        counts = np.bincount(y, minlength=10)
        assert counts.min() >= 0.8 * counts.mean()
    with pytest.raises(ValueError):
        a.x_test[0, 0, 0, 0] = 1.0
    other = demo_split(1)
    assert not np.array_equal(other.y_test, a.y_test)
    # no image is in two parts
    flat = {p: {row.tobytes() for row in getattr(a, f"x_{p}").reshape(-1, 64)} for p in ("train", "val", "test")}
    assert len(flat["train"] & flat["test"]) < 5  # load_digits itself holds a few duplicate images


def test_models_train_well_and_are_cached(state_dir, demo_models):
    assert list(demo_models) == list(MODEL_NAMES)
    for name, model in demo_models.items():
        assert model.val_accuracy >= 0.95, (name, model.val_accuracy)
        assert model.test_accuracy >= 0.95, (name, model.test_accuracy)
        assert not model.module.training
        pt, js = model_paths(state_dir, name)
        meta = json.loads(js.read_text())
        assert meta["seed"] == 0 and meta["version"] == model.version and meta["val_accuracy"] == model.val_accuracy
        state = torch.load(pt, weights_only=True)
        assert set(state) == set(model.module.state_dict())
    again = load_demo_models(state_dir, ["cnn"], progress=False)
    assert again["cnn"].meta["train_seconds"] == demo_models["cnn"].meta["train_seconds"]  # loaded, not retrained
    assert weights_hash(again["cnn"].module) == weights_hash(demo_models["cnn"].module)


def test_stale_or_corrupt_cache_is_retrained(tmp_path, state_dir):
    import shutil

    (tmp_path / "models").mkdir()
    for suffix in (".pt", ".json"):
        shutil.copy(model_paths(state_dir, "mlp")[0].with_suffix(suffix), tmp_path / "models" / f"mlp{suffix}")
    pt, _ = model_paths(tmp_path, "mlp")
    pt.write_bytes(pt.read_bytes()[:-10] + b"0123456789")  # corrupt the weights
    model = load_demo_models(tmp_path, ["mlp"], progress=False)["mlp"]
    assert model.val_accuracy >= 0.95
    import hashlib

    assert json.loads(model_paths(tmp_path, "mlp")[1].read_text())["sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest()
    torch.load(pt, weights_only=True)  # a valid state dict again


def test_training_is_seeded(demo_models):
    from workers.inference.models import train_model

    module, meta = train_model("mlp", seed=0)
    assert weights_hash(module) == weights_hash(demo_models["mlp"].module)


def test_predict_gives_probabilities_and_penultimate(demo_models):
    split = demo_split(0)
    for name, model in demo_models.items():
        probs, layers = model.predict(split.x_val[:32])
        assert probs.shape == (32, 10) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        assert list(layers) == ["penultimate", *DETECTOR_LAYERS[name]] and layers["penultimate"].shape == (32, 64)
        assert model.layer_names() == layer_names(name)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="cnn, resnet, mlp"):
        layer_names("vgg")


def test_preprocessing():
    x = torch.tensor([[[[0.0, 0.1, 0.49, 0.51, 1.0, 0.26, 0.74, 0.9]] * 8]])
    assert set(bit_depth_reduce(x, 1).unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(bit_depth_reduce(x, 2) * 3, torch.round(bit_depth_reduce(x, 2) * 3))
    spike = torch.zeros(1, 1, 8, 8)
    spike[0, 0, 4, 4] = 1.0
    assert median_blur(spike, 3).abs().max() == 0  # an isolated pixel is removed
    flat = torch.full((2, 1, 8, 8), 0.3)
    assert torch.allclose(median_blur(flat, 3), flat)
    assert parse_preprocess("bitdepth:4,median:3") == [("bitdepth", 4), ("median", 3)]
    with pytest.raises(ValueError, match="known steps"):
        parse_preprocess("blur:3")


def test_mc_dropout_uncertainty(demo_models):
    module = demo_models["cnn"].module
    x = torch.tensor(np.array(demo_split(0).x_test[:50]))
    u1 = mc_dropout_uncertainty(module, x, 16, generator_seed=3)
    u2 = mc_dropout_uncertainty(module, x, 16, generator_seed=3)
    assert u1.shape == (50,) and (u1 >= 0).all() and u1.max() > 0
    torch.testing.assert_close(u1, u2)
    assert not any(m.training for m in module.modules())  # modes restored
