"""What moec did in this process, for `moec.explain` to read: a list of compile records.

Recording is cheap (references to frozen reports) and bounded; explain clears it before it runs.
"""
from dataclasses import dataclass

_RECORDS = []
_MAX = 256


@dataclass(frozen=True)
class CompileRecord:
    graph_index: int
    reports: dict


def record(gm, reports):
    if len(_RECORDS) >= _MAX:
        _RECORDS.pop(0)
    _RECORDS.append(CompileRecord(len(_RECORDS), dict(reports)))


def take() -> list:
    out = list(_RECORDS)
    _RECORDS.clear()
    return out


def clear():
    _RECORDS.clear()
