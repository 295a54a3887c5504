"""The records detection produces and rewriting consumes: the contract between the two.

A `Region` names the graph nodes of one MoE layer and the semantics moec proved it computes;
a `Miss` is something that looked like an MoE layer and was left alone, with the reason.
Both are what `moec.explain` and the dumps print.
"""
from dataclasses import dataclass, field

import torch.fx as fx


@dataclass(frozen=True)
class Router:
    """How token copies pick experts: `route` op arguments (see codegen.ops.route)."""
    scoring: str            # "softmax" | "softmax_after_topk" | "sigmoid"
    top_k: int
    renormalize: bool
    scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_fill: float | None = None  # the dropped groups' experts' score; None: they cannot be chosen
    score_dtype: object = None   # torch dtype the user's code scores in; the rewrite casts the logits to it
    capacity: object = None      # int, or an fx.Node holding a SymInt: copies each expert keeps (None: dropless)
    capacity_order: str = ""     # "choice_major" | "token_major" (see codegen/capacity.py)
    renorm_eps: float | None = None  # what the user's code adds to the sum it renormalises by

    @property
    def renorm_outside_route(self) -> bool:
        """moec.route adds 1e-20 to a sigmoid router's sum and nothing to a softmax one's; a user
        epsilon that differs is applied by the rewrite in plain ops (equal until scores underflow,
        where only the user's own epsilon gives the user's weights)."""
        builtin = 1e-20 if self.scoring == "sigmoid" else 0.0
        return self.renormalize and self.renorm_eps is not None and self.renorm_eps != builtin

    @property
    def kind(self) -> str:
        if self.scoring == "sigmoid":
            kind = "sigmoid_bias_grouped" if self.n_group > 1 else "sigmoid_bias"
        else:
            kind = {"softmax": "softmax_topk", "softmax_after_topk": "topk_softmax"}[self.scoring]
        return kind if self.capacity is None else f"{kind}_capacity"


@dataclass(frozen=True)
class Experts:
    """How the expert weights are read: each weight is a view of a graph input, never a copy.

    A view is (input node, transpose?, slice along dim 1 as (start, step) or None) so that
    `w_up` etc. are always (E, N, K) with y = x @ w[e].T.

    LoRA (`lora_up` etc.): the projection's weight is the view plus scale * B @ A per expert,
    given as (A view (E, r, K), B view (E, N, r), scale): computed as factors, never merged.
    """
    num_experts: int
    hidden: int
    ffn: int
    activation: str         # silu | gelu | gelu_tanh | relu | swiglu_oai
    up: tuple
    gate: tuple | None
    down: tuple
    up_bias: tuple | None = None
    gate_bias: tuple | None = None
    down_bias: tuple | None = None
    alpha: float = 0.0
    limit: float = 0.0
    lora_up: tuple | None = None
    lora_gate: tuple | None = None
    lora_down: tuple | None = None

    @property
    def lora(self) -> tuple:
        return self.lora_up, self.lora_gate, self.lora_down


@dataclass
class Region:
    """One MoE layer found in the graph, proven equivalent to moec's ops on random inputs."""
    module: str
    idiom: str
    router: Router
    experts: Experts
    x: fx.Node               # (T, H) tokens the experts read
    logits: fx.Node          # (T, E) router logits, computed by the user's router (left in place)
    score_bias: fx.Node | None
    output: fx.Node          # (T, H) combined expert output: the node the rewrite replaces
    nodes: list              # every node the rewrite removes, in graph order
    check: str = ""          # how the equivalence was established
    kept: frozenset = frozenset()  # nodes of `nodes` the rest of the graph reads (router outputs): not removed
    aliases: frozenset = frozenset()  # buffer the output was accumulated into in place: read as the output
    graph: str = ""          # submodule path of the graph holding the nodes ("" = the root; else a checkpoint body)

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k


@dataclass(frozen=True)
class Miss:
    """Something MoE-like that moec did not rewrite, and why; `where` is file:line."""
    module: str
    reason: str
    where: str = ""
    num_experts: int = 0
    top_k: int = 0
    idiom: str = ""
    kind: str = "unproven"   # "graph_break": top-k results leave the graph; "unproven": rewrite not proven


@dataclass
class DetectReport:
    regions: list = field(default_factory=list)
    misses: list = field(default_factory=list)
