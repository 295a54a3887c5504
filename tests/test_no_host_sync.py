"""No hidden host syncs: after the rewrite, the graph has no `.item()`, `.tolist()`, `nonzero` or
one-argument `torch.where` left from the MoE layers, which the user's code had."""
import os
import re

import pytest
import torch

from e2e.hf_models import causal_lm
from moe_idioms import MaskLoopMoE

_SYNCS = re.compile(r"\.item\(\)|\.tolist\(\)|nonzero|torch\.where\([^,()]*\)|_local_scalar_dense|repeat_interleave")


def _graphs(tmp_path, module, *inputs):
    torch.compile(module, backend="moec", options={"dump_dir": str(tmp_path), "dense_backend": "eager"})(*inputs)
    [folder] = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    read = lambda name: open(os.path.join(folder, name)).read()
    return read("00_input.py"), read("02_rewrite.py")


@pytest.mark.parametrize("make,shape", [(lambda: MaskLoopMoE(), (10, 32)),
                                        (lambda: causal_lm("olmoe", "eager"), None)], ids=["mask_loop", "hf_olmoe_eager"])
def test_rewritten_graph_has_no_host_reads(tmp_path, make, shape):
    torch.manual_seed(0)
    inputs = torch.randn(shape) if shape else torch.randint(3, 96, (2, 7))
    before, after = _graphs(tmp_path, make(), inputs)
    if shape:   # the mask loop's torch.where(ids == e) is a nonzero: a sync the user's code had
        assert _SYNCS.search(before)
    assert not _SYNCS.findall(after), _SYNCS.findall(after)
    assert "torch.ops.moec.experts" in after
