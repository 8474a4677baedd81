"""Fused Triton kernels for training-mode batch norm: two kernels forward, two backward.

Same contract as `functional.train_forward` / `train_backward` (signatures, return tuples,
numerics), which `dispatch.run` dispatches to under BNEXP_BN_BACKEND=triton (and auto on CUDA).
CUDA tensors run compiled kernels; CPU tensors run the same kernels through Triton's interpreter
(slow; it lets the kernels be tested on machines without a GPU).

Layout. An input (N, C, *spatial) is read as [A, C, B]: A outer rows, B the contiguous extent of
one channel within a row. Contiguous (N, C, *spatial): A = N, B = prod(spatial); channels-last
(and (N, C)): A = N * prod(spatial), B = 1. Any other strides get a contiguous copy first.
A program owns one channel (B > 1) or COLS channels (B == 1) and one of S splits of their tiles,
and walks its share tile by tile. A tile is [ROWS, COLS] with columns contiguous in memory: b
positions of the channel (B > 1) or the channels (B == 1). So loads are coalesced in both layouts and no
per-element integer division is needed (tile offsets are row * C * B + c * B + b).

    forward   K1 _stats_partials   grid (channel blocks, S): per (split, channel) count, mean, M2
              K2 _normalize        grid (channel blocks, S): combine the S partials, write y;
                                   split 0 also writes shift, delta, invstd, mean, running var
    backward  K3 _grad_partials    per (split, channel) sums of g and g * x_hat
              K4 _grad_input       combine them, write grad_x; split 0 writes grad_weight/bias

Memory traffic per element: forward reads x twice and writes y once; backward reads (g, x)
twice and writes grad_x once; the per-channel partials are tiny. S is chosen so that the grid
has ~8 programs per SM (all resident at once), enough loads in flight at any channel count.

Numerics as in `functional.train_forward`: d = x - x[0, c, 0] (the shift); each tile's mean and
sum of squared deviations from it are merged with Chan, Golub & LeVeque's parallel formula (1983)
across tiles and then across splits, never E[x^2] - E[x]^2; y = (d - mean(d)) * invstd * weight
+ bias. Statistics are float32 for float32/bfloat16/float16 inputs (float64 is not handled here:
`functional` routes it to the compiled or eager path).

The host side allocates with torch.empty on the input's device and never synchronises, so the
kernels can be captured in a CUDA graph; launch geometry is cached per (shape, strides, dtype,
device) to keep the per-call Python cost small.
"""

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_interpret import interpreted
from torch import Tensor

from .dispatch import _dense_strides

TILE = 2048  # elements per tile on the GPU: 16 per thread with 4 warps
NUM_WARPS = 4
PROGRAMS_PER_SM = 8  # S is chosen so that channel blocks * S ~ this many programs per SM (all resident at once)
MAX_SPLITS = 256
MAX_CHANNEL_COLS = 32  # channels per tile when B == 1 (128 bytes of float32 per row)
MAX_PARTIAL_TILE = 4096  # SPLITS * COLS: the partials a program of K2/K4 combines in registers
# Triton's interpreter runs each program in numpy: small tiles and few programs keep it quick,
# and still give partial tiles and several splits on test-sized inputs.
INTERPRETER_TILE = 256
INTERPRETER_PROGRAMS = 8


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _tile(item, rows, cols, base, col_start, col_limit, A, row_stride, b_blocks,
          ROWS: tl.constexpr, COLS: tl.constexpr):
    """Offsets and mask of tile `item` of a program: rows a of [A, C, B] and columns that are
    channels (B == 1: base 0, col_start = first channel, col_limit C, b_blocks 1) or positions b
    of one channel (base c * B, col_start 0, col_limit B)."""
    a_block = item // b_blocks
    col = col_start + (item - a_block * b_blocks) * COLS + cols
    a = a_block * ROWS + rows
    return base + a[:, None] * row_stride + col[None, :], (a < A)[:, None] & (col < col_limit)[None, :]


@triton.jit
def _program(C, B, ROWS: tl.constexpr, COLS: tl.constexpr, CHANNEL_COLS: tl.constexpr, WIDE: tl.constexpr):
    """What every kernel's program starts from: its split, the tile's row and column ranges, the
    index of its per-channel values and their mask, the tile arguments base, col_start, col_limit,
    and the offset of x[0, c, 0]. B == 1: COLS channels (vectors); else one channel (scalars)."""
    block = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    if WIDE:  # offsets past 2**31
        rows = rows.to(tl.int64)
        block = block.to(tl.int64)
    if CHANNEL_COLS:
        param = block * COLS + cols
        valid = param < C
        base, col_start, col_limit, first = 0, block * COLS, C, param
    else:
        param = block
        valid = block < C  # always: one real channel
        base, col_start, col_limit, first = block * B, 0, B, block * B
    return split, rows, cols, param, valid, base, col_start, col_limit, first


@triton.jit
def _bcast(v, CHANNEL_COLS: tl.constexpr):
    """A per-channel value shaped to broadcast against a [ROWS, COLS] tile."""
    if CHANNEL_COLS:
        v = v[None, :]
    return v


@triton.jit
def _load_channel(ptr, param, valid, other, CHANNEL_COLS: tl.constexpr):
    """Per-channel float32 values at `param`, shaped for a tile."""
    return _bcast(tl.load(ptr + param, mask=valid, other=other).to(tl.float32), CHANNEL_COLS)


@triton.jit
def _tile_sum(v, CHANNEL_COLS: tl.constexpr):
    """Sum of a [ROWS, COLS] tile per channel: over rows (B == 1), or over everything (one channel)."""
    if CHANNEL_COLS:
        out = tl.sum(v, axis=0)
    else:
        out = tl.sum(tl.sum(v, axis=1), axis=0)
    return out


@triton.jit
def _load_partials(part_ptr, k, splits, param, valid, C, S, CHANNEL_COLS: tl.constexpr):
    """Partial k [S, C] of the program's channels over all splits: [SPLITS, COLS] or [SPLITS]; 0 past S."""
    if CHANNEL_COLS:
        idx = splits[:, None] * C + param[None, :]
        ok = (splits < S)[:, None] & valid[None, :]
    else:
        idx = splits * C + param
        ok = splits < S
    return tl.load(part_ptr + k * S * C + idx, mask=ok, other=0.0)


@triton.jit
def _stats_partials(x_ptr, part_ptr, A, C, B, row_stride, items, items_per_split, b_blocks, S,
                    ROWS: tl.constexpr, COLS: tl.constexpr, CHANNEL_COLS: tl.constexpr, WIDE: tl.constexpr):
    """K1: count, mean and M2 of d = x - shift per (split, channel) -> part [3, S, C]."""
    split, rows, cols, param, valid, base, col_start, col_limit, first_x = _program(
        C, B, ROWS, COLS, CHANNEL_COLS, WIDE)
    shift_t = _load_channel(x_ptr, first_x, valid, 0.0, CHANNEL_COLS)  # x[0, c, 0]
    # Loop-carried float32 tensors (a Python 0.0 is a constexpr, which older Triton versions refuse
    # to carry through a loop); count is the same for every channel of the program.
    count = split.to(tl.float32) * 0.0
    if CHANNEL_COLS:
        mean = tl.zeros([COLS], dtype=tl.float32)
        m2 = tl.zeros([COLS], dtype=tl.float32)
    else:
        mean = count
        m2 = count
    first = split * items_per_split
    last = tl.minimum(first + items_per_split, items)
    for item in range(first, last):
        offs, ok = _tile(item, rows, cols, base, col_start, col_limit, A, row_stride, b_blocks, ROWS, COLS)
        a_block = item // b_blocks
        n_tile = tl.minimum(A - a_block * ROWS, ROWS).to(tl.float32)  # values per channel
        if not CHANNEL_COLS:
            n_tile = n_tile * tl.minimum(B - (item - a_block * b_blocks) * COLS, COLS).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, x - shift_t, 0.0)
        tile_mean = _tile_sum(d, CHANNEL_COLS) / n_tile
        dev = tl.where(ok, d - _bcast(tile_mean, CHANNEL_COLS), 0.0)
        tile_m2 = _tile_sum(dev * dev, CHANNEL_COLS)
        # Chan et al.: merge (count, mean, m2) with the tile's (n_tile, tile_mean, tile_m2)
        total = count + n_tile
        frac = n_tile / total
        diff = tile_mean - mean
        mean = mean + diff * frac
        m2 = m2 + tile_m2 + diff * diff * count * frac
        count = total
    idx = split * C + param
    tl.store(part_ptr + idx, count + mean * 0.0, mask=valid)  # count broadcast to the channels
    tl.store(part_ptr + S * C + idx, mean, mask=valid)
    tl.store(part_ptr + 2 * S * C + idx, m2, mask=valid)


@triton.jit
def _normalize(x_ptr, y_ptr, w_ptr, b_ptr, part_ptr, stats_ptr, A, C, B, row_stride, items, items_per_split,
               b_blocks, S, eps, unbias,
               ROWS: tl.constexpr, COLS: tl.constexpr, SPLITS: tl.constexpr, CHANNEL_COLS: tl.constexpr,
               HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, WIDE: tl.constexpr):
    """K2: merge the S partials of K1, write y; split 0 writes stats [5, C]
    (shift, delta, invstd, mean = shift + delta, variance for the running estimate)."""
    split, rows, cols, param, valid, base, col_start, col_limit, first_x = _program(
        C, B, ROWS, COLS, CHANNEL_COLS, WIDE)
    splits = tl.arange(0, SPLITS)
    # Chan et al. over the S partials at once: mean = sum n_s mean_s / n, M2 = sum M2_s + n_s (mean_s - mean)^2
    n_s = _load_partials(part_ptr, 0, splits, param, valid, C, S, CHANNEL_COLS)
    mean_s = _load_partials(part_ptr, 1, splits, param, valid, C, S, CHANNEL_COLS)
    m2_s = _load_partials(part_ptr, 2, splits, param, valid, C, S, CHANNEL_COLS)
    n = tl.maximum(tl.sum(n_s, axis=0), 1.0)  # 1: channels past C (masked)
    delta = tl.sum(n_s * mean_s, axis=0) / n
    dm = mean_s - _bcast(delta, CHANNEL_COLS)
    m2 = tl.sum(m2_s + n_s * dm * dm, axis=0)
    shift = tl.load(x_ptr + first_x, mask=valid, other=0.0).to(tl.float32)
    var = m2 / n
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = invstd
    if HAS_WEIGHT:
        scale = invstd * tl.load(w_ptr + param, mask=valid, other=1.0).to(tl.float32)
    offset = scale * 0.0
    if HAS_BIAS:
        offset = tl.load(b_ptr + param, mask=valid, other=0.0).to(tl.float32)
    first_split = valid & (split == 0)
    tl.store(stats_ptr + param, shift, mask=first_split)
    tl.store(stats_ptr + C + param, delta, mask=first_split)
    tl.store(stats_ptr + 2 * C + param, invstd, mask=first_split)
    tl.store(stats_ptr + 3 * C + param, shift + delta, mask=first_split)
    tl.store(stats_ptr + 4 * C + param, var * unbias, mask=first_split)
    scale_t = _bcast(scale, CHANNEL_COLS)
    offset_t = _bcast(offset, CHANNEL_COLS)
    shift_t = _bcast(shift, CHANNEL_COLS)
    delta_t = _bcast(delta, CHANNEL_COLS)
    first = split * items_per_split
    last = tl.minimum(first + items_per_split, items)
    for item in range(first, last):
        offs, ok = _tile(item, rows, cols, base, col_start, col_limit, A, row_stride, b_blocks, ROWS, COLS)
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        y = (x - shift_t - delta_t) * scale_t + offset_t  # (d - mean(d)) * scale + bias
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grad_and_x_hat(g_ptr, x_ptr, offs, ok, shift_t, delta_t, invstd_t):
    """A tile of the output gradient g and of x_hat = (x - shift - delta) * invstd, float32 (0 where masked)."""
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    return g, (x - shift_t - delta_t) * invstd_t


@triton.jit
def _grad_partials(g_ptr, x_ptr, shift_ptr, delta_ptr, invstd_ptr, part_ptr, A, C, B, row_stride, items,
                   items_per_split, b_blocks, S,
                   ROWS: tl.constexpr, COLS: tl.constexpr, CHANNEL_COLS: tl.constexpr, WIDE: tl.constexpr):
    """K3: sums of g and g * x_hat per (split, channel) -> part [2, S, C]."""
    split, rows, cols, param, valid, base, col_start, col_limit, first_x = _program(
        C, B, ROWS, COLS, CHANNEL_COLS, WIDE)
    shift_t = _load_channel(shift_ptr, param, valid, 0.0, CHANNEL_COLS)
    delta_t = _load_channel(delta_ptr, param, valid, 0.0, CHANNEL_COLS)
    invstd_t = _load_channel(invstd_ptr, param, valid, 0.0, CHANNEL_COLS)
    sum_g = tl.zeros([ROWS, COLS], dtype=tl.float32)
    sum_gx = tl.zeros([ROWS, COLS], dtype=tl.float32)
    first = split * items_per_split
    last = tl.minimum(first + items_per_split, items)
    for item in range(first, last):
        offs, ok = _tile(item, rows, cols, base, col_start, col_limit, A, row_stride, b_blocks, ROWS, COLS)
        g, x_hat = _grad_and_x_hat(g_ptr, x_ptr, offs, ok, shift_t, delta_t, invstd_t)
        sum_g += g
        sum_gx += g * x_hat  # g = 0 where masked
    idx = split * C + param
    tl.store(part_ptr + idx, _tile_sum(sum_g, CHANNEL_COLS), mask=valid)
    tl.store(part_ptr + S * C + idx, _tile_sum(sum_gx, CHANNEL_COLS), mask=valid)


@triton.jit
def _grad_input(g_ptr, x_ptr, dx_ptr, w_ptr, shift_ptr, delta_ptr, invstd_ptr, part_ptr, out_ptr, A, C, B, row_stride,
                items, items_per_split, b_blocks, S, inv_n,
                ROWS: tl.constexpr, COLS: tl.constexpr, SPLITS: tl.constexpr, CHANNEL_COLS: tl.constexpr,
                HAS_WEIGHT: tl.constexpr, WIDE: tl.constexpr):
    """K4: grad_x = weight * invstd * (g - sum g / n - x_hat * sum(g x_hat) / n); split 0 writes
    out [2, C] = (grad_weight, grad_bias)."""
    split, rows, cols, param, valid, base, col_start, col_limit, first_x = _program(
        C, B, ROWS, COLS, CHANNEL_COLS, WIDE)
    splits = tl.arange(0, SPLITS)
    grad_bias = tl.sum(_load_partials(part_ptr, 0, splits, param, valid, C, S, CHANNEL_COLS), axis=0)
    grad_weight = tl.sum(_load_partials(part_ptr, 1, splits, param, valid, C, S, CHANNEL_COLS), axis=0)
    tl.store(out_ptr + param, grad_weight, mask=valid & (split == 0))
    tl.store(out_ptr + C + param, grad_bias, mask=valid & (split == 0))
    invstd = tl.load(invstd_ptr + param, mask=valid, other=0.0).to(tl.float32)
    scale = invstd
    if HAS_WEIGHT:
        scale = invstd * tl.load(w_ptr + param, mask=valid, other=0.0).to(tl.float32)
    shift_t = _load_channel(shift_ptr, param, valid, 0.0, CHANNEL_COLS)
    delta_t = _load_channel(delta_ptr, param, valid, 0.0, CHANNEL_COLS)
    invstd_t = _bcast(invstd, CHANNEL_COLS)
    scale_t = _bcast(scale, CHANNEL_COLS)
    mean_g_t = _bcast(grad_bias * inv_n, CHANNEL_COLS)
    mean_gx_t = _bcast(grad_weight * inv_n, CHANNEL_COLS)
    first = split * items_per_split
    last = tl.minimum(first + items_per_split, items)
    for item in range(first, last):
        offs, ok = _tile(item, rows, cols, base, col_start, col_limit, A, row_stride, b_blocks, ROWS, COLS)
        g, x_hat = _grad_and_x_hat(g_ptr, x_ptr, offs, ok, shift_t, delta_t, invstd_t)
        dx = scale_t * (g - mean_g_t - x_hat * mean_gx_t)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


_KERNELS = (_stats_partials, _normalize, _grad_partials, _grad_input)


# ----------------------------------------------------------------------------- launch geometry (pure Python)

def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _column_block(B: int, tile: int) -> int:
    """Tile width along b (B > 1): the widest power of two (4 .. 1024) that pads B by at most 30%
    (masked lanes cost arithmetic, not bandwidth); else the one that pads least."""
    widths = []
    width = min(_next_pow2(B), tile, 1024)
    while width >= 4:
        widths.append(width)
        width //= 2
    widths = widths or [4]
    for width in widths:
        if math.ceil(B / width) * width <= 1.3 * B:
            return width
    return min(widths, key=lambda w: (math.ceil(B / w) * w, -w))


@dataclass(frozen=True)
class Tiling:
    """How [A, C, B] is cut: [rows, cols] tiles, `splits` programs per channel block."""
    rows: int
    cols: int
    channel_cols: bool  # B == 1: the tile's columns are channels; else positions b of one channel
    channel_blocks: int
    b_blocks: int  # tiles across one row of one channel (1 when channel_cols)
    items: int  # tiles per channel block
    items_per_split: int
    splits: int
    split_block: int  # splits rounded up to a power of two (K2/K4 combine them in one tile)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.channel_blocks, self.splits)


def choose_tiling(A: int, C: int, B: int, programs: int, tile: int = TILE) -> Tiling:
    """Tiles of about `tile` elements, and S splits so that channel blocks * S ~ `programs`, with
    1 <= S <= MAX_SPLITS and every split at least one tile of work."""
    if min(A, C, B, programs, tile) < 1:
        raise ValueError(f"choose_tiling: every argument must be >= 1, got A={A}, C={C}, B={B}, "
                         f"programs={programs}, tile={tile}")
    channel_cols = B == 1
    if channel_cols:
        cols = min(_next_pow2(C), MAX_CHANNEL_COLS, _next_pow2(tile))
        channel_blocks, b_blocks = math.ceil(C / cols), 1
        max_splits = min(MAX_SPLITS, max(1, MAX_PARTIAL_TILE // cols))
    else:
        cols = _column_block(B, tile)
        channel_blocks, b_blocks = C, math.ceil(B / cols)
        max_splits = MAX_SPLITS
    rows = max(1, min(tile // cols, _next_pow2(A)))
    items = math.ceil(A / rows) * b_blocks
    splits = max(1, min(math.ceil(programs / channel_blocks), max_splits, items))
    items_per_split = math.ceil(items / splits)
    splits = math.ceil(items / items_per_split)  # drop splits that would get no tile
    return Tiling(rows, cols, channel_cols, channel_blocks, b_blocks, items, items_per_split, splits,
                  _next_pow2(splits))


def view_as_acb(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(A, C, B) for a dense contiguous or channels-last (N, C, *spatial) tensor, else None."""
    n, c, inner = shape[0], shape[1], math.prod(shape[2:])
    if stride == _dense_strides(shape, range(len(shape) - 1, -1, -1)):
        return (n, c, inner)
    if len(shape) >= 3 and stride == _dense_strides(shape, (1, *range(len(shape) - 1, 1, -1), 0)):
        return (n * inner, c, 1)
    return None


# ----------------------------------------------------------------------------- plans and launches

@functools.cache
def _interpreted_kernels() -> tuple:
    """The four kernels run by Triton's interpreter (CPU tensors; see triton_interpret)."""
    return interpreted(_KERNELS)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(frozen=True)
class _Plan:
    copy: bool  # strides neither contiguous nor channels-last: run on a contiguous copy
    C: int
    tiling: Tiling
    args: tuple  # A, C, B, row_stride, items, items_per_split, b_blocks, S
    meta: dict  # constexprs shared by the four kernels, and num_warps
    unbias: float  # n / (n - 1): the running variance is unbiased
    inv_n: float
    kernels: tuple
    device_index: int | None  # CUDA: the device to launch on


_plans: dict[tuple, _Plan] = {}


def _plan(x: Tensor) -> _Plan:
    key = (x.shape, x.stride(), x.dtype, x.device)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _make_plan(x)
    return plan


def _make_plan(x: Tensor) -> _Plan:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"bnexp's Triton batch norm takes float32, bfloat16 or float16 inputs, not {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"batch norm expects an input (N, C, *spatial), got shape {tuple(x.shape)}")
    acb = view_as_acb(tuple(x.shape), x.stride())
    copy = acb is None
    A, C, B = acb or view_as_acb(tuple(x.shape), _dense_strides(x.shape, range(x.dim() - 1, -1, -1)))
    if x.device.type == "cuda":
        kernels, programs, tile, index = _KERNELS, PROGRAMS_PER_SM * _sm_count(x.device.index), TILE, x.device.index
    elif x.device.type == "cpu":
        kernels, programs, tile, index = _interpreted_kernels(), INTERPRETER_PROGRAMS, INTERPRETER_TILE, None
    else:
        raise RuntimeError(f"bnexp's Triton batch norm runs on CUDA (compiled) or CPU (Triton's interpreter), "
                           f"not on {x.device.type}")
    tiling = choose_tiling(A, C, B, programs, tile)
    if A + tiling.rows >= 2**31 or B >= 2**31:
        raise ValueError(f"bnexp's Triton batch norm: input {tuple(x.shape)} is too large")
    n = A * B
    wide = (A + tiling.rows) * C * B >= 2**31  # offsets, masked rows included, need int64
    meta = dict(ROWS=tiling.rows, COLS=tiling.cols, CHANNEL_COLS=tiling.channel_cols, WIDE=wide, num_warps=NUM_WARPS)
    args = (A, C, B, C * B, tiling.items, tiling.items_per_split, tiling.b_blocks, tiling.splits)
    return _Plan(copy, C, tiling, args, meta, n / (n - 1) if n > 1 else math.inf, 1.0 / n, kernels, index)


def _other_device(plan: _Plan) -> bool:
    """Triton launches on the current CUDA device: is the input on another one?"""
    return plan.device_index is not None and torch.cuda.current_device() != plan.device_index


def _param(p: Tensor | None, plan: _Plan, name: str, x: Tensor) -> Tensor | None:
    """A per-channel tensor (C,) as the kernels read it (dense); None stays None."""
    if p is None:
        return None
    if p.shape != (plan.C,):
        raise ValueError(f"batch norm: {name} has shape {tuple(p.shape)}, expected ({plan.C},) "
                         f"for an input of shape {tuple(x.shape)}")
    return p if p.is_contiguous() else p.contiguous()


# ----------------------------------------------------------------------------- entry points (as functional's)

def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, biased_running_var: bool):
    """As `functional.train_forward`: (y, shift, delta, invstd, batch mean, variance for the running estimate)."""
    plan = _plan(x)
    if _other_device(plan):
        with torch.cuda.device(plan.device_index):
            return train_forward(x, weight, bias, eps, biased_running_var)
    if plan.copy:
        x = x.clone(memory_format=torch.contiguous_format)
    weight, bias = _param(weight, plan, "weight", x), _param(bias, plan, "bias", x)
    t = plan.tiling
    y = torch.empty_like(x)  # x is dense: y gets its strides
    part = torch.empty((3, t.splits, plan.C), dtype=torch.float32, device=x.device)
    stats = torch.empty((5, plan.C), dtype=torch.float32, device=x.device)
    stats_partials, normalize = plan.kernels[0], plan.kernels[1]
    stats_partials[t.grid](x, part, *plan.args, **plan.meta)
    normalize[t.grid](x, y, stats if weight is None else weight, stats if bias is None else bias, part, stats,
                      *plan.args, eps, 1.0 if biased_running_var else plan.unbias, SPLITS=t.split_block,
                      HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **plan.meta)
    shift, delta, invstd, mean, running_estimate = stats.unbind(0)
    return y, shift, delta, invstd, mean, running_estimate


def train_backward(grad_y: Tensor, x: Tensor, weight: Tensor | None, shift: Tensor, delta: Tensor, invstd: Tensor):
    """As `functional.train_backward`: (grad_x in x's dtype, grad_weight, grad_bias in float32)."""
    plan = _plan(x)
    if _other_device(plan):
        with torch.cuda.device(plan.device_index):
            return train_backward(grad_y, x, weight, shift, delta, invstd)
    if plan.copy:
        x = x.clone(memory_format=torch.contiguous_format)
    if grad_y.stride() != x.stride() or grad_y.shape != x.shape:  # the kernels index both alike
        grad_y = torch.empty_like(x).copy_(grad_y)
    weight = _param(weight, plan, "weight", x)
    shift, delta, invstd = (_param(stat, plan, name, x) for stat, name in ((shift, "shift"), (delta, "delta"),
                                                                            (invstd, "invstd")))
    t = plan.tiling
    grad_x = torch.empty_like(x)
    part = torch.empty((2, t.splits, plan.C), dtype=torch.float32, device=x.device)
    out = torch.empty((2, plan.C), dtype=torch.float32, device=x.device)
    grad_partials, grad_input = plan.kernels[2], plan.kernels[3]
    grad_partials[t.grid](grad_y, x, shift, delta, invstd, part, *plan.args, **plan.meta)
    grad_input[t.grid](grad_y, x, grad_x, out if weight is None else weight, shift, delta, invstd, part, out,
                       *plan.args, plan.inv_n, SPLITS=t.split_block, HAS_WEIGHT=weight is not None, **plan.meta)
    grad_weight, grad_bias = out.unbind(0)
    return grad_x, grad_weight, grad_bias
