"""experts_combine / its backward through the Triton path (pre-activations saved by the gate/up
kernel, the dh kernel with the routing weights' gradient, gathered dW_down) against float64
references, values and every gradient, on NaN-padded strided weights."""
import pytest
import torch

from moec.codegen import reference, tuning
from moec.codegen.tuning import Tile

from kernel_helpers import DEVICE, TOL, assert_grads_close, padded, rel_err
from test_experts_launch import SMALL, _layer, _routing

KERNELS = ("gate_up", "down", "dh", "down_dx", "wgrad", "wgrad_dual")


def _run(T, E, k, H, F, dtype, act, gated=True, bias=False, layout="interleaved", how="uniform", tile=SMALL,
         save=True, frozen=(), w_dtype=torch.float32, pad=3, tol=None):
    x = padded((T, H), dtype).requires_grad_()
    offsets, src, inv = _routing(T, E, k, how)
    route_w = torch.rand(T, k, device=DEVICE).to(w_dtype).requires_grad_()
    bases, layout = _layer(E, H, F, dtype, gated, bias, layout, pad)
    for i, w in enumerate(bases):
        w.requires_grad_(i not in frozen)
    args = (act, 1.702, 7.0)
    leaves = [x, route_w] + [w for w in bases if w.requires_grad]
    with tuning.pin(**({} if tile is None else {name: tile for name in KERNELS})):
        out, pre = torch.ops.moec.experts_combine(x, src, offsets, inv, route_w, k, bases, layout, *args, save)
        gout = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, gout) if out.numel() else [torch.zeros_like(t) for t in leaves]
    d = lambda t: t.detach().cpu().double()
    ref_b = [d(w) for w in bases]
    routing = (src.cpu(), offsets.cpu(), inv.cpu(), d(route_w), k)
    out_ref, pre_ref = reference.experts_combine(d(x), *routing, ref_b, layout, *args, save)
    g_ref = reference.experts_combine_backward(d(gout), d(x), *routing, ref_b, layout, *args)
    g_ref = g_ref[:2] + [g for i, g in enumerate(g_ref[2:]) if i not in frozen]
    tol = tol or TOL[dtype]
    assert out.shape == out_ref.shape and out.dtype == dtype and pre.shape == pre_ref.shape
    if out.numel():
        assert rel_err(out.cpu(), out_ref) < tol
    if save and T:      # rows past offsets[E] (dropped copies) are never written nor read
        kept = int(offsets[-1])
        assert rel_err(pre[:kept].cpu(), pre_ref[:kept]) < tol
    assert_grads_close(grads, g_ref, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act,gated,bias", [("silu", True, False), ("gelu", True, True), ("relu", False, True),
                                            ("gelu_tanh", False, False), ("swiglu_oai", True, True)])
def test_activations(act, gated, bias, dtype):
    _run(11, 4, 2, 40, 24, dtype, act, gated, bias)


# one token with k = E = 8: the routing weights' gradient has 8 entries. At k = 1 it was one dot product,
# whose float32 rounding against float64 can cancel to any relative error (a 1-in-~10 failure here)
@pytest.mark.parametrize("T,E,k,how", [(0, 4, 2, "uniform"), (1, 8, 8, "uniform"), (23, 3, 3, "uniform"),
                                       (17, 4, 2, "one_expert"), (21, 6, 2, "sparse"), (19, 5, 1, "uniform")])
def test_routings(T, E, k, how):
    _run(T, E, k, 24, 40, torch.float32, "silu", bias=how == "sparse", how=how)


@pytest.mark.parametrize("how,layout,rows", [("uniform", "interleaved", 5), ("one_expert", "transposed", 4),
                                             ("sparse", "interleaved", 1), ("uniform", "transposed", 7)])
def test_weight_gradients_in_copy_chunks(monkeypatch, how, layout, rows):
    """The gathered copies of x and grad_out made `rows` rows at a time (MAX_COPY_BYTES shrunk to
    that): experts straddling chunks (added to by later ones), one expert over every chunk, empty
    experts and dropped copies, transposed (TRANS_OUT) and interleaved gradients, biases (the
    routing-weighted b_down sums)."""
    from moec.codegen import wgrad_kernel
    H, dtype = 24, torch.float32
    monkeypatch.setattr(wgrad_kernel, "MAX_COPY_BYTES", rows * H * 4)
    chunked, copies, real = [], [], wgrad_kernel._launch

    def launch(grid, a, a2, b, *rest, **kw):
        chunked.append(rest[11])
        copies.append(min(a.shape[0], b.shape[0]))      # the gathered operand: a copy of <= rows rows
        return real(grid, a, a2, b, *rest, **kw)
    monkeypatch.setattr(wgrad_kernel, "_launch", launch)
    _run(19, 4, 2, H, 40, dtype, "silu", bias=True, layout=layout, how=how)
    assert chunked.count(True) >= 4 and max(copies) <= rows


def test_transposed_weights_wide_tiles():
    _run(13, 4, 2, 48, 40, torch.bfloat16, "silu", bias=True, layout="transposed", tile=Tile(32, 32, 32, 4, 1))


@pytest.mark.parametrize("gated,bias,split", [(True, True, 2), (False, False, 2), (True, True, 4)])
def test_epilogue_in_column_pieces(gated, bias, split):
    """dh's epilogue over two column halves or four quarters (Tile.epilogue_split) computes the
    same; F = 72 leaves the last tile's quarters partly and wholly past the edge. A register cap
    (Tile.max_regs) changes nothing here: the interpreter has no registers."""
    _run(13, 4, 2, 40, 72, torch.float32, "gelu", gated, bias, tile=Tile(32, 64, 32, 4, 1, split, max_regs=128))


def test_half_precision_routing_weights():
    """Routing weights in the model's dtype (user code that never upcasts them); fp16 experts."""
    _run(10, 4, 2, 24, 16, torch.float16, "silu", bias=True, w_dtype=torch.float16)


def test_without_saved_preactivations():
    """save=False under autograd: the backward recomputes the pre-activations itself."""
    _run(9, 4, 2, 24, 16, torch.float32, "silu", bias=True, save=False)


@pytest.mark.parametrize("frozen", [(0,), (1, 3)])
def test_frozen_bases(frozen):
    """A base without requires_grad gets no gradient; a bias of a frozen weight still trains."""
    _run(12, 4, 2, 24, 16, torch.float32, "silu", bias=True, layout="transposed", frozen=frozen)


def test_refuses_mismatched_routing():
    x = torch.randn(4, 8, device=DEVICE)
    offsets, src, inv = _routing(4, 2, 2, "uniform")
    bases, layout = _layer(2, 8, 4, torch.float32, True, False, "transposed")
    with pytest.raises(Exception, match="route_w"):
        torch.ops.moec.experts_combine(x, src, offsets, inv, torch.rand(4, 1, device=DEVICE), 2, bases, layout,
                                       "silu", 0.0, 0.0, True)


@pytest.mark.skipif(DEVICE != "cuda", reason="real widths are for the GPU run")
@pytest.mark.parametrize("E,k,H,F,T", [(64, 8, 2048, 1024, 512), (128, 8, 2048, 768, 300), (8, 2, 4096, 14336, 100)])
def test_real_shapes_default_tiles(E, k, H, F, T):
    _run(T, E, k, H, F, torch.bfloat16, "silu", tile=None)


@pytest.mark.skipif(DEVICE != "cuda", reason="real widths are for the GPU run")
def test_gpt_oss_real_shape():
    _run(256, 32, 4, 2880, 2880, torch.bfloat16, "swiglu_oai", bias=True, tile=None)
