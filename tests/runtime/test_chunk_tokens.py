"""passes/chunk_tokens.py: expert-parallel MoE layers pipelined over token chunks (or, in capacity
mode, pieces of the slots) on 2 and 4 gloo ranks compute what the single-process model computes:
outputs and every gradient (expert weights summed over the ranks, router, norms, projections).
The models run in float64, but HF's norms and routers compute in float32 inside, so chunked and
whole (rows summed in another order) agree to float32 rounding: `_TOL`."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.device_mesh import init_device_mesh
from torch.testing import assert_close

from fixed_calibration import write_calibration
from moe_ops import summed
from moec.codegen.torch_release import TORCH_RELEASE
from moec.runtime import shard_experts
from moec.runtime.cost_model import AllToAllModel, Calibration, ComputeModel

sys.path.insert(0, str(Path(__file__).parents[1]))        # tests/: the shared MoE idioms
sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))


_TOL = dict(rtol=1e-5, atol=1e-5)


def _reports():
    from moec import session
    return [r.reports["chunk_tokens"] for r in session.take() if "chunk_tokens" in r.reports]


def _compare(ref, ep, sharded, run):
    """run(model) -> loss on this rank's tokens; the EP model's loss and grads equal the plain one's."""
    want, got = run(ref), run(ep)
    want.backward()
    got.backward()
    assert_close(got, want, **_TOL)
    for (name, p), q in zip(ref.named_parameters(), ep.parameters()):
        g = q.grad.full_tensor() if name in sharded else q.grad
        assert_close(g, summed(p.grad) if name in sharded else p.grad, **_TOL,
                     msg=lambda m, name=name: f"grad of {name}: {m}")


def _start(rank, ws, make):
    """The plain model and an EP copy with its experts sharded over the ranks."""
    torch._dynamo.reset()
    from moec import session
    session.clear()
    from moec.runtime.consistency import forget
    forget()
    ref = make()
    ep = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    return ref, ep, mesh, set(shard_experts(ep, mesh))


def _causal_lm(arch):
    from hf_models import causal_lm
    model = causal_lm(arch).double().train()
    model.config.use_cache = False
    return model


def hf_matches_single_process(rank, ws, arch, whole_model, tokens, options):
    """A tiny HF causal LM, each decoder layer compiled alone (whole_model: the model as one graph),
    EP over every rank with `options`; this rank feeds (B, S) = tokens[rank] token ids."""
    ref, ep, mesh, sharded = _start(rank, ws, lambda: _causal_lm(arch))
    opts = {"dense_backend": "aot_eager", "ep_group": mesh, **options}
    if "dump_dir" in opts:
        opts["dump_dir"] = f"{opts['dump_dir']}/rank{rank}"
    if whole_model:
        ep.model.compile(backend="moec", options=opts)
    else:
        for layer in ep.model.layers:
            layer.compile(backend="moec", options=opts)
    ids = torch.randint(3, 96, tokens[rank], generator=torch.Generator().manual_seed(rank))
    _compare(ref, ep, sharded, lambda m: _loss(m, ids))
    return [[(l.k, l.pre, l.side, l.post, l.stops, l.why, l.units) for l in r.layers] for r in _reports()]


def _loss(model, ids):
    """A loss every logit feeds, also for one token (a next-token loss would have no labels)."""
    logits = model(ids).logits
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7), dtype=logits.dtype)
    return (logits * probe).sum()


@pytest.mark.parametrize("arch, k, tokens", [
    ("mixtral", 3, [(1, 5), (2, 4)]),          # T = 5 (chunks 2, 2, 1) and 8 (3, 3, 2)
    ("qwen3_moe", 2, [(1, 7), (1, 4)]),
    ("deepseek_v3", 4, [(1, 3), (2, 3)]),      # T = 3 < k: an empty chunk on rank 0
], ids=["mixtral-k3", "qwen3_moe-k2", "deepseek_v3-k4"])
def test_hf_decoder_layers_chunked_match_single_process(pool2, arch, k, tokens):
    results = pool2.run(hf_matches_single_process, arch, False, tokens, {"ep_chunks": k}, timeout=240)
    for per_rank in results:
        assert per_rank, "no layer compiled"
        for k_, pre, side, post, stops, why, units in (l for g in per_rank for l in g):
            assert k_ == k and why.startswith(f"ep_chunks={k}") and units == "tokens", (why, units)
            # the residual add, the norm and the router before; the residual add after
            assert any("router_logits" in n for n in pre) and len(pre) >= 10, pre
            assert post, post
            # attention mixes the tokens: the range stops at its output's transpose
            assert any(n.startswith("transpose") for n, _ in stops), stops
            assert (len(side) == 5) == (arch == "deepseek_v3"), side   # the shared expert, under the dispatch


@pytest.mark.parametrize("arch, by", [("mixtral", "auto"), ("qwen3_moe", "sequences"), ("mixtral", "tokens")])
def test_hf_decoder_layers_chunked_by_sequences(pool2, arch, by):
    """Batches of 2 and 3 sequences, k = 2: each rank cuts whole sequences, so the attention and
    everything before it in the layer runs in the chunks too (a single-sequence batch could not);
    unless ep_chunk_by="tokens"."""
    results = pool2.run(hf_matches_single_process, arch, False, [(2, 4), (3, 3)],
                        {"ep_chunks": 2, "ep_chunk_by": by}, timeout=240)
    for per_rank, units in zip(results, ("2 sequences of 4 tokens", "3 sequences of 3 tokens")):
        assert per_rank, "no layer compiled"
        for k_, pre, side, post, stops, why, got in (l for g in per_rank for l in g):
            if by == "tokens":
                assert k_ == 2 and got == "tokens" and "attn_output" not in pre, (got, pre)
                continue
            assert k_ == 2 and got == units, (k_, got)
            assert {"attn_output", "hidden_states"} <= set(pre), pre   # the attention; the first norm
            assert any("router_logits" in n for n in pre) and post, (pre, post)
            # nothing left out but the layer's input (Dynamo names it l_args_0_ or l_hidden_states_ by version)
            assert [why for _, why in stops] == ["a graph input"], stops


def _collectives(code: str) -> str:
    """The dispatch/combine all-to-alls in a dumped AOT forward graph or Inductor's code, in order:
    S for a start, W for its wait. A count exchange (waited before any other collective) is left out."""
    events, alias = [], {}
    for line in code.splitlines():
        left, _, right = line.strip().partition(" = ")
        if "_c10d_functional.all_to_all_single.default(" in line:
            events.append(("S", left))
        elif "wait_tensor.default(" in line:
            name = line.split("wait_tensor.default(")[1].split(")")[0]
            events.append(("W", alias.get(name, name)))
        elif right and right.split(";")[0].strip() in {n for _, n in events} | set(alias):
            alias[left] = alias.get(right.split(";")[0].strip(), right.split(";")[0].strip())   # bufB = bufA
    started = {name for kind, name in events if kind == "S"}
    counts = {a[1] for a, b in zip(events, events[1:]) if a[0] == "S" and b == ("W", a[1])}
    return "".join(kind for kind, name in events if name in started and name not in counts)


def test_aot_forward_starts_early_and_waits_late(pool2, tmp_path):
    pool2.run(hf_matches_single_process, "mixtral", False, [(1, 5), (1, 6)],
              {"ep_chunks": 3, "dump_dir": str(tmp_path)}, timeout=240)
    for rank in range(2):
        for folder in (tmp_path / f"rank{rank}").iterdir():
            # A0 A1 B0 A2 B1 C0 B2 C1 C2: S S WS S WS W WS W W
            assert _collectives((folder / "aot_forward.py").read_text()) == "SSWSSWSWWSWW"


def inductor_forward_order(rank, ws, capacity_factor):
    """Inductor's generated forward for token chunks (dropless) or capacity-mode pieces, with the
    dispatch/combine starts and waits in order; outputs and grads match the single-process block."""
    import torch._functorch.config as functorch_config
    from hf_models import moe_block
    from torch._inductor.utils import run_and_get_code
    ref, ep, mesh, sharded = _start(rank, ws, lambda: moe_block("qwen3_moe"))
    with torch._inductor.config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        compiled = torch.compile(ep, backend="moec", options={"ep_group": mesh, "ep_chunks": 2,
                                                              "ep_capacity_factor": capacity_factor})
        x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(rank))
        probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
        _, (forward, _) = run_and_get_code(
            lambda: _compare(ref, ep, sharded, lambda m: ((compiled if m is ep else m)(x)[0] * probe).sum()))
    return _collectives(forward[forward.index("def call("):])


@pytest.mark.parametrize("capacity_factor", [0.0, 8.0], ids=["dropless", "capacity"])   # 8: drops none
def test_inductor_keeps_starts_early_and_waits_late(pool2, capacity_factor):
    # both pieces' dispatches; per piece: its wait, its combine started; then the combines' waits
    assert pool2.run(inductor_forward_order, capacity_factor, timeout=300) == ["SSWSWSWW"] * 2


@pytest.mark.skipif(TORCH_RELEASE < (2, 13), reason="torch 2.11's Inductor cannot run a float64 SDPA backward on "
                    "the CPU, moec or not (RuntimeError: expected scalar type Double but found Float)")
def test_inductor_sequence_chunks_with_uneven_batches(pool2):
    """2 and 3 sequences per rank under Inductor: each rank's generated code orders its ops its own
    way. The layers' consistency check (a blocking collective Inductor would not order among the
    all-to-alls) runs before the graph, not in it: with a check per chunk in the graph, rank 1 ran
    chunk 2's before chunk 1's count exchange and both ranks hung."""
    results = pool2.run(hf_matches_single_process, "mixtral", False, [(2, 4), (3, 3)],
                        {"ep_chunks": 2, "ep_chunk_by": "sequences", "dense_backend": "inductor"}, timeout=400)
    for per_rank, units in zip(results, ("2 sequences of 4 tokens", "3 sequences of 3 tokens")):
        got = [l[6] for g in per_rank for l in g]
        assert got and set(got) == {units}, got


def test_whole_tiny_model_chunked_as_one_graph(pool2):
    results = pool2.run(hf_matches_single_process, "qwen3_moe", True, [(2, 3), (1, 5)], {"ep_chunks": 3},
                        timeout=240)
    layers = [l for g in results[0] for l in g]
    assert len(layers) == 2 and all(l[0] == 3 for l in layers), layers
    # the first layer's post range runs into the second layer's norm and projections
    assert len(layers[0][3]) > 5, layers[0][3]


def capacity_matches_unchunked(rank, ws, k, capacity_factor):
    """Capacity mode drops copies, so the reference is the same EP model unchunked (ep_chunks=1)."""
    plain, ep, mesh, sharded = _start(rank, ws, lambda: _causal_lm("mixtral"))
    ref = copy.deepcopy(ep)
    for model, chunks in ((ref, 1), (ep, k)):
        for layer in model.model.layers:
            layer.compile(backend="moec", options={"dense_backend": "aot_eager", "ep_group": mesh, "ep_chunks": chunks,
                                                   "ep_capacity_factor": capacity_factor})
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(rank))
    want, got = _loss(ref, ids), _loss(ep, ids)
    want.backward()
    got.backward()
    assert_close(got, want, **_TOL)
    for (name, p), q in zip(ref.named_parameters(), ep.parameters()):
        assert_close(q.grad.full_tensor() if name in sharded else q.grad,
                     p.grad.full_tensor() if name in sharded else p.grad, **_TOL,
                     msg=lambda m, name=name: f"grad of {name}: {m}")
    dropped = want.item() != _loss(plain, ids).item()
    return dropped, [(l.k, l.mode, l.pre, l.post) for r in _reports() for l in r.layers]


@pytest.mark.parametrize("k", [2, 3])
def test_capacity_mode_pieces_match_unchunked(pool2, k):
    """Chunked along the slots: each (E, C, H) dispatch in k pieces; 0.75 drops copies."""
    results = pool2.run(capacity_matches_unchunked, k, 0.75, timeout=240)
    assert any(dropped for dropped, _ in results), "the capacity drops nothing: the test would not see a wrong drop"
    for _, layers in results:
        assert set(layers) == {(k, "capacity", (), ())}, layers     # ep_chunks=1 reports nothing


def starved_block_matches(rank, ws, k):
    """An MoE block alone; rank 0's tokens never choose rank 1's experts, so its chunks send rank 1 nothing."""
    from hf_models import moe_block
    ref, ep, mesh, sharded = _start(rank, ws, lambda: moe_block("qwen3_moe").double())
    E = ref.gate.weight.shape[0]
    x = torch.randn(1, 5 + rank, 32, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    with torch.no_grad():
        for m in (ref, ep):
            m.gate.weight[E // 2:] = 0
            m.gate.weight[E // 2:, 0] = -10.0
        if rank == 0:
            x[..., 0] = x[..., 0].abs() + 1
        chosen = ref.gate(x.reshape(-1, 32))[2]
    assert (chosen >= E // 2).any() != (rank == 0), chosen
    compiled = torch.compile(ep, backend="moec", options={"dense_backend": "aot_eager", "ep_group": mesh,
                                                          "ep_chunks": k})
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    _compare(ref, ep, sharded, lambda m: ((compiled if m is ep else m)(x)[0] * probe).sum())
    [layer] = [l for r in _reports() for l in r.layers]
    return layer.k, layer.pre, layer.post


def test_chunk_that_sends_nothing(pool2):
    for k, pre, post in pool2.run(starved_block_matches, 3, timeout=240):
        assert k == 3 and "router_logits" in pre and post, (pre, post)


def dynamic_on_one_rank(rank, ws):
    """Rank 0 compiles with symbolic shapes (its token count unknown): only the layer's own ops are
    chunked there, into the same k, so the ranks' all-to-alls still pair up."""
    from hf_models import moe_block
    ref, ep, mesh, sharded = _start(rank, ws, lambda: moe_block("qwen3_moe").double())
    compiled = torch.compile(ep, backend="moec", dynamic=rank == 0,
                             options={"dense_backend": "aot_eager", "ep_group": mesh, "ep_chunks": 3})
    for T in (5, 7):
        x = torch.randn(1, T, 32, generator=torch.Generator().manual_seed(rank + T), dtype=torch.float64)
        probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        _compare(ref, ep, sharded, lambda m: ((compiled if m is ep else m)(x)[0] * probe).sum())
        for p in (*ref.parameters(), *ep.parameters()):
            p.grad = None
    return [(l.k, l.pre) for r in _reports() for l in r.layers]


def test_symbolic_token_count_on_one_rank(pool2):
    dynamic, static = pool2.run(dynamic_on_one_rank, timeout=240)
    assert dynamic and all(layer == (3, ()) for layer in dynamic), dynamic
    assert static and all(k == 3 and "router_logits" in pre for k, pre in static), static


def test_four_ranks(pool4):
    # T = 1 on rank 3: two of its three chunks are empty and nothing around the experts is chunked
    results = pool4.run(hf_matches_single_process, "mixtral", False, [(1, 5), (2, 3), (1, 6), (1, 1)],
                        {"ep_chunks": 3}, timeout=300)
    assert {l[0] for per_rank in results for g in per_rank for l in g} == {3}
    assert all(not l[1] for g in results[3] for l in g) and all(l[1] for g in results[0] for l in g)


def test_four_ranks_capacity(pool4):
    for _, layers in pool4.run(capacity_matches_unchunked, 2, 1.0, timeout=300):
        assert set(layers) == {(2, "capacity", (), ())}, layers


def cost_model_chooses(rank, ws, cache_dir, dump_dir, options=None, shapes=None):
    """ep_chunks=0: rank 0's cached calibration (a slow link) makes chunking pay; every rank takes the
    same k though their token counts differ; the dump explains and draws it."""
    ref, ep, mesh, sharded = _start(rank, ws, lambda: _causal_lm("mixtral"))
    layer = ep.model.layers[0]
    layer.compile(backend="moec", options={"dense_backend": "aot_eager", "ep_group": mesh, "cache_dir": cache_dir,
                                           "dump_dir": f"{dump_dir}/rank{rank}", **(options or {})})
    T = (4 if options else 4 + 2 * rank)      # capacity mode needs the same T on every rank
    ids = torch.randint(3, 96, shapes[rank] if shapes else (2, T), generator=torch.Generator().manual_seed(rank))
    _compare(ref, ep, sharded, lambda m: _loss(m, ids))
    [layer] = [l for r in _reports() for l in r.layers]
    return layer.k, layer.why, layer.schedule is not None and layer.schedule.k == layer.k, layer.text()


def test_cost_model_choice(pool2, tmp_path):
    write_calibration(tmp_path / "cache", 2, AllToAllModel(1e-6, 3e7, world_size=2))   # compute ~ transfer
    results = pool2.run(cost_model_chooses, str(tmp_path / "cache"), str(tmp_path / "dump"), timeout=240)
    (k0, why0, ok0, text0), (k1, why1, ok1, _) = results
    assert k0 == k1 > 1 and why0 == why1 == "cost model" and ok0 and ok1, results
    assert "predicted vs" in text0 and "chunked before the dispatch: " in text0, text0
    for rank in range(2):
        [folder] = (tmp_path / "dump" / f"rank{rank}").iterdir()
        assert (folder / "schedule_0.txt").read_text().startswith(f"mlp.experts: k={k0} (cost model)")
        assert (folder / "schedule_0.png").exists(), sorted(p.name for p in folder.iterdir())


def recompiling_on_one_rank(rank, ws, cache_dir):
    """ep_chunks=0: rank 0's second batch has longer sequences, so Dynamo compiles the layer again
    there (dynamic shapes) while rank 1 runs its compiled graph."""
    ref, ep, mesh, sharded = _start(rank, ws, lambda: _causal_lm("mixtral"))
    ep.model.layers[0].compile(backend="moec", options={"dense_backend": "aot_eager", "ep_group": mesh,
                                                        "cache_dir": cache_dir})
    for step, S in enumerate((4, 6) if rank == 0 else (5, 5)):
        ids = torch.randint(3, 96, (2, S), generator=torch.Generator().manual_seed(10 * rank + step))
        _compare(ref, ep, sharded, lambda m: _loss(m, ids))
        for p in (*ref.parameters(), *ep.parameters()):
            p.grad = None
    return [(l.k, l.why) for r in _reports() for l in r.layers]


def test_recompile_on_one_rank_takes_the_agreed_k(pool2, tmp_path):
    """The recompile takes the k the ranks agreed on at the first compile, with no collective: the
    calibration broadcast and the agreement, run there again, waited for a rank that never came."""
    write_calibration(tmp_path / "cache", 2, AllToAllModel(1e-6, 3e7, world_size=2))
    recompiled, once = pool2.run(recompiling_on_one_rank, str(tmp_path / "cache"), timeout=300)
    assert len(recompiled) == 2 and len(once) == 1, (recompiled, once)
    (k, why), (k_again, why_again) = recompiled
    assert k == k_again == once[0][0] > 1 and why == once[0][1] == "cost model", (recompiled, once)
    assert why_again == f"cost model (k={k} agreed at the layer's first compile)", why_again


def test_cost_model_cuts_whole_sequences_when_that_hides_more(pool2, tmp_path):
    """Batches of 8 sequences on a slow link, launches nearly free: the ops up to the attention's
    output projection cannot hide the all-to-all, the whole layer before it can, so every rank
    cuts whole sequences (the attention chunked too), the same k on both."""
    write_calibration(tmp_path / "cache", 2, AllToAllModel(1e-6, 1e7, world_size=2), ComputeModel(1e9, 1e10, 1e-8))
    results = pool2.run(cost_model_chooses, str(tmp_path / "cache"), str(tmp_path / "dump"), {"ep_chunk_by": "auto"},
                        [(8, 2), (8, 3)], timeout=240)
    (k0, why0, ok0, text0), (k1, why1, ok1, text1) = results
    assert 1 < k0 == k1 <= 8 and why0 == why1 == "cost model" and ok0 and ok1, results
    assert "8 sequences of 2 tokens" in text0 and "8 sequences of 3 tokens" in text1, (text0, text1)
    assert "attn_output," in text0.split("chunked before the dispatch: ")[1].splitlines()[0], text0


def test_cost_model_choice_in_capacity_mode(pool2, tmp_path):
    """Capacity 8 drops nothing here, so the single-process model is still the reference."""
    write_calibration(tmp_path / "cache", 2, AllToAllModel(1e-6, 3e7, world_size=2))
    results = pool2.run(cost_model_chooses, str(tmp_path / "cache"), str(tmp_path / "dump"),
                        {"ep_capacity_factor": 8.0}, timeout=240)
    assert results[0][0] == results[1][0] > 1 and all(r[2] for r in results), results
    assert "slots" in results[0][3], results[0][3]


def test_cost_model_keeps_a_layer_whole_when_chunking_does_not_pay(pool2, tmp_path):
    write_calibration(tmp_path / "cache", 2, AllToAllModel(5e-3, 1e12, world_size=2))   # latency-bound link
    results = pool2.run(cost_model_chooses, str(tmp_path / "cache"), str(tmp_path / "dump"), timeout=240)
    assert [r[:3] for r in results] == [(1, "cost model", True)] * 2, results
    assert "no chunking pays off" in results[0][3], results[0][3]


def random_chunks_match(rank, ws, k, tokens):
    return hf_matches_single_process(rank, ws, "qwen3_moe", False, tokens, {"ep_chunks": k})


@settings(max_examples=4, deadline=None, derandomize=True, database=None)
@given(k=st.integers(2, 6), t0=st.integers(1, 7), t1=st.integers(1, 7))
def test_random_chunk_counts(pool2, k, t0, t1):
    results = pool2.run(random_chunks_match, k, [(1, t0), (1, t1)], timeout=240)
    assert {l[0] for per_rank in results for g in per_rank for l in g} == {k}


def calibrating_with(rank, ws, cache_dir, a2a_grows):
    """Calibration with faked timings (so a loaded CI host cannot change the answer): compute on a
    clean line; the all-to-all's time on a line (a2a_grows) or flat at every size, as on a host
    whose load hides the link's bandwidth term. -> (k, why) per layer left whole, the a2a sizes
    measured, and how often chunk_tokens gave up on calibrating."""
    from unittest import mock

    from torch._dynamo.utils import counters

    from moec.runtime import cost_model
    measured = []

    def fake(timer, slowest, what, amounts, fns, passes=3):
        if what == "all_to_all":
            measured.append(list(amounts))
            return [1e-4 + a * 1e-9 if a2a_grows else 1e-3 for a in amounts]
        return [1e-6 + a * 1e-10 for a in amounts]

    ref, ep, mesh, sharded = _start(rank, ws, lambda: _causal_lm("mixtral"))
    counters.clear()
    ep.model.layers[0].compile(backend="moec", options={"dense_backend": "aot_eager", "ep_group": mesh,
                                                        "cache_dir": cache_dir})
    ids = torch.randint(3, 96, (2, 4 + rank), generator=torch.Generator().manual_seed(rank))
    with mock.patch.object(cost_model, "_fastest", fake):
        _compare(ref, ep, sharded, lambda m: _loss(m, ids))
    [report] = _reports()
    return [l.k for l in report.layers], [why for _, why in report.skipped], measured, \
        counters["moec"]["chunk_calibration_failed"]


def test_calibration_that_cannot_see_the_link_keeps_layers_whole(pool2, tmp_path):
    """Flat all-to-all times: measured again at 8x the sizes, then every rank keeps the layer whole
    (a correct step, no error) and says why; nothing is cached, so the next compile tries again."""
    for ks, whys, measured, failed in pool2.run(calibrating_with, str(tmp_path / "cache"), False, timeout=240):
        assert ks == [] and failed == 1, (ks, failed)
        assert len(whys) == 1 and "could not be calibrated" in whys[0] and "all-to-all" in whys[0], whys
        assert len(measured) == 2 and measured[1] == [8 * a for a in measured[0]], measured
    assert not list((tmp_path / "cache").glob("calibration/*.json"))


def test_unreadable_cached_calibration_is_measured_again(pool2, tmp_path):
    """Rank 0's cache file is garbage: it measures again (every rank with it, no hang) and rewrites it."""
    path = tmp_path / "cache" / "calibration" / "cpu-ws2-gloo.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    for ks, whys, measured, failed in pool2.run(calibrating_with, str(tmp_path / "cache"), True, timeout=240):
        assert failed == 0 and len(measured) == 1, (failed, measured)
    a2a = Calibration.load(path).all_to_all
    assert a2a.latency_s == pytest.approx(1e-4, rel=1e-6), a2a
