"""Fixtures of the MMD engine tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run these small-matrix tests on one intra-op thread, then restore the setting.

    The tests' matrices are tiny, so a second OpenMP thread brings nothing, while on
    a shared 2-core machine a busy core makes every parallel region wait for it and
    the suite many times slower. The library itself never sets threads.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
