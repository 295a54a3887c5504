"""`pip install .` (not only -e): the wheel holds moec.passes/codegen/runtime under their
installed names, the shipped tuning tables, and the torch_dynamo_backends entry point."""
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).parents[1]


def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("moec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("moec/backend.py", "moec/passes/detect.py", "moec/codegen/ops.py", "moec/runtime/mesh.py"):
        assert module in names
    assert any(n.startswith("moec/codegen/tuned/") and n.endswith(".json") for n in names)
    [entry_points] = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[torch_dynamo_backends]" in text and "moec = moec.backend:moec_backend" in text
