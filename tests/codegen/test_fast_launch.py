"""codegen/fast_launch.py: a repeat launch through the compiled kernel gives what Triton's own path
gives, and its key separates every property Triton specialises on. The key tests run anywhere;
the launch tests need CUDA (under the interpreter every launch takes Triton's path)."""
import pytest
import torch
import triton
import triton.language as tl

from moec.codegen import fast_launch
from moec.codegen.fast_launch import arg_key, launch

from kernel_helpers import DEVICE, padded
from test_experts_launch import _layer, _routing

cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="direct launches exist only for compiled CUDA kernels")


def test_key_separates_what_triton_specialises():
    base = torch.empty(64, dtype=torch.bfloat16)
    keys = [arg_key((t,)) for t in (base, base[1:], base.float(), base[8:])]
    assert keys[0] != keys[1] and keys[0] != keys[2] and keys[0] == keys[3]    # alignment, dtype
    ints = [arg_key((v,)) for v in (1, 2, 16, 32, 2 ** 31, 2 ** 63, -16)]
    assert len(set(ints[:3])) == 3 and ints[2] == ints[3] and len({ints[3], ints[4], ints[5]}) == 3
    assert arg_key((True,)) != arg_key((1,)) and arg_key((None,)) != arg_key((0.5,))
    assert arg_key((3,), constexpr={0}) != arg_key((5,), constexpr={0})   # a constexpr by position: its value
    assert arg_key(([1, 2],)) is None and arg_key(("silu",)) is None       # unknown: Triton's own path
    # keys are built from per-type plans and remembered int classes: asked again, and mixed
    assert [arg_key((v,)) for v in (1, 2, 16, 32, 2 ** 31, 2 ** 63, -16)] == ints
    assert arg_key((None, 16)) != arg_key((base, 16)) != arg_key((base, 17)) != arg_key((base, True))
    assert arg_key((torch.nn.Parameter(base.float()),)) != arg_key((base.float(),))    # a subclass: its own plan


def test_an_empty_hook_chain_is_no_hook():
    """triton 3.6+ keeps an empty HookChain where no launch hook is set: taking it for a hook
    sent every launch through Triton's path (the fast one never ran, found on an H100)."""
    from triton.knobs import HookChain
    chain = HookChain()
    assert not fast_launch.hooked(chain) and not fast_launch.hooked(None)
    chain.add(print)
    assert fast_launch.hooked(chain) and fast_launch.hooked(print)


class _FakeKernel:
    """A JITFunction's surface as fast_launch reads it: params, kernel[grid](...) returning the
    compiled kernel, whose run(...) is recorded."""

    def __init__(self):
        from types import SimpleNamespace as P
        self.params = [P(name="x", is_constexpr=False, has_default=False, default=None),
                       P(name="n", is_constexpr=False, has_default=False, default=None),
                       P(name="a", is_constexpr=False, has_default=False, default=None),
                       P(name="BLOCK", is_constexpr=True, has_default=False, default=None),
                       P(name="MODE", is_constexpr=True, has_default=True, default=3)]
        self.through_triton, self.direct = [], []
        self.compiled = P(function="fn", packed_metadata="meta", run=lambda *a: self.direct.append(a))

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.through_triton.append((grid, args, kwargs)) or self.compiled


def test_direct_launch_passes_every_parameter_in_signature_order(monkeypatch):
    """The launcher gets the grid padded to 3, the stream, the compiled function, no hooks, then
    each parameter in signature order (keyword constexprs and defaults included); a new key
    (alignment, an int turning 1) goes through Triton's path first."""
    monkeypatch.setattr(fast_launch, "_protocol_ok", lambda: True)
    monkeypatch.setattr(fast_launch, "_on_cuda", lambda args: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 77, raising=False)
    monkeypatch.setitem(fast_launch._state, "ok", True)
    try:
        k, t = _FakeKernel(), torch.empty(64)
        for _ in range(2):
            launch(k, (5,), t, 32, 0.5, BLOCK=64)
        assert len(k.through_triton) == 1
        assert k.direct == [(5, 1, 1, 77, "fn", "meta", None, None, None, t, 32, 0.5, 64, 3)]
        launch(k, (5, 2), t[1:], 32, 0.5, BLOCK=64)        # misaligned: a new key
        launch(k, (5,), t, 1, 0.5, BLOCK=64)               # n == 1: Triton makes it a constexpr
        launch(k, (5,), t, 32, 0.5, BLOCK=128)             # another constexpr value
        assert len(k.through_triton) == 4 and len(k.direct) == 1
        launch(k, (5,), t, n=32, a=0.5, BLOCK=64)          # runtime values by keyword: never cached
        launch(k, (5,), t, n=32, a=0.5, BLOCK=64)
        assert len(k.through_triton) == 6 and len(k.direct) == 1
    finally:
        fast_launch._sites.pop(k, None)


@triton.jit
def _axpy(x_ptr, out_ptr, n, a, stride, BLOCK: tl.constexpr, SHIFT: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(out_ptr + i, tl.load(x_ptr + i * stride, mask=m) * a + SHIFT, mask=m)


def test_launch_gives_the_kernel_result_on_every_device(direct):
    """Interpreter or GPU: results equal torch's, call after call, as n, strides, alignment and
    constexprs change (a stale cached kernel would read a wrong stride or shift)."""
    x = torch.randn(300, device=DEVICE)
    for n, stride, off, shift in [(257, 1, 0, 0), (257, 1, 0, 0), (16, 1, 0, 0), (1, 1, 0, 0), (100, 2, 0, 1),
                                  (100, 1, 1, 1), (32, 1, 0, 1), (33, 1, 0, 0)]:
        src = x[off:]
        out = torch.empty(n, device=DEVICE)
        launch(_axpy, (triton.cdiv(n, 64),), src, out, n, 0.5, stride, BLOCK=64, SHIFT=shift)
        torch.testing.assert_close(out, src[:n * stride:stride] * 0.5 + shift)


@pytest.fixture
def direct():
    before = fast_launch.enabled()
    fast_launch.set_enabled(True)
    yield
    fast_launch.set_enabled(before)


@cuda_only
def test_repeat_launches_go_direct(direct):
    x, out = torch.randn(64, device=DEVICE), torch.empty(64, device=DEVICE)
    for _ in range(2):
        launch(_axpy, (1,), x, out, 64, 2.0, 1, BLOCK=64, SHIFT=0)
    assert fast_launch.enabled() and fast_launch._sites[_axpy].entries


def _layer_grads(x, bases, layout, routing, route_w, grad, k):
    offsets, src, inv = routing
    out, _ = torch.ops.moec.experts_combine(x, src, offsets, inv, route_w, k, bases, layout, "silu", 0.0, 0.0, True)
    return [out] + list(torch.autograd.grad(out, [x, route_w] + bases, grad))


@cuda_only
@pytest.mark.parametrize("T", [1, 16, 300])
def test_layer_bit_exact_with_and_without(T, direct):
    E, k, H, F = 8, 2, 256, 128
    bases, layout = _layer(E, H, F, torch.bfloat16, True, True, "interleaved", pad=8)
    for w in bases:
        w.requires_grad_()
    for pad in (3, 8):            # the tokens' rows aligned or not: a key change between steps
        x = padded((T, H), torch.bfloat16, pad=pad).requires_grad_()
        route_w = torch.rand(T, k, device=DEVICE, requires_grad=True)
        routing = _routing(T, E, k, "uniform")
        grad = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
        got = []
        for on in (False, True, True):
            fast_launch.set_enabled(on)
            try:
                got.append(_layer_grads(x, bases, layout, routing, route_w, grad, k))
            finally:
                fast_launch.set_enabled(True)
        for a, b in zip(got[0], got[2]):
            assert torch.equal(a, b)
