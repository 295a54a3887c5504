"""The installed torch's (major, minor), for the few places where moec or its tests must do what
that release supports (each use says why)."""
import torch

TORCH_RELEASE = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
