"""Compiled-vs-eager comparison (values and gradients) with fresh inputs, shared by the tests."""
import copy

import torch


# float64 models still route in float32 where their code says so (softmax(..., dtype=float)), and
# moec does the same: routing weights and router gradients carry float32 rounding (~1e-7
# relative per op) into float64 results, so float64 is held to a float32-rounding bound.
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
       torch.float64: dict(rtol=1e-4, atol=1e-6)}


def grads_of(module, loss):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def check_compiled_matches_eager(module, *inputs, options=None, dense_backend="eager", backward=True, tol=None):
    """Compile a copy of `module` with moec, run both on `inputs`, compare outputs and gradients
    of every parameter and of float inputs (within `tol`, default the output dtype's TOL).
    Returns the compiled module for further calls."""
    ref_mod, test_mod = module, copy.deepcopy(module)
    opts = {"dense_backend": dense_backend, **(options or {})}
    compiled = torch.compile(test_mod, backend="moec", options=opts)
    ins_ref = [i.detach().clone().requires_grad_(i.is_floating_point()) if torch.is_tensor(i) else i for i in inputs]
    ins_test = [i.detach().clone().requires_grad_(i.is_floating_point()) if torch.is_tensor(i) else i for i in inputs]
    out_ref, out_test = ref_mod(*ins_ref), compiled(*ins_test)
    out_ref = out_ref[0] if isinstance(out_ref, tuple) else out_ref
    out_test = out_test[0] if isinstance(out_test, tuple) else out_test
    out_ref = getattr(out_ref, "logits", out_ref)
    out_test = getattr(out_test, "logits", out_test)
    tol = tol or TOL[out_ref.dtype]
    torch.testing.assert_close(out_test, out_ref, **_scaled(tol, out_ref))
    if backward:
        probe = torch.randn_like(out_ref)
        loss_ref, loss_test = (out_ref * probe).sum(), (out_test * probe).sum()
        float_ref = [i for i in ins_ref if torch.is_tensor(i) and i.requires_grad]
        float_test = [i for i in ins_test if torch.is_tensor(i) and i.requires_grad]
        p_ref = [p for p in ref_mod.parameters() if p.requires_grad]
        p_test = [p for p in test_mod.parameters() if p.requires_grad]
        g_ref = torch.autograd.grad(loss_ref, float_ref + p_ref, allow_unused=True)
        g_test = torch.autograd.grad(loss_test, float_test + p_test, allow_unused=True)
        for (name, _), a, b in zip([("input", None)] * len(float_ref) + list(ref_mod.named_parameters()),
                                   g_test, g_ref):
            if b is None:
                assert a is None or a.abs().max() == 0, name
                continue
            torch.testing.assert_close(a, b, **_scaled(tol, b), msg=lambda m: f"grad of {name}: {m}")
    return compiled


def _scaled(tol, ref):
    """`tol` with its atol scaled by the reference's largest magnitude (at least 1): rounding noise
    is relative to the sums an element comes from, and a small element of a large gradient (a
    second MoE layer's, ~70) carries the noise of its large neighbours' scale."""
    scale = max(1.0, float(ref.detach().abs().max())) if ref.numel() else 1.0
    return {**tol, "atol": tol["atol"] * scale}
