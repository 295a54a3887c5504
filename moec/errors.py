"""moec's one error family. Every message names what is wrong, where, and what to do."""
from moec.codegen.errors import MoecError, MoecKernelError  # noqa: F401  (codegen is the lowest layer)
