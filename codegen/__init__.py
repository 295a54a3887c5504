"""moec's kernels behind `torch.ops.moec.*`. Importing this package registers the ops."""
from . import capacity, decode_fused, experts_combine_op, ops, route_plan_op, router_plan_op  # noqa: F401
from .errors import MoecError, MoecKernelError

__all__ = ["MoecError", "MoecKernelError", "ops"]
