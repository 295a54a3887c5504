"""The README's promises: every option documented, the three first-screen commands present."""
import dataclasses
import pathlib

from moec.config import Config

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()


def test_every_option_documented():
    missing = [f.name for f in dataclasses.fields(Config) if f"| `{f.name}` |" not in README]
    assert not missing, f"options missing from the README's table: {missing}"


def test_first_screen_commands():
    first_screen = "\n".join(README.splitlines()[:15])
    for command in ('pip install -e ".[triton,test]"', "python -m moec.demo",
                    "TRITON_INTERPRET=1 python -m pytest -q tests"):
        assert command in first_screen
