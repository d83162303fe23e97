"""`layerwatch classifier fit`: a supervised detector for a user's torch model from its stored reference.

A real chDB store holds the model's published reference (written as the worker writes
reference batches); the command runs through the CLI entry point in-process, imports the
model from tests/streams/cli/fit_model.py and loads its weights tensors-only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from schemas.batch import PredictionBatch
from streams.cli import main
from streams.rows import Delivered, reference_rows
from streams.store import open_store
from tests.clickhouse_server import free_port
from tests.streams.cli.fit_model import build
from workers.classifier.bank import DetectorBank
from workers.classifier.detector import Detector
from workers.inference.data import demo_split
from workers.inference.tap import LayerTap

FACTORY = "tests.streams.cli.fit_model:build"


def _tap(net: nn.Module, x: np.ndarray):
    with LayerTap(net, ["1"]) as tap:
        return tap.tap(x, output_fn=lambda z: torch.softmax(z, 1))


def _publish_reference(store, model_id: str, version: str, outputs, layers) -> None:
    n = len(outputs)
    batch = PredictionBatch.build(model_id, [f"{model_id}-{version}-ref-{i}" for i in range(n)], outputs=outputs,
                                  layers=layers, model_version=version, role="reference")
    store.insert("reference_embeddings", reference_rows([Delivered(batch, "lw.predictions", 0, 0)]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny CNN trained on the digits' train split (a second or two) and its weights file."""
    split = demo_split(0)
    torch.manual_seed(0)
    net = build()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = torch.tensor(split.x_train), torch.tensor(split.y_train)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    weights = tmp_path_factory.mktemp("fit") / "tiny.pt"
    torch.save(net.state_dict(), weights)
    return net, split, weights


@pytest.fixture
def env(trained, chdb_url, tmp_path, monkeypatch):
    net, split, weights = trained
    store = open_store(chdb_url)
    try:
        store.migrate()
        ref = _tap(net, split.x_val)
        _publish_reference(store, "tiny", "2", ref.outputs, ref.layers)
        rng = np.random.default_rng(0)
        _publish_reference(store, "other", "1", rng.dirichlet(np.ones(10), 300),
                           {"penultimate": rng.normal(size=(300, 32))})
    finally:
        store.close()
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=split.x_val[:200], y=split.y_val[:200])
    monkeypatch.setenv("LW_CLICKHOUSE_URL", chdb_url)
    monkeypatch.setenv("LW_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("LW_WEB_PORT", str(free_port()))  # no worker answers: the CLI opens the store itself
    return {"weights": str(weights), "inputs": str(inputs), "state": tmp_path / "state", "url": chdb_url}


def _fit(env, *extra: str) -> int:
    return main(["classifier", "fit", "--model-id", "tiny", "--model-factory", FACTORY, "--weights", env["weights"],
                 "--inputs", env["inputs"], "--attacks", "fgsm,pgd,fgm", *extra])


def test_fit_saves_a_detector_that_applies_to_that_model_version_only(env, trained, capsys):
    net, split, _ = trained
    assert _fit(env) == 0  # --model-version defaults to the one with a reference: "2"
    out = capsys.readouterr().out
    assert "tiny@2" in out and "saved" in out
    (path,) = (env["state"] / "classifier" / "detectors").glob("*.skops")
    det = Detector.load(path)
    assert det.supervised and det.layers == ("penultimate", "1")
    assert det.meta["model_id"] == "tiny" and det.meta["model_version"] == "2" and det.meta["reference_rows"] > 0

    # held-out test digits, clean and attacked (PGD: one of the attacks it was fitted on)
    from workers.attacks import generate

    x, y = split.x_test[:150], split.y_test[:150]
    adv = generate(net, x, y, "pgd", seed=1).x_adv
    clean_t, adv_t = _tap(net, x), _tap(net, adv)
    s_clean, s_adv = (det.score(t.outputs, t.layers["penultimate"], {"1": t.layers["1"]}) for t in (clean_t, adv_t))
    from sklearn.metrics import roc_auc_score

    auroc = roc_auc_score(np.r_[np.zeros(len(s_clean)), np.ones(len(s_adv))], np.r_[s_clean, s_adv])
    assert auroc > 0.9, auroc
    assert (s_adv >= 0.5).mean() > 0.5 and (s_clean >= 0.5).mean() < 0.15

    # the stream's bank: supervised for tiny@2 only
    bank = DetectorBank.from_dir(path.parent)
    layers = {"penultimate": clean_t.layers["penultimate"], "1": clean_t.layers["1"]}
    assert bank.detector_for("tiny", "2", layers).version == det.version
    assert bank.detector_for("tiny", "3", layers) is None  # another version: its own reference, not this head
    assert bank.detector_for("other", "1", {"penultimate": np.zeros((1, 32))}) is None
    labels = bank.label("tiny", "2", adv_t.outputs, {"penultimate": adv_t.layers["penultimate"], "1": adv_t.layers["1"]})
    assert labels.kind == "supervised" and (labels.p_adversarial >= 0.5).mean() > 0.5

    # version 3 gets its reference and its own detector; version 2 keeps its own
    store = open_store(env["url"])
    try:
        ref = _tap(net, split.x_val)
        _publish_reference(store, "tiny", "3", ref.outputs, ref.layers)
    finally:
        store.close()
    assert _fit(env, "--model-version", "3") == 0
    files = sorted(p.name for p in path.parent.glob("*.skops"))
    assert files == ["tiny@2.skops", "tiny@3.skops"]
    bank = DetectorBank.from_dir(path.parent)
    assert bank.detector_for("tiny", "2", layers).version == det.version
    assert bank.detector_for("tiny", "3", layers).meta["model_version"] == "3"
    assert bank.detector_for("tiny", "4", layers) is None and bank.detector_for("other", "1", layers) is None
    assert _fit(env, "--model-version", "3") == 0 and "replacing" in capsys.readouterr().out
    assert sorted(p.name for p in path.parent.glob("*.skops")) == files


@pytest.mark.parametrize("args, needle", [
    (["--model-factory", "tests.streams.cli.no_such_module:build"], "cannot import"),
    (["--model-factory", "tests.streams.cli.fit_model:broken"], "raised RuntimeError"),
    (["--model-version", "7"], "version '7' has no reference"),
    (["--model-id", "nobody"], "'nobody' has no reference"),
    (["--attacks", "pgd,laser"], "unknown attack(s) laser"),
])
def test_fit_errors_are_one_line(env, capsys, args, needle):
    options = {"--model-id": "tiny", "--model-factory": FACTORY, "--weights": env["weights"], "--inputs": env["inputs"],
               **dict(zip(args[::2], args[1::2]))}
    assert main(["classifier", "fit", *[part for item in options.items() for part in item]]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("layerwatch classifier fit:")
    assert not list(env["state"].glob("classifier/detectors/*.skops"))


def test_wrong_weights_are_refused_by_the_stored_reference(env, tmp_path, capsys):
    torch.manual_seed(1)
    other = tmp_path / "untrained.pt"
    torch.save(build().state_dict(), other)
    argv = ["classifier", "fit", "--model-id", "tiny", "--model-factory", FACTORY, "--weights", str(other),
            "--inputs", env["inputs"], "--attacks", "fgsm"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "do not match the stored reference of tiny@2" in err and "--force" in err
