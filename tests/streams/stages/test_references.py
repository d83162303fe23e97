"""Reference alignment across layers (pure part of the reference cache)."""

from __future__ import annotations

import numpy as np

from streams.stages.references import reference_arrays


def test_reference_arrays_keep_events_present_in_every_layer() -> None:
    rows = [("e2", "pen", 1, [1.0, 2.0]), ("e1", "pen", 0, [3.0, 4.0]), ("e1", "early", 0, [5.0]),
            ("e2", "early", 1, [6.0]), ("e3", "pen", 2, [7.0, 8.0])]
    layers, classes = reference_arrays(rows)
    np.testing.assert_array_equal(layers["pen"], [[3.0, 4.0], [1.0, 2.0]])
    np.testing.assert_array_equal(layers["early"], [[5.0], [6.0]])
    assert classes.tolist() == [0, 1]
