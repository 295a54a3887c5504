"""Hypothesis budgets for the property tests.

"ci" (default): derandomized, so every run tries the same programs; sized so that
`python -m pytest -q tests/property` stays under 8 minutes on 2 CPU cores.
"heavy" (HYPOTHESIS_PROFILE=heavy): random and many more examples, for long runs.
Each property scales its own base count by the profile (`budget.examples`).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("ci", derandomize=True, max_examples=100, database=None, **_COMMON)
settings.register_profile("heavy", max_examples=1000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _dynamo_quiet():
    # Generated programs compile hundreds of times in one test function: no recompile limit.
    with torch._dynamo.config.patch(cache_size_limit=64, accumulated_cache_size_limit=4096):
        yield
