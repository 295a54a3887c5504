"""FX graphs with Dynamo-style example values, for pass tests that build graphs by hand."""
import torch
import torch.fx as fx

import moec.codegen  # noqa: F401  (registers torch.ops.moec.*)
from moec.runtime.expert_parallel import ep_experts


class RecordValues(fx.Interpreter):
    """Records each node's value as Dynamo would (meta["example_value"]); ep_experts runs as
    moec.experts, whose contract it keeps."""

    def run_node(self, n):
        if n.op == "call_function" and n.target is ep_experts:
            v = torch.ops.moec.experts(*self.map_nodes_to_values(n.args[:9], n))
        else:
            v = super().run_node(n)
        n.meta["example_value"] = v
        return v


def traced(fn, *inputs):
    """symbolic_trace(fn), with example values from running it on `inputs`."""
    gm = fx.symbolic_trace(fn)
    RecordValues(gm).run(*inputs)
    return gm
