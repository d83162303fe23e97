"""The demo's phase figures: each window counts for the phase that holds most of its span."""

from __future__ import annotations

import numpy as np

from streams.demo import attribute_windows, phase_figures

WINDOWS = np.array(
    [("cnn", 0, 4000, 0.0), ("cnn", 2000, 6000, 0.1), ("cnn", 4000, 8000, 0.9), ("cnn", 6000, 10000, 1.0),
     ("cnn", 8000, 12000, 0.2), ("mlp", 6000, 10000, 0.05), ("cnn", 20000, 24000, 0.0)],
    dtype=[("model", "U64"), ("start", "i8"), ("end", "i8"), ("rate", "f8")])
PHASES = [
    {"name": "clean", "attack": "clean", "target": None, "start_ms": 0, "end_ms": 5000},
    {"name": "pgd@cnn", "attack": "pgd", "target": "cnn", "start_ms": 5000, "end_ms": 9000},
    {"name": "clean", "attack": "clean", "target": None, "start_ms": 9000, "end_ms": 14000},
]


def test_windows_go_to_the_phase_holding_most_of_their_span() -> None:
    # [2000, 6000) is 3 s clean, 1 s attack; [4000, 8000) 1 s clean, 3 s attack; a window outside every phase: -1
    assert attribute_windows(WINDOWS, PHASES).tolist() == [0, 0, 1, 1, 2, 1, -1]


def test_a_short_attack_phase_still_has_its_windows() -> None:
    figures = phase_figures(WINDOWS, ["cnn", "mlp"], PHASES)
    assert [f["windows"] for f in figures] == [2, 2, 1]  # the mlp window of the cnn attack is not counted
    assert figures[1]["detection_rate_mean"] == 0.95 and figures[1]["detection_rate_max"] == 1.0
    assert figures[0]["detection_rate_median"] == 0.05
    empty = phase_figures(WINDOWS[:0], ["cnn"], PHASES)
    assert [f["windows"] for f in empty] == [0, 0, 0] and empty[0]["detection_rate_mean"] is None
