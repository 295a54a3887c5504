"""moec: a torch.compile backend that finds Mixture-of-Experts layers and rewrites them into
fused kernels. Use it as `torch.compile(model, backend="moec")`."""
from .backend import moec_backend
from .config import Config
from .errors import MoecError
from .expert_load import LayerLoad, dump_stats, reset_stats, stats
from .explain import Explanation, explain

__all__ = ["Config", "Explanation", "LayerLoad", "MoecError", "dump_stats", "explain", "moec_backend",
           "reset_stats", "stats"]
