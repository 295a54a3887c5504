"""Which FX nodes compute each token's (or each sequence's) output from its inputs alone, and how to
run such a node on a chunk of them. Read by the pass `chunk_tokens`.

Legend: T tokens (rows of an MoE layer's (T, H) input), U units the chunks are cut in: U = T (token
mode) or U = B, the sequences of a (B, S, H) batch (batch mode: T = B * S); k chunks, U_i units in
chunk i. A value *carries units* when a leading run of its dims multiplies to a multiple of U, m * U
(symbolic sizes: to U itself); its unit dims are the fewest that do (ntok). Its *flat form* is
(m * U, *shape[ntok:]): row-major order is unchanged, so unit u is rows [u m, (u + 1) m) of it, the
u-th of U equal contiguous blocks of the value, and chunk i is the rows of its U_i units.

A node is unit-local when chunk i of its output is a function of chunk i of its inputs that carry
units and of its other inputs whole. Every rule below keeps the blocks (a reshape of any kind keeps
them: it keeps the row-major order), so the claim holds whatever a block means; the MoE layer's
input gives it its meaning, tokens or sequences. In batch mode, ops that mix the tokens of a
sequence (attention, a sum over the sequence) are local too. Rules on shapes propose it:
    pointwise  a torch op tagged pointwise (add, mul, rsqrt, silu, where...) or a dtype/copy
               method (to, type_as, float, contiguous...); inputs broadcast; layer_norm and rms_norm
               over dims that are not unit dims
               (and dropout that is off: p = 0 or not training)
    linear     linear(x, w, b) and matmul/mm(x, w) with w 2-D and b read whole, x's unit dims
               not its last
    batched    matmul/bmm of two operands with the same unit dims among their batch dims
    attention  scaled_dot_product_attention with q, k, v (and a mask, or broadcast over them)
               sharing their unit dims, which are batch dims
    along      reductions, scans, softmax, topk, split/chunk/cat/stack along dims that are not
               unit dims (a reduction with no dim reduces all of them: not local)
    view       view/reshape/flatten/unflatten/squeeze/unsqueeze/expand, the output carrying units;
               transpose/permute of the other dims; basic indexing of the other dims
    route      moec.route routes each token alone
and `verify` runs the node on random inputs, whole and in three uneven chunks, before it is
trusted: a rule wrong for some op fails there, not in a user's model. Everything else (a sum over
all units, an aux loss, in-place writes, symbolic sizes in batch mode) is not local.

    use = rule(node, U)          -> Rule | None, with how each input is read (`ArgUse`)
    ok  = verify(node, use, U)
    y_i = use.emit(graph, node, {input: its chunk-i or whole node}, U_i)
"""
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._python_dispatch import _disable_current_modes

from .graph import _mutated_arg, op_name, value

# dtype and copy methods: elementwise, shape-preserving, not tagged (they are not aten ops)
_UNARY_METHODS = {"to", "type", "float", "double", "half", "bfloat16", "type_as", "clone", "contiguous", "detach"}
_OPERATOR_NAMES = {"truediv": "div", "floordiv": "floor_divide", "invert": "bitwise_not", "and_": "bitwise_and",
                   "or_": "bitwise_or", "xor": "bitwise_xor", "getitem": ""}
# name -> position of the dim argument (also passed as dim=); None: the op acts on its last dim by default
_ALONG = {"sum": 1, "mean": 1, "amax": 1, "amin": 1, "max": 1, "min": 1, "prod": 1, "var": 1, "std": 1,
          "norm": 2, "vector_norm": 2, "logsumexp": 1, "softmax": 1, "log_softmax": 1, "cumsum": 1,
          "cumprod": 1, "argmax": 1, "argmin": 1, "all": 1, "any": 1, "topk": 2, "sort": 1,
          "split": 2, "chunk": 2, "tensor_split": 2, "unbind": 1, "cat": 1, "concat": 1, "stack": 1}
_DIM_DEFAULTS = {"topk": -1, "sort": -1, "split": 0, "chunk": 0, "tensor_split": 0, "unbind": 0, "cat": 0,
                 "concat": 0, "stack": 0}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_PERMUTES = {"transpose", "permute", "swapaxes", "swapdims", "movedim"}
_LINEAR = {"linear", "matmul", "mm"}


def token_dims(shape, U) -> int | None:
    """ntok: the fewest leading dims of `shape` whose product is a multiple of U (at least one),
    else None. Symbolic sizes count where the product is U whatever the symbols (no guard)."""
    p = 1
    static = isinstance(U, int) and all(isinstance(s, int) for s in shape)
    for i, s in enumerate(shape):
        p = p * s
        if static and p > 0 and p % U == 0 or not static and statically_known_true(p == U):
            return i + 1
        if statically_known_true(p == 0) or not static and statically_known_true(p > U):
            return None
    return None


def flat_rows(shape, rest, T):
    """Rows of the flat form (*, *rest) of a value of `shape`: m U when static, else T (token
    mode, m = 1: symbolic sizes are only chunked by tokens)."""
    lead = tuple(shape)[:len(shape) - len(rest)]
    return math.prod(lead) if all(isinstance(s, int) for s in lead) else T


@dataclass(frozen=True)
class ArgUse:
    """How a node reads one input in chunk form: `rows` of its flat form, (T_i, *rest), reached from
    the input by expand(expand) + reshape when broadcast; else the input whole, reshaped to `whole`
    when its leading broadcast dims must go."""
    rows: bool
    rest: tuple = ()
    expand: tuple | None = None
    whole: tuple | None = None


@dataclass(frozen=True)
class Rule:
    kind: str                # pointwise, linear, batched, attention, along, view, permute, index, getitem, route
    args: dict               # input node -> ArgUse
    out_rest: object         # the output's flat rest shape (a tuple per item for a tuple output)
    dims: tuple = ()         # along: the output's dims acted on, shifted into the flat form
    ntok_in: int = 0         # unit dims of the first input (along/permute/index rewrite dims by it)
    out_m: int = 1           # view: the output's rows per unit (a reshape may change it)

    def emit(self, graph: fx.Graph, node: fx.Node, inputs: dict, U_i) -> fx.Node:
        """Chunk i of `node` (U_i units, None where not known statically) in `graph`, its inputs
        taken from `inputs` (node -> chunk node)."""
        arg = lambda a: fx.node.map_arg(a, lambda n: inputs[n])   # noqa: E731
        src = inputs[node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else None
        if self.kind == "view":
            method = "expand" if op_name(node) in ("expand", "expand_as") else "reshape"
            rows = U_i * self.out_m if isinstance(U_i, int) else graph.call_method("size", (src, 0))
            return graph.call_method(method, (src, (rows, *self.out_rest)))
        if self.kind == "permute":
            perm = _permutation(node)
            return graph.call_method("permute", (src, (0, *[p - self.ntok_in + 1 for p in perm[self.ntok_in:]])))
        if self.kind == "index":
            return graph.call_function(operator.getitem, (src, _flat_index(node, self.ntok_in)))
        args, kwargs = arg(node.args), arg(node.kwargs)
        if self.kind == "along":
            args, kwargs = _with_dims(node, args, kwargs, self.ntok_in)
        return graph.create_node(node.op, node.target, tuple(args), dict(kwargs))


def rule(node: fx.Node, U: int, symbolic_views: bool = False) -> Rule | None:
    """The rule that makes `node` token-local for U tokens, or None (see the module docstring).
    symbolic_views: take a reshape whose target sizes are graph values (token counts): sound for
    a caller that resizes every size with the tokens (token buckets), not for one that cuts the
    tokens into chunks and would have to rewrite those sizes per chunk."""
    if node.op not in ("call_function", "call_method") or _mutates(node):
        return None
    out = value(node)
    inputs = node.all_input_nodes
    name = op_name(node)
    sizes_ok = symbolic_views and name in _RESHAPES
    if any(not isinstance(value(a), torch.Tensor) and not _is_tuple_item_source(a, node)
           and not (sizes_ok and isinstance(value(a), torch.SymInt)) for a in inputs):
        return None                                   # symbolic sizes and the like
    if node.target is operator.getitem and not isinstance(value(node.args[0]), torch.Tensor):
        item = value(node)
        ntok = token_dims(item.shape, U) if isinstance(item, torch.Tensor) else None
        return Rule("getitem", {}, tuple(item.shape[ntok:])) if ntok else None
    if not isinstance(out, torch.Tensor):
        return _tuple_rule(node, name, out, U)
    ntok = token_dims(out.shape, U)
    if ntok is None:
        return None
    rest = tuple(out.shape[ntok:])
    if node.target is torch.ops.moec.route.default:
        return None                                   # tuple output: handled above
    if name in _LINEAR or name == "bmm":
        return _linear(node, out, ntok, rest, U) or _batched(node, out, ntok, rest, U)
    if name == "scaled_dot_product_attention":
        return _attention(node, out, ntok, rest, U)
    if name in ("layer_norm", "rms_norm") and _normalizes_rest(node, ntok, out):
        return _pointwise(node.all_input_nodes, out, ntok, rest)
    if name == "dropout" and _dropout_is_off(node):
        return _pointwise(node.args[0:1], out, ntok, rest)
    if name in _ALONG and _dim_arg(node, name) is not _NOT_A_DIM:
        return _along(node, name, ntok, rest, U)
    if name in _RESHAPES or name in ("expand", "expand_as"):
        return _view(node, ntok, rest, U)
    if name in _PERMUTES:
        return _permute(node, ntok, rest, U)
    if node.target is operator.getitem:
        return _index(node, ntok, rest, U)
    if _is_pointwise(node, name):
        return _pointwise(node.all_input_nodes, out, ntok, rest)
    return None


def _tuple_rule(node, name, out, U):
    if not isinstance(out, (tuple, list)) or not all(isinstance(v, torch.Tensor) for v in out):
        return None
    first = value(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if not isinstance(first, torch.Tensor):
        return None
    n_in = token_dims(first.shape, U)
    outs = [token_dims(v.shape, U) for v in out]
    if n_in is None or any(o is None for o in outs):
        return None
    rests = tuple(tuple(v.shape[o:]) for v, o in zip(out, outs))
    if node.target is torch.ops.moec.route.default:
        logits, bias = node.args[0], node.args[1]
        if len(first.shape) != 2:
            return None
        uses = {logits: ArgUse(True, tuple(first.shape[1:]))}
        if isinstance(bias, fx.Node):
            uses[bias] = ArgUse(False)
        return Rule("route", uses, rests)
    if name in _ALONG:
        r = _along(node, name, n_in, None, U)
        return None if r is None else Rule("along", r.args, rests, r.dims, n_in)
    return None


def _pointwise(inputs, out, ntok, rest):
    uses = {}
    for a in inputs:
        use = _broadcast_use(a, out, ntok, rest)
        if use is None:
            return None
        uses[a] = use
    return Rule("pointwise", uses, rest)


def _broadcast_use(a, out, ntok, rest) -> ArgUse | None:
    """How an input that broadcasts against `out` (ntok unit dims) is read: whole where it is
    broadcast over every unit dim, else by rows (expanded over the unit dims first if it must be)."""
    s = tuple(value(a).shape)
    if len(s) > len(out.shape):
        return None
    padded = (1,) * (len(out.shape) - len(s)) + s
    if all(d == 1 for d in padded[:ntok]):
        return ArgUse(False, whole=padded[ntok:] if len(s) > len(rest) else None)
    return ArgUse(True, padded[ntok:], None if padded[:ntok] == tuple(out.shape[:ntok])
                  else tuple(out.shape[:ntok]) + padded[ntok:])


def _batched(node, out, ntok, rest, U):
    """matmul/bmm of two operands of one rank (3+) whose unit dims are leading batch dims of both."""
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("mat2", node.kwargs.get("other"))
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return None
    sa, sb = tuple(value(a).shape), tuple(value(b).shape)
    if not len(sa) == len(sb) == len(out.shape) >= 3 or ntok > len(sa) - 2:
        return None
    if token_dims(sa, U) != ntok or token_dims(sb, U) != ntok or not sa[:ntok] == sb[:ntok] == tuple(out.shape[:ntok]):
        return None
    return Rule("batched", {a: ArgUse(True, sa[ntok:]), b: ArgUse(True, sb[ntok:])}, rest)


def _attention(node, out, ntok, rest, U):
    """scaled_dot_product_attention(q, k, v, attn_mask, ...): q, k, v share their unit dims, which
    are batch dims (before heads, sequence and head size); the mask is read like a pointwise input."""
    names = ("query", "key", "value", "attn_mask")
    q, k, v, mask = [node.args[i] if len(node.args) > i else node.kwargs.get(n) for i, n in enumerate(names)]
    if not all(isinstance(t, fx.Node) for t in (q, k, v)):
        return None
    shapes = [tuple(value(t).shape) for t in (q, k, v)]
    if ntok > len(shapes[0]) - 2 or any(token_dims(s, U) != ntok or s[:ntok] != tuple(out.shape[:ntok])
                                        for s in shapes):
        return None
    uses = {t: ArgUse(True, s[ntok:]) for t, s in zip((q, k, v), shapes)}
    if isinstance(mask, fx.Node):
        use = _broadcast_use(mask, out, ntok, rest)
        if use is None or mask in uses:
            return None
        uses[mask] = use
    if any(a not in uses for a in node.all_input_nodes):
        return None                                   # a tensor we do not know how to read
    return Rule("attention", uses, rest)


def _normalizes_rest(node, ntok, out) -> bool:
    """layer_norm / rms_norm over trailing dims that are not unit dims (weight and bias broadcast)."""
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    shape = (shape,) if isinstance(shape, int) else shape
    return isinstance(shape, (tuple, list)) and len(shape) <= len(out.shape) - ntok


def _dropout_is_off(node) -> bool:
    """dropout(x, p, training) that returns x: p = 0 or training False (random otherwise)."""
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return len(node.all_input_nodes) == 1 and (p == 0 or training is False)


def _linear(node, out, ntok, rest, U):
    x, w = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not isinstance(x, fx.Node) or not isinstance(w, fx.Node):
        return None
    xs, ws = tuple(value(x).shape), tuple(value(w).shape)
    if token_dims(xs, U) != ntok or ntok >= len(xs) or len(ws) != 2 or x is w:
        return None
    uses = {x: ArgUse(True, xs[ntok:])}
    for a in node.all_input_nodes:
        if a is not x:
            uses[a] = ArgUse(False)
    return Rule("linear", uses, rest)


def _along(node, name, ntok, rest, U):
    data = node.args[0]
    tensors = list(data) if name in ("cat", "concat", "stack") and isinstance(data, (tuple, list)) else [data]
    if not tensors or not all(isinstance(t, fx.Node) and isinstance(value(t), torch.Tensor) for t in tensors):
        return None
    shapes = [tuple(value(t).shape) for t in tensors]
    n_in = token_dims(shapes[0], U)
    if n_in is None or any(token_dims(s, U) != n_in or s[:n_in] != shapes[0][:n_in] for s in shapes):
        return None
    ndim = len(shapes[0]) + (1 if name == "stack" else 0)
    dims = _dim_arg(node, name)
    if dims is None:
        return None                                   # all dims: reduces the tokens too
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    if any(not isinstance(d, int) for d in dims) or any((d % ndim) < n_in for d in dims):
        return None
    uses = {t: ArgUse(True, s[n_in:]) for t, s in zip(tensors, shapes)}
    for a in node.all_input_nodes:
        uses.setdefault(a, ArgUse(False))
    return Rule("along", uses, rest, tuple(dims), n_in)


def _view(node, ntok, rest, U):
    src = node.args[0]
    s = tuple(value(src).shape)
    n_in = token_dims(s, U)
    out = tuple(value(node).shape)
    static = isinstance(U, int) and all(isinstance(d, int) for d in (*s, *out))
    expand = op_name(node) in ("expand", "expand_as")
    # A reshape keeps the row-major order, so unit u stays the u-th block whatever the rows per
    # unit become; with symbolic sizes only a reshape that keeps them (one row per token) is taken.
    if n_in is None or not expand and not static and math.prod(rest) != math.prod(s[n_in:]):
        return None
    if expand and (s[:n_in] != out[:ntok] or n_in != ntok):
        return None                                   # broadcasting over the units is not a view of them
    uses = {src: ArgUse(True, s[n_in:])}
    for a in node.all_input_nodes:
        uses.setdefault(a, ArgUse(False))             # view_as/expand_as: their other input gives a shape
    return Rule("view", uses, rest, out_m=math.prod(out[:ntok]) // U if static else 1)


def _permute(node, ntok, rest, U):
    src = node.args[0]
    s = tuple(value(src).shape)
    n_in = token_dims(s, U)
    perm = _permutation(node)
    if n_in != ntok or perm is None or tuple(perm[:ntok]) != tuple(range(ntok)):
        return None
    return Rule("permute", {src: ArgUse(True, s[n_in:])}, rest, ntok_in=n_in)


def _index(node, ntok, rest, U):
    src = node.args[0]
    s = tuple(value(src).shape)
    n_in = token_dims(s, U)
    if n_in is None or n_in != ntok or _flat_index(node, n_in) is None:
        return None
    return Rule("index", {src: ArgUse(True, s[n_in:])}, rest, ntok_in=n_in)


def _flat_index(node, ntok):
    """The index into the flat form for a basic index into the unit-leading value, or None when
    it touches a unit dim (a new axis, None, only after them)."""
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if not all(i is Ellipsis or i is None or isinstance(i, (int, slice)) and not isinstance(i, bool) for i in idx) or \
            idx.count(Ellipsis) > 1 or any(isinstance(i, slice) and any(isinstance(v, fx.Node) for v in
                                                                          (i.start, i.stop, i.step)) for i in idx):
        return None                                   # tensor and symbolic indices are not handled
    ndim = len(value(node.args[0]).shape)
    consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    at = idx.index(Ellipsis) if Ellipsis in idx else len(idx)
    idx = idx[:at] + (slice(None),) * (ndim - consumed) + idx[at + 1:]    # Ellipsis or the trailing dims
    if len(idx) < ntok or any(i is None or i != slice(None) for i in idx[:ntok]):
        return None
    return (slice(None),) + tuple(idx[ntok:])


def _permutation(node):
    ndim = len(value(node.args[0]).shape)
    name, args = op_name(node), node.args[1:]
    if name == "permute":
        perm = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        perm = [p % ndim for p in perm] if all(isinstance(p, int) for p in perm) else None
        return perm if perm is None or sorted(perm) == list(range(ndim)) else None
    if name in ("transpose", "swapaxes", "swapdims"):
        a, b = (list(args) + [node.kwargs.get("dim0"), node.kwargs.get("dim1")])[:2]
        if not isinstance(a, int) or not isinstance(b, int):
            return None
        perm = list(range(ndim))
        perm[a % ndim], perm[b % ndim] = perm[b % ndim], perm[a % ndim]
        return perm
    return None


_NOT_A_DIM = object()


def _dim_arg(node, name):
    """The dim(s) an along-dims op acts on; None for all dims; _NOT_A_DIM when the op is the
    pointwise overload (max(a, b))."""
    at = _ALONG[name]
    v = node.kwargs.get("dim", node.args[at] if len(node.args) > at else _DIM_DEFAULTS.get(name))
    if name in ("max", "min") and isinstance(v, fx.Node):
        return _NOT_A_DIM
    return v


def _with_dims(node, args, kwargs, ntok):
    name = op_name(node)
    shift = lambda d: d - ntok + 1 if d >= 0 else d   # noqa: E731
    at = _ALONG[name]
    if "dim" in kwargs:
        d = kwargs["dim"]
        kwargs = {**kwargs, "dim": tuple(map(shift, d)) if isinstance(d, (tuple, list)) else shift(d)}
    elif len(args) > at:
        d = args[at]
        args = (*args[:at], tuple(map(shift, d)) if isinstance(d, (tuple, list)) else shift(d), *args[at + 1:])
    elif name in _DIM_DEFAULTS and _DIM_DEFAULTS[name] >= 0:
        kwargs = {**kwargs, "dim": shift(_DIM_DEFAULTS[name])}
    return args, kwargs


def _is_pointwise(node, name) -> bool:
    if node.op == "call_method" and name in _UNARY_METHODS:
        return True
    if name.endswith("_"):
        return False
    packet = getattr(torch.ops.aten, _OPERATOR_NAMES.get(name, name) or "_no_such_op_", None)
    if packet is None or not isinstance(packet, torch._ops.OpOverloadPacket):
        return False
    return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())


def _mutates(node) -> bool:
    return _mutated_arg(node) is not None


def _is_tuple_item_source(a, node) -> bool:
    return node.target is operator.getitem and node.args[0] is a


# --- checking a rule on random inputs ------------------------------------------------------------

def chunk_sizes(U: int, k: int) -> list:
    """Units per chunk, as torch.tensor_split cuts U into k: the first U % k chunks one longer."""
    return [U // k + (1 if i < U % k else 0) for i in range(k)]


def flat_input(graph, a: fx.Node, use: ArgUse, T, shape: tuple) -> fx.Node:
    """`a` (of `shape`) as the node reads it, whole: its flat form (m U, *rest) for rows (T rows
    where sizes are symbolic), else the broadcast-ready value."""
    if not use.rows:
        return graph.call_method("reshape", (a, use.whole)) if use.whole is not None else a
    if use.expand is None and len(shape) == 1 + len(use.rest) and \
            all(statically_known_true(x == y) for x, y in zip(shape[1:], use.rest)):
        return a                                      # flat already (T may be symbolic)
    if use.expand is not None:
        a = graph.call_method("expand", (a, use.expand))
    return graph.call_method("reshape", (a, (flat_rows(use.expand or shape, use.rest, T), *use.rest)))


def verify(node: fx.Node, use: Rule, U: int, k: int = 3, seed: int = 0) -> bool:
    """`node` run whole and in k uneven chunks (of U units) by `use` agree on random inputs."""
    k = min(k, U)
    g = fx.Graph()
    phs = {a: g.placeholder(a.name) for a in node.all_input_nodes}
    whole = g.node_copy(node, lambda a: phs[a])
    uses = {a: use.args.get(a, ArgUse(False)) for a in node.all_input_nodes}
    flats = {a: flat_input(g, phs[a], uses[a], U, tuple(value(a).shape)) for a in node.all_input_nodes}
    per_unit = {a: flat_rows(uses[a].expand or tuple(value(a).shape), uses[a].rest, U) // U
                for a in flats if uses[a].rows}
    chunks, start = [], 0
    for U_i in chunk_sizes(U, k):
        ins = {a: g.call_method("narrow", (f, 0, start * per_unit[a], U_i * per_unit[a])) if uses[a].rows else f
               for a, f in flats.items()}
        chunks.append(use.emit(g, node, ins, U_i))
        start += U_i
    out = value(node)
    items = range(len(out)) if isinstance(out, (tuple, list)) else [None]
    results = []
    for j in items:
        parts = [c if j is None else g.call_function(operator.getitem, (c, j)) for c in chunks]
        shape = tuple((out if j is None else out[j]).shape)
        results.append(g.call_method("reshape", (g.call_function(torch.cat, (parts, 0)), shape)))
        results.append(whole if j is None else g.call_function(operator.getitem, (whole, j)))
    g.output(tuple(results))
    gm = fx.GraphModule(torch.nn.Module(), g)
    gens = {}
    try:
        # real tensors on the graph's device, whatever mode the compiler is in
        with torch.no_grad(), _disable_current_modes():
            got = gm(*[_random_like(value(a), gens, seed) for a in node.all_input_nodes])
    except Exception:   # noqa: BLE001 -- a rule that cannot even run is a rule that does not hold
        return False
    return all(_close(a, b) for a, b in zip(got[0::2], got[1::2]))


def _random_like(v, gens, seed):
    """Made on v's device (full-size inputs of a large layer stay cheap to make)."""
    shape, device = tuple(int(s) for s in v.shape), torch.device(v.device)
    gen = gens.setdefault(device, torch.Generator(device=device).manual_seed(seed))
    if v.dtype.is_floating_point:
        # positive, away from 0: rsqrt, log and pow see valid inputs, so NaNs cannot hide a mismatch
        return torch.rand(shape, generator=gen, device=device, dtype=v.dtype) + 0.5
    if v.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen, device=device).bool()
    return torch.randint(0, 4, shape, generator=gen, device=device, dtype=v.dtype)


def _close(a, b) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.dtype.is_floating_point:
        return bool(torch.equal(a, b))
    rtol = 1e-3 if torch.finfo(a.dtype).bits >= 32 else 3e-2
    a, b = a.double(), b.double()
    scale = max(1.0, float(b.abs().nan_to_num().max())) if b.numel() else 1.0
    return bool(torch.allclose(a, b, rtol=rtol, atol=rtol * scale, equal_nan=True))
