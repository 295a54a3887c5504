"""`launch(kernel, grid, *args, **kwargs)`: `kernel[grid](*args, **kwargs)` with less host work
on a repeat call.

Why: Triton's `JITFunction.run` specialises every argument, builds a cache key from them and its
options, and looks up hooks on every launch. Our expert kernels take 60-110 arguments, and on an
H100 host that was 30-65 us per launch (2026-12-05, triton 3.6: experts_combine's three launches
194 us of its 334 us host time at Qwen3 widths), enough to make a 4096-token layer host-bound.

How: the first launch for a key goes through Triton (it compiles or finds the kernel and returns
it); later launches with the same key call the compiled kernel's launcher directly, with the
arguments in signature order, as `JITFunction.run` does. The key is a superset of what Triton
specialises on, so two calls with one key always get one compiled kernel:
  tensor -> dtype, 16-byte alignment | int -> == 1, % 16, 32/64-bit range | bool, float -> type |
  None | TensorDescriptor -> dtype, block shape, padding | constexpr passed by position -> value |
  keyword arguments (constexprs, num_warps, ...) -> their values.
Anything else (another argument type, a keyword naming a runtime parameter, launch hooks set by
a profiler, the interpreter, a Triton whose `run` launches another way) takes Triton's own path.
"""
import inspect

import torch

from .env import switch

_UNSUPPORTED = object()


def _protocol_ok() -> bool:
    """True where JITFunction.run launches the way `launch` repeats it (triton 3.4 through 3.9 do)."""
    try:
        import triton.knobs  # noqa: F401  (3.4+: where the launch hooks live)
        from triton.runtime.jit import JITFunction
        src = inspect.getsource(JITFunction.run)
    except Exception:
        return False
    return ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata,"
            in src and "*bound_args.values())" in src)


# On by default (MOEC_FAST_LAUNCH=0 turns it off): on an H100 (2026-12-05, triton 3.6) the whole
# layer bit-exact with and without it (tests/codegen/test_fast_launch.py), the kernel suite passing
# through it (MOEC_TEST_FAST_LAUNCH=1), host time per call halved (benchmarks/op_host_time.py:
# route_plan 235 -> 114 us, experts_combine 544 -> 268 us).
_state = {"ok": switch("MOEC_FAST_LAUNCH", True) and _protocol_ok()}


def enabled() -> bool:
    return _state["ok"]


def set_enabled(on: bool) -> None:
    """On: repeat launches go direct where this Triton launches as `_protocol_ok` expects.
    Off: every launch through Triton's own path."""
    _state["ok"] = bool(on) and _protocol_ok()


class _Site:
    """Per kernel: the constexpr positions, parameter names and defaults, and the launches seen."""

    def __init__(self, kernel):
        params = kernel.params
        self.names = [p.name for p in params]
        self.constexpr = frozenset(i for i, p in enumerate(params) if p.is_constexpr)
        self.constexpr_names = frozenset(self.names[i] for i in self.constexpr)
        self.defaults = [p.default if p.has_default else _UNSUPPORTED for p in params]
        self.entries = {}

    def tail(self, n_args, kwargs):
        """Values of the parameters after the positional ones, in signature order, or None where
        a keyword names a runtime parameter (its value would be frozen into the cache)."""
        for name in kwargs:
            if name in self.names and name not in self.constexpr_names:
                return None
        out = []
        for name, default in zip(self.names[n_args:], self.defaults[n_args:]):
            value = kwargs.get(name, default)
            if value is _UNSUPPORTED:
                return None
            out.append(value)
        return tuple(out)


_sites = {}


def hooked(hook) -> bool:
    """Whether a launch hook (a profiler's) wants each launch: triton 3.6+ keeps an empty
    HookChain there when none is set (older ones None)."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return not isinstance(calls, list) or bool(calls)


def arg_key(args, constexpr=frozenset()):
    """A hashable key of the properties Triton specialises positional arguments on (a superset),
    or None for an argument type this module does not know. Built from the arguments' types and,
    per type, a plan of which positions to read (cached): per-argument type dispatch was ~0.25 us
    an argument, 15 us for gate/up's 62 (2-core CPU machine)."""
    if type(constexpr) is not frozenset:
        constexpr = frozenset(constexpr)
    types = tuple(map(type, args))
    plan = _plans.get((types, constexpr))
    if plan is None:
        plan = _plans[(types, constexpr)] = _plan(types, constexpr)
    if plan is _UNSUPPORTED:
        return None
    tensors, ints, consts, descs = plan
    return (types,
            tuple([args[i].dtype for i in tensors]),
            tuple([args[i].data_ptr() % 16 == 0 for i in tensors]),
            tuple([_int_classes.get(args[i]) or _int_class(args[i]) for i in ints]),
            tuple([args[i] for i in consts]),
            tuple([(d.base.dtype, tuple(d.block_shape), getattr(d, "padding", None),
                    getattr(d, "round_f32_to_tf32", None)) for d in [args[i] for i in descs]]))


_plans = {}
_int_classes = {}


def _int_class(v):
    """What Triton specialises an int on (== 1, divisible by 16, 32- or 64-bit), as one small int
    (0 only past 64 bits, recomputed each time); remembered per value (strides and widths repeat
    from launch to launch)."""
    if len(_int_classes) > 4096:
        _int_classes.clear()
    c = _int_classes[v] = (v == 1) + 2 * (v % 16 == 0) + 4 * (-2 ** 31 <= v < 2 ** 31) + 8 * (v < 2 ** 63)
    return c


def _plan(types, constexpr):
    """(tensor, int, constexpr, descriptor positions) for arguments of these types, or
    _UNSUPPORTED. bool, float and None are keyed by their type alone (Triton specialises them on
    nothing else)."""
    tensors, ints, consts, descs = [], [], [], []
    for i, t in enumerate(types):
        if i in constexpr:
            consts.append(i)
        elif issubclass(t, torch.Tensor):
            tensors.append(i)
        elif t is int:
            ints.append(i)
        elif t.__name__ == "TensorDescriptor":
            descs.append(i)
        elif t not in (bool, float, type(None)):
            return _UNSUPPORTED
    return tuple(tensors), tuple(ints), tuple(consts), tuple(descs)


def _on_cuda(args) -> bool:
    return bool(args) and getattr(args[0], "is_cuda", False)


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), directly through the compiled kernel where it was seen before."""
    if not enabled() or not hasattr(kernel, "params") or not _on_cuda(args):
        return kernel[grid](*args, **kwargs)
    from triton import knobs
    site = _sites.get(kernel)
    if site is None:
        site = _sites[kernel] = _Site(kernel)
    key = arg_key(args, site.constexpr)
    if key is None or hooked(knobs.runtime.launch_enter_hook) or hooked(knobs.runtime.launch_exit_hook):
        return kernel[grid](*args, **kwargs)
    device = torch.cuda.current_device()
    try:
        key = (device, key, tuple(kwargs.items()))
        hit = site.entries.get(key)
    except TypeError:     # an unhashable keyword value
        return kernel[grid](*args, **kwargs)
    if hit is None:
        compiled = kernel[grid](*args, **kwargs)
        tail = site.tail(len(args), kwargs)
        if compiled is not None and tail is not None:
            site.entries[key] = (compiled, tail)
        return compiled
    compiled, tail = hit
    g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
    stream = torch._C._cuda_getCurrentRawStream(device)      # what Triton's driver reads
    compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)
    return compiled
