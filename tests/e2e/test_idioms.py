"""MoE idioms beyond Hugging Face (torchtitan, a mask loop over range(E), a DeepSpeed/GShard
capacity gate) and look-alikes that must never be rewritten (top-k sampling, attention)."""
import pytest
import torch
from torch._dynamo.utils import counters

import moec
from compare import check_compiled_matches_eager
from moec.passes.graph import op_name
from moe_idioms import Attention, CapacityTop2MoE, GroupedRouterMoE, MaskLoopMoE, SortedGroupedMoE, TopKSampler

FUSED = {
    "torchtitan_softmax": (lambda: SortedGroupedMoE(), (2, 5, 32), "softmax_topk", "grouped_mm"),
    "torchtitan_sigmoid_shared": (lambda: SortedGroupedMoE(score="sigmoid", shared=True), (2, 5, 32),
                                  "sigmoid_bias", "grouped_mm"),
    "mask_loop_silu": (lambda: MaskLoopMoE().double(), (10, 32), "softmax_topk", "expert_loop"),
    "mask_loop_gelu": (lambda: MaskLoopMoE(act="gelu").double(), (10, 32), "softmax_topk", "expert_loop"),
    # routers written without nn.Linear (were skipped with no report: only `linear` was a router)
    "router_x_matmul_w_T": (lambda: MaskLoopMoE(router="matmul_t").double(), (10, 32), "softmax_topk", "expert_loop"),
    "router_matmul_h_by_e": (lambda: MaskLoopMoE(router="matmul_he").double(), (10, 32), "softmax_topk",
                             "expert_loop"),
    "router_einsum": (lambda: MaskLoopMoE(router="einsum").double(), (10, 32), "softmax_topk", "expert_loop"),
}


@pytest.mark.parametrize("name", list(FUSED))
def test_idiom_fused_and_exact(name):
    make, shape, router, idiom = FUSED[name]
    torch.manual_seed(0)
    module = make()
    dtype = next(module.parameters()).dtype
    report = moec.explain(module, torch.randn(shape, dtype=dtype))
    assert [(r.status, r.router, r.idiom) for r in report.regions] == [("fused", router, idiom)], str(report)
    counters.clear()
    check_compiled_matches_eager(module, torch.randn(shape, dtype=dtype))
    assert counters["moec"]["regions_fused"] == 1


def test_dead_in_place_write_goes_with_the_region():
    """A write into a buffer the layer made that nothing reads after is removed with the layer:
    left behind, it kept the router's top-k and sort alive and made the graph look token-mixing
    to the bucket analysis."""
    torch.manual_seed(0)
    module, graphs = SortedGroupedMoE(clamp_ids=True), []
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    out = torch.compile(module, backend="moec", options={"dense_backend": lambda gm, _: graphs.append(gm) or gm})(x)
    left = [n.format_node() for gm in graphs for n in gm.graph.nodes
            if op_name(n) in ("topk", "argsort", "clamp_", "histc")]
    assert graphs and not left, left
    torch.testing.assert_close(out, module(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 4.0], ids=["drops_many", "drops_some", "drops_none"])
def test_capacity_gate_fused_and_exact(capacity_factor):
    """DeepSpeed/GShard top-2 with capacity: first choices outrank second ones, dropped copies
    add nothing, the kept gates are renormalised. Token counts change: capacity = f(T) is symbolic."""
    torch.manual_seed(0)
    module = CapacityTop2MoE(capacity_factor=capacity_factor).double()
    report = moec.explain(module, torch.randn(12, 32, dtype=torch.float64))
    assert [(r.status, r.router, r.idiom) for r in report.regions] == \
        [("fused", "softmax_topk_capacity", "einsum")], str(report)
    counters.clear()
    compiled = check_compiled_matches_eager(module, torch.randn(12, 32, dtype=torch.float64))
    for tokens in (20, 7, 33):
        x = torch.randn(tokens, 32, dtype=torch.float64)
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-4, atol=1e-6)
    # one_hot(..., num_classes=capacity) in the user's code makes Dynamo itself specialise on
    # each capacity value, so graphs recompile per capacity: every one of them is fused.
    assert counters["moec"]["regions_fused"] == counters["moec"]["graphs"] >= 2


@pytest.mark.parametrize("make", [TopKSampler, Attention], ids=["topk_sampling", "attention"])
def test_look_alikes_untouched(make):
    torch.manual_seed(0)
    module = make().double()
    report = moec.explain(module, torch.randn(10, 32, dtype=torch.float64))
    assert report.regions == [], str(report)
    counters.clear()
    out = torch.compile(module, backend="moec", options={"dense_backend": "eager"})(torch.randn(10, 32, dtype=torch.float64))
    assert out is not None
    assert counters["moec"]["regions_fused"] == 0


def test_large_experts_prove_in_the_model_dtype(monkeypatch, caplog):
    """Experts whose float64 copy would pass the budget (4.8 GB for a Qwen3-30B-A3B layer) are
    proved in the model's dtype, with no float64 copy; below it, in float64."""
    from moec.passes import identify
    torch.manual_seed(0)
    module = MaskLoopMoE()

    def proof():
        torch._dynamo.reset()
        caplog.clear()
        with caplog.at_level("INFO", logger="moec"):
            out = torch.compile(module, backend="moec", options={"dense_backend": "eager"})(torch.randn(10, 32))
        assert out.shape == (10, 32)
        return [r.getMessage() for r in caplog.records if "fused (" in r.getMessage()]
    sharp = proof()
    monkeypatch.setattr(identify, "PROOF_FLOAT64_BYTES", 0)
    cheap = proof()
    assert len(sharp) == len(cheap) == 1, (sharp, cheap)
    assert "random tokens in float64" in sharp[0], sharp
    assert "random tokens in float32" in cheap[0], cheap


def test_router_logits_reach_route_without_a_float32_copy():
    """bf16 logits scored in float32 (`softmax(logits.float())`): moec.route reads them into
    float32 itself, so no cast kernel (nor a float32 copy saved for the backward) is left in
    the graph; values and gradients as eager."""
    torch.manual_seed(0)
    module, graphs = SortedGroupedMoE(), []
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(module, backend="moec", options={"dense_backend": lambda gm, _: graphs.append(gm) or gm})
    out = compiled(x)
    casts = [n.format_node() for gm in graphs for n in gm.graph.nodes
             if op_name(n) in ("to", "_to_copy", "convert_element_type", "float")
             and tuple(n.meta["val"].shape)[-1:] == (module.E,)]
    assert graphs and not casts, casts
    ref = module(x)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, module.gate.weight], g)
    want = torch.autograd.grad(ref, [x, module.gate.weight], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("how", ["mul", "where", "inf"])
def test_grouped_router_mask_value_survives_a_trained_bias(how):
    """Compiled while the score bias is zero, where no mask value changes the routing; then the
    bias goes negative (training moves it) and the mask value decides which experts win. moec
    must have read it off the graph (a 0 mask was taken for -inf before: 0.8 off)."""
    torch.manual_seed(0)
    counters.clear()
    module = GroupedRouterMoE(how)
    compiled = torch.compile(module, backend="moec", options={"dense_backend": "eager"})
    x = torch.randn(10, 16, dtype=torch.float64)
    torch.testing.assert_close(compiled(x), module(x))
    with torch.no_grad():
        module.score_bias.copy_(torch.randn(8, dtype=torch.float64) - 0.8)
    got, want = compiled(x), module(x)
    assert counters["moec"]["regions_fused"] == 1
    torch.testing.assert_close(got, want)
