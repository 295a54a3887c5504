"""Tiny random-weight Hugging Face MoE models, built from configs (nothing downloaded).

`ARCHS` maps a name to (config factory, path of the MoE block inside the decoder layer, the
experts implementations transformers offers for it). Widths are tiny so Inductor compiles on 2
CPU cores stay fast; E, k and the router follow each architecture's real structure.
"""
import torch
import transformers as tf

# transformers' experts implementations: a per-expert Python loop, padded batched matmul, and
# torch._grouped_mm (falls back to transformers' own grouped op on CPU).
ALL_IMPLS = ("eager", "batched_mm", "grouped_mm")


def _common(**kw):
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return base


def mixtral():
    return tf.MixtralConfig(**_common(num_local_experts=4, num_experts_per_tok=2))


def qwen3_moe():
    return tf.Qwen3MoeConfig(**_common(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                       decoder_sparse_step=1, norm_topk_prob=True, head_dim=8))


def olmoe():
    return tf.OlmoeConfig(**_common(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False))


def deepseek_v3():
    return tf.DeepseekV3Config(**_common(
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
        n_group=4, topk_group=2, first_k_dense_replace=0, routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
        rope_interleave=False, num_key_value_heads=4))   # MLA's static cache wants as many kv heads as heads


def gpt_oss():
    return tf.GptOssConfig(**_common(num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                     sliding_window=16, layer_types=["sliding_attention", "full_attention"]))


def switch():
    return tf.SwitchTransformersConfig(vocab_size=96, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2,
                                       num_decoder_layers=2, num_sparse_encoder_layers=1,
                                       num_sparse_decoder_layers=1, num_experts=4, expert_capacity=8,
                                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


ARCHS = {
    "mixtral": (mixtral, tf.MixtralForCausalLM, "mlp", ALL_IMPLS),
    "qwen3_moe": (qwen3_moe, tf.Qwen3MoeForCausalLM, "mlp", ALL_IMPLS),
    "olmoe": (olmoe, tf.OlmoeForCausalLM, "mlp", ALL_IMPLS),
    "deepseek_v3": (deepseek_v3, tf.DeepseekV3ForCausalLM, "mlp", ALL_IMPLS),
    "gpt_oss": (gpt_oss, tf.GptOssForCausalLM, "mlp", ALL_IMPLS),
}


def causal_lm(arch, impl="eager", seed=0):
    """A tiny `*ForCausalLM` with random weights, the given experts implementation, float32."""
    make_config, cls, _, _ = ARCHS[arch]
    torch.manual_seed(seed)
    config = make_config()
    config._experts_implementation = impl
    model = cls(config).eval()
    _randomize_router_biases(model)
    return model


def switch_model(seed=0):
    """A tiny Switch Transformers encoder-decoder (top-1 routing with expert capacity)."""
    torch.manual_seed(seed)
    return tf.SwitchTransformersForConditionalGeneration(switch()).eval()


def moe_block(arch, impl="eager", seed=0):
    """The first decoder layer's MoE block of `causal_lm(arch, impl)`."""
    model = causal_lm(arch, impl, seed)
    return getattr(model.model.layers[0], ARCHS[arch][2])


def _randomize_router_biases(model):
    # Zero-initialised biases (DeepSeek's e_score_correction_bias, GPT-OSS router/expert biases)
    # would hide a rewrite that drops them: give every bias random values.
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "bias" in name and p.is_floating_point():
                p.copy_(torch.randn_like(p) * 0.5)
