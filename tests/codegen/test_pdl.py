"""Programmatic dependent launch (codegen/pdl.py) changes when kernels start, never what they
compute: the decode chain (route_plan -> gate/up -> down -> combine) with PDL equals it without,
bit for bit, launched eagerly and replayed from a CUDA graph. GPU only (sm90+); on the CPU,
test_compile_sm90.py checks that the PDL variants compile and wait for their producer."""
import pytest
import torch

from moec.codegen import pdl

from kernel_helpers import DEVICE, padded
from test_experts_launch import _layer

hopper = pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability()[0] < 9,
                            reason="programmatic dependent launch needs an sm90+ GPU")


def _decode(x, logits, bases, layout, E, k):
    w, _, offsets, src, inv = torch.ops.moec.route_plan(logits, None, k, "softmax", True, 1.0, 1, 1, E)
    out, _ = torch.ops.moec.experts_combine(x, src, offsets, inv, w.to(x.dtype), k, bases, layout, "silu", 0.0,
                                            0.0, False)
    return out


@pytest.fixture
def pdl_state():
    before = dict(pdl._state)
    yield
    pdl._state.update(before)


@hopper
@pytest.mark.parametrize("T", [1, 8, 64])
def test_decode_bit_exact_with_and_without(T, pdl_state):
    E, k, H, F = 16, 4, 256, 128
    bases, layout = _layer(E, H, F, torch.bfloat16, True, True, "interleaved", pad=8)
    x = padded((T, H), torch.bfloat16)
    logits = torch.randn(T, E, device=DEVICE)
    got = {}
    with torch.no_grad():
        for on in (False, True):
            pdl.set_enabled(on)
            assert pdl.use(x, T) == on
            got[on] = _decode(x, logits, bases, layout, E, k)
    assert torch.equal(got[False], got[True])


@hopper
def test_decode_replayed_from_a_cuda_graph(pdl_state):
    E, k, H, F, T = 16, 4, 256, 128, 8
    bases, layout = _layer(E, H, F, torch.bfloat16, True, False, "interleaved", pad=8)
    x = padded((T, H), torch.bfloat16)
    logits = torch.randn(T, E, device=DEVICE)
    pdl.set_enabled(True)
    with torch.no_grad():
        want = _decode(x, logits, bases, layout, E, k)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _decode(x, logits, bases, layout, E, k)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _decode(x, logits, bases, layout, E, k)
        for _ in range(3):      # fresh inputs each replay: the graph reads them, not a copy
            x.copy_(padded((T, H), torch.bfloat16))
            logits.copy_(torch.randn(T, E, device=DEVICE))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, _decode(x, logits, bases, layout, E, k))
    assert want.shape == out.shape


def test_switch_and_its_bounds(pdl_state):
    """PDL only where asked for, on a CUDA tensor of an sm90+ GPU, for a decode-sized forward: by
    default a one-token forward, with MOEC_PDL=1 up to PDL_MAX_TOKENS."""
    t = torch.zeros(2, 2)
    pdl.set_enabled(False)
    assert not pdl.use(t, 1) and pdl.launch_kwargs(False) == {} and pdl.max_tokens() == 0
    pdl.set_enabled(True)
    assert not pdl.use(t, 1)            # a CPU tensor never
    assert pdl.launch_kwargs(True) == {"PDL": True, "launch_pdl": True}
    assert pdl.max_tokens() == pdl.PDL_MAX_TOKENS
    pdl.set_enabled(None)
    assert pdl.max_tokens() == pdl.AUTO_MAX_TOKENS == 1
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9:
        c = t.cuda()
        assert pdl.use(c, 1) and not pdl.use(c, 2)
        pdl.set_enabled(True)
        assert pdl.use(c, pdl.PDL_MAX_TOKENS) and not pdl.use(c, pdl.PDL_MAX_TOKENS + 1)
