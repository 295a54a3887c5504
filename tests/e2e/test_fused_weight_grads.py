"""The backward of a compiled HF block allocates no zero tensor the size of a fused expert weight.

moec.experts receives HF's fused `gate_up_proj` itself and writes the gate and up gradients into
their views of one buffer; autograd through graph-level views would instead run slice_backward
per view (zeros of the whole fused weight, copy, add). Eager HF, which indexes the fused weight
per expert, is the positive control: the counter does see such allocations there.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_models import moe_block

_ZEROING = {"zeros", "zeros_like", "new_zeros", "full", "new_full", "fill_", "zero_", "slice_backward",
            "select_backward", "slice_scatter", "select_scatter"}


class _ZeroAllocs(TorchDispatchMode):
    """Records the shapes of the tensors that zero-producing ops make."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in _ZEROING and isinstance(out, torch.Tensor):
            self.shapes.append((func.overloadpacket.__name__, tuple(out.shape)))
        return out


def _backward_zero_allocs(block, x):
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    loss = (out * torch.randn_like(out)).sum()
    with _ZeroAllocs() as mode:
        loss.backward()
    return mode.shapes


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])
def test_no_full_size_zero_tensor_for_fused_weight_views(arch):
    block = moe_block(arch, "eager")
    fused = tuple(block.experts.gate_up_proj.shape)       # OLMoE (E, 2F, H); GPT-OSS (E, H, 2F)
    x = torch.randn(2, 5, 32)
    assert any(shape == fused for _, shape in _backward_zero_allocs(block, x)), "control: eager HF zero-fills"
    block.zero_grad()
    compiled = torch.compile(block, backend="moec", options={"dense_backend": "eager"})
    compiled(x)                                           # compile outside the counted backward
    allocs = _backward_zero_allocs(compiled, x)
    assert not [a for a in allocs if a[1] == fused], allocs
    assert block.experts.gate_up_proj.grad is not None and block.experts.gate_up_proj.grad.abs().sum() > 0
