"""Serving-side defences from seed 003: input preprocessing and MC-dropout uncertainty.

- :func:`bit_depth_reduce` — quantise pixels to ``bits`` bits (fewer grey levels remove
  fine adversarial noise; "pixel density" in the seed);
- :func:`median_blur` — a k x k median filter per channel (noise reduction, which removes
  the sparse large changes some attacks rely on);
- :func:`mc_dropout_uncertainty` — Feinman et al.'s Bayesian uncertainty: run the model
  T times with dropout switched on and measure how much the softmax outputs vary;
  adversarial inputs tend to vary more. The value per input is the sum over classes of
  the variance of the probabilities across passes (the trace of their covariance).

All work on torch tensors (n, C, H, W) on the model's device, batched, no Python loops
over inputs. None of these is a defence on its own (an adaptive attacker can account
for them); they raise the cost and feed the monitor an extra signal.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def bit_depth_reduce(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round inputs in [0, 1] to 2**bits levels."""
    if not 1 <= bits <= 16:
        raise ValueError("bits must be in 1..16")
    levels = float(2**bits - 1)
    return torch.round(x.clamp(0.0, 1.0) * levels) / levels


def median_blur(x: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """k x k median filter (odd k, reflect padding) over the last two axes of (n, C, H, W)."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError("kernel must be a positive odd number")
    if kernel == 1:
        return x
    pad = kernel // 2
    n, c, h, w = x.shape
    mode = "reflect" if min(h, w) > pad else "replicate"
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    patches = F.unfold(padded, kernel_size=kernel)  # (n, c*k*k, h*w)
    patches = patches.view(n, c, kernel * kernel, h * w)
    return patches.median(dim=2).values.view(n, c, h, w)


def parse_preprocess(spec: str | Sequence[str] | None) -> list[tuple[str, int]]:
    """'bitdepth:4,median:3' -> [('bitdepth', 4), ('median', 3)]; a clear ValueError otherwise."""
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    steps = []
    for item in items:
        name, _, arg = item.strip().partition(":")
        if name not in ("bitdepth", "median"):
            raise ValueError(f"preprocess step {item!r}: known steps are bitdepth:BITS and median:KERNEL")
        try:
            value = int(arg) if arg else (4 if name == "bitdepth" else 3)
        except ValueError:
            raise ValueError(f"preprocess step {item!r}: the argument must be an integer") from None
        steps.append((name, value))
    return steps


def apply_preprocess(x: torch.Tensor, steps: Sequence[tuple[str, int]]) -> torch.Tensor:
    """Apply parsed preprocessing steps in order."""
    for name, value in steps:
        x = bit_depth_reduce(x, value) if name == "bitdepth" else median_blur(x, value)
    return x


def mc_dropout_uncertainty(
    module: nn.Module, x: torch.Tensor, passes: int = 10, *, generator_seed: int | None = None
) -> torch.Tensor:
    """(n,) sum over classes of the variance of softmax outputs over ``passes`` dropout-on passes.

    Only the dropout modules are switched to training mode (BatchNorm keeps its running
    statistics); all passes run as one batch of n * passes rows. The module's modes are
    restored afterwards. Not thread-safe on a module shared with concurrent callers.
    """
    if passes < 2:
        raise ValueError("MC-dropout needs at least 2 passes")
    dropouts = [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if not dropouts:
        raise ValueError("the model has no dropout layer: MC-dropout uncertainty is undefined")
    modes = [m.training for m in dropouts]
    n = x.shape[0]
    try:
        for m in dropouts:
            m.train()
        with torch.inference_mode():
            if generator_seed is not None:
                with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                    torch.manual_seed(generator_seed)
                    logits = module(x.repeat(passes, *([1] * (x.dim() - 1))))
            else:
                logits = module(x.repeat(passes, *([1] * (x.dim() - 1))))
            probs = torch.softmax(logits.float(), dim=1).view(passes, n, -1)
            return probs.var(dim=0, unbiased=False).sum(dim=1)
    finally:
        for m, mode in zip(dropouts, modes):
            m.train(mode)
