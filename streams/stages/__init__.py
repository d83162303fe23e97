"""The detection stages of the ingest step, one module each; :func:`build_stages` picks them from ``settings.agents``.

A stage implements :class:`streams.runtime.Stage` (start, handle a step's decoded batches,
stop, health) and owns its state. To add one: a module here with the class, an entry in
``STAGES`` and its agent name in ``streams.runtime.AGENTS`` (docs/architecture.md, "Add a stage").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from streams.stages.base import Stage


def _drift(runtime: Any) -> "Stage":
    from streams.stages.drift import DriftStage

    return DriftStage(runtime)


def _windows(runtime: Any) -> "Stage":
    from streams.stages.drift import DriftStage

    return DriftStage(runtime, publish=True)


def _classify(runtime: Any) -> "Stage":
    from streams.stages.classify import ClassifyStage

    return ClassifyStage(runtime)


def _probing(runtime: Any) -> "Stage":
    from streams.stages.probing import ProbingStage

    return ProbingStage(runtime)


#: agent name -> stage factory, in the order the stages get each step
STAGES: dict[str, Callable[[Any], "Stage"]] = {
    "drift": _drift, "windows": _windows, "classify": _classify, "probing": _probing,
}


def build_stages(runtime: Any) -> list["Stage"]:
    """The stages the runtime's agents ask for."""
    return [factory(runtime) for name, factory in STAGES.items() if name in runtime.agents]
