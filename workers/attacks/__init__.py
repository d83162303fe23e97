"""Adversarial example generation for the demo and the evaluations, with the Adversarial Robustness Toolbox (ART).

Why ART and not torchattacks or foolbox: torchattacks requires torchvision, and
torchvision does not import beside the torch build layerwatch runs on (torch 2.13 CPU),
so installing it would break the environment; ART works on a plain ``torch.nn.Module``
through ``PyTorchClassifier`` and is permissively licensed (MIT).

- :data:`PRESETS` — named attacks (``fgsm``, ``fgm``, ``pgd``, ``pgd_small``, ``pgd_large``,
  ``pgd_l2``, ``deepfool``, ``cw``, ``square``): the seed's six attacks translated to the
  demo's 8x8 [0, 1] digits (see :mod:`workers.attacks.presets` for the table);
- :func:`generate` — run a preset on (x, y), report the success rate (prediction changed
  from the true label, among inputs the model got right) and cache the set under
  ``<state_dir>/attacks/<model>_<preset>.npz``.
"""

from workers.attacks.generate import AttackResult, cache_key, cache_path, generate
from workers.attacks.presets import EVAL_PRESETS, PRESETS, Preset, get_preset

__all__ = ["EVAL_PRESETS", "PRESETS", "AttackResult", "Preset", "cache_key", "cache_path", "generate", "get_preset"]
