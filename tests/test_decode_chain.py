"""benchmarks/decode_chain.py's logic on the CPU (its timings need a GPU): the chain is a residual
stream through every layer, moec's ops give the reference chain's values, and the floor sums each
layer's own, routed on the input that layer sees."""
import importlib.util
import os
import sys

import pytest
import torch

_DIR = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("triton")
    sys.path.insert(0, _DIR)
    try:
        spec = importlib.util.spec_from_file_location("decode_chain", os.path.join(_DIR, "decode_chain.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(_DIR)


def _setup(layers=3):
    from layers import Shape, make_params
    s = Shape("tiny", 8, 2, 32, 16)
    params = [{n: t.detach() for n, t in make_params(s, "cpu", dtype=torch.float32, seed=i).items()}
              for i in range(layers)]
    return s, params, torch.randn(5, s.H)


def test_chain_is_a_residual_stream_and_moec_matches(bench):
    from layers import hf_grouped_layer, moec_layer, router_plan
    s, params, x = _setup()
    with torch.no_grad():
        want = x
        for p in params:
            want = want + hf_grouped_layer(s, p, want)
        got_hf = bench.chain(hf_grouped_layer, s, params)(x)
        got_moec = bench.chain(moec_layer, s, params)(x)
        got_router = bench.chain(lambda s, p, x: moec_layer(s, p, x, router_plan), s, params)(x)   # route_plan_ab's
    assert torch.equal(got_hf, want)
    for got in (got_moec, got_router):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_floor_sums_each_layers_own_routing(bench):
    from layers import _route, hf_grouped_layer
    s, params, x = _setup()
    peak, bw = 1e12, 1e9
    want, h = 0.0, x
    with torch.no_grad():
        for p in params:
            want += bench.floor_ms(s, h.shape[0], _route(s, p, h)[1], peak, bw, train=False)[0]
            h = h + hf_grouped_layer(s, p, h)
    floor, out = bench.touched_floor_ms(s, params, x, peak, bw)
    assert floor == pytest.approx(want) and torch.equal(out, h)
    first_only = bench.floor_ms(s, x.shape[0], _route(s, params[0], x)[1], peak, bw, train=False)[0]
    assert want > first_only


def test_table_reads_each_row(bench):
    row = {"shape": "tiny", "tokens": 1, "floor_us": 20.0, "moec_us": 30.0, "moec_compiled_us": 25.0,
           "hf_grouped_mm_compiled_us": 50.0}
    line = bench.table([row]).splitlines()[-1]
    assert "| 2.00x |" in line and "| 80% |" in line and "| 40% |" in line
