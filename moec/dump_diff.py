"""`python -m moec.dump diff A B`: what differs between two dump folders.

A and B are compile folders (graph_0_0) or dump roots holding several; roots are paired by
folder name. Prints, per compile, the regions whose record changed and the passes whose graph
changed, with a unified diff of each changed graph (first lines only).
"""
import difflib
import json
import os

_MAX_DIFF_LINES = 40


def main(argv) -> int:
    if len(argv) != 3 or argv[0] != "diff":
        print("usage: python -m moec.dump diff A B")
        return 2
    a, b = argv[1], argv[2]
    pairs = _pairs(a, b)
    if not pairs:
        print(f"no dump folders to compare in {a} and {b}")
        return 2
    differs = False
    for name, da, db in pairs:
        lines = compare(da, db)
        differs |= bool(lines)
        print(f"== {name}: " + ("same" if not lines else f"{len(lines)} difference(s)"))
        print("\n".join(lines)) if lines else None
    return 1 if differs else 0


def compare(da, db) -> list:
    """Human-readable differences between two compile folders (empty: the same)."""
    if da is None or db is None:
        return [f"only in {'B' if da is None else 'A'}"]
    out = []
    ra, rb = _regions(da), _regions(db)
    for module in sorted(set(ra) | set(rb)):
        if ra.get(module) != rb.get(module):
            out.append(f"region {module or '<root>'}: {_brief(ra.get(module))} -> {_brief(rb.get(module))}")
    for name in sorted(set(_graphs(da)) | set(_graphs(db))):
        ta, tb = _read(da, name), _read(db, name)
        if ta != tb:
            diff = list(difflib.unified_diff(ta.splitlines(), tb.splitlines(), f"A/{name}", f"B/{name}", lineterm=""))
            out.append(f"pass graph {name} differs:")
            out += ["    " + line for line in diff[:_MAX_DIFF_LINES]]
    return out


def _pairs(a, b):
    if _is_compile(a) or _is_compile(b):
        return [(os.path.basename(a.rstrip("/")), a, b)]
    names = sorted(set(os.listdir(a)) | set(os.listdir(b)))
    pick = lambda root, n: os.path.join(root, n) if os.path.isdir(os.path.join(root, n)) else None
    return [(n, pick(a, n), pick(b, n)) for n in names if _is_compile(os.path.join(a, n)) or _is_compile(os.path.join(b, n))]


def _is_compile(path):
    return os.path.exists(os.path.join(path, "index.md"))


def _regions(d):
    path = os.path.join(d, "regions.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["module"]: r for r in json.load(f)}


def _brief(r):
    if r is None:
        return "absent"
    return f"{r['status']}" + (f" ({r.get('reason')})" if r.get("reason") else f" [{r.get('router', {}).get('kind', '')}]")


def _graphs(d):
    return [n for n in os.listdir(d) if n.endswith(".py")]


def _read(d, name):
    path = os.path.join(d, name)
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()
