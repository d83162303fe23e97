"""The docstring examples of the MMD engine run and hold."""

from __future__ import annotations

import doctest

import pytest

import workers.mmd
import workers.mmd.tester


@pytest.mark.parametrize("module", [workers.mmd, workers.mmd.tester])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
