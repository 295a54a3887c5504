"""Every kernel a layer launches compiles for an H100 (sm_90) at the GPU's own tile sizes, and fits
its shared memory; for an A100 (sm_80) the heuristic tiles also spill no registers: checked on the
CPU, where the interpreter runs the same code but would accept what the GPU compiler rejects and
never runs out of shared memory. Launches are recorded, not run
(codegen/compile_check.py), in a child process: Triton's compiler needs the kernels as @jit
functions, which TRITON_INTERPRET=1 (how the rest of this folder runs on CPU) replaces."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from moec.codegen import compile_check, experts_combine_launch, reference, route_plan_kernel, tuning, wgrad_kernel

SM90_SHARED = 227 * 1024        # the most shared memory one H100 block may ask for
SHARED = {90: SM90_SHARED, 80: 163 * 1024}      # and one A100 block
SM80_SPILL = 64
GEMMS = ("gate_up", "gate_up_bwd", "down", "dh", "down_dx", "wgrad", "wgrad_dual")
E, k, H, F, T = 8, 2, 256, 128, 64


def _tiles(rows_per_expert, dtype, tma=False, arch=90):
    """The GPU's heuristic tiles (tuning._default): decode-sized or training-sized."""
    tiles = {g: tuning._default(g, rows_per_expert, dtype, f"sm{arch}") for g in GEMMS}
    if tma:
        tiles.update({g: dataclasses.replace(tiles[g], tma=True)
                      for g in ("gate_up", "gate_up_bwd", "down", "dh", "down_dx")})
    return tiles


def _record_layer(dtype, act, gated, bias, layout, train, tiles):
    from test_experts_launch import _layer
    x = torch.randn(T, H, dtype=dtype)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    offsets, src, inv = reference.plan(ids, E)
    bases, lay = _layer(E, H, F, dtype, gated, bias, layout, pad=8)
    w = torch.rand(T, k)
    with compile_check.recording() as launches, tuning.pin(**tiles), torch.set_grad_enabled(train):
        if train:
            x.requires_grad_()
            w.requires_grad_()
            for b in bases:
                b.requires_grad_()
        out, _ = torch.ops.moec.experts_combine(x, src, offsets, inv, w, k, bases, lay, act, 1.702, 7.0, train)
        if train:
            torch.autograd.grad(out, [x, w] + bases, torch.randn_like(out))
    return launches


def _record_lora(form, tiles):
    """moec.experts with LoRA factors on gate/up and down (test_lora_experts' layouts), forward and
    backward: the low-rank terms' extra K-columns and rank-r GEMMs."""
    import test_lora_experts as lx
    p = lx._params(form, ("gu", "down"), form == "gpt_oss", torch.bfloat16)
    for t in p.values():
        t.requires_grad_()
    weights, layout = lx._pack(form, p, merged=False)
    offsets, src, _ = lx._routing()
    x = torch.randn(lx.T, lx.H, dtype=torch.bfloat16, requires_grad=True)
    act = "swiglu_oai" if form == "gpt_oss" else "silu"
    with compile_check.recording() as launches, tuning.pin(**tiles):
        y = torch.ops.moec.experts(x, src, offsets, lx.k, weights, layout, act, 1.702, 7.0)
        torch.autograd.grad(y, [x] + list(p.values()), torch.randn_like(y))
    return launches


def _record_routing(scoring, n_group, topk_group, tokens):
    logits = torch.randn(tokens, E, requires_grad=True)
    bias = torch.randn(E) if scoring == "sigmoid" else None
    with compile_check.recording() as launches:
        w, *_ = torch.ops.moec.route_plan(logits, bias, k, scoring, True, 1.0, n_group, topk_group, E)
        torch.autograd.grad(w, logits, torch.randn_like(w))
    return launches


GEMV_SETTINGS = [(64, 64, 128, 4, 4), (64, 48, 128, 4, 4)]     # decode_fused.settings' on a GPU; rows_f < block_f


def _record_decode_gemv():
    """The GEMV path (decode_experts_kernel.py) at the settings a GPU launches it with, and with a
    program's rows fewer than its tile (a pinned setting), at one and two Qwen3 tokens (the CPU's own
    settings are other, small blocks)."""
    from test_experts_launch import _layer
    from moec.codegen import decode_fused
    bases, lay = _layer(E, H, F, torch.bfloat16, True, False, "interleaved", pad=8)
    launches = []
    for settings in GEMV_SETTINGS:
        decode_fused.set_settings(settings)
        try:
            with compile_check.recording() as recorded, torch.no_grad():
                for tokens in (1, 2):
                    x = torch.randn(tokens, H).to(torch.bfloat16)
                    offsets, src, inv = reference.plan(torch.stack([torch.randperm(E)[:k] for _ in range(tokens)]), E)
                    torch.ops.moec.experts_combine(x, src, offsets, inv, torch.rand(tokens, k), k, bases, lay, "silu",
                                                   1.702, 7.0, False)
        finally:
            decode_fused.set_settings(None)
        launches += recorded
    return launches


def _record_decode_routing():
    """The decode routing's options not on by default: route_plan's top-k by a sort, and the router GEMM,
    routing and plan in one launch (router_plan_kernel.py) with either top-k and with PDL, bf16, at Qwen3's E
    and k."""
    from moec.codegen import router_plan_kernel
    E, k = 128, 8
    x = torch.randn(1, 256).to(torch.bfloat16)
    w_router = torch.randn(E, 256).to(torch.bfloat16)
    saved = route_plan_kernel.SORT, router_plan_kernel.use_pdl
    route_plan_kernel.SORT = True
    try:
        with compile_check.recording() as launches:
            torch.ops.moec.route_plan(torch.randn(4, E), None, k, "softmax", True, 1.0, 1, 1, E)
            for sort in (False, True):
                router_plan_kernel.router_plan_launch(x, w_router, None, None, k, "softmax", True, 1.0, 1, 1,
                                                      sort=sort)
            router_plan_kernel.use_pdl = lambda t, tokens: True     # a one-token forward on an H100
            router_plan_kernel.router_plan_launch(x, w_router, None, None, k, "softmax", True, 1.0, 1, 1)
    finally:
        route_plan_kernel.SORT, router_plan_kernel.use_pdl = saved
    return launches


def _compile_all(launches, arch=90):
    """{kernel name: errors}: each distinct launch compiled for sm_<arch>, its failures collected
    (before Hopper, spills past SM80_SPILL bytes a thread count as one: the Hopper tiles spilled
    232-512 there, the heuristic's pre-Hopper tiles none under Triton 3.6 and 16 under 3.9)."""
    seen, names = set(), {}
    for kernel, args, kwargs in launches:
        ident = compile_check.launch_id(kernel, args, kwargs)
        if ident in seen:
            continue
        seen.add(ident)
        errors = names.setdefault(kernel.__name__, [])
        try:
            compiled = compile_check.compile_launch(kernel, args, kwargs, arch)
            regs, local, shared = compile_check.usage(compiled)
        except Exception as e:
            errors.append(f"{kwargs}: {type(e).__name__}: {str(e)[-800:]}")
            continue
        ptx = compiled.asm["ptx"]
        if kwargs.get("PDL") and not ("griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx):
            errors.append(f"{kwargs}: launched with PDL, but waits for / releases no grid")
        if not 0 < regs <= 255 or shared > SHARED[arch] or (arch < 90 and local > SM80_SPILL):
            errors.append(f"{kwargs}: {regs} registers, {local} bytes spilled, {shared} bytes of shared memory")
    return names


LAYER_CASES = ["train", "train_oai_bias_transposed", "decode", "decode_pdl", "tma", "fp32", "lora_concat",
               "lora_gpt_oss", "persistent_oai_bias_transposed", "rowdesc_oai_bias_transposed"]
# 4 tokens: route and plan in one launch; 64: route, then plan in one program; 4096: plan over blocks
# A100: the heuristic tiles (tuning._PRE_HOPPER) for bf16 training and decode
SM80_CASES = ["train_sm80", "train_oai_bias_transposed_sm80", "decode_sm80"]
ROUTING_CASES = [("softmax", 1, 1, 64), ("sigmoid", 4, 2, 64), ("softmax", 1, 1, 4), ("softmax", 1, 1, 4096)]
ROUTING_KERNELS = {4: {"route_plan_kernel"}, 64: {"route_kernel", "plan_single_kernel"},
                   4096: {"route_kernel", "plan_count_kernel", "plan_scatter_kernel"}}


def _layer_case(case):
    arch = 80 if case.endswith("_sm80") else 90
    case = case[:-len("_sm80")] if arch == 80 else case
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    act, gated, bias, layout = ("swiglu_oai", True, True, "transposed") if "oai" in case else \
        ("silu", True, False, "interleaved")
    train = not case.startswith("decode")
    tiles = _tiles(64 if train else 1, dtype, tma=case == "tma", arch=arch)
    if case.startswith("persistent") or case == "tma":     # the weight gradients' persistent twin: stores
        # through pointers, its bias kernel beside (transposed GPT-OSS layout); through TMA (the tma case)
        tiles.update({g: dataclasses.replace(tiles[g], persistent=1, tma=case == "tma")
                      for g in ("wgrad", "wgrad_dual")})
    if case.startswith("rowdesc"):      # operand rows through descriptors made on the device
        tiles.update({g: dataclasses.replace(tiles[g], row_descs=True)
                      for g in ("wgrad", "wgrad_dual", "down", "down_dx")})
    saved = wgrad_kernel.MAX_COPY_BYTES, experts_combine_launch.use_pdl, route_plan_kernel.use_pdl
    if case == "train":     # the weight gradients' copies in chunks too (CHUNKED, its early exit)
        wgrad_kernel.MAX_COPY_BYTES = 40 * H * 2
    if case == "decode_pdl":    # as on an H100 with MOEC_PDL=1 (codegen/pdl.py)
        experts_combine_launch.use_pdl = route_plan_kernel.use_pdl = lambda t, tokens: True
    try:
        if case.startswith("lora"):
            return _compile_all(_record_lora(case[len("lora_"):], tiles))
        launches = _record_layer(dtype, act, gated, bias, layout, train, tiles)
        if case == "decode_pdl":
            launches += _record_routing("softmax", 1, 1, 4)
        return _compile_all(launches, arch)
    finally:
        wgrad_kernel.MAX_COPY_BYTES, experts_combine_launch.use_pdl, route_plan_kernel.use_pdl = saved


@pytest.fixture(scope="module")
def compiled():
    if not os.path.exists(os.path.join(compile_check.tools_dir(), "cuobjdump")):
        pytest.skip("this Triton ships no CUDA tools (cuobjdump, ptxas)")
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(__file__), timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", LAYER_CASES + SM80_CASES)
def test_layer_kernels_compile(case, compiled):
    names = compiled[case]
    want = {"gate_up_kernel", "down_kernel", "combine_kernel"}
    if case.startswith("lora"):        # moec.experts' backward: gate/up recomputed, no dh kernel
        want |= {"wgrad_kernel"}
    elif not case.startswith("decode"):
        want |= {"dh_kernel", "wgrad_kernel"}
    if case == "decode_pdl":
        want |= {"route_plan_kernel"}
    if case.startswith("persistent"):
        want = want - {"wgrad_kernel"} | {"wgrad_persistent_kernel", "bias_grad_kernel"}
    if case == "tma":
        want = want - {"wgrad_kernel"} | {"wgrad_persistent_kernel"}
    if case.startswith("rowdesc"):
        want = want - {"wgrad_kernel"} | {"wgrad_rowdesc_kernel", "bias_grad_kernel"}
    assert want <= set(names), sorted(names)
    assert not any(names.values()), {n: e for n, e in names.items() if e}


def test_decode_gemv_compiles_at_the_gpu_settings(compiled):
    names = compiled["decode_gemv"]
    assert {"decode_experts_kernel", "decode_reduce_kernel"} <= set(names), sorted(names)
    assert not any(names.values()), {n: e for n, e in names.items() if e}


def test_decode_routing_options_compile(compiled):
    names = compiled["decode_routing"]
    assert {"route_plan_kernel", "router_plan_kernel"} <= set(names), sorted(names)
    assert not any(names.values()), {n: e for n, e in names.items() if e}


@pytest.mark.parametrize("routing", ROUTING_CASES)
def test_routing_kernels_compile(routing, compiled):
    names = compiled["routing_%s_%d_%d_%d" % routing]
    assert ROUTING_KERNELS[routing[-1]] | {"route_backward_kernel"} <= set(names), sorted(names)
    assert not any(names.values()), {n: e for n, e in names.items() if e}


if __name__ == "__main__":        # the child: no interpreter, launches recorded and compiled
    sys.path.insert(0, os.path.dirname(__file__))
    from moec.codegen import kernels     # (and registers torch.ops.moec.*)
    results = {}
    with kernels.backend("triton"):
        for case in LAYER_CASES + SM80_CASES:
            results[case] = _layer_case(case)
        for routing in ROUTING_CASES:
            results["routing_%s_%d_%d_%d" % routing] = _compile_all(_record_routing(*routing))
        results["decode_routing"] = _compile_all(_record_decode_routing())
        results["decode_gemv"] = _compile_all(_record_decode_gemv())
    print(json.dumps(results))
