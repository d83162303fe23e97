"""A clean reference computed offline: outputs and layer activations in one ``.npz`` file.

For teams whose model does not run in Python (ONNX, Triton, a Spark job): compute the
outputs and layer activations of clean validation data wherever the model runs, save them
with ``numpy.savez``, and publish them with ``layerwatch reference --model-id ID --from FILE.npz``.

File layout (``numpy.savez(path, outputs=..., penultimate=..., truth=...)``):

- ``outputs``: (n, classes) float, class probabilities (``--softmax`` when they are logits);
- ``truth`` (optional): (n,) integer true labels;
- every other array is a layer, named by its key: (n, dim), or (n, C, *spatial), which is
  pooled to (n, C) as LayerTap does. Name the layers as the live events name them
  (``penultimate`` for the penultimate layer).

Loaded with ``allow_pickle=False``: a file that needs unpickling is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

OUTPUTS, TRUTH = "outputs", "truth"


class ReferenceFileError(ValueError):
    """The file is not a usable reference; the message says which array and why, in one line."""


@dataclass
class ReferenceArrays:
    outputs: np.ndarray  # (n, classes) float32
    layers: dict[str, np.ndarray]  # name -> (n, dim) float32
    truth: np.ndarray | None  # (n,) int32

    @property
    def n(self) -> int:
        return len(self.outputs)


def load_reference_npz(path: str | os.PathLike, *, softmax: bool = False) -> ReferenceArrays:
    """Read and validate a reference ``.npz`` (see the module docstring for the layout)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise ReferenceFileError(f"{path}: not a readable .npz without pickles ({exc})") from None
    if OUTPUTS not in arrays:
        raise ReferenceFileError(f"{path}: no 'outputs' array (found: {', '.join(arrays) or 'nothing'})")
    outputs = _float(arrays.pop(OUTPUTS), OUTPUTS)
    if outputs.ndim != 2 or len(outputs) == 0:
        raise ReferenceFileError(f"outputs: expected (n, classes) with n > 0, got shape {outputs.shape}")
    if softmax:
        shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        outputs = (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
    n = len(outputs)
    truth = None
    if TRUTH in arrays:
        truth = arrays.pop(TRUTH)
        if truth.shape != (n,) or truth.dtype.kind not in "iu":
            raise ReferenceFileError(f"truth: expected ({n},) integers, got shape {truth.shape} of {truth.dtype}")
        truth = truth.astype(np.int32)
    if not arrays:
        raise ReferenceFileError(f"{path}: no layer arrays beside 'outputs'")
    layers: dict[str, np.ndarray] = {}
    for name, values in arrays.items():
        values = _float(values, name)
        if values.ndim > 2:
            values = values.reshape(values.shape[0], values.shape[1], -1).mean(axis=2)
        if values.ndim != 2 or len(values) != n:
            raise ReferenceFileError(f"{name}: expected ({n}, dim), got shape {values.shape}")
        layers[name] = np.ascontiguousarray(values, dtype=np.float32)
    return ReferenceArrays(outputs, layers, truth)


def _float(values: np.ndarray, name: str) -> np.ndarray:
    if values.dtype.kind not in "fiu":
        raise ReferenceFileError(f"{name}: expected numbers, got {values.dtype}")
    values = values.astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        raise ReferenceFileError(f"{name}: contains NaN or Inf")
    return values


def publish_reference_arrays(
    bootstrap: str,
    model_id: str,
    reference: ReferenceArrays,
    *,
    model_version: str = "1",
    topic: str = "lw.predictions",
    batch_size: int = 1024,
    on_batch: Callable[[int], None] | None = None,
    **client_config: Any,
) -> int:
    """Publish the arrays as ``role="reference"`` batches; returns the events the broker acknowledged."""
    from workers.inference.publisher import Publisher

    with Publisher(bootstrap, model_id, model_version=model_version, topic=topic, role="reference",
                   **client_config) as publisher:
        for start in range(0, reference.n, batch_size):
            stop = min(start + batch_size, reference.n)
            publisher.publish(reference.outputs[start:stop], {k: v[start:stop] for k, v in reference.layers.items()},
                              client_ids=["reference"] * (stop - start),
                              truth=None if reference.truth is None else reference.truth[start:stop])
            if on_batch is not None:
                on_batch(stop - start)
        publisher.flush()
        return publisher.sent_events
