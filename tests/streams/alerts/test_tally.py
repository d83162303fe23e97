"""The label tally: classifier verdicts judged once per model and bucket."""

from __future__ import annotations

import doctest

import numpy as np

import streams.alerts.tally as tally_module
from schemas.batch import LabelBatch
from streams.alerts.tally import LabelTally


def test_docstring_examples_run() -> None:
    assert doctest.testmod(tally_module).failed == 0


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
