"""On/off kernel switches read from the environment once, at import: a value other than 0 or 1
is an error naming the variable, never a silent default (a typo in a benchmark's environment
would otherwise time the other setting)."""
import os

from .errors import MoecError


def switch(name: str, default: bool) -> bool:
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise MoecError(f"{name}={value!r}: expected 1 (on), 0 (off), or unset ({'on' if default else 'off'})")
    return default if value == "" else value == "1"
