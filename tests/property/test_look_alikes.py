"""Programs that only look like MoE (top-k sampling over vocabulary logits, a top-k mix of
embeddings, argmax codebook lookup, attention softmax) are never rewritten nor reported."""
import torch
from hypothesis import example, given, settings
from torch._dynamo.utils import counters

import moec
from budget import examples, fresh
from compare import TOL
from look_alikes import build_look_alike, look_alike_input
from strategies import look_alike_specs


@settings(max_examples=examples(50))
@given(spec=look_alike_specs())
# V <= 8 is the size of a real router: still no expert weights, so still not MoE.
@example(spec=dict(kind="topk_embedding_mix", H=8, V=4, k=2, tokens=6, dtype="float64", seed=0))
@example(spec=dict(kind="argmax_codebook", H=8, V=8, k=1, tokens=1, dtype="float32", seed=0))
def test_look_alike_untouched(spec):
    model = build_look_alike(spec)
    fresh()
    report = moec.explain(model, look_alike_input(spec, 1))
    assert report.regions == [], str(report)
    fresh()
    x = look_alike_input(spec, 2)
    out = torch.compile(model, backend="moec", options={"dense_backend": "eager"})(x)
    assert counters["moec"]["regions_fused"] == 0 and counters["moec"]["regions_not_rewritten"] == 0
    ref = model(x)
    out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
    torch.testing.assert_close(out, ref, **TOL[ref.dtype])
