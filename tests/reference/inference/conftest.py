"""Shared by the inference tests: two intra-op threads per module (the CI machine's cores; bigger thread
pools only add contention on these tiny models), the previous count restored after it."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)
