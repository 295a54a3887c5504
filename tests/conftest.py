"""Test set-up: every test starts from a fresh Dynamo cache and counters; the session compiles
into its own Inductor cache, so artifacts a previous checkout of moec left in the shared default
cache (made with other op schemas) are never replayed."""
import os
import tempfile

import pytest
import torch
from torch._dynamo.utils import counters

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="moec-tests-inductor-"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
