"""GPU kernels: the student's submanifold convolution in Triton.

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

Import this module only after TRITON_INTERPRET is settled: Triton reads the variable when a
kernel is defined. With TRITON_INTERPRET=1 the kernels run on CPU tensors (numpy underneath;
float32 only, slow): that is how the tests prove them equal to the plain-torch definition on a
machine without a GPU.
"""
from __future__ import annotations

import os
from collections import Counter

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _disable_current_modes

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LAUNCHES = Counter()  # kernel name -> launches so far (read by infer.count_ops)


# =====================================================================================
# The kernels
# =====================================================================================

@triton.jit
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


@triton.jit
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
# Launching them
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
# The convolution with its gradients
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
