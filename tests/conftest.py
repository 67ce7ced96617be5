"""Test session setup: without a GPU, Triton kernels run through Triton's CPU interpreter; torch's global
random state is seeded before every test.

The interpreter must be chosen before triton is first imported, so it is set here, before any test
module is collected.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same global random state: a test that draws from torch's global
    generator gets the same values on every run (and a tolerance that a rare draw could exceed shows up
    every time, not once in a while)."""
    torch.manual_seed(0)
    yield
