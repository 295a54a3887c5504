"""Triton device functions shared by the grouped-GEMM kernels: the tile table and activations.

Tile table: segment i in [0, E) holds grouped rows offsets[i]:offsets[i+1] (expert i); with
`dropped`, segment E holds rows offsets[E]:S (copies routed to no expert). Each segment is cut
into ceil(rows / BLOCK_M) tiles, numbered in segment order; a program finds its tile's segment
from a cumulative sum over at most E+1 counts, so the grid can be sized from a host-known bound
(`max_tiles`) while the counts stay on the device (no sync, no recompile).
"""
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .tuning import bucket


GROUP_M = 8     # m tiles per n tile in `grouped_order`


# Host-side twins of triton.cdiv / triton.next_power_of_2, which are constexpr functions in Triton
# >= 3.4 and cost ~4 us a call on the host: a layer's training step made ~28 such calls, 7% of its
# host time at decode sizes. The power of two is tuning's token bucket (the same rounding).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


next_pow2 = bucket


def max_tiles(S: int, segments: int, block_m: int) -> int:
    """Most tiles S grouped rows can make over `segments` segments: each non-empty segment adds at
    most one partial tile, and no tile is empty, so min(S, cdiv(S, BLOCK_M) + min(segments, S)).
    At decode sizes (S << E) this keeps the grid near S instead of E: programs past the last tile
    still start and read the offsets, which at E = 128 was most of a 1-token launch."""
    return min(S, cdiv(S, block_m) + min(segments, S))


@triton.jit
def grouped_order(pid, n_n, m_tiles, GROUP: tl.constexpr):
    """pid -> (m tile, n tile), GROUP m tiles per n tile before the next n tile: the GROUP tiles
    share the weight tile they read (through L2) and the next n tile finds their rows in L2.
    Row-major order instead re-read a whole expert's weights once per m tile, e.g. 8 times a
    step for Mixtral's 235 MB experts at 4096 tokens (1024 rows per expert)."""
    width = GROUP * n_n
    first = (pid // width) * GROUP
    size = tl.minimum(m_tiles - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def expert_tile(tile, offsets_ptr, E, S, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr,
                DROPPED: tl.constexpr):
    """-> (segment, first row, end row of the segment); segment = -1 if the tile is past the end."""
    i = tl.arange(0, E_POW2)
    n_seg = E + 1 if DROPPED else E
    lo = tl.load(offsets_ptr + i, mask=i < n_seg, other=0)
    hi = tl.load(offsets_ptr + i + 1, mask=i < E, other=0)
    hi = tl.where(i == E, S, hi)
    hi = tl.where(i < n_seg, hi, lo)
    n_tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(n_tiles, axis=0)
    seg = tl.sum((ends <= tile).to(tl.int32), axis=0)
    here = i == seg
    first_tile = tl.sum(tl.where(here, ends - n_tiles, 0), axis=0)
    row0 = tl.sum(tl.where(here, lo, 0), axis=0) + (tile - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(here, hi, 0), axis=0)
    seg = tl.where(seg < n_seg, seg, -1)
    return seg, row0, row_end


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _tanh(v):
    return 2.0 * _sigmoid(2.0 * v) - 1.0


@triton.jit
def act_plain(v, ACT: tl.constexpr):
    """ACT: 0 silu, 1 gelu (erf), 2 gelu_tanh, 3 relu, 5 none (a plain grouped GEMM, as LoRA's
    x A^T). fp32 in, fp32 out."""
    if ACT == 5:
        out = v
    elif ACT == 0:
        out = v * _sigmoid(v)
    elif ACT == 1:
        out = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif ACT == 2:
        out = 0.5 * v * (1.0 + _tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
    else:
        out = tl.maximum(v, 0.0)
    return out


@triton.jit
def act_plain_grad(v, ACT: tl.constexpr):
    """d act_plain / d v."""
    if ACT == 5:
        d = tl.full(v.shape, 1.0, tl.float32)
    elif ACT == 0:
        s = _sigmoid(v)
        d = s * (1.0 + v * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(v * 0.7071067811865476))
        d = cdf + v * tl.exp(-0.5 * v * v) * 0.3989422804014327
    elif ACT == 2:
        c = 0.7978845608028654
        t = _tanh(c * (v + 0.044715 * v * v * v))
        d = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * v * v)
    else:
        d = (v > 0.0).to(tl.float32)
    return d


@triton.jit
def activate(g, u, alpha, limit, ACT: tl.constexpr, GATED: tl.constexpr):
    """h = act(g) * u (gated), act(u) (plain), or GPT-OSS swiglu_oai (ACT == 4); fp32."""
    if ACT == 4:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        h = (uc + 1.0) * (gc * _sigmoid(gc * alpha))
    elif GATED:
        h = act_plain(g, ACT) * u
    else:
        h = act_plain(u, ACT)
    return h


@triton.jit
def activate_backward(g, u, dh, alpha, limit, ACT: tl.constexpr, GATED: tl.constexpr):
    """(d g, d u) of `activate` given d h (d g is zeros when not gated); fp32."""
    if ACT == 4:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        s = _sigmoid(gc * alpha)
        du = tl.where((u >= -limit) & (u <= limit), dh * gc * s, 0.0)
        dg = tl.where(g <= limit, dh * (uc + 1.0) * (s + gc * alpha * s * (1.0 - s)), 0.0)
    elif GATED:
        du = dh * act_plain(g, ACT)
        dg = dh * u * act_plain_grad(g, ACT)
    else:
        du = dh * act_plain_grad(u, ACT)
        dg = tl.zeros_like(du)
    return dg, du


ACTIVATION_CODE = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "swiglu_oai": 4, "none": 5}


@triton.jit
def lowrank(acc, t_ptr, s_t, rows64, rmask, b_ptr, e64, s_b_e, s_b_k, s_b_n, cols, cmask, R,
            IEEE: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += t[rows, :R] @ B[e][:R, cols]: a LoRA term beside a grouped GEMM's main product.
    t (S, R) rows are contiguous; B is read as (E, R, N) through its strides (a factor's view)."""
    for k0 in range(0, R, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < R
        a = tl.load(t_ptr + rows64[:, None] * s_t + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + e64 * s_b_e + kk[:, None] * s_b_k + cols[None, :] * s_b_n,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = mma(a, b, acc, IEEE)
    return acc


def lowrank_ptrs(lora):
    """The (t, L) pointers of a `lowrank` term for a launch; None when there is none.

    Every launch passes None for a pointer its constexpr flags leave unread: Triton specialises None
    as a constant, so its launcher neither calls data_ptr() nor has the driver check the pointer
    (one cuPointerGetAttribute per pointer argument per launch, triton 3.6). A one-token gate/up
    launch passed 13 placeholder tensors, and at one token a launch's cost is the host's."""
    return (lora[0], lora[1]) if lora is not None else (None, None)


def lowrank_args(lora):
    """(t row stride, L strides as (E, r, N), r) of a `lowrank` term; zeros when there is none."""
    if lora is None:
        return 0, 0, 0, 0, 0
    t, factor = lora
    return (t.stride(0), *factor.stride(), factor.shape[1])


@triton.jit
def weight_tile(ptr, desc, e, e64, k0, n0, kk, cols, kmask, cmask, s_e, s_k, s_n, TMA: tl.constexpr,
                K_LAST: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Expert e's (BLOCK_K, BLOCK_N) tile at (k0, n0) of a weight read as (E, K, N): through the
    TMA descriptor `weight_desc` made (rows and columns past the view's own K, N read as zeros,
    so an expert's tile never spills into the next one's) or through pointers and masks."""
    if TMA:
        if K_LAST:
            b = tl.trans(tl.reshape(desc.load([e, n0, k0]), (BLOCK_N, BLOCK_K)))
        else:
            b = tl.reshape(desc.load([e, k0, n0]), (BLOCK_K, BLOCK_N))
    else:
        b = tl.load(ptr + e64 * s_e + kk[:, None] * s_k + cols[None, :] * s_n,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
    return b


def weight_desc(w, tile, transpose=False):
    """(descriptor, K_LAST) for `weight_tile` to read w, a weight viewed (E, K, N) (any strides;
    transpose: w is (E, N, K)), through TMA; (None, False) where the tile does not ask for it or
    TMA cannot read this view (neither K nor N of unit stride, misaligned, or a GPU older than
    sm90). Asked on every launch: without `tile.tma` it returns before touching w."""
    if not tma_asked(tile, w):
        return None, False
    from triton.tools.tensor_descriptor import TensorDescriptor
    w = w.transpose(1, 2) if transpose else w
    (E, K, N), (s_e, s_k, s_n) = w.shape, w.stride()
    if s_n == 1:
        shape, strides, block, k_last = [E, K, N], [s_e, s_k, 1], [1, tile.block_k, tile.block_n], False
    elif s_k == 1:
        shape, strides, block, k_last = [E, N, K], [s_e, s_n, 1], [1, tile.block_n, tile.block_k], True
    else:
        return None, False
    if not tma_readable(w, shape, strides):
        return None, False
    return TensorDescriptor(w, shape, strides, block), k_last


def tma_asked(tile, t) -> bool:
    """Whether the tile asks for TMA and t's GPU has it (sm90+; the interpreter runs descriptors too)."""
    return tile.tma and not _before_hopper(t)


def _before_hopper(t) -> bool:
    """t lives on a GPU without TMA (older than sm90); the interpreter runs descriptors."""
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] < 9


def rows_readable(*rows) -> bool:
    """Whether descriptors made on the device (Tile.row_descs) can read these (S, K) operands
    (None entries skipped): unit column stride, 16-byte aligned base and rows, row indices that fit
    the descriptors' 32-bit coordinates, a GPU with TMA (sm90+; the interpreter runs descriptors too)."""
    rows = [t for t in rows if t is not None]
    return not _before_hopper(rows[0]) and all(
        t.stride(1) == 1 and t.shape[0] < 2 ** 31 and tma_readable(t, t.shape, t.stride()) for t in rows)


def tma_readable(t, shape, strides) -> bool:
    """Whether a descriptor of this shape and these strides (the last one 1) can read t: no empty
    dimension, the base and every other stride 16-byte aligned."""
    size = t.element_size()
    return min(shape) >= 1 and t.data_ptr() % 16 == 0 and not any(s * size % 16 for s in strides[:-1])


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr):
    """acc += a @ b. IEEE: full-precision float32 products (no tf32), as the reference; operands
    are upcast first, which is exact and also sidesteps the interpreter's wrong bf16 dot."""
    if IEEE:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


def ieee(t) -> bool:
    """The `mma` mode for operands like t: float32 operands, or any on the CPU interpreter."""
    return t.dtype.itemsize == 4 or not t.is_cuda


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """First thing in a kernel launched with PDL (codegen/pdl.py): wait until the kernel before it
    has finished and its writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """Let the next kernel's CTAs launch once every CTA of this one has come here (or exited)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """pdl_wait then pdl_release: for the chain's small kernels (one wave), whose dependents may
    take their slots at once."""
    pdl_wait(PDL)
    pdl_release(PDL)


@triton.jit
def expert_mn(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A weight gradient's tile index -> (expert, m block, n block): an expert's (M, N) gradient in
    n-fastest blocks, experts one after another."""
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    return tile // (n_m * n_n), (tile // n_n) % n_m, tile % n_n


@triton.jit
def store_tile(base, s_m, s_n, ms64, ns64, mmask, amask, nmask, acc, CHUNKED: tl.constexpr,
               TRANS_OUT: tl.constexpr):
    """A weight-gradient tile: base[m * s_m + n * s_n] = acc[m, n] where mmask[m], plus what is
    there where amask[m]."""
    if TRANS_OUT:    # a (BN, BM) tile, m last, so consecutive threads take consecutive m
        ptrs = base + ns64[:, None] * s_n + ms64[None, :] * s_m
        out = tl.trans(acc)
        if CHUNKED:
            out += tl.load(ptrs, mask=nmask[:, None] & amask[None, :], other=0.0).to(tl.float32)
        tl.store(ptrs, out.to(base.dtype.element_ty), mask=nmask[:, None] & mmask[None, :])
    else:
        ptrs = base + ms64[:, None] * s_m + ns64[None, :] * s_n
        out = acc
        if CHUNKED:
            out += tl.load(ptrs, mask=amask[:, None] & nmask[None, :], other=0.0).to(tl.float32)
        tl.store(ptrs, out.to(base.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def _torch_scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device=torch.cuda.current_device() if torch.cuda.is_available()
                       else "cpu")


def ensure_allocator():
    """Give Triton an allocator for the kernels' global scratch (device-made descriptors) where none
    is set. Triton keeps it per thread (a ContextVar), and autograd runs a backward on threads of its
    own: asked before every launch that needs it."""
    from triton.runtime import _allocation
    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)
