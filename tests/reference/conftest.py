"""Fixtures for the distributed tests: gloo worker pools shared by the session (reference.parallel.spawn.shared_pool)."""

from __future__ import annotations

import pytest


@pytest.fixture
def pool2():
    from reference.parallel.spawn import shared_pool

    return shared_pool(2)


@pytest.fixture
def pool4():
    from reference.parallel.spawn import shared_pool

    return shared_pool(4)
