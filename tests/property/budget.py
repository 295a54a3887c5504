"""Per-property example counts, scaled by the active hypothesis profile (see conftest.py)."""
import torch
from hypothesis import settings
from torch._dynamo.utils import counters


def examples(base: int) -> int:
    """`base` examples under "ci", proportionally more under a bigger profile."""
    return max(1, base * settings.default.max_examples // 100)


def fresh():
    """A clean Dynamo cache and counters: each hypothesis example is its own compile (the
    autouse fixture in tests/conftest.py runs once per test function, not per example)."""
    torch._dynamo.reset()
    counters.clear()
