"""Every op of moec.codegen runs on CUDA tensors as its function itself, registered with the
dispatcher (codegen/dispatch.py: custom_op's wrapper cost 20-25 us a call), while CPU tensors keep
custom_op's checked path. Checked on the dispatcher's tables, and the direct path itself run on the
CPU: the same functions registered for the CPU key for one test (what CUDA tensors go through),
the fused op's forward and every gradient against float64 through autograd, and routing. The
autograd kernel's shortcut (no gradient wanted: the function called straight away) the same way,
with the CPU key counted as direct: taken under no_grad, never with a gradient or fake tensors."""
import contextlib
import importlib
import pkgutil

import pytest
import torch
from torch import _C
from torch._library.custom_ops import CustomOpDef
from torch._subclasses.fake_tensor import FakeTensorMode

import moec.codegen
from moec.codegen import dispatch, reference

import test_experts_combine
from kernel_helpers import DEVICE, TOL, rel_err
import test_route_plan


def _codegen_ops():
    ops = {}
    for info in pkgutil.iter_modules(moec.codegen.__path__):
        mod = importlib.import_module(f"moec.codegen.{info.name}")
        ops.update({f"{v._namespace}::{v._name}": v for v in vars(mod).values() if isinstance(v, CustomOpDef)})
    return ops


def test_every_codegen_op_has_a_direct_cuda_kernel():
    ops = _codegen_ops()
    assert {"moec::route_plan", "moec::experts_combine", "moec::experts_combine_backward", "moec::route_backward"} \
        <= set(ops), sorted(ops)
    for name in ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name     # custom_op's wrapper


def test_cpu_calls_keep_custom_ops_aliasing_check():
    """custom_op's wrapper refuses an output that aliases an input: still there on the CPU path."""
    lib = torch.library.Library("moec_test_dispatch", "FRAGMENT")     # noqa: F841 (keeps the namespace)

    @torch.library.custom_op("moec_test_dispatch::echo", mutates_args=())
    def echo(x: torch.Tensor) -> torch.Tensor:
        return x

    try:
        echo(torch.randn(3))
    except RuntimeError as e:
        assert "alias" in str(e)
    else:
        raise AssertionError("custom_op's aliasing check did not run")


@contextlib.contextmanager
def _direct_on_cpu():
    """The CPU key served as dispatch.py serves CUDA, for the block."""
    lib = torch.library.Library("moec", "IMPL")
    try:
        for name, op in _codegen_ops().items():
            lib.impl(name.split("::")[1], torch.compiler.disable(op._init_fn), "CPU")    # as dispatch.py does
        assert torch._C._dispatch_has_kernel_for_dispatch_key("moec::experts_combine", "CPU")
        yield
    finally:
        lib._destroy()
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("moec::experts_combine", "CPU")


def test_the_direct_path_computes_what_custom_op_does(monkeypatch):
    with _direct_on_cpu():
        test_experts_combine._run(13, 4, 2, 48, 40, torch.float32, "silu", bias=True)
        test_experts_combine._run(9, 5, 2, 24, 40, torch.bfloat16, "swiglu_oai", bias=True, how="sparse")
        for sort in (False, True):
            test_route_plan.test_route_plan_equals_route_then_plan(monkeypatch, 7, 8, 2, "softmax", 1, 1, False, None,
                                                                   sort)


def _keys(*names):
    out = _C.DispatchKeySet(getattr(_C.DispatchKey, names[0]))
    for n in names[1:]:
        out = out | _C.DispatchKeySet(getattr(_C.DispatchKey, n))
    return out


def test_only_a_call_headed_for_a_direct_kernel_takes_the_shortcut():
    assert dispatch.goes_direct(_keys("CUDA", "AutogradCUDA", "ADInplaceOrView"))
    assert not dispatch.goes_direct(_keys("CPU", "AutogradCPU", "ADInplaceOrView"))     # custom_op's CPU kernel
    for between in ("Python", "Functionalize", "Meta"):      # a fake tensor, functionalization, a meta tensor
        assert not dispatch.goes_direct(_keys("CUDA", "AutogradCUDA", between)), between


@pytest.fixture
def counted_slow_kernels(monkeypatch):
    """The CPU key direct (the functions registered for it, counted as dispatch.py counts CUDA);
    yields the op names custom_op's autograd kernel was entered for."""
    entered = []
    for name, slow in list(dispatch._slow.items()):
        def counting(keyset, *args, _name=name, _slow=slow):
            entered.append(_name)
            return _slow(keyset, *args)
        monkeypatch.setitem(dispatch._slow, name, counting)
    monkeypatch.setattr(dispatch, "_DIRECT", {_C.DispatchKey.CUDA, _C.DispatchKey.CPU})
    with _direct_on_cpu():
        yield entered


def _layer(T=9, E=5, k=2, H=24, F=16):
    """On the tests' device: on a GPU the CUDA key's own shortcut is what runs."""
    x = torch.randn(T, H, device=DEVICE)
    logits = torch.randn(T, E, device=DEVICE)
    bases = [torch.randn(E, 2 * F, H, device=DEVICE) * H ** -0.5, torch.randn(E, H, F, device=DEVICE) * F ** -0.5]
    layout = f"w_up=0[{F}:{2 * F}:1] w_gate=0[0:{F}:1] w_down=1"
    return x, logits, bases, layout, k


def _forward(x, logits, bases, layout, k):
    w, _, offsets, src, inv = torch.ops.moec.route_plan(logits, None, k, "softmax", True, 1.0, 1, 1, logits.shape[1])
    out, _ = torch.ops.moec.experts_combine(x, src, offsets, inv, w, k, bases, layout, "silu", 0.0, 0.0, False)
    return out


def _reference(x, logits, bases, layout, k):
    d = lambda t: t.cpu() if t.dtype == torch.float64 else t.detach().cpu().double()
    w, ids = reference.route(d(logits), None, k, "softmax", True, 1.0, 1, 1)
    offsets, src, inv = reference.plan(ids, logits.shape[1])
    out, _ = reference.experts_combine(d(x), src, offsets, inv, w, k, [d(b) for b in bases], layout, "silu", 0.0,
                                       0.0, False)
    return out


def test_no_grad_calls_take_the_shortcut(counted_slow_kernels):
    layer = _layer()
    with torch.no_grad():
        out = _forward(*layer)
    assert counted_slow_kernels == []
    assert rel_err(out.cpu(), _reference(*layer)) < TOL[torch.float32]
    x, logits, bases, layout, k = layer      # grad mode on, but nothing to differentiate: also direct
    _forward(x, logits, bases, layout, k)
    assert counted_slow_kernels == []


def test_calls_that_need_a_gradient_or_trace_keep_custom_ops_kernel(counted_slow_kernels):
    x, logits, bases, layout, k = _layer()
    x.requires_grad_()
    out = _forward(x, logits, bases, layout, k)
    assert counted_slow_kernels == ["experts_combine"]     # x needs a gradient; route_plan (logits) none
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, [x], g)
    xd = x.detach().cpu().double().requires_grad_()
    (want,) = torch.autograd.grad(_reference(xd, logits, bases, layout, k), [xd], g.cpu().double())
    assert rel_err(dx.cpu(), want) < TOL[torch.float32]
    counted_slow_kernels.clear()
    mode = FakeTensorMode()
    fake = [mode.from_tensor(t) for t in [x.detach(), logits] + bases]
    with mode, torch.no_grad():
        out = _forward(fake[0], fake[1], fake[2:], layout, k)
    assert counted_slow_kernels == ["route_plan", "experts_combine"] and out.shape == x.shape

