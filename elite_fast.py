"""The fast forms of elite.py's parts, each beside the reference form it equals.

elite.py holds the method in its plain reference forms: the maths as the papers state it,
read top to bottom. This file holds the forms that run by default, faster on a GPU (fewer
launches, fewer waits for the data, Triton) and on a CPU. Each says which reference form it
equals; test_fast.py proves every one equal to it, outputs and gradients, and a whole student
step and a whole teacher step agree between the two. Read top to bottom:

    0. Which forms run: ELITE_FORMS=fast|reference, or a script's --forms
    1. Voxels as packed int64 keys, every scale in one torch.unique       (= elite.voxelize, each scale)
    2. The neighbour table and the convolution over it, its backward by hand (= elite.submconv3d)
    3. The student's stages batched: scale links over voxel pairs, split-weight point
       encoder, classifier per distinct voxel combination      (= elite.voxelize_scales, ...)
    4. The convolution in Triton (--conv): kernels, launches, gradients, which path runs
    5. The teacher: adapters merged into the weights, a bf16 weight cache, SAM's attention
       folded for the fused kernels, pixel features at the read pixels only

The Triton convolution computes the sum of section 2 with one program per tile of output
rows, in the output-stationary ("implicit GEMM") form:

    out[i] = sum over the 27 offsets k of x[nb[k, i]] @ W[k]          (nb[k, i] = -1: no term)

nb is the (27, N) int32 neighbour table of neighbour_table. Each program owns BLOCK_N output
rows, loops over the 27 offsets, gathers its rows' neighbours (masked where absent),
multiplies them with that offset's (Cin, Cout) weight in one tl.dot, accumulates in float32
and writes each output row once: no atomics, so two runs are bitwise equal. An offset that no
row of the tile has is skipped. The backward pass reuses the same two ideas:
  * features: grad_x[j] = sum_k g[nb[k, j]] @ W[26 - k]^T. The table is symmetric (j is i's
    neighbour at +o exactly when i is j's at -o, and offset -o is row 26 - k), so this is the
    forward kernel run on the output gradient with the mirrored, transposed weights.
  * weight: grad_W[k] = sum_i x[nb[k, i]]^T g[i]. Each program sums a fixed chunk of rows for
    one offset into a partial (Cin, Cout); the partials are added by torch.sum in a fixed
    order (deterministic: no float atomics).

Set TRITON_INTERPRET before importing elite (Triton reads the variable when a kernel is
defined); without triton this module still imports, and the plain-torch forms run everywhere.
With TRITON_INTERPRET=1 the kernels run on CPU tensors (numpy underneath; float32 only,
slow): that is how the tests prove them equal on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

import elite  # the reference forms; elite imports this module too (each reads the other only when called)

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
# 0. Which forms run
# =====================================================================================
# "fast" (the default) runs the forms of this file; "reference" runs elite.py's plain forms
# for a whole run. The environment variable ELITE_FORMS sets it for a process, a script's
# --forms flag calls set_forms. Models built in one form load and run in the other: the
# parameters and their names are the same.

FORMS = ("fast", "reference")
FORM = os.environ.get("ELITE_FORMS", "fast")


def set_forms(form: str) -> None:
    global FORM
    if form not in FORMS:
        raise ValueError(f"forms {form!r}: expected one of {', '.join(FORMS)}")
    FORM = form


def enabled() -> bool:
    """Whether the fast forms run (ELITE_FORMS / --forms fast, the default)."""
    if FORM not in FORMS:
        raise ValueError(f"ELITE_FORMS={FORM!r}: expected one of {', '.join(FORMS)}")
    return FORM == "fast"


@contextlib.contextmanager
def forms(form: str):
    """Run a block in these forms, then go back (tests compare the two)."""
    before = FORM
    set_forms(form)
    try:
        yield
    finally:
        set_forms(before)


@functools.lru_cache(maxsize=None)
def constant(values: tuple, device: torch.device, dtype=torch.long) -> torch.Tensor:
    """A small constant tensor, copied to its device once per process, not once per forward."""
    return torch.tensor(values, dtype=dtype, device=device)


def read_to_host(t: torch.Tensor) -> list:
    """The fast forms read values of the data only through here: one copy to the host, which on
    a GPU waits for the device (infer.count_ops counts it)."""
    return t.to("cpu", copy=True).tolist()


# =====================================================================================
# 1. Voxels as int64 keys, every scale in one torch.unique  (= elite.voxelize per scale)
# =====================================================================================
# A voxel is one int64 key, [set | batch | x | y | z] in bit fields, which sorts as its row
# [batch, x, y, z] sorts (lexicographically) within a set. The five scales are five sets of
# one key array, so one torch.unique voxelises them all: on a GPU the host waits for the data
# once, not once per scale. The same keys find every voxel's neighbours (section 2).

COORD_BITS = 15  # a coordinate field: +-16k cells around 0 (a grid is 1,000 cells across)
BATCH_BITS = 12  # up to 4,096 scans in a batch
VALUE_BITS = BATCH_BITS + 3 * COORD_BITS  # 57: a key below its set tag (4 bits: up to 16 sets)


def set_start_keys(sets: int, device) -> torch.Tensor:
    """(sets,) the smallest key of each set 0 .. sets - 1."""
    return constant(tuple(k << VALUE_BITS for k in range(sets)), device)


def pack_keys(batch: torch.Tensor, cells: torch.Tensor, sets: torch.Tensor | int = 0) -> torch.Tensor:
    """batch (...), cells (..., 3) int64 -> keys (...) int64 ordered as the rows [batch, x, y, z].
    Coordinates are shifted by half a field, so that negative ones (augmentation moves points
    off the grid, as upstream) and their -1 neighbours stay inside their own field."""
    batch, cells = batch.long(), cells.long()  # the fields need 64 bits
    c = cells + (1 << COORD_BITS - 1)
    if c.numel():
        torch._assert_async((c.min() >= 1) & (c.max() <= (1 << COORD_BITS) - 2) & (batch.min() >= 0)
                            & (batch.max() < 1 << BATCH_BITS),
                            "voxel coordinates beyond +-16k cells, or a batch of 4,096 scans or more")
    fields = constant((1 << 2 * COORD_BITS, 1 << COORD_BITS, 1), cells.device)
    return (sets << VALUE_BITS) + (batch << 3 * COORD_BITS) + (c * fields).sum(-1)


def unpack_keys(keys: torch.Tensor) -> torch.Tensor:
    """keys (V,) -> rows (V, 4) [batch, x, y, z]."""
    device, mask = keys.device, (1 << COORD_BITS) - 1
    shifts = constant((3 * COORD_BITS, 2 * COORD_BITS, COORD_BITS, 0), device)
    masks = constant(((1 << BATCH_BITS) - 1, mask, mask, mask), device)
    return ((keys[:, None] >> shifts) & masks) - constant((0,) + (1 << COORD_BITS - 1,) * 3, device)


def rows_per_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """torch.bincount(index, minlength=size) when every index < size, but with an output size
    known in advance: a GPU need not wait for the data to learn it. (size,) int64."""
    return torch.zeros(size, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))


@functools.lru_cache(maxsize=None)
def grid_constants(scales: tuple, lo: tuple, hi: tuple, shape: tuple, device: torch.device):
    """(cells (S, 1, 3) per scale, lo (3,), hi - lo (3,)) on the device, made once."""
    cells = torch.tensor([[[math.ceil(n / s) for n in shape]] for s in scales], device=device)
    lo_t, hi_t = torch.tensor(lo, device=device), torch.tensor(hi, device=device)
    return cells, lo_t, hi_t - lo_t


@dataclass
class VoxelSets:
    """The voxels of several scales as one array, scale after scale: keys (V,) sorted, their
    rows coords (V, 4), inv (S, N) each point's voxel within its scale, and per_scale the
    elite.Voxels of each scale (views into these)."""
    keys: torch.Tensor
    coords: torch.Tensor
    inv: torch.Tensor
    per_scale: list


def voxel_sets(xyz: torch.Tensor, batch_idx: torch.Tensor, scales: tuple, lo, hi, shape) -> VoxelSets:
    """elite.voxelize at every scale of `scales`, in one torch.unique: VoxelSets."""
    cells, lo_t, span = grid_constants(tuple(scales), tuple(lo), tuple(hi), tuple(shape), xyz.device)
    idx = (cells * (xyz - lo_t) / span).long()  # (S, N, 3); .long() truncates toward zero, as upstream
    sets = torch.arange(len(scales), device=xyz.device)[:, None]  # (S, 1)
    keys, inv, count = torch.unique(pack_keys(batch_idx, idx, sets), return_inverse=True, return_counts=True)
    first = torch.searchsorted(keys, set_start_keys(len(scales) + 1, xyz.device))  # (S + 1,) where each scale starts
    inv = inv - first[:-1, None]  # (S, N) each point's voxel within its scale
    coords, starts = unpack_keys(keys), read_to_host(first)  # the one wait: how many voxels each scale has
    per_scale = [elite.Voxels(coords[a:b], inv[k], count[a:b]) for k, (a, b) in enumerate(zip(starts, starts[1:]))]
    return VoxelSets(keys, coords, inv, per_scale)


# =====================================================================================
# 2. The neighbour table and the convolution over it  (= elite.submconv3d)
# =====================================================================================
# The table (which voxel sits at each offset of each voxel) is found from sorted keys: in key
# order the z-neighbours of a voxel are adjacent, so one binary search per (dx, dy) column
# finds all three dz in {-1, 0, 1} at once. Nothing in it waits on the data. Pairs come in
# mirrored couples (j is i's neighbour at +o exactly when i is j's at -o), so the plain-torch
# convolution reads the 13 offsets after the centre and mirrors; section 4 runs it in Triton.

XY_OFFSETS = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
# k = 9(dx+1) + 3(dy+1) + dz+1: weight.view(27, ...)[k] multiplies offset k; -o is 26 - k. The same list as
# elite.OFFSETS (a test holds them equal), written again: this module may load before elite's names exist.
OFFSETS = [(dx, dy, dz) for dx, dy in XY_OFFSETS for dz in (-1, 0, 1)]


def neighbour_table(keys: torch.Tensor) -> torch.Tensor:
    """keys (N,) unique, sorted ascending -> (27, N) int32: [k, i] = the position of voxel
    i's neighbour at OFFSETS[k], or -1. Keys of other sets are never neighbours."""
    n, device = len(keys), keys.device
    flat = torch.full((27 * n + 1,), -1, dtype=torch.int32, device=device)  # + 1: where absent mirrors go
    table = flat[:-1].view(27, n)
    if n == 0:  # a batch with no point in range
        return table
    index = torch.arange(n, dtype=torch.int32, device=device)
    table[13] = index  # the centre: every voxel is its own neighbour
    # The 13 offsets after the centre in key order: (0, 0, +1) is the next key; the rest lie in
    # the 4 (dx, dy) columns ahead, searched once each for z - 1 (then z and z + 1 follow it).
    none = constant(-1, device, torch.int32)
    torch.where(keys[1:] == keys[:-1] + 1, index[1:], none, out=table[14, :-1])
    steps = constant(tuple((dx << 2 * COORD_BITS) + (dy << COORD_BITS) - 1 for dx, dy in XY_OFFSETS[5:]), device)
    lowest = keys + steps[:, None]  # (4, N) the key of (x + dx, y + dy, z - 1)
    pos = torch.searchsorted(keys, lowest, out_int32=True)  # (4, N) the first key >= it
    for dz in range(3):  # z - 1, z, z + 1: each found one moves the next candidate one place on
        found = keys.index_select(0, pos.view(-1).clamp_max(n - 1)).view(4, n) == lowest + dz
        torch.where(found, pos, none, out=table[15 + dz::3])  # rows 15 + 3 * column + dz
        pos += found
    # The 13 offsets before the centre are their mirrors: j at +o from i means i at -o (row 26 - k) from j.
    ahead = table[14:]  # (13, N)
    mirror_rows = constant(tuple((12 - m) * n for m in range(13)), device)[:, None]  # row 26 - k, flattened
    target = torch.where(ahead >= 0, mirror_rows + ahead, 27 * n)  # (13, N) where i goes; absent: the spare slot
    flat.index_put_((target,), index.expand(13, n))
    return table


@dataclass
class Neighbours:
    """rows (27, N) int32: rows[k, i] = the voxel at OFFSETS[k] from voxel i, or -1. Built
    once per voxel set and shared by every convolution on it (spconv's indice_key)."""
    rows: torch.Tensor
    _pairs: list | None = field(default=None, repr=False)

    def __len__(self):
        return self.rows.shape[1]

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(i, j) int64 for each of the 13 offsets after the centre, OFFSETS[14:]: voxel j is
        voxel i's neighbour at +o (so i is j's at -o). What the plain-torch form reads; made
        on first use (one wait, for the 13 pair counts) and kept."""
        if self._pairs is None:
            ahead = self.rows[14:].reshape(-1)  # (13 * N,)
            flat = torch.nonzero(ahead >= 0).squeeze(1)  # every pair, grouped by offset
            k = flat // len(self)
            counts = read_to_host(rows_per_index(k, 13))
            i, j = flat - k * len(self), ahead.index_select(0, flat).long()
            self._pairs = list(zip(i.split(counts), j.split(counts)))
        return self._pairs

    @property
    def num_pairs(self) -> int:  # including the 27th offset, the voxel itself
        return int((self.rows >= 0).sum())


def neighbours_of(coords: torch.Tensor) -> Neighbours:
    """The table of one voxel set given as unique rows (N, 4) [batch, x, y, z] in any order."""
    keys, order = torch.sort(pack_keys(coords[:, 0], coords[:, 1:]))
    table = neighbour_table(keys)  # positions in key order
    found = order.int().index_select(0, table.view(-1).clamp_min(0)).view_as(table)  # the caller's numbers
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    return Neighbours(torch.where(table >= 0, found, -1).index_select(1, rank))  # columns in the caller's order


def _gather_mm_scatter(feats: torch.Tensor, weight: torch.Tensor, neighbours: Neighbours) -> torch.Tensor:
    """elite.submconv3d's sum over the table's pairs: feats (N, Cin), weight (3, 3, 3, Cin, Cout) -> (N, Cout)."""
    out = feats @ weight[1, 1, 1]  # the centre offset pairs every voxel with itself
    pairs = neighbours.pairs()
    most = max([len(i) for i, _ in pairs], default=0)
    gathered = feats.new_empty(most, feats.shape[1])  # reused buffers: no allocation per offset
    product = feats.new_empty(most, weight.shape[-1])
    for (i, j), (dx, dy, dz) in zip(pairs, OFFSETS[14:]):
        n = len(i)
        for dst, src, w in ((i, j, weight[1 + dx, 1 + dy, 1 + dz]), (j, i, weight[1 - dx, 1 - dy, 1 - dz])):
            torch.index_select(feats, 0, src, out=gathered[:n])
            torch.mm(gathered[:n], w, out=product[:n])
            out.index_add_(0, dst, product[:n])
    return out


class _SubMConv3dFunction(torch.autograd.Function):
    """elite.submconv3d with its backward written out (what autograd derives for the reference):
    saves only the inputs, and gathered rows are recomputed in backward, not stored."""

    @staticmethod
    def forward(ctx, feats, weight, neighbours):
        ctx.save_for_backward(feats, weight)
        ctx.neighbours = neighbours
        return _gather_mm_scatter(feats, weight, neighbours)

    @staticmethod
    def backward(ctx, grad_out):
        # Forward did out[i] += f[j] W[+o] and out[j] += f[i] W[-o] for each pair (i, j), so
        # grad_f[j] += g[i] W[+o]^T, grad_f[i] += g[j] W[-o]^T, grad_W[+o] = f[j]^T g[i], grad_W[-o] = f[i]^T g[j].
        feats, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_feats = grad_out @ weight[1, 1, 1].T
        grad_weight = torch.empty_like(weight)
        grad_weight[1, 1, 1] = feats.T @ grad_out
        for (i, j), (dx, dy, dz) in zip(ctx.neighbours.pairs(), OFFSETS[14:]):
            plus, minus = (1 + dx, 1 + dy, 1 + dz), (1 - dx, 1 - dy, 1 - dz)
            g_i, g_j = grad_out.index_select(0, i), grad_out.index_select(0, j)
            grad_feats.index_add_(0, j, g_i @ weight[plus].T)
            grad_feats.index_add_(0, i, g_j @ weight[minus].T)
            if ctx.needs_input_grad[1]:
                grad_weight[plus] = feats.index_select(0, j).T @ g_i
                grad_weight[minus] = feats.index_select(0, i).T @ g_j
        return grad_feats, grad_weight if ctx.needs_input_grad[1] else None, None


def submconv3d(feats: torch.Tensor, neighbours: Neighbours, weight: torch.Tensor) -> torch.Tensor:
    """elite.submconv3d over a neighbour table: feats (N, Cin), weight (3, 3, 3, Cin, Cout) -> (N, Cout).
    On a GPU the Triton kernels of section 4 (--conv), elsewhere the plain-torch form above."""
    if len(neighbours) != len(feats):
        raise ValueError(f"the neighbour table has {len(neighbours)} voxels but feats has {len(feats)} rows")
    if torch.is_autocast_enabled(feats.device.type):  # --amp: a matrix product, so in bf16 like nn.Linear's
        low = torch.get_autocast_dtype(feats.device.type)
        feats, weight = feats.to(low), weight.to(low)
    if conv_path(feats.device, feats.dtype) == "triton":
        return SubMConv3dTriton.apply(feats, weight, neighbours.rows)
    return _SubMConv3dFunction.apply(feats, weight, neighbours)


# =====================================================================================
# 3. The student's stages batched  (= elite.voxelize_scales, move_to_scale, VoxelInputEncoder, PointEncoder,
#    Student.classify)
# =====================================================================================

@dataclass
class ScaleLink:
    """How the points tie scale-L voxels to scale-s voxels: the distinct (src, dst) pairs
    and weight = (points in both) / (points in dst). Scales are quantised independently,
    so one L voxel can feed several s voxels."""
    src: torch.Tensor
    dst: torch.Tensor
    weight: torch.Tensor
    size: int


@dataclass
class FastStage:
    """What the fast forms read of a block's stage besides elite.Stage: the neighbour table of
    its L voxels (shared by the block's four convolutions) and the link from L to s."""
    neighbours: Neighbours
    link: ScaleLink


def voxelize_scales(xyz: torch.Tensor, batch_idx: torch.Tensor, cfg) -> elite.VoxelScales:
    """elite.voxelize_scales, batched across the scales: one unique for the voxels, one
    neighbour search for the four convolved scales, one unique for the four context poolings
    and the four scale links. A GPU's host waits for the data twice, not 13 times."""
    sets = voxel_sets(xyz, batch_idx, (1,) + tuple(cfg.scales), cfg.range_min, cfg.range_max, cfg.grid_shape)
    voxels = sets.per_scale
    conv, sizes = voxels[:-1], [len(v) for v in voxels]
    n_conv = sum(sizes[:-1])
    conv_keys, conv_coords = sets.keys[:n_conv], sets.coords[:n_conv]  # the convolved scales, one after another
    scale_of = conv_keys >> VALUE_BITS  # (V,) 0..3
    starts = torch.tensor([sum(sizes[:k]) for k in range(len(conv))], device=xyz.device)  # (4,)
    # Neighbours never cross scales (sets), so one search serves all four; positions made per scale.
    table = neighbour_table(conv_keys)  # (27, V)
    table = torch.where(table >= 0, table - starts.index_select(0, scale_of).int(), -1)
    # Context pools (sets 0..3: the L coords // 2) and scale links (sets 4..7: the distinct
    # (L voxel, s voxel) pairs of the points) in one unique.
    pool_keys = pack_keys(conv_coords[:, 0], torch.div(conv_coords[:, 1:], 2, rounding_mode="floor"), scale_of)
    next_size = torch.tensor(sizes[1:], device=xyz.device)[:, None]  # (4, 1)
    if max(a * b for a, b in zip(sizes, sizes[1:])) >= 1 << VALUE_BITS:
        raise ValueError(f"voxels per scale {sizes}: too many to pair the scales in one int64 key")
    link_keys = set_start_keys(8, xyz.device)[4:, None] + sets.inv[:-1] * next_size + sets.inv[1:]  # (4, N)
    ukeys, which, count = torch.unique(torch.cat([pool_keys, link_keys.view(-1)]), return_inverse=True,
                                       return_counts=True)
    bounds = read_to_host(torch.searchsorted(ukeys, set_start_keys(9, xyz.device)))  # the second wait
    stages = []
    for k, (fine, coarse) in enumerate(zip(conv, voxels[1:])):
        a, b = sum(sizes[:k]), sum(sizes[:k + 1])
        pair = ukeys[bounds[4 + k]:bounds[5 + k]] - (4 + k << VALUE_BITS)  # (P,) L voxel * n_s + s voxel
        src, dst = pair // len(coarse), pair % len(coarse)
        link = ScaleLink(src, dst, count[bounds[4 + k]:bounds[5 + k]] / coarse.count.index_select(0, dst), len(coarse))
        stages.append(elite.Stage(fine, coarse, which[a:b] - bounds[k], count[bounds[k]:bounds[k + 1]],
                                  FastStage(Neighbours(table[:, a:b]), link)))
    return elite.VoxelScales(voxels, stages)


def move_to_scale(feats: torch.Tensor, link: ScaleLink) -> torch.Tensor:
    """elite.move_to_scale (a scatter mean over points) computed over voxel pairs instead:
    (V_L, C) -> (V_s, C)."""
    dtype = torch.promote_types(feats.dtype, torch.float32)  # summed in float32 at least, as scatter_mean
    out = torch.zeros(link.size, feats.shape[1], dtype=dtype, device=feats.device)
    return out.index_add_(0, link.dst, feats.index_select(0, link.src) * link.weight[:, None].to(dtype))


def encode_voxels(mlp: nn.Sequential, x: torch.Tensor, vox) -> torch.Tensor:
    """elite.VoxelInputEncoder's scatter_mean(mlp(x)): mean(Linear(h)) == Linear(mean(h)), so
    the MLP's last layer runs per voxel, not per point. x (N, 10) -> (V1, 64)."""
    return mlp[2](elite.scatter_mean(mlp[1](mlp[0](x)), vox.inv, len(vox), vox.count))


def point_encoder_out(enc, feats: torch.Tensor, ctx: torch.Tensor, stage) -> torch.Tensor:
    """elite.PointEncoder's layer_out(cat([layer_in(feats), ctx[pool_of]])), its first layer split
    in the two halves of its weight: the context half runs once per pool and the concatenation
    is never built. feats (V_L, 64), ctx (G, 64) -> (V_L, 64)."""
    first, c = enc.layer_out[0], feats.shape[1]
    h = torch.addmm(first.bias, ctx, first.weight[:, c:].T).index_select(0, stage.pool_of)  # (V_L, 64)
    h = torch.addmm(h, enc.layer_in(feats), first.weight[:, :c].T)  # (V_L, 64)
    return enc.layer_out[2](enc.layer_out[1](h))


def classify(classifier: nn.Sequential, point_feats: list[torch.Tensor], voxels: list) -> torch.Tensor:
    """elite.Student.classify, each distinct combination of a point's four voxels classified
    once: points that share all four share the feature. -> (N, 20)."""
    combos, combo_of_point = unique_columns([v.inv for v in voxels[1:]], [len(v) for v in voxels[1:]])  # (U, 4), (N,)
    feats = torch.cat([p.index_select(0, combos[:, k]) for k, p in enumerate(point_feats)], 1)  # (U, 256)
    return classifier(feats).index_select(0, combo_of_point)  # (N, 20)


def unique_columns(columns: list[torch.Tensor], sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.unique(torch.stack(columns, 1), dim=0, return_inverse=True) for columns of indices
    (N,) each in [0, sizes[k]): the rows numbered by one int64 that sorts as they do. When the
    numbers would not fit in an int64 (large batches), each half of the columns is numbered
    first. -> (U, K) the distinct rows in lexicographic order, (N,) the row of each."""
    if math.prod(sizes) < 1 << 63:
        key = columns[0]
        for column, size in zip(columns[1:], sizes[1:]):
            key = key * size + column
        ukey, inverse = torch.unique(key, return_inverse=True)
        below = [math.prod(sizes[k + 1:]) for k in range(len(sizes))]
        return torch.stack([ukey // b % s for b, s in zip(below, sizes)], 1), inverse
    half = len(columns) // 2
    left, left_of = unique_columns(columns[:half], sizes[:half])
    right, right_of = unique_columns(columns[half:], sizes[half:])
    pairs, inverse = unique_columns([left_of, right_of], [len(left), len(right)])
    return torch.cat([left.index_select(0, pairs[:, 0]), right.index_select(0, pairs[:, 1])], 1), inverse


# =====================================================================================
# 4. The Triton convolution: the kernels
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
# 4.1 Launching them
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
# 4.2 The convolution with its gradients
# =====================================================================================

class SubMConv3dTriton(torch.autograd.Function):
    """Same inputs and outputs as elite's plain convolution: feats (N, Cin), weight
    (3, 3, 3, Cin, Cout), nb (27, N) int32 -> (N, Cout)."""

    @staticmethod
    def forward(ctx, feats, weight, nb):
        if feats.dtype != weight.dtype:
            raise TypeError(f"features in {feats.dtype} but weights in {weight.dtype}: the Triton convolution "
                            "multiplies one type (under autocast, elite_fast.submconv3d casts both)")
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
# 4.3 Which convolution runs: plain torch (section 2) or these kernels
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
# 5. The teacher  (= elite.Teacher.encode with its LoRA hooks, SAM's Attention, elite.pixel_features)
# =====================================================================================

def encode_blocks(teacher, x: torch.Tensor) -> list[torch.Tensor]:
    """elite.Teacher.encode's blocks: x (B, h, w, C) -> the tokens after each global block.
    Each block runs with W + delta W in place of its frozen weights (torch.func.functional_call),
    so an adapted layer costs one product a step, not three (W x + B (A x))."""
    weights = adapted_weights(teacher)  # this step's W + delta W, all layers at once
    tokens = []
    for i, block in enumerate(teacher.encoder.blocks):
        x = torch.func.functional_call(block, weights[i], (x,))
        if i in teacher.stage_blocks:
            tokens.append(x)
    return tokens


def delta_weights(adapters) -> torch.Tensor:
    """(depth, out, in): every block's s B diag(E) A of one kind of layer, in one batched product,
    the parts' rows stacked in order (elite.Adapters.low_rank_update, as a matrix)."""
    a = adapters.lora_A * adapters.lora_E if adapters.svd else adapters.lora_A  # diag(E) A
    return (adapters.lora_B @ a * adapters.scaling).flatten(1, 2)  # (depth, parts, out/parts, in) -> (depth, out, in)


def adapted_weights(teacher) -> list[dict[str, torch.Tensor]]:
    """Per block, {'attn.qkv.weight': W + delta W, ...}: the weights its adapted layers run with."""
    blocks = teacher.encoder.blocks
    layers = [(i, elite.ADAPTED_LAYERS[kind][0]) for kind in teacher.adapters for i in range(len(blocks))]
    updates = [u for a in teacher.adapters.values() for u in delta_weights(a).unbind(0)]  # (out, in) each
    # Every sum W + delta W in one operation (the plain form: one add per layer, 48 in ViT-B).
    summed = torch._foreach_add(frozen_weights(teacher, layers), updates) if layers else []  # peft none: no layers
    weights = [{} for _ in blocks]
    for (i, path), w in zip(layers, summed):
        weights[i][f"{path}.weight"] = w
    return weights


def frozen_weights(teacher, layers: list[tuple[int, str]]) -> list[torch.Tensor]:
    """The frozen weights of these (block, layer) in the precision the blocks compute in: under
    autocast (--amp) a bf16 copy made once, as SAM's weights never train, instead of a cast of
    every weight at every step."""
    weights = [teacher.encoder.blocks[i].get_submodule(path).weight for i, path in layers]
    device = weights[0].device.type
    if not torch.is_autocast_enabled(device):
        return weights
    dtype = torch.get_autocast_dtype(device)
    key = (dtype,) + tuple((w.data_ptr(), w._version) for w in weights)  # new weights (a load, .to()): a new copy
    if BF16_COPIES.get(teacher, (None,))[0] != key:
        BF16_COPIES[teacher] = (key, [w.detach().to(dtype) for w in weights])
    return BF16_COPIES[teacher][1]


BF16_COPIES = weakref.WeakKeyDictionary()  # teacher -> (key, its frozen weights in bf16): made once, gone with it


def layer_norm_2d(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """elite.LayerNorm2d through torch's fused layer norm on the channels-last view: (B, C, H, W)."""
    # Back to (B, C, H, W) memory: the transposed convolution after it is slower on the permuted view.
    return F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias,
                        norm.eps).permute(0, 3, 1, 2).contiguous()


def fold_attention(encoder: nn.Module) -> None:
    """Every block's SAM Attention -> FoldedAttention: the same modules and keys, the same maths; in
    the reference forms it runs SAM's own Attention.forward on them."""
    for block in encoder.blocks:
        block.attn = FoldedAttention(block.attn)


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
        self.num_heads, self.scale = attn.num_heads, attn.scale
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
        if not enabled():  # the reference forms: SAM's own Attention.forward, on these same modules
            from segment_anything.modeling.image_encoder import Attention
            return Attention.forward(self, x)
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


def sample_pixels(maps: list[torch.Tensor], pixel_indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """elite.pixel_features: the teacher's maps (B, C, 4h, 4w) at each sample's (Ki, 2) (row, col)
    crop pixels -> (sum Ki, C) per map: what elite.upsample_maps holds at those pixels (bilinear,
    align_corners=False), computed from the four map cells around each, at those pixels only."""
    if not pixel_indices or sum(len(p) for p in pixel_indices) == 0:
        return [m.new_zeros(0, m.shape[1]) for m in maps]
    device = maps[0].device
    sample = torch.cat([torch.full((len(p),), b, device=device) for b, p in enumerate(pixel_indices)])  # (K,)
    pixel = torch.cat(pixel_indices).to(device)  # (K, 2)
    # F.interpolate's source coordinate of an output pixel: (p + 0.5) / 4 - 0.5, clamped at 0.
    src = ((pixel.to(maps[0].dtype) + 0.5) / 4 - 0.5).clamp_min(0)  # (K, 2)
    low = src.floor().long()
    frac = src - low  # (K, 2) the weight of the cell after
    last = torch.tensor(maps[0].shape[2:], device=device) - 1
    high = torch.minimum(low + 1, last)
    (r0, c0), (r1, c1), fr, fc = low.unbind(1), high.unbind(1), frac[:, :1], frac[:, 1:]  # fr, fc (K, 1)
    m = torch.cat(maps, 1)  # (B, 4C, 4h, 4w): the four maps read at once
    top = m[sample, :, r0, c0] * (1 - fc) + m[sample, :, r0, c1] * fc  # (K, 4C)
    bottom = m[sample, :, r1, c0] * (1 - fc) + m[sample, :, r1, c1] * fc
    return list((top * (1 - fr) + bottom * fr).split([x.shape[1] for x in maps], 1))
