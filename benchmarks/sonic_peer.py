"""SonicMoE (Dao AI Lab, PyPI `sonic-moe`; grouped GEMMs in CuTe DSL from QuACK, Hopper/Blackwell
only) as a peer column of bench_layer.py, run on the same weights as moec's layer.

SonicMoE as read in sonic-moe 0.1.2.post1:
- `sonicmoe.MoE(num_experts, num_experts_per_tok, hidden_size, intermediate_size,
  activation_function, add_bias, std)` holds router.weight (E, H), c_fc.weight (E, 2F, H) with
  gate and up rows interleaved (gate = rows 0::2, up = rows 1::2), c_proj.weight (E, H, F), and
  with add_bias c_fc.bias (E, 2F), c_proj.bias (E, H).
- `MoE.forward(x, kernel_backend_moe, is_inference_mode)` returns (out, aux_loss) and always
  routes softmax(topk(logits)). We call what it calls, `moe_TC_softmax_topk_layer`, on the
  module's parameters: that function also takes topk(softmax(logits)) without renormalising
  (OLMoE), and it skips the switch aux loss, which moec's layer does not compute either.
- The fused up-projection takes GLU activations only: swiglu = silu(gate) * up, or geglu;
  no alpha, no clamp.

Running it: Python 3.12 (the packed wheels are cp312) with cuda-bindings and numpy installed;
`nvidia_cutlass_dsl/python_packages` must be on PYTHONPATH, since a .pth file is not read there.
The first call for each set of tensor shapes (each layer, token count and fwd/train) compiles the
CuTe kernels and autotunes QuACK's GEMMs over all their configs (seconds to minutes; bench()
warms up before it times). Compiled objects are cached under QUACK_CACHE_DIR (default
$TMPDIR/$USER/quack_cache); QUACK_CACHE_AUTOTUNING=1 also keeps the tuning choices on disk and
QUACK_PRINT_AUTOTUNING=1 prints them.
"""
import torch

from layers import split


class Unsupported(Exception):
    """SonicMoE cannot run this layer as moec does; the message says why."""


def _unsupported(s):
    """Why SonicMoE cannot compute layer `s` the way moec does, or None when it can."""
    if s.scoring == "sigmoid" or s.n_group > 1:
        return "sigmoid scoring with grouped top-k (DeepSeek-V3): SonicMoE's router is softmax only"
    if s.shared_F:
        return "shared expert: SonicMoE has none"
    if s.activation != "silu":
        return (f"activation {s.activation}: SonicMoE's fused up-projection takes swiglu "
                "(silu(gate) * up) or geglu only, without alpha or clamp")
    if s.biases:   # SonicMoE takes them (add_bias); no shape with its activations needs them
        return "expert biases are not wired into this peer"
    return None


def sonic_layer(s, params):
    """fn(x (T, H) bf16) -> (T, H) bf16: SonicMoE's layer on copies of `params`. fn.leaves lists
    the parameters that hold those copies, for bench() to take their gradients."""
    why = _unsupported(s)
    if why:
        raise Unsupported(why)
    try:
        from sonicmoe import MoE, moe_TC_softmax_topk_layer
        from sonicmoe.enums import ActivationType
    except Exception as e:   # a missing wheel, or CUDA/cutlass libraries that do not load
        raise Unsupported(f"sonicmoe not importable: {type(e).__name__}: {e}") from e
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        raise Unsupported(f"SonicMoE needs Hopper or Blackwell, not {torch.cuda.get_device_name()}")
    # Renormalised softmax over the top k equals softmax over the top-k logits, SonicMoE's default.
    over_topk = s.scoring == "softmax_after_topk" or s.renormalize
    with torch.device("cuda"):     # MoE reads the current CUDA stream when built
        moe = MoE(s.E, s.k, s.H, s.F, ActivationType.SWIGLU, add_bias=False, std=0.02).to(torch.bfloat16)
    w_up, w_gate, _, _ = split(s, params)
    with torch.no_grad():
        moe.router.weight.copy_(params["router"])
        moe.c_fc.weight[:, 0::2].copy_(w_gate)
        moe.c_fc.weight[:, 1::2].copy_(w_up)
        moe.c_proj.weight.copy_(params["down"])

    def fn(x):
        # the (2F, H, E) and (H, F, E) views MoE.forward passes; without grad, no pre-activations are kept
        out, _, _ = moe_TC_softmax_topk_layer(
            x, moe.router.weight, moe.c_fc.weight.permute(1, 2, 0), None, moe.c_proj.weight.permute(1, 2, 0),
            None, s.k, moe.stream_id, ActivationType.SWIGLU, not torch.is_grad_enabled(),
            is_softmax_over_topk=over_topk, norm_topk_probs=False)
        return out

    fn.leaves = list(moe.parameters())
    return fn


def version():
    """sonic-moe's version, or why it does not import."""
    try:
        import sonicmoe
        return sonicmoe.__version__
    except Exception as e:
        return f"not importable: {type(e).__name__}: {str(e)[:200]}"
