"""Compile moec's Triton kernels for a GPU architecture on a machine without one.

The interpreter (TRITON_INTERPRET=1, how CI runs the kernels) accepts code the GPU compiler
rejects, and says nothing of registers, spills or shared memory. Here a kernel launch is recorded
instead of run (`recording()`), and `compile_launch` builds what Triton would for that launch on
the named architecture: the signature and 16-divisibility it specialises on, the constexprs and
options, through Triton's own compiler and its bundled ptxas; `usage` reads the cubin's
registers, local (spill) bytes and shared memory with the bundled cuobjdump.
"""
import collections
import contextlib
import importlib
import os
import pkgutil
import re
import subprocess
import tempfile

import torch

_OPTIONS = ("num_warps", "num_stages", "launch_pdl", "maxnreg")      # launch keywords that are compile options
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
           torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def kernel_modules():
    """The modules whose kernels launch through their `launch` name (fast_launch.launch): every
    *_kernel module of this package that imports it (found, so a new kernel cannot be missed)."""
    from . import fast_launch
    package = importlib.import_module(__package__)
    mods = [importlib.import_module(f"{__package__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)
            if m.name.endswith("_kernel")]
    return tuple(m for m in mods if getattr(m, "launch", None) is fast_launch.launch)


@contextlib.contextmanager
def recording():
    """Within: every moec kernel launch is appended to the yielded list as (kernel, args, kwargs)
    and not run (outputs stay uninitialised), and the products' precision is the GPU's (CPU
    operands would otherwise take the interpreter's float32 products)."""
    launches, saved = [], []

    def launch(kernel, grid, *args, **kwargs):
        launches.append((kernel, args, kwargs))
    for mod in kernel_modules():
        saved.append((mod, mod.launch, getattr(mod, "ieee", None)))
        mod.launch = launch
        if hasattr(mod, "ieee"):
            mod.ieee = lambda t: t.dtype.itemsize == 4
    try:
        yield launches
    finally:
        for mod, real, ieee in saved:
            mod.launch = real
            if ieee is not None:
                mod.ieee = ieee


def _signature(kernel, args, kwargs):
    names = kernel.arg_names
    values = dict(zip(names, args))
    values.update({n: v for n, v in kwargs.items() if n in names})
    sig, consts, attrs = {}, {}, {}
    for i, (name, p) in enumerate(zip(names, kernel.params)):
        v = values.get(name, p.default)
        if p.is_constexpr or v is None or (type(v) is int and v == 1):    # Triton folds ints == 1 too
            sig[name], consts[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _DTYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif type(v) is bool:
            sig[name] = "i1"
        elif type(v) is int:
            sig[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif type(v) is float:
            sig[name] = "fp32"
        elif type(v).__name__ == "TensorDescriptor":
            sig[name] = f"tensordesc<{_DTYPES[v.base.dtype]}{list(v.block_shape)}>"
        else:
            raise TypeError(f"{kernel.__name__}: argument {name} of type {type(v).__name__}")
    return sig, consts, attrs


def _options(kwargs):
    return {k: kwargs[k] for k in _OPTIONS if k in kwargs}


def launch_id(kernel, args, kwargs):
    """What makes two launches one compiled kernel (signature, constexprs, options), hashable."""
    sig, consts, attrs = _signature(kernel, args, kwargs)
    return kernel.__name__, repr(sig), repr(sorted(consts.items())), repr(sorted(attrs.items())), \
        repr(_options(kwargs))


def compile_launch(kernel, args, kwargs, arch=90):
    """Triton's CompiledKernel for this launch on sm_<arch> (raises what the compiler raises)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, consts, attrs = _signature(kernel, args, kwargs)
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=_options(kwargs))


def tools_dir():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


# SASS opcodes that say which path a kernel's GEMM and memory traffic took: HGMMA (wgmma, Hopper's
# tensor-core path) or HMMA (the older mma.sync, a quarter of the rate); UTMALDG/UTMASTG (TMA),
# LDGSTS (cp.async), LDG/STG (through registers), LDL/STL (local memory: spills)
SASS_OPS = ("HGMMA", "HMMA", "UTMALDG", "UTMASTG", "LDGSTS", "LDG", "STG", "LDL", "STL")


def _cuobjdump(compiled, flag):
    """What the bundled cuobjdump prints for the compiled kernel's cubin with `flag`."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([os.path.join(tools_dir(), "cuobjdump"), flag, path], capture_output=True,
                              text=True).stdout


def sass_mix(compiled):
    """{opcode: static count in the cubin's SASS} for SASS_OPS."""
    ops = collections.Counter(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)",
                                         _cuobjdump(compiled, "-sass"), re.M))
    return {op: ops[op] for op in SASS_OPS}


def usage(compiled):
    """(registers, local bytes per thread (spills, stack), shared bytes) of a compiled kernel."""
    out = _cuobjdump(compiled, "--dump-resource-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if not found:
        raise RuntimeError(f"cuobjdump said: {out[-500:]}")
    return int(found.group(1)), int(found.group(2)) + int(found.group(3)), compiled.metadata.shared
