"""Training a small HF Qwen3-MoE-like causal LM (real layer widths, few layers, random weights, bf16,
AdamW): tokens/s, MFU over active parameters, peak memory; HF's eager experts loop, HF grouped_mm
under torch.compile, and moec, each with and without gradient checkpointing.

    python benchmarks/bench_training.py --out DIR             # every variant, one process each
    python benchmarks/bench_training.py --one moec_ckpt        # one cell, prints one JSON line

MFU = (6 * active parameters + 12 * layers * sequence * hidden) FLOPs per token * tokens/s, over the
bf16 matmul rate measured on this card (8192^3 GEMM), the usual active-parameter accounting.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

LAYERS, BATCH, SEQ, STEPS, WARMUP = 2, 4, 1024, 6, 3
VARIANTS = ("hf_eager", "hf_gmm_compiled", "moec", "hf_eager_ckpt", "hf_gmm_compiled_ckpt", "moec_ckpt",
            "hf_gmm_compiled_lora", "moec_lora")
LORA_RANK = 16


def build(impl):
    import transformers as tf
    config = tf.Qwen3MoeConfig(vocab_size=32000, num_hidden_layers=LAYERS, hidden_size=2048, moe_intermediate_size=768,
                               intermediate_size=6144, num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                               num_key_value_heads=4, head_dim=128, norm_topk_prob=True, decoder_sparse_step=1,
                               max_position_embeddings=4096, output_router_logits=True, router_aux_loss_coef=0.001)
    config._experts_implementation = impl
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.Qwen3MoeForCausalLM(config).to(torch.bfloat16).train()
    return model


def active_params(model):
    """Parameters a token passes through: all but the embedding table, the experts counted k/E."""
    c = model.config
    total = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total - experts + experts * c.num_experts_per_tok // c.num_experts


def peak_flops():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ a
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * 20 / (start.elapsed_time(end) * 1e-3)


def run_cell(variant):
    from torch._dynamo.utils import counters
    ckpt, lora = variant.endswith("_ckpt"), variant.endswith("_lora")
    base = variant.removesuffix("_ckpt").removesuffix("_lora")
    model = build("eager" if base == "hf_eager" else "grouped_mm")
    if ckpt:
        model.gradient_checkpointing_enable()
    if lora:   # PEFT LoRA on the 3D expert weights; everything else frozen
        import peft
        names = [n.split("model.layers.")[-1].split(".", 1)[1] for n, _ in model.named_parameters() if ".experts." in n]
        config = peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=[],
                                 target_parameters=sorted(set(names)))
        model = peft.get_peft_model(model, config)
    forward = model.forward
    if base != "hf_eager":
        forward = torch.compile(model.forward, backend="moec" if base == "moec" else "inductor")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens = [torch.randint(100, 30000, (BATCH, SEQ), device="cuda") for _ in range(2)]

    def step(i):
        loss = forward(input_ids=tokens[i % 2], labels=tokens[i % 2]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    for i in range(WARMUP):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(STEPS):
        loss = step(i)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / STEPS
    tok_s = BATCH * SEQ * 1e3 / ms
    c = model.config
    # (with LoRA: the frozen base still costs its forward and input-gradient GEMMs, so this overstates MFU by ~1/3)
    flops_per_token = 6 * active_params(model) + 12 * c.num_hidden_layers * SEQ * c.hidden_size
    return {"variant": variant, "ms_per_step": ms, "tokens_per_s": tok_s,
            "mfu": flops_per_token * tok_s / peak_flops(), "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
            "loss": float(loss), "moec": dict(counters["moec"]), "active_params": active_params(model)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--one")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.one:
        print("CELL " + json.dumps(run_cell(args.one)), flush=True)
        return
    import transformers
    import triton
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "date": datetime.date.today().isoformat(),
            "shape": dict(layers=LAYERS, batch=BATCH, seq=SEQ, hidden=2048, experts=128, k=8, expert_width=768)}
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for v in args.variants.split(","):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", v], capture_output=True, text=True,
                              timeout=900)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CELL ")), None)
        err = [ln for ln in proc.stderr.splitlines() if "Error" in ln.split(":")[0]]
        rows.append(json.loads(line[5:]) if line else {"variant": v, "error": (err or ["?"])[-1][:300]})
        print(json.dumps(rows[-1]), flush=True)
        with open(os.path.join(args.out, "bench_training.json"), "w") as f:   # after every cell: a cut run keeps what it had
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
