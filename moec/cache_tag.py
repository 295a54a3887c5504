"""Make Inductor's caches tell moec versions apart.

Inductor's FX graph cache and AOT autograd's cache key a compiled graph on the graph Dynamo
captured, torch's version and Inductor's config — not on the Python code behind moec's ops. The
backward graph comes from moec's autograd formulas, so after moec changes (an op gains an
argument, a formula changes) the caches would replay code built against the old moec: wrong
calls at best. Both keys include the uuid of any `post_grad_custom_pre_pass`, so moec installs a
pass that does nothing but carry a hash of moec's own sources and the kernel switches that shape
its ops' outputs (and calls the user's pass, if one was set, combining both uuids).
"""
import functools
import hashlib
import pathlib

from torch._inductor.custom_graph_pass import CustomGraphPass

_CONFIG_KEY = "post_grad_custom_pre_pass"


class MoecSourceTag(CustomGraphPass):
    def __init__(self, user_pass=None):
        self.user_pass = user_pass

    def __call__(self, graph):
        if self.user_pass is not None:
            self.user_pass(graph)

    def uuid(self):
        ours = (source_hash(), switches())
        if self.user_pass is None:
            return ours
        theirs = self.user_pass.uuid() if hasattr(self.user_pass, "uuid") else None
        return None if theirs is None else (ours, theirs)   # None: Inductor skips caching


def switches() -> str:
    """The kernel switches that change what moec's ops return (their fakes, so the traced graph): read
    at each compile, as a benchmark may flip them in one process. Without it, a graph compiled with
    MOEC_GROUPED_MM_WGRAD=0 was replayed from the cache with it on (the rows op's du is (S, 2F) there:
    Inductor's size assert failed, H200, 2026-12-06)."""
    from moec.codegen import grouped_mm_wgrad, router_plan_op
    return f"{grouped_mm_wgrad.cache_key()},{router_plan_op.cache_key()}"


def tagged(patches: dict) -> dict:
    """Inductor config patches with moec's source tag added."""
    import torch._inductor.config as inductor_config
    user = patches.get(_CONFIG_KEY, getattr(inductor_config, _CONFIG_KEY))
    if isinstance(user, MoecSourceTag):
        return patches
    return {**patches, _CONFIG_KEY: MoecSourceTag(user)}


@functools.cache
def source_hash() -> str:
    import moec
    import moec.codegen
    import moec.passes
    import moec.runtime
    digest = hashlib.sha256()
    for package in (moec, moec.passes, moec.codegen, moec.runtime):
        root = pathlib.Path(package.__file__).parent
        for path in sorted(root.glob("*.py")) + sorted(root.glob("tuned/*.json")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
