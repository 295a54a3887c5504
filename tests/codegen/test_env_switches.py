"""The kernel-level environment switches (README, Options): a bad value is a clear error naming
the variable, read when moec.codegen is imported (in a child process here)."""
import os
import subprocess
import sys


def _import_with(code="import moec.codegen.wgrad_kernel as w; print(w.MAX_COPY_BYTES)", **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                          timeout=300)


def test_wgrad_copy_mib():
    assert _import_with(MOEC_WGRAD_COPY_MIB="48").stdout.strip() == str(48 << 20)
    for bad in ("0", "-3", "4.5", "lots"):
        run = _import_with(MOEC_WGRAD_COPY_MIB=bad)
        assert run.returncode != 0 and f"MOEC_WGRAD_COPY_MIB={bad!r}" in run.stderr, run.stderr[-500:]


def test_pdl():
    code = "import moec.codegen.pdl as p; print(p.max_tokens())"
    env = {k: v for k, v in os.environ.items() if k != "MOEC_PDL"}
    unset = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert unset.stdout.strip() == "1", unset.stderr[-500:]
    assert _import_with(code, MOEC_PDL="1").stdout.strip() == "64"
    assert _import_with(code, MOEC_PDL="0").stdout.strip() == "0"
    for bad in ("2", "yes", "on"):
        run = _import_with(code, MOEC_PDL=bad)
        assert run.returncode != 0 and f"MOEC_PDL={bad!r}" in run.stderr, run.stderr[-500:]


def test_decode_fused():
    code = ("import moec.codegen; from moec.codegen import decode_fused as d; "
            "print(d.max_tokens(), d._state['any_layer'])")
    env = {k: v for k, v in os.environ.items() if k != "MOEC_DECODE_FUSED"}
    unset = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert unset.stdout.strip() == "2 False", unset.stderr[-500:]
    assert _import_with(code, MOEC_DECODE_FUSED="1").stdout.strip() == "16 True"
    assert _import_with(code, MOEC_DECODE_FUSED="0").stdout.strip() == "0 False"
    for bad in ("2", "yes"):
        run = _import_with("import moec.codegen", MOEC_DECODE_FUSED=bad)
        assert run.returncode != 0 and f"MOEC_DECODE_FUSED={bad!r}" in run.stderr, run.stderr[-500:]


def test_on_off_switches():
    for name, module, attr, default in (("MOEC_GROUPED_MM_WGRAD", "grouped_mm_wgrad", "ENABLED", True),
                                        ("MOEC_GROUPED_MM_FORWARD", "grouped_mm_forward", "GATE_UP", False),
                                        ("MOEC_ROUTER_PLAN", "router_plan_op", "ENABLED", False)):
        code = f"import moec.codegen.{module} as m; print(m.{attr})"
        env = {k: v for k, v in os.environ.items() if k != name}
        unset = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert unset.stdout.strip() == str(default), unset.stderr[-500:]
        assert _import_with(code, **{name: "1"}).stdout.strip() == "True"
        assert _import_with(code, **{name: "0"}).stdout.strip() == "False"
        for bad in ("yes", "true", "2"):
            run = _import_with(code, **{name: bad})
            assert run.returncode != 0 and f"{name}={bad!r}" in run.stderr, run.stderr[-500:]
