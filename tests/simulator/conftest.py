"""Fixtures of the simulator tests (helpers live in sim_helpers.py)."""

import pytest


@pytest.fixture(params=["analytic", "flow"])
def backend(request) -> str:
    return request.param
