"""Trace PEFT's LoRA on expert parameters (`LoraConfig(target_parameters=[...])`) in one graph.

PEFT's `ParamWrapper` applies its adapter by registering an `nn.utils.parametrize`
parametrization on the wrapped module for the duration of each forward and removing it after
(peft/tuners/lora/layer.py, `_activate_lora`). Registration swaps the module's class and `set_`s
the parameter, which Dynamo cannot trace: the wrapper's frame runs eagerly, the router and the
experts land in different graphs, and the MoE layer cannot be fused (PEFT documents the
limitation). While Dynamo traces for moec, `enter_param_lora_traced()` has the wrapper compute the
same weight, W + s * lhs @ rhs from PEFT's own `get_delta_factors`, and call the wrapped module
with it through `torch.func.functional_call`, which Dynamo traces: one graph, in which moec finds
the layer and the LoRA form of its weights. Eager calls, other backends, and the states this
does not cover (adapters disabled or merged, per-sample adapter names, 2-D parameters, float8
weights) run PEFT's own forward, unchanged.
"""
import sys

import torch


def enter_param_lora_traced():
    """From here to `exit_param_lora_traced`, Dynamo traces PEFT's ParamWrapper through
    `_traced_forward` (moec/capture.py enters it around every compiled call) -> what the exit
    restores: the wrapper class, or None (no PEFT, or a nested entry)."""
    wrapper = _param_wrapper_class()
    if wrapper is None or wrapper.forward is _traced_forward:
        return None
    _peft_forward["original"] = wrapper.forward
    wrapper.forward = _traced_forward
    return wrapper


def exit_param_lora_traced(wrapper):
    if wrapper is not None:
        wrapper.forward = _peft_forward.pop("original")


_peft_forward: dict = {}     # ParamWrapper's own forward while the traced one stands in for it


def _traced_forward(self, x, *args, **kwargs):
    # Dynamo folds is_compiling() to True and traces the first branch only: no guard on the rest
    if torch.compiler.is_compiling() and _covered(self, kwargs):
        return _adapted_call(self, x, args, kwargs)
    return _peft_forward["original"](self, x, *args, **kwargs)


def _adapted_call(self, x, args, kwargs):
    """The wrapped module called with W + s * lhs @ rhs for each adapted parameter, as PEFT's
    `_LoraFactorsProxy` computes it (`baddbmm`), several active adapters one after another."""
    self._check_forward_args(x, *args, **kwargs)
    weights, module = {}, self
    while isinstance(module, type(self)):     # nested wrappers: one per targeted parameter
        name = module.parameter_name
        weight = weights.get(name, module.get_param())
        for adapter in [a for a in module.active_adapters if a in module.lora_A]:
            lhs, rhs, scale = module.get_delta_factors(adapter)
            weight = torch.baddbmm(weight, lhs, rhs, alpha=scale)
        weights[name] = weight
        module = module.base_layer
    return torch.func.functional_call(module, weights, (x, *args), kwargs)


def _covered(self, kwargs) -> bool:
    module = self
    while isinstance(module, type(self)):
        if module.disable_adapters or module.merged or module.num_experts < 2 or \
                module.get_param().dtype not in _DTYPES or not hasattr(module, "get_delta_factors"):
            return False
        module = module.base_layer
    return kwargs.get("adapter_names") is None


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)   # PEFT folds float8 otherwise


def _param_wrapper_class():
    module = sys.modules.get("peft.tuners.lora.layer")
    return getattr(module, "ParamWrapper", None)
