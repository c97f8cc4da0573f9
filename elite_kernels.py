"""GPU forms beside the plain ones, read top to bottom:

    1. The student's submanifold convolution in Triton: the kernels, launching them, the
       convolution with its gradients
    2. Which form runs: the plain-torch definition (elite.py) or these kernels (--conv)
    3. SAM's attention with its relative positions folded into q and k, so that torch's fused
       attention kernels run (elite.build_sam_encoder puts it in every block)

elite.submconv3d is the definition (plain torch: per offset, gather -> matmul -> scatter-add)
and the CPU path. This module computes the same sum with one Triton program per tile of
output rows, in the output-stationary ("implicit GEMM") form:

    out[i] = sum over the 27 offsets k of x[nb[k, i]] @ W[k]          (nb[k, i] = -1: no term)

nb is the (27, N) int32 neighbour table of elite.neighbour_table. Each program owns BLOCK_N
output rows, loops over the 27 offsets, gathers its rows' neighbours (masked where absent),
multiplies them with that offset's (Cin, Cout) weight in one tl.dot, accumulates in float32
and writes each output row once: no atomics, so two runs are bitwise equal. An offset that no
row of the tile has is skipped.

The backward pass reuses the same two ideas:
  * features: grad_x[j] = sum_k g[nb[k, j]] @ W[26 - k]^T. The table is symmetric (j is i's
    neighbour at +o exactly when i is j's at -o, and offset -o is row 26 - k), so this is the
    forward kernel run on the output gradient with the mirrored, transposed weights.
  * weight: grad_W[k] = sum_i x[nb[k, i]]^T g[i]. Each program sums a fixed chunk of rows for
    one offset into a partial (Cin, Cout); the partials are added by torch.sum in a fixed
    order (deterministic: no float atomics).

elite.py imports this module (so set TRITON_INTERPRET before importing elite: Triton reads the
variable when a kernel is defined); without triton it still imports, and the plain-torch form
runs everywhere. With TRITON_INTERPRET=1 the kernels run on CPU tensors (numpy underneath;
float32 only, slow): that is how the tests prove them equal to the plain-torch definition on a
machine without a GPU.
"""
from __future__ import annotations

import functools
import os
import warnings
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

try:
    import triton
    import triton.language as tl
    jit = triton.jit
except ImportError:  # torch's CPU build brings no Triton: the kernels stay plain functions nobody calls
    triton = tl = None

    def jit(fn):
        return fn

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LAUNCHES = Counter()  # kernel name -> launches so far (read by infer.count_ops)


# =====================================================================================
# 1. The Triton convolution: the kernels
# =====================================================================================

@jit
def gather_conv_kernel(x_ptr, w_ptr, nb_ptr, out_ptr, n, nb_stride, w_stride_k, w_stride_in, w_stride_out,
                       C_IN: tl.constexpr, C_OUT: tl.constexpr, MIRROR: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr, PRECISION: tl.constexpr):
    """out[rows, cols] = sum_k x[nb[k, rows]] @ W[k][:, cols]; with MIRROR, W[26 - k] instead.
    x (n, C_IN) and out (n, C_OUT) row-major; W addressed by its three strides."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) the tile's output rows
    cols = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)  # (BLOCK_OUT,)
    chans = tl.arange(0, BLOCK_IN)
    acc = tl.zeros((BLOCK_N, BLOCK_OUT), dtype=tl.float32)
    for k in range(27):
        nb = tl.load(nb_ptr + k * nb_stride + rows, mask=rows < n, other=-1)  # (BLOCK_N,) int32
        if tl.max(nb, 0) >= 0:  # some row of the tile has a neighbour at this offset
            src = nb.to(tl.int64)
            if MIRROR:
                w_k = w_ptr + (26 - k) * w_stride_k
            else:
                w_k = w_ptr + k * w_stride_k
            for c0 in range(0, C_IN, BLOCK_IN):
                c = c0 + chans
                a = tl.load(x_ptr + src[:, None] * C_IN + c[None, :],
                            mask=(nb[:, None] >= 0) & (c[None, :] < C_IN), other=0.0)  # (BLOCK_N, BLOCK_IN)
                w = tl.load(w_k + c[:, None] * w_stride_in + cols[None, :] * w_stride_out,
                            mask=(c[:, None] < C_IN) & (cols[None, :] < C_OUT), other=0.0)  # (BLOCK_IN, BLOCK_OUT)
                acc = tl.dot(a, w, acc, input_precision=PRECISION)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * C_OUT + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < n) & (cols[None, :] < C_OUT))


@jit
def weight_grad_kernel(x_ptr, g_ptr, nb_ptr, part_ptr, n, nb_stride, C_IN: tl.constexpr, C_OUT: tl.constexpr,
                       ROWS_PER_PROGRAM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_IN: tl.constexpr,
                       BLOCK_OUT: tl.constexpr, PRECISION: tl.constexpr):
    """part[chunk, k] = sum over the chunk's rows i of x[nb[k, i]]^T g[i]   (BLOCK_IN x BLOCK_OUT of it).
    Grid: (27 offsets, row chunks, input-channel blocks x output-channel blocks)."""
    k, chunk = tl.program_id(0), tl.program_id(1)
    blocks_out = tl.cdiv(C_OUT, BLOCK_OUT)
    c = (tl.program_id(2) // blocks_out) * BLOCK_IN + tl.arange(0, BLOCK_IN)  # (BLOCK_IN,)
    cols = (tl.program_id(2) % blocks_out) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)  # (BLOCK_OUT,)
    acc = tl.zeros((BLOCK_IN, BLOCK_OUT), dtype=tl.float32)
    for r0 in range(chunk * ROWS_PER_PROGRAM, tl.minimum((chunk + 1) * ROWS_PER_PROGRAM, n), BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        nb = tl.load(nb_ptr + k * nb_stride + rows, mask=rows < n, other=-1)  # (BLOCK_N,)
        if tl.max(nb, 0) >= 0:
            has = nb[:, None] >= 0
            a = tl.load(x_ptr + nb.to(tl.int64)[:, None] * C_IN + c[None, :],
                        mask=has & (c[None, :] < C_IN), other=0.0)  # (BLOCK_N, BLOCK_IN)
            g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * C_OUT + cols[None, :],
                        mask=has & (cols[None, :] < C_OUT), other=0.0)  # (BLOCK_N, BLOCK_OUT)
            acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)
    out = part_ptr + (chunk * 27 + k).to(tl.int64) * C_IN * C_OUT
    tl.store(out + c[:, None] * C_OUT + cols[None, :], acc, mask=(c[:, None] < C_IN) & (cols[None, :] < C_OUT))


# =====================================================================================
# 1.1 Launching them
# =====================================================================================

def launch(kernel, grid, *args, **meta) -> None:
    """kernel[grid](*args, **meta), counted in LAUNCHES. The interpreter copies tensors to and
    from numpy with torch operations of its own; they are hidden from dispatch modes (such as
    infer.count_ops), because a GPU launch makes no such copies."""
    LAUNCHES[kernel.fn.__name__] += 1
    if INTERPRET:
        with _disable_current_modes():
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def precision(dtype: torch.dtype) -> str:
    """float32 products exactly unless torch is told TF32 may be used (torch's own rule for
    matmuls); bf16 operands multiply in bf16 whatever this says (Triton's default then)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def channel_block(c: int) -> int:
    """A power of two >= 16 (tl.dot's smallest side), at most 64 (one tile's registers)."""
    return min(64, max(16, triton.next_power_of_2(c)))


def tile_rows(dtype: torch.dtype) -> int:
    """Output rows per program. Measured on an H200 (../shared/reference/gpu-h200.md): 64 rows
    for float32, 128 for bf16. The interpreter's cost is per program, not per row: larger tiles."""
    if INTERPRET:
        return 256
    return 64 if dtype == torch.float32 else 128


def gather_conv(x: torch.Tensor, weight: torch.Tensor, nb: torch.Tensor, mirror=False,
                block_n: int | None = None) -> torch.Tensor:
    """x (N, Cin); weight (27, Cin, Cout) (with mirror: (27, Cout, Cin), applied as W[26 - k]^T);
    nb (27, N) int32 with unit column stride -> (N, Cout) in x's dtype."""
    w_stride_k, w_stride_in, w_stride_out = weight.stride()
    c_in, c_out = weight.shape[1:]
    if mirror:  # read W[26 - k]^T: swap the roles of W's two channel axes
        c_in, c_out, w_stride_in, w_stride_out = c_out, c_in, w_stride_out, w_stride_in
    n = len(x)
    out = x.new_empty(n, c_out)
    if n == 0:  # a batch with no voxel: nothing to launch
        return out
    if 27 * nb.stride(0) >= 1 << 31:
        raise ValueError(f"a neighbour table of {nb.stride(0):,} columns: too many voxels for int32 offsets")
    block_n = block_n or tile_rows(x.dtype)
    block_out = channel_block(c_out)
    launch(gather_conv_kernel, (triton.cdiv(n, block_n), triton.cdiv(c_out, block_out)),
           x, weight, nb, out, n, nb.stride(0), w_stride_k, w_stride_in, w_stride_out,
           C_IN=c_in, C_OUT=c_out, MIRROR=mirror, BLOCK_N=block_n, BLOCK_IN=channel_block(c_in),
           BLOCK_OUT=block_out, PRECISION=precision(x.dtype))
    return out


def weight_grad(x: torch.Tensor, grad_out: torch.Tensor, nb: torch.Tensor, block_n: int | None = None,
                rows_per_program: int | None = None) -> torch.Tensor:
    """x (N, Cin), grad_out (N, Cout), nb (27, N) -> grad of the (27, Cin, Cout) weight, float32.
    Each program sums a fixed chunk of rows; the chunks are summed in a fixed order."""
    n, c_in = x.shape
    c_out = grad_out.shape[1]
    block_n = block_n or tile_rows(x.dtype)
    # At most 32 chunks of whole tiles per offset: 27 x 32 programs fill a GPU, and the partials stay small.
    rows_per_program = rows_per_program or block_n * max(1, triton.cdiv(triton.cdiv(n, 32), block_n))
    if rows_per_program % block_n:
        raise ValueError(f"rows_per_program {rows_per_program} is not a multiple of the tile's {block_n} rows")
    chunks = max(1, triton.cdiv(n, rows_per_program))
    block_in, block_out = channel_block(c_in), channel_block(c_out)
    part = torch.empty(chunks, 27, c_in, c_out, dtype=torch.float32, device=x.device)
    launch(weight_grad_kernel, (27, chunks, triton.cdiv(c_in, block_in) * triton.cdiv(c_out, block_out)),
           x, grad_out, nb, part, n, nb.stride(0), C_IN=c_in, C_OUT=c_out, ROWS_PER_PROGRAM=rows_per_program,
           BLOCK_N=block_n, BLOCK_IN=block_in, BLOCK_OUT=block_out, PRECISION=precision(x.dtype))
    return part.sum(0)  # (27, Cin, Cout): a fixed-order reduction


# =====================================================================================
# 1.2 The convolution with its gradients
# =====================================================================================

class SubMConv3dTriton(torch.autograd.Function):
    """Same inputs and outputs as elite's plain convolution: feats (N, Cin), weight
    (3, 3, 3, Cin, Cout), nb (27, N) int32 -> (N, Cout)."""

    @staticmethod
    def forward(ctx, feats, weight, nb):
        if feats.dtype != weight.dtype:
            raise TypeError(f"features in {feats.dtype} but weights in {weight.dtype}: the Triton convolution "
                            "multiplies one type (under autocast, elite.submconv3d casts both)")
        feats = feats.contiguous()
        ctx.save_for_backward(feats, weight, nb)
        return gather_conv(feats, weight.reshape(27, *weight.shape[3:]), nb)

    @staticmethod
    def backward(ctx, grad_out):
        feats, weight, nb = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        w27 = weight.reshape(27, *weight.shape[3:])  # (27, Cin, Cout)
        grad_feats = gather_conv(grad_out, w27, nb, mirror=True) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = weight_grad(feats, grad_out, nb).to(weight.dtype).view_as(weight)
        return grad_feats, grad_weight, None


# =====================================================================================
# 2. Which form runs: the plain-torch definition (elite.py) or these kernels
# =====================================================================================
# "auto" takes Triton on CUDA tensors when triton imports, plain torch otherwise. The
# environment variable ELITE_CONV (auto | torch | triton) sets it for a process; the scripts'
# --conv flag calls set_conv_path. Forcing "triton" on CPU tensors needs TRITON_INTERPRET=1
# set before start (Triton's interpreter: exact in float32 and slow; it is how the tests run it).

CONV_PATHS = ("auto", "torch", "triton")
CONV_PATH = os.environ.get("ELITE_CONV", "auto")


def set_conv_path(path: str) -> None:
    global CONV_PATH
    if path not in CONV_PATHS:
        raise ValueError(f"convolution path {path!r}: expected one of {', '.join(CONV_PATHS)}")
    CONV_PATH = path


def conv_path(device: torch.device, dtype=torch.float32) -> str:
    """'triton' or 'torch': the form the convolutions on this device and in this precision run."""
    if CONV_PATH not in CONV_PATHS:
        raise ValueError(f"ELITE_CONV={CONV_PATH!r}: expected one of {', '.join(CONV_PATHS)}")
    if CONV_PATH == "torch" or (CONV_PATH == "auto" and (device.type != "cuda" or triton is None
                                                        or torch.cuda.get_device_capability(device) < (8, 0))):
        return "torch"  # auto: Triton on GPUs from Ampere (sm_80) on, where its bf16 products run
    if triton is None:
        raise RuntimeError("the Triton convolution was asked for (--conv triton / ELITE_CONV=triton) but triton "
                           "does not import: install torch's CUDA build (it brings triton), or use --conv torch")
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"the Triton convolution runs on CUDA tensors; these are on {device}. Use --conv torch "
                           "(or TRITON_INTERPRET=1, Triton's slow CPU interpreter, for tests)")
    if CONV_PATH == "auto" and not triton_agrees(device, dtype):
        return "torch"
    return "triton"


@functools.lru_cache(maxsize=None)
def triton_agrees(device: torch.device, dtype: torch.dtype) -> bool:
    """auto's check, once per device and precision: the Triton convolution of a small voxel set
    (two scans on a 6^3 grid) runs and gives what a submanifold convolution is, a dense conv3d
    read at the active voxels. If not (a GPU or triton version it does not compile for), auto
    keeps plain torch and says why; --conv triton would raise instead."""
    g = torch.Generator().manual_seed(0)
    coords = torch.nonzero(torch.rand(2, 6, 6, 6, generator=g) < 0.5)  # (N, 4) [scan, x, y, z]
    feats = torch.randn(len(coords), 64, generator=g)  # (N, 64)
    weight = torch.randn(3, 3, 3, 64, 64, generator=g) * 0.05  # weight[i, j, k]: offset (i-1, j-1, k-1)
    scan, x, y, z = coords.T
    grid = torch.zeros(2, 64, 6, 6, 6)
    grid[scan, :, x, y, z] = feats
    dense = F.conv3d(grid, weight.permute(4, 3, 0, 1, 2), padding=1)[scan, :, x, y, z]  # (N, 64)
    index = torch.full((2, 8, 8, 8), -1, dtype=torch.int32)  # voxel numbers, a border of -1 around the grid
    index[scan, x + 1, y + 1, z + 1] = torch.arange(len(coords), dtype=torch.int32)
    nb = torch.stack([index[scan, x + 1 + dx, y + 1 + dy, z + 1 + dz]
                      for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)])  # (27, N), elite.OFFSETS' order
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            out = SubMConv3dTriton.apply(feats.to(device, dtype), weight.to(device, dtype), nb.to(device))
            error = (out.float().cpu() - dense).abs().max()
        agrees = bool(error <= (1e-4 if precision(dtype) == "ieee" else 1e-2) * dense.abs().max())
        why = f"its output differs from a dense conv3d's by {float(error):.2g}"
    except Exception as e:  # noqa: BLE001 - any failure to compile or run means: not here
        agrees, why = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not agrees:
        warnings.warn(f"the Triton convolution does not work on {device} in {dtype} ({why}): the plain-torch form "
                      "runs instead (--conv torch silences this; --conv triton raises)")
    return agrees


# =====================================================================================
# 3. SAM's attention in the form the fused attention kernels run
# =====================================================================================
# elite.build_sam_encoder puts this in place of every block's attention: same modules, same
# weights, same outputs as segment-anything's Attention (a test compares them), but no mask.

class FoldedAttention(nn.Module):
    """SAM's attention, same maths and the same modules (qkv, proj, rel_pos_h, rel_pos_w); a
    test compares it with SAM's Attention:

        softmax(s q k^T + q R_h[row_q - row_k] + q R_w[col_q - col_k]) v,   s = 1 / sqrt(d)

    SAM adds the decomposed relative-position term to the logits as a mask, which sends torch's
    attention to its slow unfused form. Here it is folded into the queries and keys instead:
    q' = [q, q R_h[row_q]^T / s, q R_w[col_q]^T / s] and k' = [k, onehot(row_k), onehot(col_k)]
    give s q' k'^T = s q k^T + the term, exactly, with no mask: the fused kernels run."""

    def __init__(self, attn: nn.Module):  # segment_anything's Attention
        super().__init__()
        self.num_heads = attn.num_heads
        self.qkv, self.proj = attn.qkv, attn.proj  # (3C, C): q rows 0:C, k C:2C, v 2C:3C
        self.use_rel_pos = attn.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h, self.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w
        self._tables = {}  # (h, w, dtype, ...) -> the frozen tables for that grid, made once

    def rel_pos_tables(self, h: int, w: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """For an h x w grid, per position p = (row, col): (R_h[row] and R_w[col] divided by s,
        (h*w, h + w + pad, d); onehot(row), onehot(col), (h*w, h + w + pad)), zero-padded to a
        multiple of 8 columns once q and k are extended, as the fused kernels want. SAM's tables
        are resized to the grid (get_rel_pos); they are frozen, so this is made once per grid."""
        from segment_anything.modeling.image_encoder import get_rel_pos  # segment-anything: for the teacher only
        p_h, p_w = self.rel_pos_h, self.rel_pos_w
        key = (h, w, dtype, p_h.device, p_h._version, p_w._version, p_h.data_ptr(), p_w.data_ptr())
        if key not in self._tables:
            with torch.no_grad():
                d = p_h.shape[1]
                pad = -(d + h + w) % 8
                position = torch.arange(h * w, device=p_h.device)
                row, col = position.div(w, rounding_mode="floor"), position % w
                table = torch.cat([get_rel_pos(h, h, p_h)[row], get_rel_pos(w, w, p_w)[col]], 1) * d ** 0.5
                onehot = torch.cat([F.one_hot(row, h), F.one_hot(col, w)], 1)
                tables = (F.pad(table, (0, 0, 0, pad)).to(dtype), F.pad(onehot, (0, pad)).to(dtype))
                self._tables = {key: tables}  # the last grid only
        return self._tables[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape  # a window (14 x 14) or the whole grid (global blocks)
        n, d = b * self.num_heads, c // self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, d).permute(2, 0, 3, 1, 4)  # (3, B, heads, h*w, d)
        q, k, v = qkv.reshape(3, n, h * w, d).unbind(0)  # (B*heads, h*w, d) each
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            table, onehot = self.rel_pos_tables(h, w, q.dtype)
            # Each query times its own position's rows of R_h and R_w: one product per position,
            # all positions at once (the batch is the position, the rows the heads).
            rel = torch.bmm(q.transpose(0, 1), table.transpose(1, 2)).transpose(0, 1)  # (n, h*w, h + w + pad)
            q2 = torch.cat([q, rel], -1)  # (n, h*w, d + h + w + pad)
            k2 = torch.cat([k, onehot.expand(n, -1, -1)], -1)
            out = F.scaled_dot_product_attention(q2, k2, v, scale=d ** -0.5)  # softmax(s q2 k2^T) v
        out = out.reshape(b, self.num_heads, h, w, d).permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        return self.proj(out)
