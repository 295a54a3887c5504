"""The kernel-level environment switches (README, Options): a bad value is a clear error naming
the variable, read when moec.codegen is imported (in a child process here)."""
import os
import subprocess
import sys


def _import_with(**env):
    return subprocess.run([sys.executable, "-c", "import moec.codegen.wgrad_kernel as w; print(w.MAX_COPY_BYTES)"],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


def test_wgrad_copy_mib():
    assert _import_with(MOEC_WGRAD_COPY_MIB="48").stdout.strip() == str(48 << 20)
    for bad in ("0", "-3", "4.5", "lots"):
        run = _import_with(MOEC_WGRAD_COPY_MIB=bad)
        assert run.returncode != 0 and f"MOEC_WGRAD_COPY_MIB={bad!r}" in run.stderr, run.stderr[-500:]
