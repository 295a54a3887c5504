"""Read-only helpers over Dynamo FX graphs, shared by the passes.

Dynamo graphs mix `call_function` (torch.topk) and `call_method` (x.topk) forms and keep
in-place mutation (`x /= s`, `buf[idx] = v`, `out.index_add_(...)`) as ordinary calls. The
helpers here give each node a canonical op name and a dependency relation that includes
mutation: a node that reads a tensor depends on every earlier mutation of that tensor's
storage, so slices and dominators computed on it respect what the code really computes.
"""
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.distributed.tensor import Replicate

# Ops that return a view of their first argument: a mutation through the view is a mutation of
# the base. Advanced indexing (getitem with a tensor index) copies, and is handled in `_is_view`.
_VIEW_OPS = {
    "view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "narrow",
    "select", "chunk", "split", "unflatten", "flatten", "t", "as_strided", "view_as", "T",
    "contiguous", "detach", "unbind",
}
_INPLACE_FUNCTIONS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.ipow, operator.iand, operator.ior,
}

# Name of the function moec's frontend traces HF's eager experts loop through (see
# moec/capture.py); it shows in the stack trace of every node traced that way.
TRACED_AS_MARKER = "moec_hf_eager_experts_traced_as_"


# torch 2.11's Dynamo records some Python operators on tensors as their method (`ids == e` as call_method
# `__eq__`) where 2.13 records `operator.eq`: both are the operator's name. Reflected forms (`__rsub__`)
# keep theirs, as their operands are swapped.
_DUNDER = {f"__{n}__": n for n in ("eq", "ne", "lt", "le", "gt", "ge", "add", "sub", "mul", "truediv", "floordiv",
                                    "mod", "pow", "neg", "invert", "getitem", "matmul", "iadd", "isub", "imul",
                                    "itruediv")}
_DUNDER.update({"__and__": "and_", "__or__": "or_", "__xor__": "xor"})


def op_name(node: fx.Node) -> str:
    """`topk` for torch.topk, Tensor.topk and aten.topk alike; '' for placeholders and outputs."""
    if node.op == "call_method":
        return _DUNDER.get(node.target, node.target)
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return target._schema.name.split("::")[-1]
        if isinstance(target, torch._ops.OpOverloadPacket):
            return target._qualified_op_name.split("::")[-1]
        return getattr(target, "__name__", str(target))
    if node.op == "call_module":
        return str(node.target)
    return ""


def value(node) -> object:
    """The example value Dynamo recorded for a node (a FakeTensor, SymInt, tuple...), or None."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def hint(v):
    """The concrete value behind a SymInt/SymFloat (the example Dynamo traced with), else v."""
    if isinstance(v, (torch.SymInt, torch.SymFloat)):
        return v.node.hint
    return v


def is_int(arg) -> bool:
    """An integer argument: a Python int, or a node whose value is one (a SymInt included); not a bool."""
    if isinstance(arg, int) and not isinstance(arg, bool):
        return True
    v = value(arg) if hasattr(arg, "meta") else None
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def static(v):
    """A layer's width as a Python int. Where Dynamo made it symbolic (automatic dynamic: the same
    code compiled again for a layer of other widths), it is specialised to the value traced with,
    which adds Dynamo's guard on it: the rewrite passes the experts' count to moec's ops as a
    constant and the region is proven at one width, so a graph with another width compiles again.
    The token count stays symbolic."""
    if isinstance(v, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import guard_int
        return guard_int(v)
    return v


def shape(node) -> tuple | None:
    v = value(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def is_tensor(node) -> bool:
    return isinstance(value(node), torch.Tensor)


def _is_view(node: fx.Node) -> bool:
    name = op_name(node)
    if name == "getitem":
        base = node.args[0]
        if isinstance(base, fx.Node) and not is_tensor(base):
            # an output of a multi-output op: a view only if the op returns views (chunk, split);
            # topk's values and indices are two fresh tensors
            return op_name(base) in _VIEW_OPS
        index = node.args[1]
        items = index if isinstance(index, tuple) else (index,)
        # getitem on a tuple result (topk, chunk) or basic indexing is a view; a tensor index copies.
        return not any(isinstance(i, fx.Node) and is_tensor(i) for i in items)
    return name in _VIEW_OPS


def _mutated_arg(node: fx.Node) -> fx.Node | None:
    """The tensor a node writes into, if it mutates one."""
    if node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
        return node.args[0]
    if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
        return node.args[0]
    out = node.kwargs.get("out") if node.op == "call_function" else None
    return out if isinstance(out, fx.Node) else None


@dataclass(frozen=True)
class DepGraph:
    """Dependencies of every node, mutation edges included. `users` is the inverse of `deps`."""
    order: dict      # node -> position
    deps: dict       # node -> frozenset of nodes it reads (data inputs and earlier mutations)
    users: dict      # node -> set of nodes that depend on it
    mutations: frozenset
    root: dict       # node -> the node whose storage it is (itself unless a view or a mutation)

    @classmethod
    def build(cls, graph: fx.Graph) -> "DepGraph":
        order, deps, users = {}, {}, {}
        root, writes, mutations = {}, {}, set()
        for i, node in enumerate(graph.nodes):
            order[node] = i
            inputs = set(node.all_input_nodes)
            root[node] = root.get(node.args[0], node.args[0]) if (
                node.args and isinstance(node.args[0], fx.Node) and _is_view(node)) else node
            for a in list(inputs):
                # The latest write stands for all earlier ones: each write depends on the last.
                latest = writes.get(root[a])
                if latest:
                    inputs.add(latest[-1])
            target = _mutated_arg(node)
            if isinstance(target, fx.Node):
                writes.setdefault(root[target], []).append(node)
                mutations.add(node)
                root[node] = root[target]
            inputs.discard(node)
            deps[node] = frozenset(inputs)
            users[node] = set()
            for a in inputs:
                users[a].add(node)
        return cls(order, deps, users, frozenset(mutations), root)

    def forward_slice(self, seeds, stop=()) -> set:
        """Every node reachable from `seeds` along users, seeds included, not entering `stop`."""
        seen, todo = set(), list(seeds)
        while todo:
            n = todo.pop()
            if n in seen or n in stop or n.op == "output":
                continue
            seen.add(n)
            todo.extend(self.users[n])
        return seen

    def backward_slice(self, seeds, stop=()) -> set:
        seen, todo = set(), list(seeds)
        while todo:
            n = todo.pop()
            if n in seen or n in stop:
                continue
            seen.add(n)
            todo.extend(self.deps[n])
        return seen

    def sorted(self, nodes) -> list:
        return sorted(nodes, key=self.order.__getitem__)


def source_location(node: fx.Node) -> str:
    """file:line of the user code that produced a node, from Dynamo's stack trace."""
    trace = node.meta.get("stack_trace") or ""
    lines = [l.strip() for l in trace.splitlines() if l.strip().startswith("File ")]
    if not lines:
        return ""
    last = lines[-1]  # 'File "path", line N, in fn'
    try:
        path = last.split('"')[1]
        line = last.split("line ")[1].split(",")[0]
        return f"{path}:{line}"
    except IndexError:
        return last


def module_path(node: fx.Node) -> str:
    """Qualified module name of the innermost module that ran this node ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return _clean_source_name(path)


def common_module(paths) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    prefix = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        prefix.append(group[0])
    return ".".join(prefix)


def _clean_source_name(path: str) -> str:
    # Dynamo names modules by their source: L['self'].layers[0].mlp -> layers.0.mlp
    p = path.replace("L['self']", "").replace("L['model']", "")
    p = p.replace(".__dict__['_modules']['", "._modules['")   # a wrapper's __getattr__ (PEFT's PeftModel)
    p = p.replace("._modules['", ".").replace("']", "").replace("[", ".").replace("]", "")
    p = p.replace("L['", "").replace("'", "")
    return p.strip(".")


def gathered_dtensor(node) -> fx.Node | None:
    """The DTensor graph input `node` all-gathers whole, as modules sharded by
    `moec.runtime.shard_experts` read their weights, else None. Two spellings: `dt.full_tensor(...)`
    (call_method), and `dt.redistribute(mesh, [Replicate()]).to_local(...)`, which Dynamo records
    as methods (torch 2.13) or as `prim_*` functions it wraps around the placements (2.11)."""
    chain = gather_chain(node)
    return chain[-1].args[0] if chain else None


def gather_chain(node) -> list:
    """The nodes of the gather `node` ends (itself first, up to the DTensor input's reader), or []."""
    if not isinstance(node, fx.Node) or node.op not in ("call_method", "call_function") or not node.args:
        return []
    chain, name = [node], op_name(node)
    if name in ("to_local", "prim_to_local"):
        src = node.args[0]
        dt = value(src)
        if not (isinstance(src, fx.Node) and src.op in ("call_method", "call_function") and src.args
                and op_name(src) in ("redistribute", "prim_redistribute")
                and all(isinstance(p, Replicate) for p in getattr(dt, "placements", [None]))):
            return []
        chain.append(src)
    elif name != "full_tensor":
        return []
    source = chain[-1].args[0]
    return chain if isinstance(source, fx.Node) and source.op == "placeholder" else []


class Emitter:
    """Creates nodes with the example values and provenance later passes and dumps rely on."""

    def __init__(self, graph, anchor, fake_mode, pass_name):
        self.graph, self.fake_mode, self.pass_name = graph, fake_mode, pass_name
        self.meta = {k: anchor.meta[k] for k in ("nn_module_stack", "stack_trace", "source_fn_stack")
                     if k in anchor.meta}

    def _node(self, kind, target, args):
        node = self.graph.create_node(kind, target, args)
        node.meta.update(self.meta)
        node.meta["moec_pass"] = self.pass_name
        if self.fake_mode is not None:
            fake_args = fx.node.map_arg(args, value)    # into lists too (moec.experts' bases)
            # Dynamo's own fake mode, not the backend's copy of it in the TracingContext: the
            # graph's example values all belong to Dynamo's.
            with torch._guards.tracing(torch._guards.TracingContext(self.fake_mode)), self.fake_mode:
                if kind == "call_method":
                    example = getattr(fake_args[0], target)(*fake_args[1:])
                else:
                    example = target(*fake_args)
            node.meta["example_value"] = example
        return node

    def op(self, target, *args):
        return self._node("call_function", target, args)

    def method(self, name, *args):
        return self._node("call_method", name, args)

    def item(self, node, i):
        return self._node("call_function", operator.getitem, (node, i))
