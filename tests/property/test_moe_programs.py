"""Generated MoE programs: compiled with moec equals eager (values and gradients), every MoE
layer is explained (fused, or missed for a known limitation), token permutation commutes with
the model, and new routing on the same shapes never recompiles.

A failure hypothesis finds is kept below as an `@example`; a real moec bug that is not fixed
yet is a `KNOWN_BUGS` entry with a minimal reproducer that runs as a strict xfail, and the
properties skip only the checks that bug breaks, only for the programs it applies to.
"""
import dataclasses

import pytest
import torch
from hypothesis import assume, example, given, settings
from torch._dynamo.utils import counters

import moec
from budget import examples, fresh
from compare import TOL, check_compiled_matches_eager
from programs import MoESpec, ProgramSpec, build, make_input
from strategies import program_specs

HOST_SIZES = "reads per-expert sizes on the host"
# Misses moec reports on purpose: reason substring -> the programs for which it is expected.
KNOWN_LIMITATIONS = {
    # identify proves a rewrite by running the layer on the traced token count; with none it
    # cannot, and decides on the first non-empty batch (a recompile, since 0 is specialised).
    "compiled with zero tokens": lambda p: p.tokens == 0,
    # moec's Experts reads separate (E, F, H) gate and up stacks only without biases
    # (identify._expert_candidates); GPT-OSS biases are known on a fused gate_up only.
    "expert weights of unknown layout": lambda p: p.moe.act == "swiglu_oai" and p.moe.layout == "separate",
    # Per-expert nn.Linear modules are reported, not fused: stacking them would copy the
    # parameters every step (detect._per_expert_modules).
    "experts are separate modules": lambda p: p.moe.dispatch == "module_list",
    # torchtitan's for-loop experts split by `bincount(...).tolist()`: host-side sizes, so a graph
    # break (capture.tolist_graph_breaks; it raised in Dynamo before) splits the layer.
    HOST_SIZES: lambda p: p.moe.dispatch == "sort_split",
}


def spec(moe=None, **program):
    """A ProgramSpec from a small default, for explicit examples and reproducers."""
    base = MoESpec(router="softmax_topk", renorm=True, scale=1.0, score_fp32=True, E=4, k=2, H=8, F=4,
                   G=1, topk_group=1, act="swiglu", layout="concat", dispatch="where_loop",
                   combine="index_add", shared="none")
    moe = dataclasses.replace(base, **(moe or {}))
    return ProgramSpec(**{**dict(moe=moe, dtype="float64", tokens=6, batched=False, norm=False, residual=False,
                                 attention=False, second_moe=False, seed=0), **program})


@dataclasses.dataclass(frozen=True)
class Bug:
    applies: object      # ProgramSpec -> bool
    breaks: tuple        # which checks it breaks: "explain", "compile"
    reproducer: object   # a ProgramSpec to run every check on, or a function that fails while the bug is there
    what: str


def test_sigmoid_renorm_without_eps_when_scores_underflow():
    """Regression (was KNOWN_BUGS' sigmoid_renorm_eps): one token whose every sigmoid score
    underflows (logits -80) and k = 1: the user's code renormalises to weight 1; moec's route
    adds DeepSeek's 1e-20 to the sum, so the rewrite must renormalise with the user's epsilon."""
    p = spec(dict(router="sigmoid_bias", k=1), tokens=1)
    model = build(p)
    with torch.no_grad():
        model.layers[0].router.weight.zero_()
        model.layers[0].router.bias = torch.nn.Parameter(torch.full((p.moe.E,), -80.0, dtype=torch.float64))
    fresh()
    check_compiled_matches_eager(model, make_input(p, 2))
    assert counters["moec"]["regions_fused"] == 1


# Real moec bugs the properties found, not fixed yet (reported to the owner of moec/ and passes/):
# none open (the last two, sort_split_crash and stacked_moe_without_glue, are fixed: see the examples
# below); with none, test_known_bug_reproducer reports an empty parameter set.
KNOWN_BUGS: dict = {}


def _broken(p, check):
    return [name for name, bug in KNOWN_BUGS.items() if check in bug.breaks and bug.applies(p)]


# ------------------------------------------------------------------------------ checks


def _reads_host_sizes(report) -> bool:
    return any(HOST_SIZES in r.reason for r in report.regions)


def check_explained(p, model):
    """Every MoE layer is reported: fused (with the drawn E and k) or missed for a known reason."""
    fresh()
    report = moec.explain(model, make_input(p, 1))
    if _reads_host_sizes(report):
        # the break is inside the layer's forward: Dynamo compiles that frame once for both layers
        # (its parameters are the graphs' inputs), so one miss stands for every layer it runs
        assert 1 <= len(report.regions) <= p.num_moe_layers, str(report)
    else:
        assert len(report.regions) == p.num_moe_layers, str(report)
    for r in report.regions:
        if r.status == "fused":
            assert (r.num_experts, r.top_k) == (p.moe.E, p.moe.k), str(report)
        else:
            known = [s for s, when in KNOWN_LIMITATIONS.items() if s in r.reason and when(p)]
            assert known, f"missed for a reason not on KNOWN_LIMITATIONS:\n{report}"
    return report


def _tolerance(p, model):
    """The model dtype's, but float32's where a float64 model scores its router in float32: eager's
    routing weights, and the router's gradient through them, then carry float32 rounding (k = 1
    with renormalisation: eager's gradient is ~1e-6 of noise where moec's is the exact 0)."""
    dtype = next(model.parameters()).dtype
    return TOL[torch.float32] if dtype == torch.float64 and p.moe.score_fp32 else TOL[dtype]


def check_compiled(p, model, fused, report=None):
    """Compiled == eager on fresh inputs (values, input and parameter gradients); then new
    routing on the same shape (no recompile) and permuted tokens (permuted output). Where a layer
    reads its sizes on the host (HOST_SIZES), the graph after the break takes them as Python ints,
    which Dynamo specialises (0 and 1 included) and recompiles for under any backend: only the
    values are checked there."""
    fresh()
    tol = _tolerance(p, model)
    compiled = check_compiled_matches_eager(model, make_input(p, 2), tol=tol)
    if fused is not None:
        assert counters["moec"]["regions_fused"] == fused
    host_sizes = report is not None and _reads_host_sizes(report)
    graphs = counters["moec"]["graphs"]
    # Other tokens, so other experts; requires_grad and grad mode as in the first call, since
    # Dynamo guards on both and a recompile from them would be the test's own doing.
    x = make_input(p, 3, scale=3.0).requires_grad_()
    out = compiled(x)
    torch.testing.assert_close(out, model(x), **tol)
    perm = torch.randperm(x.shape[-2], generator=torch.Generator().manual_seed(p.seed))
    torch.testing.assert_close(compiled(x[..., perm, :]), out[..., perm, :], **tol)
    assert host_sizes or counters["moec"]["graphs"] == graphs, "new routing or a permutation recompiled"


@settings(max_examples=examples(200))
@given(p=program_specs())
# Regressions, found by this property and fixed in passes/ (see the commit message):
# a mask loop's `w * (ids == e)` was taken for the routing weights -> "router matches none".
@example(p=spec(dict(dispatch="mask_loop")))
# E == H: a (T, E) routing tensor (DeepSeek's group mask, dense one-hot weights) was taken for the
# (T, H) combined output -> "could not find the tokens".
@example(p=spec(dict(router="grouped", E=8, G=4, topk_group=2)))
@example(p=spec(dict(dispatch="dense_bmm", combine="einsum", E=8)))
# E == k with dense one-hot weights: `(one_hot(ids) * w).sum(1)` is (T, k)-shaped and was taken
# for the routing weights -> "router matches none".
@example(p=spec(dict(router="softmax_topk", renorm=False, score_fp32=False, E=2, k=2, H=4, F=2,
                     dispatch="dense_bmm", combine="einsum"), dtype="float32", tokens=2))
# k == 1 with sorted dispatch: the weights in expert order `w.reshape(-1)[argsort(ids)]` were
# taken for the routing weights -> "router matches none".
@example(p=spec(dict(renorm=False, score_fp32=False, E=2, k=1, H=4, F=2, dispatch="sort_gather"),
                dtype="float32", tokens=3))
# float64 model, float32 router scores, k = 1 renormalised: eager's router gradient is float32 noise
# (~1e-6), moec's the exact 0: compared at float32's tolerance (heavy profile)
@example(p=spec(dict(renorm=True, scale=2.5, score_fp32=True, E=7, k=1, H=6, F=2, act="relu", layout="transposed",
                     shared="plain"), tokens=3, norm=True, seed=7))
# gradients up to ~70 (scale 2.5, two MoE layers, attention): a small element's float32 noise passed an
# absolute 2e-5; atol now scales with the reference's magnitude (tests/compare.py, heavy profile)
@example(p=spec(dict(renorm=False, scale=2.5, score_fp32=False, E=2, k=2, H=8, F=6, act="swiglu_oai",
                     layout="interleaved"), dtype="float32", tokens=4, residual=True, attention=True,
                second_moe=True, seed=4))
# per-expert nn.Linear modules were neither fused nor reported (now: a reported limitation).
@example(p=spec(dict(dispatch="module_list")))
# a grouped router's masked scores (T, E) were taken for per-expert modules' output when E == H:
# the layer went unreported (found by the heavy profile)
@example(p=spec(dict(router="grouped", G=2, topk_group=1, dispatch="module_list", H=4)))
# a batched input (B, T/B, H) with B == E was taken for a stack of expert weights, so no output
# of per-expert modules qualified: unreported (heavy profile)
@example(p=spec(dict(E=2, k=1, dispatch="module_list"), tokens=4, batched=True))
# Found the sigmoid_renorm_eps bug (fixed: the rewrite renormalises with the user's epsilon):
# layer 2's scores underflow on 3x inputs.
@example(p=spec(dict(router="sigmoid_bias", scale=2.5, score_fp32=False, E=5, k=1, H=4, F=6,
                     shared="plain"), dtype="float32", tokens=8, second_moe=True))
# a grouped router that masks the dropped groups with 0.0 (transformers' DeepseekV3 before 5.2x):
# where a kept expert's biased score is negative, a dropped one outranks it; moec knew only -inf
# masking -> "router matches none" (heavy profile; now `group_fill`)
@example(p=spec(dict(router="grouped", E=6, G=2, topk_group=1, k=3), tokens=64, seed=2))
# routers without nn.Linear were skipped with no report (only `linear` was taken for a router); with
# the bias added after the product, it was a miss ("matches none") or, where the weights do not
# depend on it (E = 1), rewritten away with the bias's gradient
@example(p=spec(dict(router="topk_softmax", router_op="matmul_t", dispatch="sort_gather")))
@example(p=spec(dict(router="topk_softmax", router_op="matmul_t", renorm=False, score_fp32=False, E=2, k=2, H=4,
                     F=2), dtype="float32", tokens=1))
@example(p=spec(dict(router="topk_softmax", router_op="matmul_t", renorm=False, score_fp32=False, E=1, k=1, H=4,
                     F=2), dtype="float32", tokens=1))
@example(p=spec(dict(router_op="matmul_he", dispatch="dense_bmm", combine="bmm")))
@example(p=spec(dict(router="sigmoid_bias", router_op="einsum", dispatch="mask_loop")))
# torchtitan's split by `bincount(...).tolist()` raised GuardOnDataDependentSymNode in Dynamo under
# moec's dynamic-output capture (was KNOWN_BUGS' sort_split_crash): now a graph break and a reported miss
@example(p=spec(dict(dispatch="sort_split")))
# a second layer reading the first one's index_add_ buffer directly (was KNOWN_BUGS'
# stacked_moe_without_glue): the buffer's last write counted as a second token input, one of the two
# then reported as "computed outside" the layer; a write read only through a later view is no input
@example(p=spec(second_moe=True))
def test_generated_moe_program(p):
    model = build(p)
    report = None if _broken(p, "explain") else check_explained(p, model)
    assume(not _broken(p, "compile"))
    check_compiled(p, model, None if report is None else len(report.fused), report)


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=bug.what))
                                  for name, bug in KNOWN_BUGS.items()])
def test_known_bug_reproducer(name):
    """Fails while the bug is there; an XPASS (strict) says: remove the entry from KNOWN_BUGS."""
    p = KNOWN_BUGS[name].reproducer
    if callable(p):
        return p()
    model = build(p)
    report = check_explained(p, model)
    check_compiled(p, model, len(report.fused))
