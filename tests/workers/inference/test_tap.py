"""LayerTap: shapes per demo model, the auto-found penultimate layer, pooling, dtypes, removal, inference mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from workers.inference.data import demo_split
from workers.inference.models import MODEL_NAMES, layer_names
from workers.inference.tap import (
    PENULTIMATE,
    LayerTap,
    execution_order,
    find_last_linear,
)

EXPECTED_DIMS = {
    "cnn": {"penultimate": 64, "block1": 16, "block2": 32, "block3": 64},
    "resnet": {"penultimate": 64, "stem": 16, "layer1": 16, "layer2": 32, "layer3.conv1": 64},
    "mlp": {"penultimate": 64, "fc1": 128, "fc2": 128},
}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.tensor(np.array(demo_split(0).x_test[:17]))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shapes_of_every_study_layer(name, demo_models, x):
    module = demo_models[name].module
    with LayerTap(module, layer_names(name)) as tap:
        result = tap.tap(x)
    assert list(result.layers) == [PENULTIMATE] + [n for n in layer_names(name) if n != PENULTIMATE]
    assert {k: v.shape for k, v in result.layers.items()} == {k: (17, d) for k, d in EXPECTED_DIMS[name].items()}
    assert result.outputs.shape == (17, 10) and result.outputs.dtype == np.float32
    assert all(v.dtype == np.float32 for v in result.layers.values())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_penultimate_is_the_input_of_the_last_linear(name, demo_models, x):
    module = demo_models[name].module
    assert find_last_linear(module) == "head"
    seen = {}
    handle = module.head.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0].detach().clone()))
    try:
        with LayerTap(module) as tap:
            result = tap.tap(x)
    finally:
        handle.remove()
    np.testing.assert_allclose(result.layers[PENULTIMATE], seen["x"].numpy(), rtol=1e-6)
    with torch.inference_mode():
        np.testing.assert_allclose(result.outputs, module(x).numpy(), rtol=1e-5, atol=1e-6)


def test_works_under_inference_mode_and_no_grad(demo_models, x):
    module = demo_models["cnn"].module
    with LayerTap(module, ["block2"]) as tap:
        plain = tap.tap(x)
        with torch.inference_mode():
            inside = tap.tap(x)
        with torch.no_grad():
            nograd = tap.tap(x)
    for other in (inside, nograd):
        np.testing.assert_array_equal(plain.outputs, other.outputs)
        for k in plain.layers:
            np.testing.assert_array_equal(plain.layers[k], other.layers[k])


def test_one_host_buffer_and_float16(demo_models, x):
    module = demo_models["resnet"].module
    with LayerTap(module, ["layer1"]) as tap32, LayerTap(module, ["layer1"], dtype="float16") as tap16:
        r32 = tap32.tap(x)
        r16 = tap16.tap(x)
    # a single device-to-host copy: outputs and every layer are views of one buffer
    assert np.may_share_memory(r32.outputs, r32.layers[PENULTIMATE])
    assert np.may_share_memory(r32.layers["layer1"], r32.layers[PENULTIMATE])
    assert r16.outputs.dtype == np.float32 and all(v.dtype == np.float16 for v in r16.layers.values())
    np.testing.assert_array_equal(r16.outputs, r32.outputs)  # outputs travel bit-for-bit
    np.testing.assert_allclose(r16.layers["layer1"].astype(np.float32), r32.layers["layer1"], rtol=1e-2, atol=1e-3)


def test_spatial_maps_are_global_average_pooled():
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    x = torch.rand(5, 1, 4, 4)
    with LayerTap(net, ["0"], penultimate=False) as tap:
        got = tap.tap(x).layers["0"]
    with torch.inference_mode():
        want = net[0](x).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_in_place_ops_after_a_tapped_layer_do_not_change_it():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = -torch.ones(3, 4)
    with LayerTap(net, ["0"]) as tap:
        got = tap.tap(x)
    with torch.inference_mode():
        pre_relu = net[0](x).numpy()
    np.testing.assert_allclose(got.layers["0"], pre_relu, rtol=1e-6)  # negatives survive the in-place ReLU
    assert (got.layers[PENULTIMATE] >= 0).all()


def test_include_regex_and_unknown_names(demo_models, x):
    module = demo_models["cnn"].module
    with LayerTap(module, include_regex=r"block\d") as tap:
        assert tap.names == [PENULTIMATE, "block1", "block2", "block3"]
    with pytest.raises(KeyError, match="no module named 'nope'"):
        LayerTap(module, ["nope"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        LayerTap(nn.Sequential(nn.ReLU()))


def test_remove_detaches_every_hook(demo_models, x):
    module = demo_models["mlp"].module
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    tap = LayerTap(module, ["fc1", "fc2"])
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()) == before + 3
    tap.remove()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()) == before
    with pytest.raises(RuntimeError, match="removed"):
        tap.tap(x)
    with LayerTap(module) as inner:
        assert inner.attached
    assert not inner.attached


def test_layer_names_run_shallow_to_deep(demo_models):
    for name, model in demo_models.items():
        names = layer_names(name)
        assert names[-1] == PENULTIMATE
        order = execution_order(model.module, torch.zeros(1, 1, 8, 8))
        positions = [order.index(n) for n in names[:-1]]
        assert positions == sorted(positions), (name, names, order)
