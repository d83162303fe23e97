"""fit_torch_detector: a detector for any torch classifier from clean inputs and attacks crafted against it."""

from __future__ import annotations

import torch
from torch import nn

from workers.classifier.fitting import fit_torch_detector
from workers.inference.data import demo_split
from workers.inference.tap import LayerTap


def test_fit_torch_detector_on_a_small_digit_net(tmp_path):
    split = demo_split(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 32), nn.ReLU(),
                        nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = torch.tensor(split.x_train), torch.tensor(split.y_train)
    for _ in range(60):  # full-batch steps: a second or two on a CPU
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    det = fit_torch_detector(net, split.x_val[:200], split.y_val[:200], layers=["1"], attacks=("fgsm", "pgd"),
                             model_id="tiny", model_version="1", state_dir=tmp_path)
    assert det.layers == ("penultimate", "1") and det.applies_to("tiny", "1")
    assert sorted(det.classes["attack_type"].tolist()) == ["fgsm", "pgd"]
    assert list((tmp_path / "attacks").glob("tiny_*.npz"))  # the attacks were cached
    with LayerTap(net, ["1"]) as tap:
        clean = tap.tap(split.x_test[:150], output_fn=lambda z: torch.softmax(z, 1))
    scores = det.score(clean.outputs, clean.layers["penultimate"], {"1": clean.layers["1"]})
    assert scores.shape == (150,) and (scores >= 0.5).mean() < 0.2
