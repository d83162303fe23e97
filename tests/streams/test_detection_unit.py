"""Pure parts of the detection stages: label tally, reference alignment, docstring examples."""

from __future__ import annotations

import doctest

import numpy as np

import streams.stages.drift as detection
from schemas.batch import LabelBatch
from streams.stages.drift import LabelTally, reference_arrays


def test_docstring_examples_run() -> None:
    assert doctest.testmod(detection).failed == 0


def _labels(model: str, ts: list[int], p: list[float], ids: list[str]) -> LabelBatch:
    n = len(ts)
    return LabelBatch(model, "1", "c", ids, np.array(ts, np.int64), np.array(p, np.float32), np.array(["x"] * n),
                      np.ones(n, np.float32), np.array([model] * n), np.ones(n, np.float32))


def test_label_tally_judges_each_bucket_once() -> None:
    tally = LabelTally(step_ms=1000)
    first = _labels("m", [10, 20, 30], [0.9, 0.8, 0.1], ["a", "b", "c"])
    second = _labels("m", [990, 1500, 2500], [0.7, 0.2, 0.2], ["d", "e", "f"])
    assert tally.add(first) == []
    verdicts = tally.add(second)
    assert [(m, end, n, adv) for m, end, n, adv, _ in verdicts] == [("m", 1000, 4, 3), ("m", 2000, 1, 0)]
    assert verdicts[0][4][:3] == ["a", "b", "d"]
    other = _labels("x", [5000], [1.0], ["z"])
    assert tally.add(other) == []  # models are tallied apart


def test_reference_arrays_keep_events_present_in_every_layer() -> None:
    rows = [("e2", "pen", 1, [1.0, 2.0]), ("e1", "pen", 0, [3.0, 4.0]), ("e1", "early", 0, [5.0]),
            ("e2", "early", 1, [6.0]), ("e3", "pen", 2, [7.0, 8.0])]
    layers, classes = reference_arrays(rows)
    np.testing.assert_array_equal(layers["pen"], [[3.0, 4.0], [1.0, 2.0]])
    np.testing.assert_array_equal(layers["early"], [[5.0], [6.0]])
    assert classes.tolist() == [0, 1]
