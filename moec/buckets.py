"""Running a compiled graph on its token count padded to a bucket (passes/token_buckets.py proves
where that is sound and plans it): pad the token-carrying inputs with zero rows up to the next
power of two, raise the size inputs to it, cut the outputs back. CUDA graphs are then captured
once per bucket: a serving loop whose token count changes within a bucket replays.
"""
from torch._dynamo.utils import counters

from moec.codegen.tuning import bucket
from moec.passes.token_buckets import BucketReport, analyse, check, cut, pad

from .log import log


def wants_buckets(config, mode) -> bool:
    """Whether this compile pads to buckets: "always", or "auto" where CUDA graphs capture per shape."""
    if config.token_buckets != "auto":
        return config.token_buckets == "always"
    if config.dense_backend == "cudagraphs":
        return True
    if config.dense_backend != "inductor" or not mode:
        return False
    from torch._inductor import list_mode_options
    return bool(list_mode_options(mode).get("triton.cudagraphs"))


def bucket_plan(gm, example_inputs, config, mode, dumper=None):
    """(plan, report): the analysis' plan where buckets are wanted and the graph passes `check`,
    else None; the report (None where buckets are not wanted) says why not. The log,
    counters["moec"]["token_buckets"] and the dump's cudagraphs.txt say which graphs are bucketed."""
    if not wants_buckets(config, mode):
        return None, None
    if config.expert_stats:
        report = BucketReport(None, "expert_stats would count the pad tokens")
    else:
        report = analyse(gm)
        if report.static:
            return None, report
        if report.plan is not None:
            why = check(gm, example_inputs, report.plan)
            report = BucketReport(None, why) if why else report
    text = f"token counts not bucketed: {report.why}" if report.plan is None else \
        f"token counts bucketed (run padded to the next power of two): {report.log_lines()[0]}"
    log.info("%s", text)
    if dumper is not None:
        dumper.cudagraphs("token buckets", text)
    if report.plan is not None:
        counters["moec"]["token_buckets"] += 1
    return report.plan, report


def bucketed(compiled, plan):
    """`compiled`, called on inputs padded as `plan` says (none: as it is), its outputs cut back.
    Called as the caller calls it: one list (the boxed convention, the callee then owns the list)
    or positional."""
    if plan is None:
        return compiled
    i, d = plan.token_input

    def run(*args):
        boxed = len(args) == 1 and isinstance(args[0], list)
        inputs = args[0] if boxed else args
        T = inputs[i].shape[d]
        B = bucket(T)
        if B == T:
            return compiled(*args)
        padded = pad(inputs, plan, T, B)
        if boxed:
            inputs.clear()
        return cut(compiled(padded) if boxed else compiled(*padded), plan, T)
    run._boxed_call = getattr(compiled, "_boxed_call", False)
    return run
