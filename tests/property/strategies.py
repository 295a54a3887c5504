"""Hypothesis strategies for MoE programs (`programs.py`) and MoE look-alikes.

Every axis is drawn independently; only the constraints that make a program well formed tie
them (k <= E, G divides E, a layout that exists for the activation, a combine that exists for
the dispatch). Sizes are small: the properties are about structure, not scale.
"""
from hypothesis import strategies as st

from programs import GATED, MoESpec, ProgramSpec

ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid_bias", "grouped")
ROUTER_OPS = ("linear", "matmul_t", "matmul_he", "einsum")
ACTS = ("swiglu", "geglu", "gelu", "relu", "swiglu_oai")
DISPATCHES = ("where_loop", "mask_loop", "sort_gather", "sort_split", "dense_bmm", "module_list")
GATED_LAYOUTS = ("concat", "interleaved", "separate", "transposed")
PLAIN_LAYOUTS = ("standard", "transposed")


@st.composite
def moe_specs(draw, dispatches=DISPATCHES, routers=ROUTERS):
    router = draw(st.sampled_from(routers))
    if router == "grouped":
        G = draw(st.sampled_from((2, 4)))
        E = G * draw(st.sampled_from((2, 3)))          # topk(2) within a group needs >= 2 experts
        topk_group = draw(st.integers(1, G))
        k = draw(st.integers(1, topk_group * (E // G)))
    else:
        G = topk_group = 1
        E = draw(st.integers(1, 8))
        k = draw(st.integers(1, E))
    act = draw(st.sampled_from(ACTS))
    dispatch = draw(st.sampled_from(dispatches))
    return MoESpec(
        router=router, renorm=draw(st.booleans()), scale=draw(st.sampled_from((1.0, 2.5))),
        score_fp32=draw(st.booleans()), E=E, k=k,
        H=draw(st.sampled_from((4, 6, 8))), F=draw(st.sampled_from((2, 4, 6))), G=G, topk_group=topk_group,
        act=act, layout=draw(st.sampled_from(GATED_LAYOUTS if act in GATED else PLAIN_LAYOUTS)),
        dispatch=dispatch,
        combine=draw(st.sampled_from(("einsum", "bmm") if dispatch == "dense_bmm" else ("index_add", "scatter_add"))),
        shared=draw(st.sampled_from(("none", "plain", "gated"))),
        renorm_eps=draw(st.sampled_from((0.0, 1e-20))) if router in ("sigmoid_bias", "grouped") else 0.0,
        router_op=draw(st.sampled_from(ROUTER_OPS)))


@st.composite
def program_specs(draw, moe=None):
    moe = draw(moe if moe is not None else moe_specs())
    batched = draw(st.booleans())
    # 0 and 1 tokens are where shape specialisation and empty experts bite: drawn often.
    tokens = draw(st.one_of(st.sampled_from((0, 1, 2)), st.integers(3, 12)))
    if batched:
        tokens -= tokens % 2
    return ProgramSpec(moe=moe, dtype=draw(st.sampled_from(("float32", "float64"))), tokens=tokens,
                       batched=batched, norm=draw(st.booleans()), residual=draw(st.booleans()),
                       attention=draw(st.booleans()), second_moe=draw(st.booleans()),
                       seed=draw(st.integers(0, 2 ** 16)))


# ------------------------------------------------------------------------------ look-alikes


@st.composite
def look_alike_specs(draw):
    """(kind, sizes) for programs with a top-k/argmax over a linear's outputs but no experts."""
    kind = draw(st.sampled_from(("topk_sampling", "topk_embedding_mix", "attention", "argmax_codebook")))
    return dict(kind=kind, H=draw(st.sampled_from((4, 8))), V=draw(st.integers(2, 64)),
                k=draw(st.integers(1, 4)), tokens=draw(st.integers(1, 10)),
                dtype=draw(st.sampled_from(("float32", "float64"))), seed=draw(st.integers(0, 2 ** 16)))
