"""Expert-load telemetry (`expert_stats`, `moec.stats`): counts equal the eager router's choices,
accumulate over steps and recompiles, count capacity drops, survive checkpointing and Inductor,
add no host reads, and cost nothing when off."""
import copy
import gc
import json
import logging
import os
import re

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import moec
from compare import TOL, check_compiled_matches_eager
from e2e.hf_models import causal_lm, moe_block
from moe_idioms import CapacityTop2MoE
from test_dynamic import ONES_APART
from test_no_host_sync import _SYNCS

ON = {"expert_stats": True}


def _topk_counts(logits, k, E):
    """Copies per expert of a softmax top-k router, from its logits (T, E)."""
    ids = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1).indices
    return torch.bincount(ids.flatten(), minlength=E)


def _logits(block, x):
    return F.linear(x.reshape(-1, 32), block.gate.weight)


def _dump(tmp_path, module, x, options):
    compiled = torch.compile(module, backend="moec", options={"dense_backend": "eager", "dump_dir": str(tmp_path),
                                                               **options})
    compiled(x)
    [folder] = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    return compiled, lambda name: open(os.path.join(folder, name)).read()


def test_counts_equal_eager_router_over_steps_and_recompiles():
    torch.manual_seed(0)
    block = moe_block("qwen3_moe", "batched_mm").double()
    E, k = 8, 2
    xs = [torch.randn(s, dtype=torch.float64) for s in [(2, 5, 32), (3, 7, 32), (4, 9, 32), (1, 13, 32)]]
    compiled = check_compiled_matches_eager(block, xs[0], options=ON)     # forward and gradients
    for x in xs[1:]:
        torch.testing.assert_close(compiled(x), block(x), **TOL[torch.float64])
    # one recompile, with symbolic tokens; none after (torch 2.11: the batch of 1 once more, test_dynamic.py)
    assert counters["moec"]["graphs"] == 2 + ONES_APART
    want = sum(_topk_counts(_logits(block, x), k, E) for x in xs)
    [(name, load)] = moec.stats(compiled).items()
    assert name == "<root>" and load.counts.tolist() == want.tolist()
    assert (load.steps.item(), load.dropped.item(), load.routed.item()) == (4, 0, k * sum(x.numel() // 32 for x in xs))
    torch.testing.assert_close(load.imbalance, want.max() / want.float().mean())
    assert moec.stats(block) == {}                  # the eager original was not compiled


def _capacity_counts(m, x):
    """CapacityTop2MoE's own gate, step by step: copies kept per expert, copies dropped."""
    T = x.shape[0]
    capacity = max(int(m.cf * 2 * T / m.E), 1)
    gates = F.softmax(m.wg(x), dim=1)
    mask1 = F.one_hot(torch.argmax(gates, dim=1), m.E)
    mask2 = F.one_hot(torch.argmax(gates.masked_fill(mask1.bool(), float("-inf")), dim=1), m.E)
    loc1 = torch.cumsum(mask1, 0) - 1
    loc2 = torch.cumsum(mask2, 0) - 1 + mask1.sum(0, keepdim=True)
    kept = mask1 * (loc1 < capacity) + mask2 * (loc2 < capacity)       # (T, E)
    return kept.sum(0), 2 * T - kept.sum()


def test_capacity_drops_counted_and_no_host_reads(tmp_path):
    torch.manual_seed(0)
    module = CapacityTop2MoE(capacity_factor=1.0).double()
    xs = [torch.randn(24, 32, dtype=torch.float64), torch.randn(24, 32, dtype=torch.float64) * 2]
    compiled, read = _dump(tmp_path, copy.deepcopy(module), xs[0], ON)
    torch.testing.assert_close(compiled(xs[1]), module(xs[1]), **TOL[torch.float64])
    kept, dropped = (sum(v) for v in zip(*(_capacity_counts(module, x) for x in xs)))
    assert dropped > 0                              # else this test would not test drops
    [load] = moec.stats(compiled).values()
    assert load.counts.tolist() == kept.tolist() and load.dropped.item() == dropped and load.steps.item() == 2
    graph = read("03_expert_stats.py")
    assert graph.count("torch.ops.moec.expert_load_record") == 1
    assert not _SYNCS.findall(graph), _SYNCS.findall(graph)


def test_off_by_default_adds_no_nodes(tmp_path):
    torch.manual_seed(0)
    compiled, read = _dump(tmp_path, moe_block("mixtral", "batched_mm"), torch.randn(2, 5, 32), {})
    assert "`expert_stats`" in read("index.md") and "torch.ops.moec.experts" in read("02_rewrite.py")
    assert read("03_expert_stats.py") == read("02_rewrite.py") and "expert_load" not in read("02_rewrite.py")
    assert moec.stats(compiled) == {}


def test_checkpointed_layers_counted_once_per_step():
    """HF gradient checkpointing: counts leave each checkpoint body as an extra output, so the
    recomputation in the backward does not count again; gradients equal eager."""
    model = causal_lm("qwen3_moe", "grouped_mm").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled = torch.compile(copy.deepcopy(model), backend="moec", options={"dense_backend": "aot_eager", **ON})
    logits = _router_logits(model)                  # the eager router's, forward only
    tokens = torch.randint(3, 96, (2, 7))
    out, ref = compiled(tokens).logits, model(tokens).logits
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    probe = torch.randn_like(ref)
    (out * probe).sum().backward()
    (ref * probe).sum().backward()
    for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **TOL[torch.float32], msg=lambda m: f"grad of {name}: {m}")
    loads = list(moec.stats(compiled).values())
    assert len(loads) == 2 and counters["moec"]["regions_fused"] == 2
    for i, load in enumerate(loads):
        assert load.layer == f"model.layers.{i}.mlp"   # named as without checkpointing
        assert load.counts.tolist() == _topk_counts(logits[i], 2, 8).tolist() and load.steps.item() == 1


def _router_logits(model):
    """Forward hooks keeping each layer's first router logits of the eager `model`."""
    logits = {}

    def keep(i):
        def hook(module, args, out):
            logits.setdefault(i, out[0].detach())
        return hook
    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(keep(i))
    return logits


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(moe_block("mixtral", "batched_mm", seed=s) for s in (1, 2))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_per_block_compile_counts_each_layer():
    """torchtitan-style: each block compiled on its own. Dynamo runs one graph for both blocks;
    each block's counts still land in its own layer, named by its path in the model."""
    torch.manual_seed(0)
    model = _Stack()
    ref = copy.deepcopy(model)
    for layer in model.layers:
        layer.compile(backend="moec", options={"dense_backend": "eager", **ON})
    # both blocks see inputs that require grad, and a new batch size: one recompile, still shared
    xs = [torch.randn(2, 5, 32, requires_grad=True), torch.randn(1, 5, 32, requires_grad=True)]
    for x in xs:
        torch.testing.assert_close(model(x), ref(x), **TOL[torch.float32])
    assert counters["moec"]["graphs"] == 2
    want = [0, 0]
    for x in xs:
        for i, layer in enumerate(ref.layers):
            want[i] = want[i] + _topk_counts(_logits(layer, x), 2, 4)
            x = x + layer(x)
    loads = moec.stats(model)
    assert list(loads) == ["layers.0", "layers.1"]
    for load, counts in zip(loads.values(), want):
        assert load.counts.tolist() == counts.tolist() and load.steps.item() == 2


def test_inductor_counts_and_gradients():
    torch.manual_seed(0)
    block = moe_block("mixtral", "batched_mm")
    xs = [torch.randn(2, 6, 32), torch.randn(2, 6, 32)]
    compiled = check_compiled_matches_eager(block, xs[0], options=ON, dense_backend="inductor")
    torch.testing.assert_close(compiled(xs[1]), block(xs[1]), **TOL[torch.float32])
    want = sum(_topk_counts(_logits(block, x), 2, 4) for x in xs)
    [load] = moec.stats(compiled).values()
    assert load.counts.tolist() == want.tolist() and load.steps.item() == 2


def test_log_every_n_steps_reset_and_dump(tmp_path):
    torch.manual_seed(0)
    module = moe_block("mixtral", "batched_mm")
    compiled = torch.compile(module, backend="moec",
                             options={"dense_backend": "eager", "expert_stats_log_every": 2, **ON})
    logger, lines = logging.getLogger("moec"), []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)                   # what TORCH_LOGS=moec does
    try:
        xs = [torch.randn(2, n, 32) for n in (5, 5, 7, 6, 9)]
        for x in xs:
            compiled(x)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    loads = [line for line in lines if line.startswith("expert load")]
    assert len(loads) == 2    # other tests' layers may still be alive in this process: then "<root>#n"
    assert re.match(r"expert load <root>(#\d+)?: 2 calls, 40 copies routed, 0 dropped", loads[0])
    assert re.match(r"expert load <root>(#\d+)?: 4 calls, 92 copies routed", loads[1])
    want = sum(_topk_counts(_logits(module, x), 2, 4) for x in xs)
    paths = moec.dump_stats(str(tmp_path), compiled)
    [row] = json.load(open(paths[0]))
    assert row["counts"] == want.tolist() and row["steps"] == 5 and row == moec.stats(compiled)["<root>"].to_dict()
    assert open(paths[1], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    moec.reset_stats(compiled)
    x = torch.randn(1, 6, 32)
    compiled(x)
    assert moec.stats(compiled)["<root>"].counts.tolist() == _topk_counts(_logits(module, x), 2, 4).tolist()


def test_models_kept_apart():
    torch.manual_seed(0)
    a, b = moe_block("mixtral", "batched_mm", seed=1), moe_block("mixtral", "batched_mm", seed=2)
    ca = torch.compile(a, backend="moec", options={"dense_backend": "eager", **ON})
    cb = torch.compile(b, backend="moec", options={"dense_backend": "eager", **ON})
    x = torch.randn(1, 8, 32)
    ca(x), ca(x), cb(x)
    assert moec.stats(ca)["<root>"].steps.item() == 2 and moec.stats(cb)["<root>"].steps.item() == 1
    gc.collect()
    assert {"<root>", "<root>#2"} <= set(moec.stats())
