"""The backend entry: registration, options, and dense models left to Inductor untouched."""
import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import moec
from compare import check_compiled_matches_eager


class DenseBlock(nn.Module):
    def __init__(self, hidden=32, heads=4):
        super().__init__()
        self.norm, self.heads = nn.LayerNorm(hidden), heads
        self.qkv, self.o = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 64), nn.GELU(), nn.Linear(64, hidden))

    def forward(self, x):                                   # (B, S, H)
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        a = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.o(a.transpose(1, 2).reshape(b, s, h))
        return x + self.mlp(x)


def test_registered_without_import():
    from torch._dynamo.backends.registry import list_backends
    assert "moec" in list_backends(exclude_tags=())


def test_dense_model_through_inductor_untouched():
    torch.manual_seed(0)
    seen = []
    check_compiled_matches_eager(DenseBlock(), torch.randn(2, 6, 32), dense_backend="inductor")
    check_compiled_matches_eager(DenseBlock(), torch.randn(2, 6, 32),
                                 dense_backend=lambda gm, ex: seen.append(gm) or gm)
    assert counters["moec"]["regions_fused"] == 0 and counters["moec"]["graphs"] >= 2
    assert seen and not any(str(n.target).startswith("moec.") for gm in seen for n in gm.graph.nodes)


def test_unknown_option_names_the_known_ones():
    # Dynamo wraps backend errors in BackendCompilerFailed; the MoecError message comes through.
    with pytest.raises(Exception, match="unknown moec option 'dense_backnd'.*dense_backend"):
        torch.compile(DenseBlock(), backend="moec", options={"dense_backnd": "eager"})(torch.randn(1, 2, 32))


def test_bad_option_value_names_the_choices():
    from moec.config import Config
    from moec.errors import MoecError
    with pytest.raises(MoecError, match="ep_chunk_by='batch'.*'tokens', 'sequences'"):
        Config.from_options({"ep_chunk_by": "batch"})
    assert Config.from_options({"ep_chunk_by": "sequences"}).ep_chunk_by == "sequences"


def test_unknown_dense_backend_is_a_clear_error():
    with pytest.raises(Exception, match="dense_backend='no_such_backend' is not a torch.compile backend"):
        torch.compile(DenseBlock(), backend="moec", options={"dense_backend": "no_such_backend"})(torch.randn(1, 2, 32))


def test_stop_after_detect_finds_but_does_not_rewrite():
    from moe_idioms import MaskLoopMoE
    torch.manual_seed(0)
    check_compiled_matches_eager(MaskLoopMoE().double(), torch.randn(8, 32, dtype=torch.float64),
                                 options={"stop_after": "detect"})
    assert counters["moec"]["regions_not_rewritten"] == 1 and counters["moec"]["regions_fused"] == 0
