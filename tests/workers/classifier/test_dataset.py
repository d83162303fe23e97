"""The data set builder's labels, storage and leakage-free split."""

from __future__ import annotations

import json

import numpy as np

from tests.workers.classifier.conftest import ATTACKS, MODELS, N_INPUTS
from workers.classifier.dataset import (
    CLEAN,
    build_dataset,
    dataset_path,
    load_manifest,
    split_masks,
)


def test_rows_cover_every_model_attack_and_input(small_dataset):
    ds = small_dataset
    n_pool = 2 * N_INPUTS  # the first N_INPUTS of validation and of test
    assert len(ds) == len(MODELS) * (1 + len(ATTACKS)) * n_pool
    for model in MODELS:
        for attack in (CLEAN, *ATTACKS):
            rows = (ds.target_model == model) & (ds.attack == attack)
            assert rows.sum() == n_pool
            assert sorted(ds.source_index[rows].tolist()) == list(range(n_pool))
    assert set(ds.part.tolist()) == {"val", "test"}
    assert ds.outputs.shape == (len(ds), 10) and ds.outputs.dtype == np.float32
    np.testing.assert_allclose(ds.outputs.sum(axis=1), 1.0, atol=1e-4)


def test_labels_are_consistent(small_dataset):
    ds = small_dataset
    assert np.array_equal(ds.adversarial, ds.attack != CLEAN)
    assert np.array_equal(ds.predicted, ds.outputs.argmax(axis=1))
    # success = the model was right on the clean input and the attack changed its prediction away from the truth
    clean = ds.attack == CLEAN
    assert not ds.success[clean].any()
    adv = ~clean
    assert np.array_equal(ds.success[adv], (ds.clean_correct & (ds.predicted != ds.truth))[adv])
    assert np.array_equal(ds.clean_correct[clean], ds.predicted[clean] == ds.truth[clean])
    # the clean_correct flag of an adversarial row is its clean twin's (same model, same input)
    for model in MODELS:
        twin = {int(i): bool(c) for i, c in zip(ds.source_index[clean & (ds.target_model == model)],
                                                ds.clean_correct[clean & (ds.target_model == model)])}
        rows = adv & (ds.target_model == model)
        assert [twin[int(i)] for i in ds.source_index[rows]] == ds.clean_correct[rows].tolist()
    assert (ds.perturbation_l2[clean] == 0).all() and (ds.perturbation_l2[adv] > 0).mean() > 0.9
    assert ds.success[adv].mean() > 0.5  # the attacks do work on the demo models


def test_success_matches_the_attack_generator(small_state, small_dataset):
    """The builder's success flag is generate()'s (cached call: same inputs, same key)."""
    from workers.attacks import generate
    from workers.classifier.dataset import _cache_root
    from workers.inference.data import demo_split
    from workers.inference.models import load_demo_models

    model = load_demo_models(small_state, ["cnn"], progress=False)["cnn"]
    x, y = demo_split(0).part("test")
    result = generate(model.module, x[:N_INPUTS], y[:N_INPUTS], "pgd", seed=0,
                      state_dir=_cache_root(small_state, "test", N_INPUTS), model_name="cnn")
    assert result.cached
    ds = small_dataset
    rows = (ds.target_model == "cnn") & (ds.attack == "pgd") & (ds.part == "test")
    order = np.argsort(ds.source_index[rows])
    assert np.array_equal(ds.success[rows][order], result.success)
    assert np.array_equal(ds.predicted[rows][order], result.pred_adv)


def test_storage_without_pickle_and_manifest(small_state, small_dataset):
    with np.load(dataset_path(small_state), allow_pickle=False) as npz:
        assert npz["attack"].dtype.kind == "U" and npz["target_model"].dtype.kind == "U"
    manifest = load_manifest(small_state)
    assert manifest["seed"] == 0 and manifest["models"] == list(MODELS) and manifest["attacks"] == list(ATTACKS)
    assert manifest["counts"]["cnn"] == {CLEAN: 2 * N_INPUTS, "fgsm": 2 * N_INPUTS, "pgd": 2 * N_INPUTS}
    assert manifest["built_at"] and manifest["fingerprint"] == small_dataset.fingerprint()
    json.dumps(manifest)
    # an up-to-date data set is reused, not rebuilt
    again = build_dataset(small_state, 0, MODELS, ATTACKS, progress=False, n_inputs=N_INPUTS)
    assert again.fingerprint() == small_dataset.fingerprint()
    assert load_manifest(small_state)["built_at"] == manifest["built_at"]


def test_split_keeps_each_input_on_one_side(small_dataset):
    ds = small_dataset
    train, test = split_masks(ds, 0.3, seed=0)
    assert not (train & test).any() and (train | test).all()
    assert np.intersect1d(ds.source_index[train], ds.source_index[test]).size == 0
    n_inputs = len(np.unique(ds.source_index))
    assert abs(len(np.unique(ds.source_index[test])) - 0.3 * n_inputs) <= 10  # rounding per digit
    again = split_masks(ds, 0.3, seed=0)
    assert np.array_equal(test, again[1])
    assert not np.array_equal(test, split_masks(ds, 0.3, seed=1)[1])
