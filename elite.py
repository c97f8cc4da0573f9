"""ELiTe in plain PyTorch, read top to bottom.

ELiTe (ICME 2024) distils a Segment Anything image teacher into a 1.9M-parameter
voxel LiDAR student (the 2DPASS "4scale-64dimension" network). This file holds the
method, in the order the data flows once a scan is read:

    1. Voxelisation and scatter reductions
    2. Submanifold sparse convolution
    3. The student: SparseBasicBlock, point encoder, SPVBlock, classifier
    4. Losses: class-weighted cross-entropy and Lovasz-softmax
    5. The image teacher: SAM's ViT, PEFT (LoRA/AdaLoRA), patch decoder, 2D heads
    6. SAM-PLG: dense pseudo-labels from sparse LiDAR labels
    7. PPMSKD: patch-to-point multi-stage distillation from the teacher into the student
    8. One training step on one page: `python elite.py`

Every part is written in its plain reference form: the maths as the papers state it. Beside
this file, elite_fast.py holds a fast form of each part (packed voxel keys, neighbour tables,
merged adapters, Triton kernels), which runs by default and is proven equal to its reference
by test_fast.py; `--forms reference` or ELITE_FORMS=reference runs this file's forms instead.
Where a part has a fast form, one line says so and hands over.

Reading the data comes before: semantickitti.py (files, projection, the camera crop, the
dataset, the official evaluator), nusc.py (nuScenes), scandata.py (the Scan and Batch types both
share, augmentation). The machinery of a run (the training loop, checkpoints, torchrun) is in
runs.py; U2MKD is in u2mkd.py. Facts follow the official ELiTe/2DPASS code; deliberate
differences are listed in docs/differences.md, and docs/paper-map.md maps the papers' parts here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import elite_fast
import nusc
from scandata import Batch, CameraCrops
from semantickitti import CLASS_COUNTS, CROP_HW, GRID_SHAPE, IGNORE, NUM_CLASSES, RANGE_MAX, RANGE_MIN, PlgFrame

# =====================================================================================
# 1. Voxelisation and scatter reductions
# =====================================================================================
# Every scale s re-quantises the raw points into ceil(shape / s) cells per axis, so the
# scale-8 z axis has 8 cells (0.75 m) and the scale-16 x/y axes have 63 cells (1.587 m).
# A voxel is a distinct row [batch, x, y, z]; voxels are numbered in the rows' sorted order.

SCALES = (2, 4, 8, 16)


@dataclass
class Voxels:
    """The voxels of one scale: coords (V, 4) int64 rows [batch, x, y, z] in lexicographic
    order, inv (N,) the voxel of every point, count (V,) the points in each voxel."""
    coords: torch.Tensor
    inv: torch.Tensor
    count: torch.Tensor

    def __len__(self):
        return len(self.coords)


def voxelize(xyz: torch.Tensor, batch_idx: torch.Tensor, scale: int, lo=RANGE_MIN, hi=RANGE_MAX,
             shape=GRID_SHAPE) -> Voxels:
    """Quantise points (N, 3) into the cells of the grid `shape` / scale over [lo, hi]. Indices
    are not clipped: augmented points may leave the range and get negative or too-large
    indices, as in the official code. (elite_fast.voxel_sets: all scales in one pass.)"""
    cells = torch.tensor([math.ceil(n / scale) for n in shape], device=xyz.device)  # (3,)
    lo_t, hi_t = xyz.new_tensor(lo), xyz.new_tensor(hi)
    cell_of_point = (cells * (xyz - lo_t) / (hi_t - lo_t)).long()  # (N, 3); .long() truncates toward zero, as upstream
    rows = torch.cat([batch_idx[:, None].long(), cell_of_point], 1)  # (N, 4)
    coords, inv, count = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    return Voxels(coords, inv, count)


def scatter_mean(src: torch.Tensor, index: torch.Tensor, size: int, count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the rows of src (N, C) that share an index -> (size, C), summed in float32
    at least (bf16 sums of many rows would lose digits under --amp). count (size,): the rows
    per index when known already."""
    src = src.to(torch.promote_types(src.dtype, torch.float32))
    out = torch.zeros(size, src.shape[1], dtype=src.dtype, device=src.device).index_add_(0, index, src)
    count = torch.bincount(index, minlength=size) if count is None else count
    return out / count.clamp_min(1).to(src.dtype)[:, None]


# =====================================================================================
# 2. Submanifold sparse convolution
# =====================================================================================
# out_i = sum over the 27 offsets o of W[o]^T x_j, where voxel j = voxel i + o is active in
# the same scan. Output voxels are the input voxels: the active set never grows (Graham et
# al. 2018). The reference form below finds the neighbours at each offset by a search in
# the sorted voxel numbers, then gathers, multiplies and scatters; autograd gives the backward.
# elite_fast.py builds the neighbours once per scale for every convolution on it (spconv's
# indice_key), with a hand-written backward, and runs the same sum in Triton on a GPU.

OFFSETS = [(dx, dy, dz) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)]  # weight[1+dx, 1+dy, 1+dz]


def submconv3d(feats: torch.Tensor, coords: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Submanifold 3x3x3 convolution, the reference form. feats (N, Cin), one row per voxel of
    coords (N, 4) [batch, x, y, z]; weight (3, 3, 3, Cin, Cout), weight[i, j, k] multiplies the
    neighbour at offset (i-1, j-1, k-1). Returns (N, Cout)."""
    out = feats.new_zeros(len(feats), weight.shape[-1])
    if len(coords) == 0:
        return out
    lo = coords.min(0).values - 1  # (4,) a border of one cell, where the offsets of edge voxels land
    size = coords.max(0).values + 2 - lo

    def number(c):  # a voxel's row -> one int64 that sorts as the rows do
        c = c - lo
        return ((c[:, 0] * size[1] + c[:, 1]) * size[2] + c[:, 2]) * size[3] + c[:, 3]

    numbers, order = torch.sort(number(coords))
    for dx, dy, dz in OFFSETS:
        wanted = number(coords + coords.new_tensor([0, dx, dy, dz]))  # (N,) the voxel at +o of each voxel
        pos = torch.searchsorted(numbers, wanted).clamp_max(len(numbers) - 1)
        found = numbers[pos] == wanted
        i, j = found.nonzero()[:, 0], order[pos[found]]  # voxel j sits at +o from voxel i
        out = out.index_add(0, i, (feats[j] @ weight[1 + dx, 1 + dy, 1 + dz]).to(out.dtype))
    return out


class SubMConv3d(nn.Module):
    """3x3x3 submanifold convolution without bias (the student never uses one)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3, 3, 3, cin, cout))
        bound = 1 / math.sqrt(27 * cin)  # nn.Conv3d's default init
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, feats: torch.Tensor, voxels: Voxels, neighbours=None) -> torch.Tensor:
        if neighbours is not None and elite_fast.enabled():  # elite_fast.py: the neighbour table built once per scale
            return elite_fast.submconv3d(feats, neighbours, self.weight)
        return submconv3d(feats, voxels.coords, self.weight)


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


# ---- 3.1 The voxels of every scale, and what each block reads of them ----

@dataclass
class Stage:
    """What SPVBlock k reads: the voxels of its scale L, those of the next scale s = 2L, and the
    context pool of each L voxel (the pools are the L voxels' coords // 2). `fast`: what
    elite_fast.py's forms read besides (the neighbour table, the scale link); None when the
    stage was built in the reference forms, which then run whatever the switch says."""
    voxels: Voxels            # scale L
    next_voxels: Voxels       # scale s = 2L
    pool_of: torch.Tensor     # (V_L,) the context pool of each L voxel
    pool_count: torch.Tensor  # (G,) the L voxels in each pool
    fast: elite_fast.FastStage | None = None


@dataclass
class VoxelScales:
    voxels: list[Voxels]  # scales 1, 2, 4, 8, 16
    stages: list[Stage]   # one per SPVBlock: scales 1 -> 2, 2 -> 4, 4 -> 8, 8 -> 16


def context_pools(vox: Voxels) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxels grouped by coords // 2: (V,) the pool of each voxel, (G,) the voxels in each pool."""
    halved = torch.cat([vox.coords[:, :1], torch.div(vox.coords[:, 1:], 2, rounding_mode="floor")], 1)
    _, pool_of, pool_count = torch.unique(halved, dim=0, return_inverse=True, return_counts=True)
    return pool_of, pool_count


def voxelize_scales(xyz: torch.Tensor, batch_idx: torch.Tensor, cfg: StudentConfig) -> VoxelScales:
    """The voxels of scales 1, 2, 4, 8, 16 and each block's Stage (elite_fast.voxelize_scales:
    the same, batched over the scales, with the neighbour tables)."""
    if elite_fast.enabled():
        return elite_fast.voxelize_scales(xyz, batch_idx, cfg)
    voxels = [voxelize(xyz, batch_idx, s, cfg.range_min, cfg.range_max, cfg.grid_shape) for s in (1,) + cfg.scales]
    return VoxelScales(voxels, [Stage(fine, coarse, *context_pools(fine)) for fine, coarse in zip(voxels, voxels[1:])])


def move_to_scale(feats: torch.Tensor, stage: Stage) -> torch.Tensor:
    """(V_L, C) -> (V_s, C): every point carries its L voxel's feature into its s voxel, where
    they are averaged (scales are quantised independently: one L voxel can feed several s voxels)."""
    if stage.fast is not None and elite_fast.enabled():  # elite_fast.py: the same mean over distinct voxel pairs
        return elite_fast.move_to_scale(feats, stage.fast.link)
    return scatter_mean(feats.index_select(0, stage.voxels.inv), stage.next_voxels.inv, len(stage.next_voxels))


# ---- 3.2 The network ----

class VoxelInputEncoder(nn.Module):
    """Per-point 10-d input -> an MLP per point -> mean per 0.1 m voxel (V1, 64)."""

    def __init__(self, hidden=64, lo=RANGE_MIN, cell=0.1):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.lo, self.cell = lo, cell

    def point_inputs(self, points: torch.Tensor, vox: Voxels) -> torch.Tensor:
        """points (N, 4) -> (N, 10): [x, y, z, remission, offset from the voxel's mean, offset from its corner]."""
        xyz = points[:, :3]  # (N, 3)
        voxel_mean = scatter_mean(xyz, vox.inv, len(vox), vox.count).index_select(0, vox.inv)  # (N, 3)
        # Upstream calls this the voxel centre; it is the voxel's lower corner.
        corner = vox.coords[:, 1:].to(xyz.dtype).index_select(0, vox.inv) * self.cell + xyz.new_tensor(self.lo)
        return torch.cat([points, xyz - voxel_mean, xyz - corner], 1)

    def forward(self, points: torch.Tensor, vox: Voxels) -> torch.Tensor:
        x = self.point_inputs(points, vox)  # (N, 10)
        if elite_fast.enabled():  # the same mean, with the MLP's last layer run per voxel
            return elite_fast.encode_voxels(self.mlp, x, vox)
        return scatter_mean(self.mlp(x), vox.inv, len(vox), vox.count)  # (V1, 64)


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

    def forward(self, x, stage: Stage):
        neighbours = stage.fast.neighbours if stage.fast is not None else None
        h = F.leaky_relu(self.bn1(self.conv1(x, stage.voxels, neighbours)), 0.1)
        h = self.bn2(self.conv2(h, stage.voxels, neighbours))
        return F.leaky_relu(h + self.bn_shortcut(self.shortcut(x)), 0.1)


class PointEncoder(nn.Module):
    """The point branch: voxel features of scale L plus context pooled over
    (L-voxel coords // 2), concatenated and run through an MLP."""

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
        """feats (V_L, 64) -> (V_L, 64): the point features, one row per L voxel. Upstream runs
        layer_out on every point; the points of a voxel carry the same row, so once per voxel
        gives the same values."""
        # Context is always pooled by factor 2 of the L voxels, not by the next scale.
        ctx = self.context(scatter_mean(feats, stage.pool_of, len(stage.pool_count), stage.pool_count))  # (G, 64)
        if stage.fast is not None and elite_fast.enabled():  # the same MLP on the concatenation, never built
            return elite_fast.point_encoder_out(self, feats, ctx, stage)
        return self.layer_out(torch.cat([self.layer_in(feats), ctx.index_select(0, stage.pool_of)], 1))  # (V_L, 64)


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
            v = block(v, stage)  # (V_L, 64)
        c = v.shape[1]
        p, v_down = move_to_scale(torch.cat([self.point_enc(x + v, stage), v], 1), stage).split(c, 1)
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
        scales = self.voxelize(points, batch_idx)
        x = self.input_encoder(points, scales.voxels[0])  # (V1, 64)
        point_feats, stage_feats = [], []
        for block, stage in zip(self.blocks, scales.stages):
            p, v_down, v = block(x, stage)
            x = p + v_down  # (V_s, 64), the next block's input
            point_feats.append(p)
            stage_feats.append(v)
        voxels = scales.voxels
        return StudentOutput(self.classify(point_feats, voxels), stage_feats, voxels[:-1], point_feats, voxels[1:])

    def voxelize(self, points: torch.Tensor, batch_idx: torch.Tensor) -> VoxelScales:
        """The voxels of scales 1, 2, 4, 8, 16 and what each block reads of them."""
        with torch.no_grad():
            scales = voxelize_scales(points[:, :3], batch_idx, self.cfg)
        if self.training and len(scales.voxels[-1]) < 2:
            raise TooFewVoxels(f"the batch's {len(points)} points fill {len(scales.voxels[-1])} voxel(s) at scale "
                               f"{self.cfg.scales[-1]}: BatchNorm needs two")
        return scales

    def classify(self, point_feats: list[torch.Tensor], voxels: list[Voxels]) -> torch.Tensor:
        """The four stages' point branches (V_s, 64) -> logits (N, 20) per point: a point's
        feature is cat(p_2[its scale-2 voxel], ..., p_16[its scale-16 voxel]) (N, 256)."""
        if elite_fast.enabled():  # the same, each distinct combination of the four voxels classified once
            return elite_fast.classify(self.classifier, point_feats, voxels)
        return self.classifier(torch.cat([p.index_select(0, v.inv) for p, v in zip(point_feats, voxels[1:])], 1))


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

# ---- 5.1 PEFT: LoRA and AdaLoRA's SVD form on SAM's own linear layers ----
# Every linear layer of every block gets a low-rank update: q, k and v (each its own adapter,
# as upstream, which splits SAM's fused qkv into three projections), proj, lin1 and lin2; 72 in
# ViT-B. SAM's encoder stays SAM's: frozen, fused qkv, its checkpoint keys. Each adapted layer
# computes W x + b + s B (E * A) x: SAM's own nn.Linear, and the update added by a forward hook.
# The factors of one kind of layer are stored stacked over the blocks (elite_fast.py forms all
# their updates at once and merges them into the weights). Every adapter tensor's name
# contains "lora_", which is how freezing, the optimiser and AdaLoRA find them.

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

    def low_rank_update(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """s B diag(E) A x for every part of block `block`'s layer: x (..., in) -> (..., out)."""
        a, b = self.lora_A[block], self.lora_B[block]  # (parts, r, in), (parts, out/parts, r)
        if self.svd:
            a = a * self.lora_E[block]  # diag(E) A: a pruned rank has E = 0
        return self.scaling * torch.cat([x @ a[p].T @ b[p].T for p in range(len(a))], -1)


class LowRankUpdate:
    """The adapter of block `block`'s layer as a forward hook on SAM's own nn.Linear:
    y = W x + b  ->  y + s B (E * A) x."""

    def __init__(self, adapters: Adapters, block: int):
        self.adapters, self.block = adapters, block

    def __call__(self, layer: nn.Linear, inputs: tuple, y: torch.Tensor) -> torch.Tensor | None:
        if elite_fast.enabled():  # elite_fast.encode_blocks runs the layer with W + delta W merged instead
            return None
        return y + self.adapters.low_rank_update(self.block, inputs[0])


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
        self.importance: dict[str, torch.Tensor] = {}  # "kind.lora_X" -> I_bar, the kind's stacked shape
        self.uncertainty: dict[str, torch.Tensor] = {}  # "kind.lora_X" -> U_bar, its smoothed deviation

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
        """For every adapter entry: the sensitivity s = |p * dL/dp| (the first-order loss change if p
        were zeroed), I_bar <- b1 I_bar + (1 - b1) s, U_bar <- b2 U_bar + (1 - b2) |s - I_bar|."""
        for name, m in self.kinds.items():
            for pname in ("lora_A", "lora_E", "lora_B"):
                p, key = getattr(m, pname), f"{name}.{pname}"
                if p.grad is None:  # a kind the loss did not reach this step keeps its scores
                    continue
                sens = (p * p.grad).abs()
                i_bar = self.importance.get(key, torch.zeros_like(p)) * self.beta1 + sens * (1 - self.beta1)
                u_bar = self.uncertainty.get(key, torch.zeros_like(p)) * self.beta2 + (sens - i_bar).abs() * (1 - self.beta2)
                self.importance[key], self.uncertainty[key] = i_bar, u_bar

    def _score(self, m: Adapters, key: str, pname: str) -> torch.Tensor:
        if key not in self.importance:
            return torch.zeros_like(getattr(m, pname))
        return self.importance[key] * self.uncertainty[key]

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

    def state_dict(self) -> dict:  # upstream's names, as checkpoints store them
        return {"ipt": dict(self.importance), "unc": dict(self.uncertainty)}

    def load_state_dict(self, state: dict) -> None:
        self.importance, self.uncertainty = dict(state["ipt"]), dict(state["unc"])


# ---- 5.3 SAM's image encoder ----

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
    initialised, without the neck. segment-anything is imported here, where the teacher is
    built: the student needs none of it."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT
    if variant not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose from {sorted(SAM_VARIANTS)}")
    v = SAM_VARIANTS[variant]
    encoder = ImageEncoderViT(
        img_size=SAM_IMG_SIZE, patch_size=SAM_PATCH, embed_dim=v.embed_dim, depth=v.depth,
        num_heads=v.num_heads, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True, window_size=SAM_WINDOW, global_attn_indexes=v.global_attn_indexes)
    del encoder.neck  # ELiTe reads the blocks themselves; SAM's 256-channel neck is never used
    elite_fast.fold_attention(encoder)  # its modules, keys and maths; in the reference forms it runs SAM's own forward
    return encoder


# ---- 5.4 The teacher: encoder, patch decoders, 2D heads ----

class LayerNorm2d(nn.LayerNorm):
    """segment-anything's LayerNorm2d: each pixel of (B, C, H, W) normalised over its C channels,
    then scaled and shifted per channel (its weight and bias, its keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if elite_fast.enabled():  # the same through torch's fused layer norm: two operations instead of seven
            return elite_fast.layer_norm_2d(self, x)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


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
    """SAM ViT + adapters -> four (B, C/8, 4h, 4w) feature maps, one per global-attention block
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
        for kind, adapters in self.adapters.items():  # PEFT: each adapted layer adds its low-rank update
            for i, block in enumerate(self.encoder.blocks):
                block.get_submodule(ADAPTED_LAYERS[kind][0]).register_forward_hook(LowRankUpdate(adapters, i))

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
        if elite_fast.enabled():  # the same blocks, each adapted layer one product with W + delta W
            return elite_fast.encode_blocks(self, x)
        tokens = []
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)  # SAM's block; windowed blocks pad to multiples of 14 and unpad themselves
            if i in self.stage_blocks:
                tokens.append(x)
        return tokens

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) normalised -> 4 patch-decoder maps (B, C/8, 4h, 4w), a quarter of
        the padded crop's resolution. A pixel's feature is the map upsampled 4x bilinearly
        (upsample_maps, pixel_features)."""
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


def pixel_features(maps: list[torch.Tensor], pixel_indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """The teacher's maps (B, C, 4h, 4w) at each sample's (Ki, 2) (row, col) crop pixels ->
    (sum Ki, C) per map, samples concatenated in batch order: the maps upsampled 4x, then read."""
    if elite_fast.enabled():  # the same bilinear values, computed at the read pixels only
        return elite_fast.sample_pixels(maps, pixel_indices)
    full = upsample_maps(maps, 4 * maps[0].shape[2], 4 * maps[0].shape[3])  # (B, C, 16h, 16w) each
    return [torch.cat([f[b, :, p[:, 0], p[:, 1]].T for b, p in enumerate(pixel_indices)] + [f.new_zeros(0, f.shape[1])])
            for f in full]


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
        inputs = pixel_features(feats, crops.pixels)  # 4 x (K, C/8)
        labels = crops.labels
    stage_logits, fused = teacher.classify(inputs)
    losses = seg_loss(torch.stack(stage_logits + [fused]), labels, weight, lovasz_weight=1.0)  # (5,) all heads at once
    *stage_losses, fused_loss = losses.unbind()
    terms = {f"seg2d_stage{k + 1}": lambda_seg2d / 4 * loss for k, loss in enumerate(stage_losses)}
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
    """seg3d_stage{k}: (CE_w + Lovasz) of the 3D head of stage k = 1..4 on the voxels of that
    stage's scale (1, 2, 4, 8; upstream logs it as scale 2^k). PPMSKD's 3D heads bring these terms with or without a teacher (a student with
    the heads and no KD is the ablation's second row)."""
    terms = {}
    for k, (logits, vox) in enumerate(zip(logits_3d, out.stage_voxels)):
        target = voxel_labels(batch.labels, vox.inv, len(vox))  # (V_L,)
        terms[f"seg3d_stage{k + 1}"] = seg_loss(logits, target, weight, lovasz_weight=1.0)
    return terms


def kd_losses(out: StudentOutput, logits_3d: list[torch.Tensor], point_logits_2d: list[torch.Tensor],
              batch: Batch, lambda_xm=0.05) -> dict[str, torch.Tensor]:
    """kd_stage{k}: (lambda_xm / 4) KL(P_2D || P_3D) over the points at the crop's pixels, averaged
    over all K x 20 elements (F.kl_div's 'mean', as upstream), the 2D side detached."""
    terms = {}
    for k, (logits, vox, logits_2d) in enumerate(zip(logits_3d, out.stage_voxels, point_logits_2d)):
        seen = logits.index_select(0, vox.inv.index_select(0, batch.crop_points))  # (K, 20)
        # Sum over all K x 20 elements divided by K x 20: upstream's reduction='mean', spelled out
        # (torch warns that 'mean' will change meaning); max(., 1) keeps a crop without points at 0.
        kl = F.kl_div(F.log_softmax(seen, 1), F.softmax(logits_2d.detach(), 1), reduction="sum")
        terms[f"kd_stage{k + 1}"] = lambda_xm / 4 * kl / max(seen.numel(), 1)
    return terms


def ppmskd_losses(out: StudentOutput, heads: nn.ModuleList, point_logits_2d: list[torch.Tensor],
                  batch: Batch, weight: torch.Tensor, lambda_xm=0.05) -> dict[str, torch.Tensor]:
    """The 3D and KD terms of PPMSKD by name, per stage k = 1..4: the 3D heads' seg3d_stage{k}
    (deep_supervision_losses) and kd_stage{k} (kd_losses). point_logits_2d: the teacher's stage
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
        stage_logits, _ = teacher.classify(pixel_features(teacher(crops.images), crops.pixels))
    return stage_logits


def elite_losses(out: StudentOutput, heads: nn.ModuleList, teacher: Teacher, batch: Batch,
                 weight: torch.Tensor, joint=True, lambda_xm=LAMBDA_XM) -> dict[str, torch.Tensor]:
    """ELiTe's whole training loss, term by name (their sum is the loss):
        seg3d_main                 CE_w + LAMBDA_LOVASZ (0.1) Lovasz of the student's point logits
        seg2d_stage*, seg2d_fused  the teacher's 2D terms               (joint mode)
        seg3d_stage*, kd_stage*    PPMSKD's 3D heads and KL(P_2D || P_3D)
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


# =====================================================================================
# 8. One ELiTe training step on one page: python elite.py
# =====================================================================================
# batch -> student -> teacher -> PPMSKD's losses -> backward -> AdaLoRA's budget -> the optimiser
# step, on one synthetic scan, in the reference forms above, without the run machinery of
# runs.py (train_student.py runs the same loss, elite_losses, over epochs and checkpoints).

def one_step_demo(seed=0) -> dict[str, float]:
    import scandata
    import semantickitti
    import synthkitti
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    # The batch: one LiDAR scan with labels, and the camera crop the teacher reads.
    points, raw, image, proj = synthkitti.make_frame(seed, columns=512)  # (N, 4), (N,), (376, 1241, 3), (3, 4)
    keep = np.flatnonzero(scandata.in_range(points[:, :3], RANGE_MIN, RANGE_MAX))
    points, labels = points[keep], semantickitti.to_train_ids(raw[keep] & 0xFFFF)
    crop, crop_points = semantickitti.camera_crop(image, points[:, :3], proj, (160, 512), rng, True, None)
    batch = scandata.collate([scandata.Scan(points, labels, keep, len(raw), Path("synthetic"), crop, crop_points)])
    show("points (x, y, z, remission)", batch.points)
    show("labels (training ids 0..19)", batch.labels)
    show("camera crop (SAM-normalised)", batch.crops.images)
    show("points seen in the crop, their pixels", batch.crops.pixels[0])

    # The networks: the 1.9M student, PPMSKD's 3D heads, and SAM's ViT (tiny, random) with AdaLoRA.
    student, heads = Student(), heads_3d()
    teacher = Teacher(TeacherConfig(variant="vit_tiny", peft="adalora", crop_hw=(160, 512)))
    params = list(student.parameters()) + list(heads.parameters()) + teacher.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    allocator = RankAllocator(teacher, total_steps=12)
    print(f"student {sum(p.numel() for p in student.parameters()):,} parameters; teacher trains "
          f"{sum(p.numel() for p in teacher.trainable_parameters()):,} of {sum(p.numel() for p in teacher.parameters()):,}")

    # The student: voxels at five scales, four SPV blocks, a logit per point.
    out = student(batch.points, batch.batch_idx)
    for k, (v, p) in enumerate(zip(out.stage_feats, out.point_feats)):
        show(f"stage {k + 1}: voxel features (scale {2 ** k}), point branch (scale {2 ** (k + 1)})", v, p)
    show("student logits per point", out.logits)

    # The teacher: SAM's blocks with the adapters' low-rank updates, a patch decoder per stage.
    maps = teacher(batch.crops.images)
    show("teacher maps, one per global-attention block (1/4 resolution)", *maps)
    weight = class_weights()
    terms = {"seg3d_main": seg_loss(out.logits, batch.labels, weight, LAMBDA_LOVASZ)}
    terms_2d, logits_2d = teacher_losses(teacher, maps, batch.crops, weight, LAMBDA_SEG2D)
    show("teacher stage logits at the seen points", *logits_2d)

    # PPMSKD: a 3D head per stage, its deep supervision and the KL toward the 2D head. (elite_losses
    # computes these same terms; they are spelled out here to show each.)
    terms |= terms_2d | ppmskd_losses(out, heads, logits_2d, batch, weight, LAMBDA_XM)
    terms["orth"] = orth_regularizer(teacher, ORTH_WEIGHT)
    loss = sum(terms.values())
    for name, value in terms.items():
        print(f"  {name:<14} {value.item():.4g}")
    print(f"  {'loss':<14} {loss.item():.4g}")

    loss.backward()
    budget = allocator.step(global_step=1)  # AdaLoRA: sensitivities, then the rank budget
    optimizer.step()
    print(f"AdaLoRA's rank budget after step 1: {budget} of {allocator.total_rank} (full for the first T/6 = "
          f"{allocator.init_warmup} steps, then cut as a cubic); one optimiser step taken")
    return {name: value.item() for name, value in terms.items()}


def show(what: str, *tensors: torch.Tensor) -> None:
    print(f"{what}: " + ", ".join(str(tuple(t.shape)) for t in tensors))


if __name__ == "__main__":
    with elite_fast.forms("reference"):  # the forms elite.py defines, nothing from elite_fast.py
        one_step_demo()
