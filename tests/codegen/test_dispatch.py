"""Every op of moec.codegen runs on CUDA tensors as its function itself, registered with the
dispatcher (codegen/dispatch.py: custom_op's wrapper cost 20-25 us a call), while CPU tensors keep
custom_op's checked path. Checked on the dispatcher's tables, and the direct path itself run on the
CPU: the same functions registered for the CPU key for one test (what CUDA tensors go through),
the fused op's forward and every gradient against float64 through autograd, and routing."""
import importlib
import pkgutil

import torch
from torch._library.custom_ops import CustomOpDef

import moec.codegen

import test_experts_combine
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


def test_the_direct_path_computes_what_custom_op_does():
    lib = torch.library.Library("moec", "IMPL")
    try:
        for name, op in _codegen_ops().items():
            lib.impl(name.split("::")[1], torch.compiler.disable(op._init_fn), "CPU")    # as dispatch.py does
        assert torch._C._dispatch_has_kernel_for_dispatch_key("moec::experts_combine", "CPU")
        test_experts_combine._run(13, 4, 2, 48, 40, torch.float32, "silu", bias=True)
        test_experts_combine._run(9, 5, 2, 24, 40, torch.bfloat16, "swiglu_oai", bias=True, how="sparse")
        test_route_plan.test_route_plan_equals_route_then_plan(7, 8, 2, "softmax", 1, 1, False, None)
    finally:
        lib._destroy()
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("moec::experts_combine", "CPU")
