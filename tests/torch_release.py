"""The installed torch's (major, minor), for expectations that differ by release (each use says why)."""
import torch

TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
