"""LayerTap: read chosen layer activations of any torch model during an ordinary forward pass.

The drift detector tests windows of *layer activations* against a clean reference
(LADIS: the penultimate layer is the most telling, see the seeds), so the inference
server needs those activations for every prediction without changing the model code.
A LayerTap attaches forward hooks to named modules:

- by default it finds the penultimate representation itself: the **input** of the
  last ``nn.Linear`` (in registration order), captured by a forward *pre*-hook and
  reported under the name ``"penultimate"``;
- ``layers`` adds modules by exact name (``"layer2"``, ``"features.3"``) and/or
  ``include_regex`` adds every module whose name fully matches a pattern (the same
  idea as SageMaker Debugger's ``include_regex``); those are reported under their
  module name, after ``"penultimate"``.

Every tapped activation becomes a ``(batch, dim)`` matrix: tensors with more than two
dimensions are treated as ``(batch, channels, *spatial)`` and reduced by **global
average pooling** over the spatial axes (a conv map ``(n, C, H, W)`` becomes
``(n, C)``), which keeps the dimension small and independent of the input size, as
the reference embeddings require. Two-dimensional tensors are kept as they are.

Hooks only record while :meth:`LayerTap.tap` or :meth:`LayerTap.forward` runs in the
same thread (the recording state is thread-local, so concurrent requests on one model
and attacks or training that call the same module never mix); a hook pools (or copies)
what it sees at once, cast to the tap's dtype, so a later in-place operation in the model
cannot change a tapped value. The penultimate input is the exception: the head's input is not
written after the head reads it, so it is held by reference until the caller's single copy. All matrices of one call (outputs included) are cast on the
device, concatenated and copied to the host **once** (:func:`to_host`), then split into
numpy views. Works under ``torch.inference_mode()`` and ``torch.no_grad()``.
:meth:`LayerTap.forward` returns the module's own output untouched plus the tapped device
tensors, for callers (``Monitor``) that copy to the host later, off the request path.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> with LayerTap(net) as tap:
    ...     result = tap.tap(torch.ones(5, 4))
    >>> result.outputs.shape, {k: v.shape for k, v in result.layers.items()}
    ((5, 2), {'penultimate': (5, 3)})
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from schemas.batch import PENULTIMATE


@dataclass
class TapResult:
    """Module outputs (n, classes) float32 and tapped layers name -> (n, dim), penultimate first."""

    outputs: np.ndarray
    layers: dict[str, np.ndarray]


def find_last_linear(module: nn.Module) -> str:
    """Name of the last ``nn.Linear`` registered in ``module`` (the classifier head in usual models)."""
    last = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            last = name
    if last is None:
        raise ValueError("the model has no nn.Linear: name the layers to tap explicitly (penultimate=False)")
    return last


def pool_to_matrix(t: torch.Tensor) -> torch.Tensor:
    """(batch, dim) view of an activation: global average pooling over axes 2.. of (n, C, *spatial)."""
    if t.dim() > 2:
        return t.flatten(2).mean(dim=2)
    if t.dim() == 1:
        return t.unsqueeze(1)
    return t


def _snapshot(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pool now, or copy a 2-D one, cast to ``dtype``: a new tensor a later in-place op cannot change."""
    t = t.detach()
    return pool_to_matrix(t).to(dtype) if t.dim() > 2 else pool_to_matrix(t).to(dtype, copy=True)


def first_tensor(value: object) -> torch.Tensor:
    """The tensor itself, or the first tensor of a tuple, list or dict output."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    if isinstance(value, dict):
        for item in value.values():
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"cannot tap a module output of type {type(value).__name__}")


class LayerTap:
    """Forward hooks on named modules of ``module``; ``tap(x)`` returns outputs + (batch, dim) layers.

    Args:
        module: any ``torch.nn.Module`` (not modified, only hooked).
        layers: exact module names to tap, reported under their name ("penultimate" may be
            listed too: it means the auto-found layer, still reported first).
        include_regex: a pattern; every module whose name fully matches it is tapped too.
        penultimate: tap the input of the last ``nn.Linear`` as ``"penultimate"`` (first).
        dtype: ``"float32"`` or ``"float16"`` for the layer matrices (outputs stay float32).
    """

    def __init__(
        self,
        module: nn.Module,
        layers: Iterable[str] | None = None,
        *,
        include_regex: str | None = None,
        penultimate: bool = True,
        dtype: str | np.dtype = "float32",
    ):
        self.module = module
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"dtype must be float32 or float16, got {self.dtype}")
        modules = dict(module.named_modules())
        wanted: list[str] = []
        for name in layers or ():
            if name == PENULTIMATE:  # the auto-found one, always reported first
                penultimate = True
                continue
            if name not in modules:
                raise KeyError(f"no module named {name!r} (known: {', '.join(n for n in modules if n)})")
            wanted.append(name)
        if include_regex is not None:
            pattern = re.compile(include_regex)
            wanted += [n for n in modules if n and pattern.fullmatch(n) and n not in wanted]
        self.penultimate_module = find_last_linear(module) if penultimate else None
        if not wanted and self.penultimate_module is None:
            raise ValueError("nothing to tap: give layers, include_regex or penultimate=True")
        self.names: list[str] = ([PENULTIMATE] if penultimate else []) + wanted
        self._torch_dtype = torch.float16 if self.dtype == np.float16 else torch.float32
        self._local = threading.local()  # .captured while recording: per thread, for concurrent requests
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        if self.penultimate_module is not None:
            self._handles.append(modules[self.penultimate_module].register_forward_pre_hook(self._pre_hook))
        for name in wanted:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    # --- hooks ------------------------------------------------------------------------------

    def _pre_hook(self, _module: nn.Module, args: tuple) -> None:
        captured = getattr(self._local, "captured", None)
        if captured is not None:
            # The head's input: nothing in the forward pass writes it after the head reads it, so it
            # is kept by reference (no copy on the request path; callers copy once after forward).
            captured[PENULTIMATE] = pool_to_matrix(first_tensor(args).detach())

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, _args: tuple, output: object) -> None:
            captured = getattr(self._local, "captured", None)
            if captured is not None:
                captured[name] = _snapshot(first_tensor(output), self._torch_dtype)

        return hook

    # --- use --------------------------------------------------------------------------------

    def forward(self, x: object) -> tuple[object, list[torch.Tensor]]:
        """Run ``module(x)`` exactly as the caller would (its grad mode, its device, its input) and
        return the module's output untouched plus the tapped (n, dim) device tensors in ``names`` order.

        Named layers are copies in the tap's dtype; the penultimate matrix may be the model's own
        tensor in the model's dtype: copy it (``to_host``, ``torch.cat``) before handing it on."""
        if not self._handles:
            raise RuntimeError("this LayerTap was removed")
        local = self._local
        local.captured = captured = {}
        try:
            out = self.module(x)
        finally:
            local.captured = None
        if len(captured) < len(self.names):
            missing = [n for n in self.names if n not in captured]
            raise RuntimeError(f"the forward pass did not reach the tapped layer(s) {missing}")
        return out, [captured[n] for n in self.names]

    def tap(
        self,
        x: torch.Tensor | np.ndarray,
        *,
        output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> TapResult:
        """Run ``module(x)`` and return its outputs and the tapped layers as host numpy matrices.

        ``output_fn`` (e.g. ``softmax``) is applied to the outputs on the device before the
        single device-to-host copy. Runs under ``torch.inference_mode()`` unless grad mode or
        inference mode was already chosen by the caller (then it respects that).
        """
        if isinstance(x, np.ndarray):
            x = np.ascontiguousarray(x, dtype=np.float32)
            x = torch.from_numpy(x if x.flags.writeable else x.copy())
        x = x.to(_device_of(self.module))
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            with torch.inference_mode():
                out, mats = self.forward(x)
        else:
            out, mats = self.forward(x)
        out = first_tensor(out).detach()
        if output_fn is not None:
            out = output_fn(out)
        return to_host(out, dict(zip(self.names, mats)), self.dtype)

    __call__ = tap

    def remove(self) -> None:
        """Detach every hook; the module behaves exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __deepcopy__(self, memo: dict) -> "LayerTap":
        """The tap itself: a deep-copied model shares it (its thread-local state cannot be copied)."""
        return self

    def __enter__(self) -> "LayerTap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"LayerTap({type(self.module).__name__}, layers={self.names}, dtype={self.dtype})"


def to_host(out: torch.Tensor, layers: dict[str, torch.Tensor], dtype: str | np.dtype = "float32") -> TapResult:
    """One device-to-host copy: outputs as float32 (n, classes) and (n, dim) layers cast to ``dtype``
    are concatenated along dim 1 on the device, copied once, and split into numpy views on the host."""
    dtype = np.dtype(dtype)
    n = out.shape[0]
    out = out.reshape(n, -1).float()
    if dtype == np.float16:
        # float32 outputs travel bit-for-bit as pairs of float16 in the same buffer
        parts = [out.contiguous().view(torch.float16)] + [m.to(torch.float16) for m in layers.values()]
    else:
        parts = [out] + [m.float() for m in layers.values()]
    host = torch.cat(parts, dim=1).cpu().numpy()
    k = out.shape[1] * (2 if dtype == np.float16 else 1)
    outputs = host[:, :k]
    if dtype == np.float16:
        outputs = np.ascontiguousarray(outputs).view(np.float32)
    matrices: dict[str, np.ndarray] = {}
    at = k
    for name, m in layers.items():
        matrices[name] = host[:, at : at + m.shape[1]]
        at += m.shape[1]
    return TapResult(outputs=outputs, layers=matrices)


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def execution_order(module: nn.Module, example: torch.Tensor, *, leaves_only: bool = False) -> list[str]:
    """Names of the submodules of ``module`` in the order a forward pass on ``example`` runs them."""
    order: list[str] = []
    handles = []
    for name, sub in module.named_modules():
        if not name or (leaves_only and any(True for _ in sub.children())):
            continue
        handles.append(sub.register_forward_hook(lambda _m, _a, _o, name=name: order.append(name)))
    was_training = module.training
    try:
        module.eval()
        with torch.inference_mode():
            module(example.to(_device_of(module)))
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    seen: dict[str, None] = {}
    for name in order:
        seen.setdefault(name, None)
    return list(seen)
