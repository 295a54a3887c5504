"""Weight gradients on a second CUDA stream, beside the input gradient.

After the dh kernel, a layer's backward has three independent GEMM groups: the input gradient
(dx, the GEMM the next layer's backward waits for) and the two weight-gradient kernels, each
a short ragged-K GEMM whose time goes to its prologue and its store. In one stream each waits
for the previous one's tail; on two, the weight gradients fill the SMs the other leaves idle.
Off by default until measured (benchmarks/switch_ab.py --switch wgrad_stream); `set_wgrad_stream(True)` turns it
on. Under CUDA graph capture the block runs in place, on the capturing stream.

Memory: a tensor made on one stream and used on the other is recorded on it
(`record_stream`), so the caching allocator reuses it only after both are done.
"""
import contextlib

import torch

_state = {"on": False, "streams": {}}


def set_wgrad_stream(on: bool) -> None:
    _state["on"] = bool(on)


def wgrad_stream_enabled() -> bool:
    return _state["on"]


@contextlib.contextmanager
def beside(device, uses):
    """Run the block's launches on a side stream of `device` that starts after everything queued
    so far on the current one; the current stream waits for it at the end. Yields a list: what
    the block appends is recorded as used by the current stream after the join (tensors made
    inside and returned). A no-op (the block runs in place) when off or not on CUDA."""
    made = []
    # under CUDA graph capture, one stream: allocations there live in the graph's private pool,
    # where record_stream's deferred frees were not tried (a forked branch would need its own test)
    if not _state["on"] or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        del uses
        yield made
        return
    main = torch.cuda.current_stream(device)
    side = _state["streams"].get(device)
    if side is None:
        side = _state["streams"][device] = torch.cuda.Stream(device)
    side.wait_stream(main)
    for t in uses:
        if t is not None:
            t.record_stream(side)
    del uses            # holding them here would keep the caller's temporaries alive to the end
    with torch.cuda.stream(side):
        yield made
    main.wait_stream(side)
    for t in made:
        if t is not None:
            t.record_stream(main)
