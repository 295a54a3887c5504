"""moec/backward.py: which backward passes a config turns on, how parameters are told apart in
AOT autograd's flattened inputs, and the Inductor pass chaining one already set by the user."""
import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.testing._internal.two_tensor import TwoTensor

from moec.backward import BackwardHook, backward_hook, param_flags
from moec.config import Config


@pytest.mark.parametrize("options, on", [({}, False), ({"ep_group": "world"}, True),
                                         ({"ep_group": "world", "wgrad_schedule": False}, False),
                                         ({"ep_group": "world", "disable": ("schedule_wgrad",)}, False)])
def test_switches(options, on):
    assert (backward_hook(Config.from_options(options)) is not None) == on


def test_param_flags_follow_aot_autograds_flattening():
    w = torch.nn.Parameter(torch.randn(3))
    pair = torch.nn.Parameter(TwoTensor(torch.randn(3), torch.randn(3)))    # flattens into 2 inputs
    assert param_flags([torch.randn(2), w, 5, pair, TwoTensor(torch.randn(1), torch.randn(1))]) == \
        [False, True, False, True, True, False, False]


class _Counting(CustomGraphPass):
    def __init__(self, key):
        self.key, self.calls = key, 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return self.key


def test_inductor_pass_chains_the_passes_already_set_and_runs_only_when_armed():
    hook = BackwardHook(Config.from_options({}))
    runs = []
    hook.run = lambda gm, flags, pin: runs.append((flags, pin))
    first, second = _Counting("a"), _Counting("b")
    chained = hook.inductor_pass([True, False], [first, second])
    graph = torch.fx.Graph(torch.nn.Module())
    chained(graph)                                     # a forward graph: only the user's passes
    with chained.armed():
        chained(graph)
    assert (first.calls, second.calls) == (2, 2) and runs == [((True, False), True)]
    assert chained.uuid() != hook.inductor_pass([True, False], [first]).uuid()
    assert hook.inductor_pass([True], lambda graph: None).uuid() is None   # no uuid: Inductor must not cache
    assert hook.inductor_pass([True], None).uuid() == hook.inductor_pass([True], None).uuid()
