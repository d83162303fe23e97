"""Named attack presets: the seed's six white-box attacks (+ a stronger and a black-box one) on the demo scale.

The seed (Kalin et al., foolbox on 224x224x3 ImageNet models) used:
FGM (L2 eps 5), FGSM (Linf eps .03), PGD (Linf eps .03, 10 steps), LinfPGD (Linf eps .1,
10 steps), L2PGD (L2 eps 5, 10 steps), L2DeepFool (eps 5, 10 steps).

Translation to the demo's inputs (8x8x1 digits in [0, 1] with only 17 grey levels, one
level = 1/16 = .0625): ImageNet models are fooled by imperceptible noise spread over
150,528 pixels; a 64-pixel digit classifier needs a few grey levels per pixel. We keep
the seed's norms, step counts, step-size rule (eps/4 for 10 steps) and ordering
(PGD < LinfPGD), and choose each budget as a round value that fools the three demo
models on >= 80% of correctly classified test digits (checked by the tests):

=========== ============ ====================================== ================================
preset      ART attack   demo setting                           seed setting
=========== ============ ====================================== ================================
fgsm        FGM, Linf    eps <= .25, minimal eps in .025 steps  FGSM eps .03 (minimal search)
fgm         FGM, L2      eps 2.0                                FGM eps 5
pgd         PGD, Linf    eps .2, 10 steps of .05                PGD eps .03, 10 steps
pgd_small   PGD, Linf    eps .16, 20 steps of .02               (LADIS-style small budget)
pgd_large   PGD, Linf    eps .3, 10 steps of .075               LinfPGD eps .1, 10 steps
pgd_l2      PGD, L2      eps 1.5, 10 steps of .375              L2PGD eps 5, 10 steps
deepfool    DeepFool     10 steps, overshoot .02, L2 <= 2.0     L2DeepFool eps 5, 10 steps
cw          CarliniL2    confidence 1, 2 x 10 steps, lr .1      (stronger: minimal-L2 optimiser)
square      SquareAttack Linf eps .25, 200 iterations           (black-box, score queries only)
=========== ============ ====================================== ================================

The L2 bound of ``deepfool`` reproduces foolbox's epsilon: the perturbation is projected
onto the L2 ball after ART's (unbounded) DeepFool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Preset:
    """One named attack configuration; calling it with an ART classifier builds the ART attack."""

    name: str
    attack: str  # ART class name
    norm: float  # np.inf or 2
    params: dict[str, Any] = field(default_factory=dict)
    max_l2: float | None = None  # project the perturbation onto this L2 ball afterwards
    seed_setting: str = ""
    description: str = ""

    def __call__(self, classifier: Any, *, verbose: bool = False) -> Any:
        from art.attacks import evasion

        cls = getattr(evasion, self.attack)
        params = dict(self.params)
        if self.attack in ("ProjectedGradientDescent", "DeepFool", "CarliniL2Method", "SquareAttack"):
            params["verbose"] = verbose
        if self.attack in ("FastGradientMethod", "ProjectedGradientDescent", "SquareAttack"):
            params["norm"] = self.norm
        return cls(classifier, **params)

    def config(self) -> dict[str, Any]:
        """JSON-able description, part of the cache key."""
        return {
            "name": self.name,
            "attack": self.attack,
            "norm": "inf" if self.norm == np.inf else float(self.norm),
            "params": {k: (float(v) if isinstance(v, float) else v) for k, v in sorted(self.params.items())},
            "max_l2": self.max_l2,
        }


INF = float(np.inf)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("fgsm", "FastGradientMethod", INF, {"eps": 0.25, "eps_step": 0.025, "minimal": True},
               seed_setting="FGSM eps .03", description="fast gradient sign, smallest Linf step that fools"),
        Preset("fgm", "FastGradientMethod", 2.0, {"eps": 2.0},
               seed_setting="FGM eps 5", description="fast gradient method, L2"),
        Preset("pgd", "ProjectedGradientDescent", INF, {"eps": 0.2, "eps_step": 0.05, "max_iter": 10},
               seed_setting="PGD eps .03, 10 steps", description="projected gradient descent, Linf"),
        Preset("pgd_small", "ProjectedGradientDescent", INF, {"eps": 0.16, "eps_step": 0.02, "max_iter": 20},
               seed_setting="(small budget)", description="PGD Linf with a small budget"),
        Preset("pgd_large", "ProjectedGradientDescent", INF, {"eps": 0.3, "eps_step": 0.075, "max_iter": 10},
               seed_setting="LinfPGD eps .1, 10 steps", description="PGD Linf with a large budget"),
        Preset("pgd_l2", "ProjectedGradientDescent", 2.0, {"eps": 1.5, "eps_step": 0.375, "max_iter": 10},
               seed_setting="L2PGD eps 5, 10 steps", description="projected gradient descent, L2"),
        Preset("deepfool", "DeepFool", 2.0, {"max_iter": 10, "epsilon": 0.02, "nb_grads": 10, "batch_size": 256},
               max_l2=2.0, seed_setting="L2DeepFool eps 5, 10 steps", description="DeepFool (L2), bounded"),
        Preset("cw", "CarliniL2Method", 2.0,
               {"confidence": 1.0, "binary_search_steps": 2, "max_iter": 10, "learning_rate": 0.1,
                "initial_const": 2.0, "max_halving": 3, "max_doubling": 3, "batch_size": 256},
               seed_setting="(stronger attack)", description="Carlini & Wagner L2"),
        Preset("square", "SquareAttack", INF, {"eps": 0.25, "max_iter": 200, "nb_restarts": 1},
               seed_setting="(black-box)", description="Square attack, score-based black-box, Linf"),
    )
}


#: Minimal-change attacks of the detection evaluation (``bench/detection.py``): budgets too small
#: to fool most digits (so not in :data:`PRESETS`, whose members must fool >= 80%), the regime
#: in which a detector is weakest — LADIS's small-ε PGD.
EVAL_PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("pgd_003", "ProjectedGradientDescent", INF, {"eps": 0.03, "eps_step": 0.0075, "max_iter": 10},
               seed_setting="PGD eps .03, 10 steps", description="PGD Linf, eps .03 (half a grey level)"),
        Preset("pgd_010", "ProjectedGradientDescent", INF, {"eps": 0.1, "eps_step": 0.025, "max_iter": 10},
               seed_setting="LinfPGD eps .1, 10 steps", description="PGD Linf, eps .1"),
    )
}


def get_preset(name: str) -> Preset:
    """The named preset (:data:`PRESETS` or :data:`EVAL_PRESETS`), or a KeyError listing the known names."""
    spec = PRESETS.get(name) or EVAL_PRESETS.get(name)
    if spec is None:
        known = ", ".join([*PRESETS, *EVAL_PRESETS])
        raise KeyError(f"unknown attack preset {name!r}: known presets are {known}")
    return spec
