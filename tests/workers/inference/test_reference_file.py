"""Reference files (.npz): layout checks with one-line errors, pooling, softmax, no pickles."""

from __future__ import annotations

import numpy as np
import pytest

from workers.inference.reference_file import ReferenceFileError, load_reference_npz


def test_layers_are_every_other_array_pooled_to_matrices(tmp_path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "ref.npz"
    logits = rng.normal(size=(5, 3))
    np.savez(path, outputs=logits, penultimate=rng.normal(size=(5, 8)), conv=rng.normal(size=(5, 4, 2, 2)),
             truth=np.arange(5))
    ref = load_reference_npz(path, softmax=True)
    assert ref.n == 5 and set(ref.layers) == {"penultimate", "conv"} and ref.layers["conv"].shape == (5, 4)
    np.testing.assert_allclose(ref.layers["conv"], np.load(path)["conv"].reshape(5, 4, 4).mean(axis=2), rtol=1e-6)
    np.testing.assert_allclose(ref.outputs.sum(axis=1), 1.0, rtol=1e-6)
    assert ref.outputs.argmax(axis=1).tolist() == logits.argmax(axis=1).tolist()
    assert ref.truth.dtype == np.int32 and ref.truth.tolist() == list(range(5))


@pytest.mark.parametrize("arrays, message", [
    ({"penultimate": np.ones((2, 3))}, "no 'outputs'"),
    ({"outputs": np.ones((2, 3))}, "no layer arrays"),
    ({"outputs": np.ones((2, 3)), "penultimate": np.ones((3, 4))}, "penultimate: expected (2, dim)"),
    ({"outputs": np.ones((2, 3)), "penultimate": np.full((2, 4), np.nan)}, "NaN"),
    ({"outputs": np.ones((2, 3)), "penultimate": np.ones((2, 4)), "truth": np.ones(2)}, "truth: expected (2,) integers"),
    ({"outputs": np.ones(3), "penultimate": np.ones((3, 4))}, "outputs: expected (n, classes)"),
])
def test_bad_files_fail_in_one_line(tmp_path, arrays, message) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ReferenceFileError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_reference_npz(path)
    assert "\n" not in str(info.value)


def test_pickled_arrays_are_refused(tmp_path) -> None:
    path = tmp_path / "pickled.npz"
    np.savez(path, outputs=np.ones((2, 3)), penultimate=np.array([{"a": 1}, {"b": 2}], dtype=object))
    with pytest.raises(ReferenceFileError, match="without pickles"):
        load_reference_npz(path)
