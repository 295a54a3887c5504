"""moec: a torch.compile backend that finds Mixture-of-Experts layers and rewrites them into
fused kernels. Use it as `torch.compile(model, backend="moec")`."""
from .backend import moec_backend
from .config import Config
from .errors import MoecError
from .explain import Explanation, explain

__all__ = ["Config", "Explanation", "MoecError", "explain", "moec_backend"]
