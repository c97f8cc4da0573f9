"""ELiTe in plain PyTorch, read top to bottom.

ELiTe (ICME 2024) distils a Segment Anything image teacher into a 1.9M-parameter
voxel LiDAR student (the 2DPASS "4scale-64dimension" network). This file holds the
method, in the order the data flows once a scan is read:

    1. Voxelisation and scatter reductions
    2. Submanifold sparse convolution (pure torch, with its neighbour table; elite_kernels.py: Triton)
    3. The student: SparseBasicBlock, point encoder, SPVBlock, classifier
    4. Losses: class-weighted cross-entropy and Lovasz-softmax
    5. The image teacher: SAM's ViT, LoRA/AdaLoRA (PEFT), patch decoder, 2D heads
    6. SAM-PLG: dense pseudo-labels from sparse LiDAR labels
    7. PPMSKD: patch-to-point multi-stage distillation from the teacher into the student

Reading the data comes before: semantickitti.py (files, projection, the camera crop, the
dataset, the official evaluator), nusc.py (nuScenes), scandata.py (the Scan and Batch types both
share, augmentation). The machinery of a run (the training loop, checkpoints, torchrun) is in
runs.py; U2MKD is in u2mkd.py. Facts follow the official ELiTe/2DPASS code; deliberate
differences are listed in docs/differences.md.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import elite_kernels
import nusc
from scandata import Batch, CameraCrops
from semantickitti import CLASS_COUNTS, CROP_HW, GRID_SHAPE, IGNORE, NUM_CLASSES, RANGE_MAX, RANGE_MIN, PlgFrame

# =====================================================================================
# 1. Voxelisation and scatter reductions
# =====================================================================================
# Every scale s re-quantises the raw points into ceil(shape / s) cells per axis, so the
# scale-8 z axis has 8 cells (0.75 m) and the scale-16 x/y axes have 63 cells (1.587 m).
#
# A voxel is one int64 key, [set | batch | x | y | z] in bit fields, which sorts as its row
# [batch, x, y, z] sorts (lexicographically) within a set. The five scales are five sets of
# one key array, so one torch.unique voxelises them all: on a GPU the host waits for the data
# once, not once per scale. The same keys find every voxel's neighbours (section 2).

SCALES = (2, 4, 8, 16)
COORD_BITS = 15  # a coordinate field: +-16k cells around 0 (a grid is 1,000 cells across)
BATCH_BITS = 12  # up to 4,096 scans in a batch
VALUE_BITS = BATCH_BITS + 3 * COORD_BITS  # 57: a key below its set tag (4 bits: up to 16 sets)


@functools.lru_cache(maxsize=None)
def constant(values: tuple, device: torch.device, dtype=torch.long) -> torch.Tensor:
    """A small constant tensor, copied to its device once per process, not once per forward."""
    return torch.tensor(values, dtype=dtype, device=device)


def read_to_host(t: torch.Tensor) -> list:
    """The forward reads values of its data only through here: one copy to the host, which on
    a GPU waits for the device (infer.count_ops counts it)."""
    return t.to("cpu", copy=True).tolist()


def set_bases(sets: int, device) -> torch.Tensor:
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


def scatter_mean(src: torch.Tensor, index: torch.Tensor, size: int, count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the rows of src (N, C) that share an index -> (size, C), summed in float32
    at least (bf16 sums of many rows would lose digits under --amp). count (size,): the rows
    per index when known already."""
    src = src.to(torch.promote_types(src.dtype, torch.float32))
    out = torch.zeros(size, src.shape[1], dtype=src.dtype, device=src.device)
    out.index_add_(0, index, src)
    count = rows_per_index(index, size) if count is None else count
    return out / count.clamp_min(1).to(src.dtype)[:, None]


def rows_per_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """torch.bincount(index, minlength=size) when every index < size, but with an output size
    known in advance: a GPU need not wait for the data to learn it. (size,) int64."""
    return torch.zeros(size, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))


@dataclass
class Voxels:
    """The voxels of one scale: coords (V, 4) int64 rows [batch, x, y, z] in lexicographic
    order, inv (N,) the voxel of every point, count (V,) the points in each voxel."""
    coords: torch.Tensor
    inv: torch.Tensor
    count: torch.Tensor

    def __len__(self):
        return len(self.coords)


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
    Voxels of each scale (views into these)."""
    keys: torch.Tensor
    coords: torch.Tensor
    inv: torch.Tensor
    per_scale: list[Voxels]


def voxelize_scales(xyz: torch.Tensor, batch_idx: torch.Tensor, scales: tuple, lo=RANGE_MIN, hi=RANGE_MAX,
                    shape=GRID_SHAPE) -> VoxelSets:
    """Quantise points (N, 3) at several scales of the grid `shape` over [lo, hi] at once.
    Indices are not clipped: augmented points may leave the range and get negative or
    too-large indices, as in the official code."""
    cells, lo_t, span = grid_constants(tuple(scales), tuple(lo), tuple(hi), tuple(shape), xyz.device)
    idx = (cells * (xyz - lo_t) / span).long()  # (S, N, 3); .long() truncates toward zero, as upstream
    sets = torch.arange(len(scales), device=xyz.device)[:, None]  # (S, 1)
    keys, inv, count = torch.unique(pack_keys(batch_idx, idx, sets), return_inverse=True, return_counts=True)
    first = torch.searchsorted(keys, set_bases(len(scales) + 1, xyz.device))  # (S + 1,) where each scale starts
    inv = inv - first[:-1, None]  # (S, N) each point's voxel within its scale
    coords, starts = unpack_keys(keys), read_to_host(first)  # the one wait: how many voxels each scale has
    per_scale = [Voxels(coords[a:b], inv[k], count[a:b]) for k, (a, b) in enumerate(zip(starts, starts[1:]))]
    return VoxelSets(keys, coords, inv, per_scale)


def voxelize(xyz: torch.Tensor, batch_idx: torch.Tensor, scale: int, lo=RANGE_MIN, hi=RANGE_MAX,
             shape=GRID_SHAPE) -> Voxels:
    """The voxels of one scale."""
    return voxelize_scales(xyz, batch_idx, (scale,), lo, hi, shape).per_scale[0]


# =====================================================================================
# 2. Submanifold sparse convolution
# =====================================================================================
# out_i = sum over the 27 offsets o of W[o]^T x_j, where voxel j = voxel i + o is active in
# the same scan. Output voxels are the input voxels. The work is a neighbour table (which
# voxel sits at each offset of each voxel) and the products. This plain-torch form is the
# definition and the CPU path: per offset, gather -> matmul -> scatter-add. On a GPU,
# elite_kernels.py computes the same sum in Triton, one program per tile of output rows.
#
# The table is found from sorted keys: in key order the z-neighbours of a voxel are adjacent,
# so one binary search per (dx, dy) column finds all three dz in {-1, 0, 1} at once. Nothing
# in it waits on the data. Pairs come in mirrored couples (j is i's neighbour at +o exactly
# when i is j's at -o), so the plain form reads the 13 offsets after the centre and mirrors.

XY_OFFSETS = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
# k = 9(dx+1) + 3(dy+1) + dz+1: weight.view(27, ...)[k] multiplies offset k; -o is 26 - k.
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
    """The convolution itself: feats (N, Cin), weight (3, 3, 3, Cin, Cout) -> (N, Cout)."""
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
    """Saves only the inputs: gathered rows are recomputed in backward, not stored."""

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
    """Submanifold 3x3x3 convolution.

    feats (N, Cin) float, one row per voxel of the set `neighbours` describes;
    weight (3, 3, 3, Cin, Cout), weight[i, j, k] multiplies the neighbour at offset
    (i-1, j-1, k-1). Returns (N, Cout)."""
    if len(neighbours) != len(feats):
        raise ValueError(f"the neighbour table has {len(neighbours)} voxels but feats has {len(feats)} rows")
    if torch.is_autocast_enabled(feats.device.type):  # --amp: a matrix product, so in bf16 like nn.Linear's
        low = torch.get_autocast_dtype(feats.device.type)
        feats, weight = feats.to(low), weight.to(low)
    if elite_kernels.conv_path(feats.device, feats.dtype) == "triton":  # elite_kernels.py: the same sum in Triton
        return elite_kernels.SubMConv3dTriton.apply(feats, weight, neighbours.rows)
    return _SubMConv3dFunction.apply(feats, weight, neighbours)


class SubMConv3d(nn.Module):
    """3x3x3 submanifold convolution without bias (the student never uses one)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3, 3, 3, cin, cout))
        bound = 1 / math.sqrt(27 * cin)  # nn.Conv3d's default init
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, feats, neighbours: Neighbours):
        return submconv3d(feats, neighbours, self.weight)


# =====================================================================================
# 3. The student (2DPASS baseline, 4 scales x 64 channels, 1,933,460 parameters)
# =====================================================================================

@dataclass
class StudentConfig:
    in_dims: int = 4
    hidden: int = 64
    num_classes: int = NUM_CLASSES
    scales: tuple[int, ...] = SCALES
    range_min: tuple[float, float, float] = RANGE_MIN  # the voxel range and its 0.1 m grid
    range_max: tuple[float, float, float] = RANGE_MAX
    grid_shape: tuple[int, int, int] = GRID_SHAPE


def student_config(dataset: str, hidden=64) -> StudentConfig:
    """The student on a dataset: SemanticKITTI's 20 classes, range and grid (the defaults), or
    nuScenes' 17 classes and its range (z up to 3 m: 70 cells of the 0.1 m grid)."""
    if dataset == "nuscenes":
        return StudentConfig(hidden=hidden, num_classes=nusc.NUM_CLASSES, range_min=nusc.RANGE_MIN,
                             range_max=nusc.RANGE_MAX, grid_shape=nusc.GRID_SHAPE)
    if dataset != "semantickitti":
        raise ValueError(f"dataset {dataset!r}: expected semantickitti or nuscenes")
    return StudentConfig(hidden=hidden)


# ---- 3.1 Where the features go: every index the four blocks read, found before any feature ----

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
class Stage:
    """What SPVBlock k reads: its scale L and the next scale s = 2L, the neighbour table of
    the L voxels (shared by the block's four convolutions), the context pool of each L voxel
    (the L coords // 2) and the link from L to s."""
    vox_l: Voxels
    vox_s: Voxels
    neighbours: Neighbours
    group: torch.Tensor  # (V_L,) the context pool of each L voxel
    group_count: torch.Tensor  # (G,) the L voxels in each pool
    link: ScaleLink


@dataclass
class Pyramid:
    voxels: list[Voxels]  # scales 1, 2, 4, 8, 16
    stages: list[Stage]  # one per SPVBlock


def build_pyramid(xyz: torch.Tensor, batch_idx: torch.Tensor, cfg: StudentConfig) -> Pyramid:
    """The voxels of every scale and each block's Stage, batched across the scales: one
    unique for the voxels, one neighbour search for the four convolved scales, one unique for
    the four context poolings and the four scale links. Per block the work would be the same;
    batched, a GPU's host waits for the data twice, not 13 times."""
    sets = voxelize_scales(xyz, batch_idx, (1,) + tuple(cfg.scales), cfg.range_min, cfg.range_max, cfg.grid_shape)
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
    link_keys = set_bases(8, xyz.device)[4:, None] + sets.inv[:-1] * next_size + sets.inv[1:]  # (4, N)
    ukeys, which, count = torch.unique(torch.cat([pool_keys, link_keys.view(-1)]), return_inverse=True,
                                       return_counts=True)
    bounds = read_to_host(torch.searchsorted(ukeys, set_bases(9, xyz.device)))  # the second wait
    stages = []
    for k, (vox_l, vox_s) in enumerate(zip(conv, voxels[1:])):
        a, b = sum(sizes[:k]), sum(sizes[:k + 1])
        pair = ukeys[bounds[4 + k]:bounds[5 + k]] - (4 + k << VALUE_BITS)  # (P,) L voxel * n_s + s voxel
        src, dst = pair // len(vox_s), pair % len(vox_s)
        link = ScaleLink(src, dst, count[bounds[4 + k]:bounds[5 + k]] / vox_s.count.index_select(0, dst), len(vox_s))
        stages.append(Stage(vox_l, vox_s, Neighbours(table[:, a:b]), which[a:b] - bounds[k],
                            count[bounds[k]:bounds[k + 1]], link))
    return Pyramid(voxels, stages)


def move_to_scale(feats: torch.Tensor, link: ScaleLink) -> torch.Tensor:
    """scatter_mean(feats[inv_L], inv_s) computed over voxel pairs instead of points:
    (V_L, C) -> (V_s, C)."""
    dtype = torch.promote_types(feats.dtype, torch.float32)  # summed in float32 at least, as scatter_mean
    out = torch.zeros(link.size, feats.shape[1], dtype=dtype, device=feats.device)
    return out.index_add_(0, link.dst, feats.index_select(0, link.src) * link.weight[:, None].to(dtype))


# ---- 3.2 The network ----

class VoxelInputEncoder(nn.Module):
    """Per-point 10-d input -> mean per 0.1 m voxel (V1, 64)."""

    def __init__(self, hidden=64, lo=RANGE_MIN, cell=0.1):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.lo, self.cell = lo, cell

    def forward(self, points, vox: Voxels):
        xyz = points[:, :3]  # (N, 3)
        voxel_mean = scatter_mean(xyz, vox.inv, len(vox), vox.count).index_select(0, vox.inv)  # (N, 3)
        # Upstream calls this the voxel centre; it is the voxel's lower corner.
        lo = constant(tuple(self.lo), xyz.device, xyz.dtype)
        corner = vox.coords[:, 1:].to(xyz.dtype).index_select(0, vox.inv) * self.cell + lo  # (N, 3)
        x = torch.cat([points, xyz - voxel_mean, xyz - corner], 1)  # (N, 10)
        # mean(Linear(h)) == Linear(mean(h)): the second layer runs per voxel, not per point.
        h = scatter_mean(self.mlp[1](self.mlp[0](x)), vox.inv, len(vox), vox.count)  # (V1, 64)
        return self.mlp[2](h)  # (V1, 64)


class SparseBasicBlock(nn.Module):
    """Residual block: LReLU(BN(conv3(LReLU(BN(conv3(x))))) + BN(conv1x1(x)))."""

    def __init__(self, cin, cout):
        super().__init__()
        self.shortcut = nn.Linear(cin, cout, bias=False)  # a 1x1x1 SubM conv is a per-voxel matmul
        self.bn_shortcut = nn.BatchNorm1d(cout)
        self.conv1 = SubMConv3d(cin, cout)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = SubMConv3d(cout, cout)
        self.bn2 = nn.BatchNorm1d(cout)

    def forward(self, x, neighbours: Neighbours):
        h = F.leaky_relu(self.bn1(self.conv1(x, neighbours)), 0.1)
        h = self.bn2(self.conv2(h, neighbours))
        return F.leaky_relu(h + self.bn_shortcut(self.shortcut(x)), 0.1)


class PointEncoder(nn.Module):
    """The point branch: voxel features of scale L plus context pooled over
    (L-voxel coords // 2), run through an MLP per point."""

    def __init__(self, c=64):
        super().__init__()
        self.layer_in = nn.Sequential(nn.Linear(c, c), nn.LeakyReLU(0.1))
        # Unusual order kept from upstream: Linear -> LeakyReLU -> BatchNorm.
        self.context = nn.Sequential(
            nn.Linear(c, c // 2), nn.LeakyReLU(0.1), nn.BatchNorm1d(c // 2),
            nn.Linear(c // 2, c // 2), nn.LeakyReLU(0.1), nn.BatchNorm1d(c // 2),
            nn.Linear(c // 2, c), nn.LeakyReLU(0.1))
        self.layer_out = nn.Sequential(nn.Linear(2 * c, c), nn.LeakyReLU(0.1), nn.Linear(c, c))

    def forward(self, feats, stage: Stage):
        """feats (V_L, 64) -> (V_L, 64): the point features, one row per L voxel.

        Upstream runs layer_out on every point; all points of a voxel carry the same row,
        so running it once per voxel gives the same values for a fraction of the work."""
        # Context is always pooled by factor 2 of the L voxels, not by the next scale.
        ctx = self.context(scatter_mean(feats, stage.group, len(stage.group_count), stage.group_count))  # (G, 64)
        # layer_out[0] on cat([layer_in(feats), ctx[group]]) (V_L, 128), split in its two halves:
        # the context half runs once per group and the concatenation is never built.
        first, c = self.layer_out[0], feats.shape[1]
        h = torch.addmm(first.bias, ctx, first.weight[:, c:].T).index_select(0, stage.group)  # (V_L, 64)
        h = torch.addmm(h, self.layer_in(feats), first.weight[:, :c].T)  # (V_L, 64)
        return self.layer_out[2](self.layer_out[1](h))  # (V_L, 64)


class SPVBlock(nn.Module):
    def __init__(self, c=64):
        super().__init__()
        self.v_enc = nn.ModuleList([SparseBasicBlock(c, c), SparseBasicBlock(c, c)])
        self.point_enc = PointEncoder(c)

    def forward(self, x, stage: Stage):
        """x (V_L, 64) at scale L -> (p (V_s, 64), v_down (V_s, 64), v (V_L, 64)).

        p, the point branch averaged into the s voxels, is what the classifier reads;
        p + v_down feeds the next block; v is what PPMSKD's 3D heads read."""
        v = x
        for block in self.v_enc:
            v = block(v, stage.neighbours)  # (V_L, 64)
        c = v.shape[1]
        p, v_down = move_to_scale(torch.cat([self.point_enc(x + v, stage), v], 1), stage.link).split(c, 1)
        return p, v_down, v


@dataclass
class StudentOutput:
    logits: torch.Tensor                                  # (N, 20) per point
    stage_feats: list[torch.Tensor] = field(default_factory=list)  # v_enc output at scales 1, 2, 4, 8
    stage_voxels: list[Voxels] = field(default_factory=list)      # the voxels of scales 1, 2, 4, 8
    point_feats: list[torch.Tensor] = field(default_factory=list)  # point branch p at scales 2, 4, 8, 16
    point_voxels: list[Voxels] = field(default_factory=list)      # the voxels of scales 2, 4, 8, 16


class TooFewVoxels(ValueError):
    """A training batch whose coarsest scale holds one voxel: BatchNorm cannot normalise a
    single row (the context pooling of scale 8 has as many groups as scale 16 has voxels)."""


class Student(nn.Module):
    """The ELiTe/2DPASS LiDAR student: 1,933,460 parameters with the defaults."""

    def __init__(self, cfg: StudentConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or StudentConfig()
        c, k = cfg.hidden, cfg.num_classes
        cell = (cfg.range_max[0] - cfg.range_min[0]) / cfg.grid_shape[0]  # 0.1 m in both datasets
        self.input_encoder = VoxelInputEncoder(c, cfg.range_min, cell)
        self.blocks = nn.ModuleList([SPVBlock(c) for _ in self.cfg.scales])
        self.classifier = nn.Sequential(nn.Linear(c * len(self.cfg.scales), 128), nn.ReLU(), nn.Linear(128, k))

    def forward(self, points: torch.Tensor, batch_idx: torch.Tensor) -> StudentOutput:
        """points (N, 4) [x, y, z, remission], batch_idx (N,) -> StudentOutput: the logits (N, 20)
        per point, and what PPMSKD reads of each stage (its voxel features and voxels, its point
        branch). Voxelising and classifying are methods of their own, and the blocks a list, so
        that U2MKD's fusion student (u2mkd.py) runs the same stages with its camera fusion between them."""
        pyramid = self.voxelize(points, batch_idx)
        x = self.input_encoder(points, pyramid.voxels[0])  # (V1, 64)
        point_feats, stage_feats = [], []
        for block, stage in zip(self.blocks, pyramid.stages):
            p, v_down, v = block(x, stage)
            x = p + v_down  # (V_s, 64), the next block's input
            point_feats.append(p)
            stage_feats.append(v)
        voxels = pyramid.voxels
        return StudentOutput(self.classify(point_feats, voxels), stage_feats, voxels[:-1], point_feats, voxels[1:])

    def voxelize(self, points: torch.Tensor, batch_idx: torch.Tensor) -> Pyramid:
        """The voxels of scales 1, 2, 4, 8, 16 and what each block reads of them."""
        with torch.no_grad():
            pyramid = build_pyramid(points[:, :3], batch_idx, self.cfg)
        if self.training and len(pyramid.voxels[-1]) < 2:
            raise TooFewVoxels(f"the batch's {len(points)} points fill {len(pyramid.voxels[-1])} voxel(s) at scale "
                               f"{self.cfg.scales[-1]}: BatchNorm needs two")
        return pyramid

    def classify(self, point_feats: list[torch.Tensor], voxels: list[Voxels]) -> torch.Tensor:
        """The four stages' point branches (V_s, 64) -> logits (N, 20) per point.

        A point's feature is cat(p_2[its scale-2 voxel], ..., p_16[its scale-16 voxel]).
        Points that share all four voxels share it, so each combination is classified once."""
        combos, combo_of_point = unique_columns([v.inv for v in voxels[1:]], [len(v) for v in voxels[1:]])  # (U, 4), (N,)
        feats = torch.cat([p.index_select(0, combos[:, k]) for k, p in enumerate(point_feats)], 1)  # (U, 256)
        return self.classifier(feats).index_select(0, combo_of_point)  # (N, 20)


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
# 4. Losses
# =====================================================================================

LAMBDA_LOVASZ = 0.1  # train_params.get('lambda_lovasz', 0.1): the student's main loss; every other head weighs 1.0


def class_weights() -> torch.Tensor:
    """w_c = (max_frac / frac_c)^(1/3) from the training-split counts; w_0 = 0 (ignored)."""
    counts = torch.tensor(CLASS_COUNTS, dtype=torch.float64)
    frac = counts / counts.sum()
    w = torch.zeros(NUM_CLASSES, dtype=torch.float64)
    w[1:] = (frac.max() / frac[1:]) ** (1 / 3)
    return w.float()


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor, ignore=IGNORE) -> torch.Tensor:
    """Lovasz-softmax (Berman et al. 2018): probs (..., P, C), labels (P,) -> (...): mean over
    the classes present, all points pooled, ignored points dropped. Leading dimensions are
    several heads scored against the same labels at once."""
    valid = labels != ignore
    probs, labels = probs[..., valid, :], labels[valid]
    if len(labels) == 0:
        return probs.sum((-2, -1)) * 0
    classes = torch.unique(labels)  # (K,) the classes present
    fg = (labels[None, :] == classes[:, None]).to(probs.dtype)  # (K, P)
    errors = (fg - probs[..., classes].transpose(-2, -1)).abs()  # (..., K, P)
    # One batched sort for all classes: it runs the rows in parallel, twice as fast as a loop.
    errors_sorted, perm = torch.sort(errors, dim=-1, descending=True)
    fg_sorted = fg.expand_as(errors).gather(-1, perm)
    # Gradient of the Lovasz extension of the Jaccard loss at the sorted errors.
    gts = fg.sum(1, keepdim=True)  # (K, 1)
    intersection = gts - fg_sorted.cumsum(-1)
    union = gts + (1 - fg_sorted).cumsum(-1)
    jaccard = 1 - intersection / union  # (..., K, P)
    jaccard = torch.cat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], -1)
    return (errors_sorted * jaccard).sum(-1).mean(-1)


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None, lovasz_weight: float) -> torch.Tensor:
    """Class-weighted cross-entropy (label 0 ignored) + lovasz_weight * Lovasz-softmax.
    logits (..., P, C), labels (P,) -> (...): leading dimensions are heads scored at once."""
    if not bool((labels != IGNORE).any()):
        return logits.sum((-2, -1)) * 0  # nothing labelled: no signal, but keep the graph
    logits = logits.float()
    heads = logits.reshape(-1, *logits.shape[-2:])  # (H, P, C)
    nll = F.cross_entropy(heads.transpose(1, 2), labels.expand(len(heads), -1), weight=weight,
                          ignore_index=IGNORE, reduction="none")  # (H, P): w_y * -log p_y, 0 where ignored
    counted = (labels != IGNORE).float() * (1 if weight is None else weight[labels])  # cross_entropy's mean divides by this sum
    ce = (nll.sum(-1) / counted.sum()).reshape(logits.shape[:-2])
    return ce + lovasz_weight * lovasz_softmax(logits.softmax(-1), labels)


# =====================================================================================
# 5. The image teacher: SAM's ViT encoder, PEFT adapters (LoRA, AdaLoRA), patch decoder
# =====================================================================================
# The teacher is SAM's image encoder, frozen, without its neck. Every linear layer of every
# block carries a low-rank adapter, and after each global-attention block a small transposed-
# conv "patch decoder" turns the 1/16 token grid into a 1/4-resolution feature map (bilinearly
# upsampled to the crop's pixels where a loss or a point reads it). Only the
# adapters, the patch decoders and the 2D heads train. The image is the bottom 320 x 1024
# crop of the camera frame; its 20 x 64 token grid is the top-left of SAM's 64 x 64 grid.

# ---- 5.1 Adapters: LoRA and AdaLoRA's SVD form, every layer's update at once ----
# Every linear layer of every block gets a low-rank update: q, k and v (each its own adapter,
# as upstream, which splits SAM's fused qkv into three projections), proj, lin1 and lin2; 72 in
# ViT-B. The factors of one kind of layer are stacked over the blocks, so one batched product
# forms the updates of all its layers, and each step runs SAM's own blocks with the weights
# W + delta W (torch.func.functional_call). SAM's encoder stays SAM's: frozen, fused qkv, its
# checkpoint keys. Every adapter tensor's name contains "lora_", which is how freezing, the
# optimiser and AdaLoRA find them.

ADAPTED_LAYERS = {"qkv": ("attn.qkv", 3), "proj": ("attn.proj", 1), "lin1": ("mlp.lin1", 1), "lin2": ("mlp.lin2", 1)}
PEFT_CHOICES = ("adalora", "lora", "none")


class Adapters(nn.Module):
    """The low-rank updates of one kind of linear layer (out, in) in all `depth` blocks, its
    rows split into `parts` adapters (q, k, v of qkv), each with

        LoRA     delta W = alpha / r B A,                   B = 0 at init (Hu et al. 2022)
        AdaLoRA  delta W = alpha / (r + 1e-5) B diag(E) A,  A, B ~ N(0, 0.02^2), E = 0 at init

    for A (r, in), B (out / parts, r), E (r, 1), stored stacked: lora_A (depth, parts, r, in),
    lora_B (depth, parts, out / parts, r), lora_E (depth, parts, r, 1). AdaLoRA (Zhang et al.
    2023) prunes a rank by zeroing its entry of E; its divisor (upstream's `ranknum`) stays r for
    the whole run, as upstream never updates it."""

    def __init__(self, depth: int, parts: int, out_features: int, in_features: int, r: int, alpha: float, svd: bool):
        super().__init__()
        self.r, self.svd = r, svd
        self.lora_A = nn.Parameter(torch.empty(depth, parts, r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(depth, parts, out_features // parts, r))
        if svd:
            self.lora_E = nn.Parameter(torch.zeros(depth, parts, r, 1))
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)
            self.scaling = alpha / (r + 1e-5)
        else:  # nn.Linear's own init for A (as loralib), per adapter
            bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
            nn.init.uniform_(self.lora_A, -bound, bound)
            self.scaling = alpha / r

    def delta_weights(self) -> torch.Tensor:
        """(depth, out, in): every block's update, the parts' rows stacked in order."""
        a = self.lora_A * self.lora_E if self.svd else self.lora_A  # diag(E) A
        return (self.lora_B @ a * self.scaling).flatten(1, 2)  # (depth, parts, out/parts, in) -> (depth, out, in)


def make_adapters(encoder: nn.Module, peft="adalora", r=12, alpha=1.0) -> nn.ModuleDict:
    """One Adapters per kind of layer in ADAPTED_LAYERS (none for peft='none')."""
    if peft not in PEFT_CHOICES:
        raise ValueError(f"peft must be one of {PEFT_CHOICES}, got {peft!r}")
    if peft == "none":
        return nn.ModuleDict()
    block = encoder.blocks[0]
    return nn.ModuleDict({
        kind: Adapters(len(encoder.blocks), parts, *block.get_submodule(path).weight.shape, r, alpha, peft == "adalora")
        for kind, (path, parts) in ADAPTED_LAYERS.items()})


def orth_regularizer(model: nn.Module, weight=0.1) -> torch.Tensor:
    """AdaLoRA's R = weight * mean over all A and B of ||A A^T - I||_F or ||B^T B - I||_F,
    keeping the factors close to orthonormal so E acts like singular values. The plain
    Frobenius norm, not its square (144 matrices in ViT-B: 8 batched products, one norm)."""
    grams = []
    for m in model.modules():
        if isinstance(m, Adapters):
            a, b = m.lora_A.flatten(0, 1), m.lora_B.flatten(0, 1)  # (L, r, in), (L, out, r)
            grams += [a @ a.transpose(1, 2), b.transpose(1, 2) @ b]  # (L, r, r) each
    if not grams:
        return torch.zeros(())
    grams = torch.cat(grams)  # (2 x 72, r, r) for ViT-B
    eye = torch.eye(grams.shape[-1], dtype=grams.dtype, device=grams.device)
    return weight * torch.linalg.matrix_norm(grams - eye).mean()


# ---- 5.2 AdaLoRA's rank budget ----

class RankAllocator:
    """AdaLoRA's budget schedule over every AdaLoRA adapter of a model.

    Each adapter entry p gets a sensitivity I = |p * dL/dp|, smoothed (I_bar) and with its
    smoothed deviation (U_bar); score = I_bar * U_bar. Rank i of an adapter scores
    score(E_i) + mean score of row i of A + mean score of column i of B. The total rank
    (12 per adapter) stays full for the first T/6 steps, falls as a cubic to 8 per adapter at
    T/2 (masking every T/300 steps), then stays there with frozen scores. "Masking" zeros
    the E entries whose score is at or below the k-th smallest, k = total - budget.

    Call step(global_step) after backward and before the optimiser step."""

    def __init__(self, model: nn.Module, total_steps: int, target_rank=8, init_warmup=None,
                 final_warmup=None, mask_interval=None, beta1=0.85, beta2=0.85):
        self.kinds = {n: m for n, m in model.named_modules() if isinstance(m, Adapters) and m.svd}
        if not self.kinds:
            raise ValueError("RankAllocator needs AdaLoRA adapters (peft='adalora'); the model has none")
        self.total_steps = total_steps
        self.init_warmup = total_steps // 6 if init_warmup is None else init_warmup
        self.final_warmup = total_steps // 2 if final_warmup is None else final_warmup
        # Upstream uses T/300 as is; at least 1 so that short runs do not divide by zero.
        self.mask_interval = max(1, total_steps // 300) if mask_interval is None else mask_interval
        self.beta1, self.beta2 = beta1, beta2
        self.total_rank = sum(m.lora_E.numel() for m in self.kinds.values())  # 12 x 72 = 864 for ViT-B
        self.target_total = target_rank * sum(m.lora_E[..., 0, 0].numel() for m in self.kinds.values())  # 8 x 72
        self.ipt: dict[str, torch.Tensor] = {}  # "kind.lora_X" -> I_bar, the kind's stacked shape
        self.unc: dict[str, torch.Tensor] = {}  # "kind.lora_X" -> U_bar

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at this step, whether to mask at this step)."""
        if step <= self.init_warmup:
            return self.total_rank, False
        if step > self.total_steps - self.final_warmup:
            return self.target_total, True
        progress = (step - self.init_warmup) / (self.total_steps - self.final_warmup - self.init_warmup)
        spare = self.total_rank - self.target_total
        return int(self.target_total + spare * (1 - progress) ** 3), step % self.mask_interval == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        """For every adapter entry: I_bar <- b1 I_bar + (1 - b1) |p * dL/dp|, U_bar <- b2 U_bar +
        (1 - b2) |sens - I_bar|. All stacked tensors at once with torch's _foreach operations (as
        torch.optim does): a few launches a step."""
        keys, params = [], []
        for name, m in self.kinds.items():
            for pname in ("lora_A", "lora_E", "lora_B"):
                p = getattr(m, pname)
                if p.grad is not None:  # a kind the loss did not reach this step keeps its scores
                    keys.append(f"{name}.{pname}")
                    params.append(p)
        if not params:
            return
        sens = torch._foreach_abs(torch._foreach_mul(params, [p.grad for p in params]))  # first-order loss change
        ipt = torch._foreach_add(torch._foreach_mul([self.ipt.get(k, torch.zeros_like(p)) for k, p in zip(keys, params)],
                                                    self.beta1), torch._foreach_mul(sens, 1 - self.beta1))
        deviation = torch._foreach_abs(torch._foreach_sub(sens, ipt))
        unc = torch._foreach_add(torch._foreach_mul([self.unc.get(k, torch.zeros_like(p)) for k, p in zip(keys, params)],
                                                    self.beta2), torch._foreach_mul(deviation, 1 - self.beta2))
        self.ipt.update(zip(keys, ipt))
        self.unc.update(zip(keys, unc))

    def _score(self, m: Adapters, key: str, pname: str) -> torch.Tensor:
        if key not in self.ipt:
            return torch.zeros_like(getattr(m, pname))
        return self.ipt[key] * self.unc[key]

    @torch.no_grad()
    def rank_importance(self) -> dict[str, torch.Tensor]:
        """Per kind (depth, parts, r): the triplet importance of each adapter's ranks."""
        out = {}
        for name, m in self.kinds.items():
            e, a, b = (self._score(m, f"{name}.{p}", p) for p in ("lora_E", "lora_A", "lora_B"))
            out[name] = e[..., 0] + a.mean(-1) + b.mean(-2)  # E + row means of A + column means of B
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> float | None:
        """Zero the E entries of the (total - budget) least important ranks; the threshold."""
        k = self.total_rank - budget
        if k <= 0:
            return None
        scores = self.rank_importance()
        threshold = torch.cat([s.flatten() for s in scores.values()]).kthvalue(k).values.item()
        for name, m in self.kinds.items():
            m.lora_E.masked_fill_((scores[name] <= threshold)[..., None], 0.0)
        return threshold

    def step(self, global_step: int) -> int:
        """Update the scores (until the final phase), mask when scheduled; the current budget."""
        if global_step < self.total_steps - self.final_warmup:
            self.update_importance()
        budget, mask_now = self.budget(global_step)
        if mask_now:
            self.mask_to_budget(budget)
        return budget

    def state_dict(self) -> dict:
        return {"ipt": dict(self.ipt), "unc": dict(self.unc)}

    def load_state_dict(self, state: dict) -> None:
        self.ipt, self.unc = dict(state["ipt"]), dict(state["unc"])


# ---- 5.3 SAM's encoder with its attention's relative positions folded into q and k ----

@dataclass
class SamVariant:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]


SAM_VARIANTS = {  # sam_model_registry's settings, plus a small random preset for tests and CPU runs
    "vit_b": SamVariant(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamVariant(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamVariant(1280, 32, 16, (7, 15, 23, 31)),
    "vit_tiny": SamVariant(96, 8, 3, (1, 3, 5, 7)),
}
SAM_IMG_SIZE, SAM_PATCH, SAM_WINDOW = 1024, 16, 14


def build_sam_encoder(variant="vit_b") -> nn.Module:
    """segment-anything's ImageEncoderViT with sam_model_registry's settings, randomly
    initialised, without the neck, its attention folded (same weights, same keys).
    segment-anything is imported here, where the teacher is built: the student needs none of it."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT
    if variant not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose from {sorted(SAM_VARIANTS)}")
    v = SAM_VARIANTS[variant]
    encoder = ImageEncoderViT(
        img_size=SAM_IMG_SIZE, patch_size=SAM_PATCH, embed_dim=v.embed_dim, depth=v.depth,
        num_heads=v.num_heads, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True, window_size=SAM_WINDOW, global_attn_indexes=v.global_attn_indexes)
    del encoder.neck  # ELiTe reads the blocks themselves; SAM's 256-channel neck is never used
    for block in encoder.blocks:
        block.attn = elite_kernels.FoldedAttention(block.attn)  # SAM's maths, in the form torch's fused attention runs
    return encoder


# ---- 5.4 The teacher: encoder, patch decoders, 2D heads ----

class LayerNorm2d(nn.LayerNorm):
    """segment-anything's LayerNorm2d (normalise each pixel over the channels of (B, C, H, W)),
    same weight and bias, through torch's fused layer norm: two operations instead of seven."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Back to (B, C, H, W) memory: the transposed convolution after it is slower on the permuted view.
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()


def patch_decoder(c: int) -> nn.Sequential:
    """Tokens (B, C, h, w) -> (B, C/8, 4h, 4w): two 2x transposed convs, as SAM's mask decoder."""
    return nn.Sequential(
        nn.ConvTranspose2d(c, c // 4, kernel_size=2, stride=2), LayerNorm2d(c // 4, eps=1e-6), nn.GELU(),
        nn.ConvTranspose2d(c // 4, c // 8, kernel_size=2, stride=2), nn.GELU())


def head_2d(cin: int, hidden: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


@dataclass
class TeacherConfig:
    variant: str = "vit_b"
    peft: str = "adalora"
    rank: int = 12
    alpha: float = 1.0
    crop_hw: tuple[int, int] = CROP_HW  # the data pipeline's crop; the network takes any size
    num_classes: int = NUM_CLASSES


class Teacher(nn.Module):
    """SAM ViT + adapters -> four (B, C/8, H, W) feature maps, one per global-attention block
    (blocks 2, 5, 8, 11 of ViT-B). The four "scales" are four depths of one 1/16 token grid;
    the shallowest pairs with the student's finest scale. Built frozen: only adapters, patch
    decoders and heads have requires_grad."""

    def __init__(self, cfg: TeacherConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or TeacherConfig()
        self.encoder = build_sam_encoder(cfg.variant).requires_grad_(False)  # SAM itself stays frozen: all of it
        self.adapters = make_adapters(self.encoder, cfg.peft, cfg.rank, cfg.alpha)
        self.stage_blocks = SAM_VARIANTS[cfg.variant].global_attn_indexes
        c = SAM_VARIANTS[cfg.variant].embed_dim
        self.feat_dim = c // 8  # 96 for ViT-B
        self.patch_decoders = nn.ModuleList([patch_decoder(c) for _ in self.stage_blocks])
        self.heads_2d = nn.ModuleList([head_2d(c // 8, c // 4, cfg.num_classes) for _ in self.stage_blocks])
        self.fused_head = head_2d(len(self.stage_blocks) * c // 8, c // 4, cfg.num_classes)
        self.sam_checkpoint: str | None = None  # the SAM file the frozen encoder was loaded from, if any
        self.sam_fingerprint: list | None = None  # that file's [size, time, CRC-32], which a checkpoint records
        self._low_precision: tuple = (None, [])  # frozen_weights' bf16 copy under autocast, and its key

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) normalised -> tokens (B, h, w, C) after each global block,
        with h, w = ceil(H/16), ceil(W/16).

        Upstream pads the crop to SAM's 1024 x 1024 and keeps the top-left h x w tokens right after
        the patch embedding (cut=True), before any block; embedding only the crop and adding the
        top-left of pos_embed gives those same tokens, and every block then runs on them alone."""
        height, width = images.shape[-2:]
        h, w = math.ceil(height / SAM_PATCH), math.ceil(width / SAM_PATCH)
        grid = SAM_IMG_SIZE // SAM_PATCH
        if h > grid or w > grid:
            raise ValueError(f"image {height}x{width} is larger than SAM's {SAM_IMG_SIZE}x{SAM_IMG_SIZE}")
        # Zero padding to whole patches: 0 is the mean colour after normalisation, as SAM pads.
        x = F.pad(images, (0, w * SAM_PATCH - width, 0, h * SAM_PATCH - height))
        x = self.encoder.patch_embed(x) + self.encoder.pos_embed[:, :h, :w]  # (B, h, w, C)
        tokens = []
        weights = self.adapted_weights()  # this step's W + delta W, all layers at once
        for i, block in enumerate(self.encoder.blocks):
            # SAM's block, run with the adapted weights in place of its frozen ones. Windowed
            # blocks pad to multiples of 14 and unpad themselves.
            x = torch.func.functional_call(block, weights[i], (x,))
            if i in self.stage_blocks:
                tokens.append(x)
        return tokens

    def adapted_weights(self) -> list[dict[str, torch.Tensor]]:
        """Per block, {'attn.qkv.weight': W + delta W, ...}: the weights its adapted layers run with.
        Each is one matrix, so a layer costs one product a step, not three (W x + B (A x))."""
        layers = [(i, ADAPTED_LAYERS[kind][0]) for kind in self.adapters for i in range(len(self.encoder.blocks))]
        updates = [u for a in self.adapters.values() for u in a.delta_weights().unbind(0)]  # (out, in) each
        # Every sum W + delta W in one operation (the plain form: one add per layer, 48 in ViT-B).
        summed = torch._foreach_add(self.frozen_weights(layers), updates) if layers else []  # peft none: no layers
        weights = [{} for _ in self.encoder.blocks]
        for (i, path), w in zip(layers, summed):
            weights[i][f"{path}.weight"] = w
        return weights

    def frozen_weights(self, layers: list[tuple[int, str]]) -> list[torch.Tensor]:
        """The frozen weights of these (block, layer) in the precision the blocks compute in: under
        autocast (--amp) a bf16 copy made once, as SAM's weights never train, instead of a cast of
        every weight at every step."""
        weights = [self.encoder.blocks[i].get_submodule(path).weight for i, path in layers]
        device = weights[0].device.type
        if not torch.is_autocast_enabled(device):
            return weights
        dtype = torch.get_autocast_dtype(device)
        key = (dtype,) + tuple((w.data_ptr(), w._version) for w in weights)  # new weights (a load, .to()): a new copy
        if self._low_precision[0] != key:
            self._low_precision = (key, [w.detach().to(dtype) for w in weights])
        return self._low_precision[1]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) normalised -> 4 patch-decoder maps (B, C/8, 4h, 4w), a quarter of
        the padded crop's resolution. A pixel's feature is the map upsampled 4x bilinearly
        (upsample_maps); sample_pixels computes it at the pixels that are read, and only there."""
        return [decoder(x.permute(0, 3, 1, 2)) for x, decoder in zip(self.encode(images), self.patch_decoders)]

    def classify(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-stage features (N, C/8) each -> (4 stage logits (N, 20), fused logits (N, 20))."""
        stage = [head(f) for head, f in zip(self.heads_2d, feats)]
        return stage, self.fused_head(torch.cat(feats, 1))  # (N, 4 * C/8) -> (N, 20)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def upsample_maps(maps: list[torch.Tensor], height: int, width: int) -> list[torch.Tensor]:
    """The teacher's maps (B, C, 4h, 4w) at full resolution (B, C, height, width): upsampled 4x
    to the padded 16h x 16w the tokens cover, then the padding dropped, so each pixel reads the
    token grid where its patch lies (a no-op crop for 320 x 1024). Upstream's form; used where
    every pixel counts (pseudo-labels)."""
    return [F.interpolate(m, size=(4 * m.shape[2], 4 * m.shape[3]), mode="bilinear", align_corners=False)
            [:, :, :height, :width] for m in maps]


def sample_pixels(maps: list[torch.Tensor], pixel_indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """The teacher's maps (B, C, 4h, 4w) at each sample's (Ki, 2) (row, col) crop pixels ->
    (sum Ki, C) per map, samples concatenated in batch order: what upsample_maps holds at those
    pixels (bilinear, align_corners=False), computed from the four map cells around each."""
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


def teacher_losses(teacher: Teacher, feats: list[torch.Tensor], crops: CameraCrops, weight: torch.Tensor,
                   lambda_seg2d=1.0) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The teacher's 2D terms by name: each stage head (lambda_seg2d / 4)(CE_w + Lovasz) and the
    fused head (CE_w + Lovasz). With pseudo-labels every crop pixel counts (dense mode); without,
    the projected points and their labels (sparse mode, the official default config).
    Also returns each stage head's logits at the points' pixels, 4 x (K, 20), for PPMSKD."""
    if crops.dense is not None:
        height, width = crops.dense.shape[-2:]
        inputs = [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in upsample_maps(feats, height, width)]  # 4 x (B*H*W, C/8)
        labels = crops.dense.reshape(-1)
    else:
        inputs = sample_pixels(feats, crops.pixels)  # 4 x (K, C/8)
        labels = crops.labels
    stage_logits, fused = teacher.classify(inputs)
    losses = seg_loss(torch.stack(stage_logits + [fused]), labels, weight, lovasz_weight=1.0)  # (5,) all heads at once
    *stage_losses, fused_loss = losses.unbind()
    terms = {f"seg2d_scale{2 ** (k + 1)}": lambda_seg2d / 4 * loss for k, loss in enumerate(stage_losses)}
    terms["seg2d_fused"] = fused_loss
    if crops.dense is not None:  # the pixel rows of the points, in the flattened (B, H, W) order
        rows = torch.cat([b * height * width + p[:, 0] * width + p[:, 1] for b, p in enumerate(crops.pixels)])
        stage_logits = [logits.index_select(0, rows) for logits in stage_logits]
    return terms, stage_logits


# =====================================================================================
# 6. SAM-PLG: dense image pseudo-labels from sparse LiDAR labels
# =====================================================================================
# Offline, once per scan (upstream: amg.py and plg/segment_anything/pseudo_label_generator.py):
#
#   stage 1  the labelled points projected into the image become SAM prompts (one
#            positive point plus a dense mask prompt per labelled pixel of SAM's 256x256
#            mask frame); SAM returns 3 masks per prompt; stable masks survive box NMS;
#   stage 2  each mask, least confident first, is painted with the majority label of
#            the points inside it; pixels no mask paints keep their point label or 0.
#
# Output, one file per scan, beside the sequence's other folders:
#
#     ROOT/sequences/XX/image_2_plg/NNNNNN.npy    uint16 (2, H, W): [0] training id 0..19
#                                                 (0 = ignore), [1] instance id
#
# Upstream writes the same array to ROOT/processed_sk/XX/image_2_labels/NNNNNN.npy.
# The mask source is pluggable: runs.SamMaskSource pushes a frame's prompts through SAM in
# batches with the rules below (a GPU job: ViT-H per image plus the mask decoder per prompt);
# synthkitti.IdealMaskSource reads SynthKITTI's rendered regions.

NO_POINT = 65535  # stage 2's "no point projects onto this pixel"
LOW_RES = 256     # SAM's mask frame; its input frame is 4x that (1024)


def last_point_per_pixel(pixel_rc: np.ndarray, width: int) -> np.ndarray:
    """Indices of the points upstream's per-point loop leaves in a label map: when points
    share a pixel the last one written wins. (K, 2) -> (U,), one per occupied pixel."""
    flat = pixel_rc[:, 0] * width + pixel_rc[:, 1]  # (K,)
    _, first_from_end = np.unique(flat[::-1], return_index=True)
    return len(flat) - 1 - first_from_end


def sparse_label_maps(semantic, instance, pixel_rc, height: int, width: int) -> np.ndarray:
    """The point labels as images: (2, H, W) uint16 [semantic, instance], NO_POINT where
    no point projects (upstream's gt_label, the ballot box of stage 2)."""
    maps = np.full((2, height, width), NO_POINT, dtype=np.uint16)
    k = last_point_per_pixel(pixel_rc, width)
    rows, cols = pixel_rc[k].T
    maps[0, rows, cols] = semantic[k]
    maps[1, rows, cols] = instance[k]
    return maps


# ------------------------------------------------------------------------------------
# Stage 1: prompts and masks
# ------------------------------------------------------------------------------------

def nearest_resize(a: np.ndarray, size: int = LOW_RES) -> np.ndarray:
    """cv2.resize(a, (size, size), interpolation=cv2.INTER_NEAREST) without OpenCV:
    output pixel d reads input pixel floor(d * in_size / size) on each axis."""
    rows = np.arange(size) * a.shape[0] // size  # integer arithmetic: no rounding surprises
    cols = np.arange(size) * a.shape[1] // size
    return a[rows[:, None], cols[None, :]]


@dataclass
class SamPrompts:
    points: np.ndarray    # (P, 2) float32 (x, y) in SAM's 1024 input frame
    semantic: np.ndarray  # (256, 256) uint8 training ids in SAM's mask frame
    instance: np.ndarray  # (256, 256) uint8 instance ids, truncated to 8 bits as upstream


def sam_prompts(semantic, instance, pixel_rc, width: int) -> SamPrompts:
    """One positive point per labelled pixel of SAM's 256x256 mask frame.

    The labels go into square (W, W) maps first: SAM scales the width W to 1024 and pads
    the height to 1024 too, so the square's 256x256 downsample lines up with SAM's mask
    frame. Only pixels the nearest sampling lands on survive, about 1 in (W / 256)^2."""
    k = last_point_per_pixel(pixel_rc, width)
    rows, cols = pixel_rc[k].T
    if len(rows) and rows.max() >= width:
        raise ValueError("SAM-PLG's square label maps need an image at least as wide as it is tall")
    sem_square = np.zeros((width, width), dtype=np.uint8)
    inst_square = np.zeros((width, width), dtype=np.uint8)
    sem_square[rows, cols] = semantic[k]
    inst_square[rows, cols] = instance[k].astype(np.uint8)  # ids above 255 wrap, as upstream's uint8 map
    sem, inst = nearest_resize(sem_square), nearest_resize(inst_square)  # (256, 256) each
    r, c = np.nonzero(sem)  # raster order, as upstream's np.where
    points = np.stack([4 * c + 1.5, 4 * r + 1.5], 1).astype(np.float32)  # centre of the 4x4 block
    return SamPrompts(points, sem, inst)


def mask_prompts(prompts: SamPrompts, index: np.ndarray) -> np.ndarray:
    """Dense mask prompts (logits in SAM's mask frame) for the points `index` -> (B, 1, 256, 256).

    Thing (instance != 0): +16 on its instance. Stuff: +1 on its class, a weak hint because
    the class's pixels may be separate regions. Both: -16 on every other labelled class;
    it overrides the +16 where another class shares the truncated instance id. 0 elsewhere."""
    col, row = np.round(prompts.points[index] / 4).astype(np.int64).T  # back to the mask-frame pixel
    sem, inst = prompts.semantic, prompts.instance  # (256, 256)
    cls = sem[row, col][:, None, None]  # (B, 1, 1)
    ins = inst[row, col][:, None, None]
    same = np.where(ins == 0, sem == cls, inst == ins)  # (B, 256, 256)
    other_class = (sem > 0) & (sem != cls)
    logits = np.where(other_class, -16.0, np.where(same, np.where(ins == 0, 1.0, 16.0), 0.0))
    return logits[:, None].astype(np.float32)


def select_masks(logits: torch.Tensor, iou_preds: torch.Tensor, mask_threshold=0.0,
                 stability_thresh=0.9, stability_offset=1.0):
    """SAM's mask filter as PLG sets it: keep masks whose stability score (the IoU of the
    mask cut at logit +1 and at -1) is >= 0.9, then binarise at the logit threshold.
    logits (M, H, W), iou_preds (M,) -> masks (m, H, W) bool, iou (m,), boxes (m, 4) xyxy.
    PLG turns the predicted-IoU filter off, and with one full-image crop the crop-edge
    filter keeps everything, so neither appears here."""
    from segment_anything.utils.amg import batched_mask_to_box, calculate_stability_score
    if stability_thresh > 0:  # upstream skips the test at 0, so empty masks (score 0/0) survive it
        stable = calculate_stability_score(logits, mask_threshold, stability_offset) >= stability_thresh
        logits, iou_preds = logits[stable], iou_preds[stable]
    masks = logits > mask_threshold
    return masks, iou_preds, batched_mask_to_box(masks)


def nms_masks(boxes: torch.Tensor, iou: torch.Tensor, thresh=0.7) -> torch.Tensor:
    """Box NMS scored by predicted IoU -> kept indices, highest predicted IoU first."""
    from torchvision.ops import batched_nms
    one_category = torch.zeros(len(iou), dtype=torch.long, device=iou.device)
    return batched_nms(boxes.float(), iou.float(), one_category, thresh)


# ------------------------------------------------------------------------------------
# Stage 2: voting
# ------------------------------------------------------------------------------------

def majority_label(values: np.ndarray) -> int:
    """The most frequent value, NO_POINT counting 0; NO_POINT if nothing else is there.

    Ties go to the value met first in `values` (for a mask: raster order, row by row),
    as upstream's Counter.most_common, which keeps insertion order and takes the first maximum."""
    uniq, first, counts = np.unique(values, return_index=True, return_counts=True)
    counts[uniq == NO_POINT] = 0
    if counts.max(initial=0) == 0:
        return NO_POINT
    tied = np.flatnonzero(counts == counts.max())
    return int(uniq[tied[np.argmin(first[tied])]])


def vote_masks(masks: np.ndarray, iou: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """Paint each mask with the majority label of the points inside it.

    masks (M, H, W) bool, iou (M,), sparse (2, H, W) uint16 from sparse_label_maps
    -> (2, H, W) uint16 pseudo-labels, 0 where nothing is known."""
    pseudo = sparse.copy()
    has_point = np.flatnonzero(sparse[0].ravel() != NO_POINT)  # (K',) raster order
    point_sem, point_inst = sparse[0].ravel()[has_point], sparse[1].ravel()[has_point]
    # Least confident first, so the most confident mask wins where masks overlap. Upstream
    # reverses the NMS order; reversing a stable descending sort matches it for tied IoUs.
    for m in np.argsort(-np.asarray(iou), kind="stable")[::-1]:
        inside = masks[m].ravel()[has_point]  # (K',) which points fall in this mask
        cls = majority_label(point_sem[inside])
        if cls in (0, NO_POINT):
            continue  # mostly unlabeled points, or none at all: the mask says nothing
        pseudo[0][masks[m]] = cls
        ins = majority_label(point_inst[inside])  # over all the mask's points, as upstream
        if ins not in (0, NO_POINT):
            pseudo[1][masks[m]] = ins
    pseudo[pseudo == NO_POINT] = 0
    return pseudo


def pseudo_labels(frame: PlgFrame, source) -> np.ndarray:
    """Both stages for one frame -> (2, H, W) uint16 [semantic, instance]."""
    height, width = frame.image.shape[:2]
    sparse = sparse_label_maps(frame.semantic, frame.instance, frame.pixel_rc, height, width)
    masks, iou = source.masks(frame)
    return vote_masks(masks, iou, sparse)


# =====================================================================================
# 7. PPMSKD: Patch-to-Point Multi-Stage Knowledge Distillation
# =====================================================================================
# At each of the student's four stages, a 3D head classifies the stage's voxel features
# (trained against majority-vote voxel labels), the teacher's matching 2D head classifies its
# stage features, and the 3D predictions of the points the camera sees are pulled toward the
# 2D ones by KL(P_2D || P_3D), with the teacher detached so the KD trains only the student.

def voxel_labels(labels: torch.Tensor, inv: torch.Tensor, num_voxels: int) -> torch.Tensor:
    """Majority label of the points in each voxel: labels (N,), inv (N,) -> (V,). Label 0 votes
    too (a mostly unlabelled voxel is ignored); ties go to the smaller id."""
    votes = torch.zeros(num_voxels, NUM_CLASSES, dtype=torch.long, device=labels.device)
    votes.index_put_((inv, labels), torch.ones_like(labels), accumulate=True)  # (V, 20) counts
    return votes.argmax(1)  # argmax returns the first maximum


def heads_3d(c=64, num_classes=NUM_CLASSES, stages=4) -> nn.ModuleList:
    """One 3D head per student stage: Linear(64, 128) -> ReLU -> Linear(128, 20). Training only:
    they are not part of the saved 1.9M student."""
    return nn.ModuleList([nn.Sequential(nn.Linear(c, 2 * c), nn.ReLU(), nn.Linear(2 * c, num_classes))
                          for _ in range(stages)])


def deep_supervision_losses(out: StudentOutput, logits_3d: list[torch.Tensor], batch: Batch,
                            weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """seg3d_scale{s}: (CE_w + Lovasz) of the 3D head of stage s = 2, 4, 8, 16 on the voxels of the
    previous scale. PPMSKD's 3D heads bring these terms with or without a teacher (a student with
    the heads and no KD is the ablation's second row)."""
    terms = {}
    for k, (logits, vox) in enumerate(zip(logits_3d, out.stage_voxels)):
        target = voxel_labels(batch.labels, vox.inv, len(vox))  # (V_L,)
        terms[f"seg3d_scale{2 ** (k + 1)}"] = seg_loss(logits, target, weight, lovasz_weight=1.0)
    return terms


def kd_losses(out: StudentOutput, logits_3d: list[torch.Tensor], point_logits_2d: list[torch.Tensor],
              batch: Batch, lambda_xm=0.05) -> dict[str, torch.Tensor]:
    """kd_scale{s}: (lambda_xm / 4) KL(P_2D || P_3D) over the points at the crop's pixels, averaged
    over all K x 20 elements (F.kl_div's 'mean', as upstream), the 2D side detached."""
    terms = {}
    for k, (logits, vox, logits_2d) in enumerate(zip(logits_3d, out.stage_voxels, point_logits_2d)):
        seen = logits.index_select(0, vox.inv.index_select(0, batch.crop_points))  # (K, 20)
        # Sum over all K x 20 elements divided by K x 20: upstream's reduction='mean', spelled out
        # (torch warns that 'mean' will change meaning); max(., 1) keeps a crop without points at 0.
        kl = F.kl_div(F.log_softmax(seen, 1), F.softmax(logits_2d.detach(), 1), reduction="sum")
        terms[f"kd_scale{2 ** (k + 1)}"] = lambda_xm / 4 * kl / max(seen.numel(), 1)
    return terms


def ppmskd_losses(out: StudentOutput, heads: nn.ModuleList, point_logits_2d: list[torch.Tensor],
                  batch: Batch, weight: torch.Tensor, lambda_xm=0.05) -> dict[str, torch.Tensor]:
    """The 3D and KD terms of PPMSKD by name, per stage s = 2, 4, 8, 16: the 3D heads' seg3d_scale{s}
    (deep_supervision_losses) and kd_scale{s} (kd_losses). point_logits_2d: the teacher's stage
    logits at batch.crop_points (teacher_losses' second output)."""
    logits_3d = [head(feats) for head, feats in zip(heads, out.stage_feats)]  # 4 x (V_L, 20)
    seg3d = deep_supervision_losses(out, logits_3d, batch, weight)
    kd = kd_losses(out, logits_3d, point_logits_2d, batch, lambda_xm)
    return dict(term for stage in zip(seg3d.items(), kd.items()) for term in stage)  # stage by stage, as upstream logs


LAMBDA_SEG2D = 1.0  # train_params.lambda_seg2d: each stage's 2D loss weighs lambda_seg2d / 4
LAMBDA_XM = 0.05    # train_params.lambda_xm: each stage's KL weighs lambda_xm / 4
ORTH_WEIGHT = 0.1   # AdaLoRA's orthogonality regulariser


def teacher_point_logits(teacher: Teacher, crops: CameraCrops) -> list[torch.Tensor]:
    """A fixed teacher's stage logits at the points' pixels, 4 x (K, 20), without gradients."""
    with torch.no_grad():
        stage_logits, _ = teacher.classify(sample_pixels(teacher(crops.images), crops.pixels))
    return stage_logits


def elite_losses(out: StudentOutput, heads: nn.ModuleList, teacher: Teacher, batch: Batch,
                 weight: torch.Tensor, joint=True, lambda_xm=LAMBDA_XM) -> dict[str, torch.Tensor]:
    """ELiTe's whole training loss, term by name (their sum is the loss):
        seg3d_main                 CE_w + LAMBDA_LOVASZ (0.1) Lovasz of the student's point logits
        seg2d_scale*, seg2d_fused  the teacher's 2D terms               (joint mode)
        seg3d_scale*, kd_scale*    PPMSKD's 3D heads and KL(P_2D || P_3D)
        orth                       AdaLoRA's orthogonality term         (joint mode, AdaLoRA)
    joint=True is the paper: the teacher's adapters, patch decoders and 2D heads keep learning
    from their 2D losses. joint=False (frozen): the teacher only hands over detached logits."""
    terms = {"seg3d_main": seg_loss(out.logits, batch.labels, weight, LAMBDA_LOVASZ)}
    if joint:
        terms_2d, logits_2d = teacher_losses(teacher, teacher(batch.crops.images), batch.crops, weight, LAMBDA_SEG2D)
        terms |= terms_2d
    else:
        logits_2d = teacher_point_logits(teacher, batch.crops)
    terms |= ppmskd_losses(out, heads, logits_2d, batch, weight, lambda_xm)
    if joint and teacher.cfg.peft == "adalora":
        terms["orth"] = orth_regularizer(teacher, ORTH_WEIGHT)
    return terms
