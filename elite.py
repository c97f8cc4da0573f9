"""ELiTe in plain PyTorch: the LiDAR side of the method, read top to bottom.

ELiTe (ICME 2024) distils a Segment Anything image teacher into a 1.9M-parameter
voxel LiDAR student (the 2DPASS "4scale-64dimension" network). This file holds
everything the student needs, in the order the data flows:

    1. SemanticKITTI files: scans, labels, calibration, splits, the label map
    2. Geometry: LiDAR-to-camera projection
    3. Training augmentation
    4. The dataset and its batches
    5. Voxelisation and scatter reductions
    6. Submanifold sparse convolution (pure torch, with its neighbour map)
    7. The student: SparseBasicBlock, point encoder, SPVBlock, classifier
    8. Losses: class-weighted cross-entropy and Lovasz-softmax
    9. Evaluation: the official SemanticKITTI IoU
   10. Checkpoints (atomic writes) and the optimiser recipe

Facts follow the official ELiTe/2DPASS code; deliberate differences are listed
in README.md under "Differences from the official code".
"""
from __future__ import annotations

import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# =====================================================================================
# 1. SemanticKITTI files
# =====================================================================================
# Values copied from the official semantic-kitti.yaml (a test compares them to it).

CLASS_NAMES = [
    "unlabeled", "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person",
    "bicyclist", "motorcyclist", "road", "parking", "sidewalk", "other-ground",
    "building", "fence", "vegetation", "trunk", "terrain", "pole", "traffic-sign",
]
NUM_CLASSES = 20  # class 0 ("unlabeled") is ignored in losses and metrics
IGNORE = 0

LEARNING_MAP = {  # raw SemanticKITTI id -> training id 0..19
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8,
    40: 9, 44: 10, 48: 11, 49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16,
    72: 17, 80: 18, 81: 19, 99: 0, 252: 1, 253: 7, 254: 6, 255: 8, 256: 5, 257: 5,
    258: 4, 259: 5,
}
LEARNING_MAP_INV = {  # training id -> raw id written in submission files
    0: 0, 1: 10, 2: 11, 3: 15, 4: 18, 5: 20, 6: 30, 7: 31, 8: 32, 9: 40, 10: 44,
    11: 48, 12: 49, 13: 50, 14: 51, 15: 70, 16: 71, 17: 72, 18: 80, 19: 81,
}
SPLITS = {
    "train": ["00", "01", "02", "03", "04", "05", "06", "07", "09", "10"],
    "val": ["08"],
    "test": [f"{s:02d}" for s in range(11, 22)],
}
# Points per class in the SemanticKITTI training split (2DPASS `seg_labelweights`).
CLASS_COUNTS = [
    0, 55437630, 320797, 541736, 2578735, 3274484, 552662, 184064, 78858, 240942562,
    17294618, 170599734, 6369672, 230413074, 101130274, 476491114, 9833174, 129609852,
    4506626, 1168181,
]

# Lookup tables: raw id -> training id (unknown raw ids -> 0, as the official evaluator does).
_RAW_TO_TRAIN = np.zeros(max(LEARNING_MAP) + 1, dtype=np.int64)
for _raw, _train in LEARNING_MAP.items():
    _RAW_TO_TRAIN[_raw] = _train
TRAIN_TO_RAW = np.array([LEARNING_MAP_INV[i] for i in range(NUM_CLASSES)], dtype=np.uint32)


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file."""


def read_scan(path) -> np.ndarray:
    """A velodyne .bin: float32 rows (x, y, z, remission) -> (N, 4)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: scan file not found")
    size = path.stat().st_size
    if size % 16:
        raise DataError(f"{path}: {size} bytes is not a multiple of 16 (4 float32 per point); "
                        "the file is truncated or not a velodyne scan")
    return np.fromfile(path, dtype=np.float32).reshape(-1, 4)


def read_labels(path, num_points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A .label file: uint32 per point -> (semantic raw id, instance id), both (N,)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label file not found")
    size = path.stat().st_size
    if size % 4:
        raise DataError(f"{path}: {size} bytes is not a multiple of 4 (one uint32 per point)")
    raw = np.fromfile(path, dtype=np.uint32)
    if num_points is not None and len(raw) != num_points:
        raise DataError(f"{path}: {len(raw)} labels but its scan has {num_points} points")
    return (raw & 0xFFFF).astype(np.int64), (raw >> 16).astype(np.int64)


def to_train_ids(raw_semantic: np.ndarray, path="labels") -> np.ndarray:
    """Raw SemanticKITTI ids -> training ids 0..19; unknown ids become 0 with a warning."""
    known = raw_semantic < len(_RAW_TO_TRAIN)
    known[known] = np.isin(raw_semantic[known], list(LEARNING_MAP))
    if not known.all():
        bad = np.unique(raw_semantic[~known])[:10].tolist()
        warnings.warn(f"{path}: {int((~known).sum())} points carry raw label ids not in "
                      f"semantic-kitti.yaml {bad}; they are treated as unlabeled (0)")
    out = np.zeros(len(raw_semantic), dtype=np.int64)
    out[known] = _RAW_TO_TRAIN[raw_semantic[known]]
    return out


def read_calib(path) -> dict[str, np.ndarray]:
    """calib.txt -> {"P2": (3, 4), "Tr": (4, 4), "proj": (3, 4) = P2 @ Tr}.

    Tr maps velodyne to rectified camera 0 (the odometry files need no R0_rect)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: calibration file not found (every sequence folder needs calib.txt)")
    mats = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            break  # the official reader stops at the first blank line
        key, _, values = line.partition(":")
        try:
            mats[key.strip()] = np.array([float(v) for v in values.split()], dtype=np.float64)
        except ValueError as e:
            raise DataError(f"{path}: line '{key}' has a non-numeric value ({e})") from None
    for key in ("P2", "Tr"):
        if key not in mats:
            raise DataError(f"{path}: no '{key}:' line")
        if mats[key].size != 12:
            raise DataError(f"{path}: '{key}' has {mats[key].size} values, expected 12 (a 3x4 matrix)")
    p2 = mats["P2"].reshape(3, 4)
    tr = np.eye(4)
    tr[:3] = mats["Tr"].reshape(3, 4)
    return {"P2": p2, "Tr": tr, "proj": p2 @ tr}


def read_image(path) -> np.ndarray:
    """image_2/*.png -> (H, W, 3) uint8 RGB."""
    from PIL import Image  # Pillow comes with torchvision
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None


def list_scans(root, sequences) -> list[Path]:
    """All velodyne/*.bin of the given sequences under ROOT/sequences, sorted."""
    root = Path(root)
    if not (root / "sequences").is_dir():
        raise DataError(f"{root}: no 'sequences' folder (expected ROOT/sequences/XX/velodyne/*.bin)")
    scans = []
    for seq in sequences:
        scans += sorted((root / "sequences" / seq / "velodyne").glob("*.bin"))
    if not scans:
        raise DataError(f"{root}/sequences: no scans in sequences {list(sequences)}")
    return scans


def label_path(scan_path: Path) -> Path:
    return scan_path.parent.parent / "labels" / (scan_path.stem + ".label")


# =====================================================================================
# 2. Geometry: LiDAR points onto the camera image
# =====================================================================================

def project_points(xyz: np.ndarray, proj: np.ndarray, height: int, width: int):
    """Pixels of LiDAR points as the official code finds them.

    xyz (N, 3) un-augmented velodyne coordinates, proj (3, 4) = P2 @ Tr.
    Returns keep (N,) bool (x > 0 and strictly inside the image) and
    rows_cols (K, 2) float (row, col) of the kept points."""
    keep = xyz[:, 0] > 0  # in front of the car (the camera looks along +x)
    hom = np.concatenate([xyz[keep], np.ones((int(keep.sum()), 1))], axis=1)  # (K, 4)
    uvw = hom @ proj.T  # (K, 3)
    u, v = uvw[:, 0] / uvw[:, 2], uvw[:, 1] / uvw[:, 2]
    inside = (u > 0) & (u < width) & (v > 0) & (v < height)
    keep[keep] = inside
    return keep, np.stack([v[inside], u[inside]], axis=1)


# =====================================================================================
# 3. Training augmentation (applied after projection, so pixel indices stay valid)
# =====================================================================================
RANGE_MIN = (-50.0, -50.0, -4.0)
RANGE_MAX = (50.0, 50.0, 2.0)


def in_range(xyz: np.ndarray) -> np.ndarray:
    """Strict range test of the official dataset: -50<x<50, -50<y<50, -4<z<2."""
    lo, hi = np.array(RANGE_MIN), np.array(RANGE_MAX)
    return ((xyz > lo) & (xyz < hi)).all(axis=1)


def dropout_points(n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices after point dropout: each point is replaced by point 0 with probability
    U(0, 0.2), as the official code does (the point count does not change)."""
    ratio = rng.uniform(0, 0.2)
    idx = np.arange(n)
    idx[rng.random(n) <= ratio] = 0
    return idx


def augment_xyz(xyz: np.ndarray, rng: np.random.Generator, flip_scale=True) -> np.ndarray:
    """Rotation (360 degrees), 4-way flip, x/y scale 0.95-1.05, translation N(0, 0.1).

    Test-time votes use rotation and translation only (flip_scale=False)."""
    xyz = xyz.copy()
    theta = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(theta), np.sin(theta)
    xyz[:, :2] = xyz[:, :2] @ np.array([[c, s], [-s, c]])  # x' = cx - sy, y' = sx + cy
    if flip_scale:
        flip = rng.integers(4)
        if flip in (1, 3):
            xyz[:, 0] = -xyz[:, 0]
        if flip in (2, 3):
            xyz[:, 1] = -xyz[:, 1]
        xyz[:, :2] *= rng.uniform(0.95, 1.05)
    xyz += rng.normal(0, 0.1, size=(1, 3))
    return xyz.astype(np.float32)


# =====================================================================================
# 4. The dataset and its batches
# =====================================================================================

@dataclass
class Scan:
    """One scan, cropped to the voxel range. n = points kept, num_raw = points in the file."""
    points: np.ndarray      # (n, 4) float32: x, y, z (augmented in training), remission
    labels: np.ndarray      # (n,) int64 training ids (zeros when the scan has no labels)
    index: np.ndarray       # (n,) int64 row of each point in the raw .bin
    num_raw: int
    path: Path


@dataclass
class Batch:
    points: torch.Tensor     # (N, 4) float
    batch_idx: torch.Tensor  # (N,) int64: which scan each point belongs to
    labels: torch.Tensor     # (N,) int64
    index: torch.Tensor      # (N,) int64 row in its raw scan
    num_raw: list[int]
    paths: list[Path]

    def to(self, device) -> "Batch":
        return Batch(self.points.to(device), self.batch_idx.to(device), self.labels.to(device),
                     self.index.to(device), self.num_raw, self.paths)


def load_scan(path: Path, with_labels=True) -> tuple[np.ndarray, np.ndarray]:
    """Raw points (N, 4) and training labels (N,) of one scan; non-finite points are
    kept in the arrays (so indices match the file) but flagged by in_range()."""
    points = read_scan(path)
    if with_labels:
        raw, _ = read_labels(label_path(path), len(points))
        labels = to_train_ids(raw, label_path(path))
    else:
        labels = np.zeros(len(points), dtype=np.int64)
    return points, labels


class SemanticKITTI(torch.utils.data.Dataset):
    """Scans of some sequences; `train` turns on dropout and 3D augmentation."""

    def __init__(self, root, sequences, train=False, seed=0):
        self.scans = list_scans(root, sequences)
        self.train = train
        self.seed = seed
        self.epoch = 0  # set by the trainer so augmentation differs per epoch yet is reproducible
        self.has_labels = [label_path(p).is_file() for p in self.scans]

    def __len__(self):
        return len(self.scans)

    def __getitem__(self, i) -> Scan:
        path = self.scans[i]
        points, labels = load_scan(path, with_labels=self.has_labels[i])
        finite = np.isfinite(points).all(axis=1)
        if not finite.all():
            warnings.warn(f"{path}: dropped {int((~finite).sum())} points with NaN or Inf values")
        keep = np.flatnonzero(finite & in_range(np.nan_to_num(points[:, :3])))
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            if len(keep):
                keep = keep[dropout_points(len(keep), rng)]
            pts = points[keep].copy()
            pts[:, :3] = augment_xyz(pts[:, :3], rng)
        else:
            pts = points[keep]
        return Scan(pts, labels[keep], keep, len(points), path)


def collate(scans: list[Scan]) -> Batch:
    return Batch(
        points=torch.from_numpy(np.concatenate([s.points for s in scans])).float(),
        batch_idx=torch.cat([torch.full((len(s.points),), b, dtype=torch.long) for b, s in enumerate(scans)]),
        labels=torch.from_numpy(np.concatenate([s.labels for s in scans])),
        index=torch.from_numpy(np.concatenate([s.index for s in scans])),
        num_raw=[s.num_raw for s in scans],
        paths=[s.path for s in scans],
    )


# =====================================================================================
# 5. Voxelisation and scatter reductions
# =====================================================================================
# Every scale s re-quantises the raw points into ceil(shape / s) cells per axis, so the
# scale-8 z axis has 8 cells (0.75 m) and the scale-16 x/y axes have 63 cells (1.587 m).

GRID_SHAPE = (1000, 1000, 60)  # 0.1 m voxels over the range
SCALES = (2, 4, 8, 16)


def scatter_mean(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of the rows of src (N, C) that share an index -> (size, C)."""
    out = torch.zeros(size, src.shape[1], dtype=src.dtype, device=src.device)
    out.index_add_(0, index, src)
    count = torch.bincount(index, minlength=size).clamp_min(1).to(src.dtype)
    return out / count[:, None]


def unique_rows(coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.unique(coords, dim=0, return_inverse=True) for integer rows, 50x faster.

    Rows are packed into one int64 key that preserves their lexicographic order, so the
    result is sorted exactly as torch.unique(dim=0) sorts it. coords (N, D) -> (V, D), (N,)."""
    if len(coords) == 0:
        return coords, torch.zeros(0, dtype=torch.long, device=coords.device)
    lo = coords.min(0).values
    c = coords - lo
    extent = c.max(0).values + 1
    if math.prod(extent.tolist()) >= 2 ** 62:
        raise ValueError(f"coordinates span {extent.tolist()} cells: too wide to pack into int64")
    key = c[:, 0]
    for d in range(1, coords.shape[1]):
        key = key * extent[d] + c[:, d]
    ukey, inverse = torch.unique(key, return_inverse=True)
    rows = []
    for d in reversed(range(coords.shape[1])):
        rows.append(ukey % extent[d])
        ukey = ukey // extent[d]
    return torch.stack(rows[::-1], 1) + lo, inverse


@dataclass
class Voxels:
    """The voxels of one scale: coords (V, 4) int64 rows [batch, x, y, z] in lexicographic
    order, and inv (N,) the voxel of every point."""
    coords: torch.Tensor
    inv: torch.Tensor

    def __len__(self):
        return len(self.coords)


def voxelize(xyz: torch.Tensor, batch_idx: torch.Tensor, scale: int) -> Voxels:
    """Quantise points (N, 3) at one scale. Indices are not clipped: augmented points may
    leave the range and get negative or too-large indices, as in the official code."""
    lo = torch.tensor(RANGE_MIN, device=xyz.device)
    hi = torch.tensor(RANGE_MAX, device=xyz.device)
    cells = torch.tensor([math.ceil(n / scale) for n in GRID_SHAPE], device=xyz.device)
    idx = (cells * (xyz - lo) / (hi - lo)).long()  # .long() truncates toward zero, as upstream
    coords, inv = unique_rows(torch.cat([batch_idx[:, None], idx], 1))
    return Voxels(coords, inv)


# =====================================================================================
# 6. Submanifold sparse convolution
# =====================================================================================
# out_i = sum over the 27 offsets o of W[o]^T x_j, where voxel j = voxel i + o is active in
# the same scan. Output voxels are the input voxels. The work is a neighbour map (which
# pairs (i, j) exist for each offset) and, per offset, gather -> matmul -> scatter-add.
#
# The neighbour map exploits two facts. (1) Pairs come in mirrored couples: if j is i's
# neighbour at +o, i is j's neighbour at -o, so 13 offsets are searched and 13 mirrored.
# (2) In sorted key order the z-neighbours of a voxel are adjacent, so one binary search
# per (dx, dy) column finds all three dz in {-1, 0, 1} at once.

@dataclass
class NeighbourMap:
    """pairs[k] = (i, j): voxel j is voxel i's neighbour at +offsets[k] (so i is j's at -o).
    Built once per voxel set and shared by every convolution on it (spconv's indice_key)."""
    num_voxels: int
    offsets: list[tuple[int, int, int]]
    pairs: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_pairs(self) -> int:  # including the 27th offset, the voxel itself
        return self.num_voxels + 2 * sum(len(i) for i, _ in self.pairs)


def build_neighbour_map(coords: torch.Tensor) -> NeighbourMap:
    """coords (N, 4) int64 [batch, x, y, z], unique rows, any integers (negative too)."""
    n = len(coords)
    c = coords - coords.min(0).values + 1  # +1: a -1 neighbour is still >= 0
    ext = c.max(0).values + 2
    if math.prod(ext.tolist()) >= 2 ** 62:
        raise ValueError(f"voxel coordinates span {ext.tolist()}: too wide to pack into int64")
    ez, eyz = int(ext[3]), int(ext[2] * ext[3])
    key = ((c[:, 0] * ext[1] + c[:, 1]) * ext[2] + c[:, 2]) * ext[3] + c[:, 3]  # (N,)
    if n > 1 and bool((key[1:] > key[:-1]).all()):
        order, skey = None, key  # voxels from voxelize() are already sorted
    else:
        skey, order = torch.sort(key)
    offsets, pairs = [], []
    # Column (0, 0): the only forward neighbour is z + 1, the next key if it is key + 1.
    i = torch.nonzero(skey[1:] == skey[:-1] + 1).squeeze(1)
    offsets.append((0, 0, 1))
    pairs.append((i, i + 1))
    last = max(n - 1, 0)
    for dx, dy in ((0, 1), (1, -1), (1, 0), (1, 1)):
        lowest = skey + (dx * eyz + dy * ez - 1)  # key of (x+dx, y+dy, z-1)
        pos = torch.searchsorted(skey, lowest)  # (N,) first key >= lowest
        found_i, found_j, found_dz = [], [], []
        for step in range(3):  # keys are unique, so z-1, z, z+1 sit at most 2 places after pos
            j = pos + step
            dz = skey.index_select(0, j.clamp_max(last)) - lowest - 1  # -1, 0, 1 if in this column
            hit = torch.nonzero((dz <= 1) & (j <= last)).squeeze(1)
            found_i.append(hit)
            found_j.append(j.index_select(0, hit))
            found_dz.append(dz.index_select(0, hit))
        found_i, found_j, found_dz = torch.cat(found_i), torch.cat(found_j), torch.cat(found_dz)
        for dz in (-1, 0, 1):
            sel = torch.nonzero(found_dz == dz).squeeze(1)
            offsets.append((dx, dy, dz))
            pairs.append((found_i.index_select(0, sel), found_j.index_select(0, sel)))
    if order is not None:
        pairs = [(order.index_select(0, i), order.index_select(0, j)) for i, j in pairs]
    return NeighbourMap(n, offsets, pairs)


def _gather_mm_scatter(feats: torch.Tensor, weight: torch.Tensor, nmap: NeighbourMap) -> torch.Tensor:
    """The convolution itself: feats (N, Cin), weight (3, 3, 3, Cin, Cout) -> (N, Cout)."""
    out = feats @ weight[1, 1, 1]  # the centre offset pairs every voxel with itself
    most = max([len(i) for i, _ in nmap.pairs], default=0)
    gathered = feats.new_empty(most, feats.shape[1])  # reused buffers: no allocation per offset
    product = feats.new_empty(most, weight.shape[-1])
    for (i, j), (dx, dy, dz) in zip(nmap.pairs, nmap.offsets):
        n = len(i)
        for dst, src, w in ((i, j, weight[1 + dx, 1 + dy, 1 + dz]), (j, i, weight[1 - dx, 1 - dy, 1 - dz])):
            torch.index_select(feats, 0, src, out=gathered[:n])
            torch.mm(gathered[:n], w, out=product[:n])
            out.index_add_(0, dst, product[:n])
    return out


class _SubMConv3dFunction(torch.autograd.Function):
    """Saves only the inputs: gathered rows are recomputed in backward, not stored."""

    @staticmethod
    def forward(ctx, feats, weight, nmap):
        ctx.save_for_backward(feats, weight)
        ctx.nmap = nmap
        return _gather_mm_scatter(feats, weight, nmap)

    @staticmethod
    def backward(ctx, grad_out):
        # Forward did out[i] += f[j] W[+o] and out[j] += f[i] W[-o] for each pair (i, j), so
        # grad_f[j] += g[i] W[+o]^T, grad_f[i] += g[j] W[-o]^T, grad_W[+o] = f[j]^T g[i], grad_W[-o] = f[i]^T g[j].
        feats, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_feats = grad_out @ weight[1, 1, 1].T
        grad_weight = torch.empty_like(weight)
        grad_weight[1, 1, 1] = feats.T @ grad_out
        for (i, j), (dx, dy, dz) in zip(ctx.nmap.pairs, ctx.nmap.offsets):
            plus, minus = (1 + dx, 1 + dy, 1 + dz), (1 - dx, 1 - dy, 1 - dz)
            g_i, g_j = grad_out.index_select(0, i), grad_out.index_select(0, j)
            grad_feats.index_add_(0, j, g_i @ weight[plus].T)
            grad_feats.index_add_(0, i, g_j @ weight[minus].T)
            if ctx.needs_input_grad[1]:
                grad_weight[plus] = feats.index_select(0, j).T @ g_i
                grad_weight[minus] = feats.index_select(0, i).T @ g_j
        return grad_feats, grad_weight if ctx.needs_input_grad[1] else None, None


def submconv3d(feats: torch.Tensor, coords: torch.Tensor, weight: torch.Tensor,
               nmap: NeighbourMap | None = None) -> torch.Tensor:
    """Submanifold 3x3x3 convolution.

    feats (N, Cin) float; coords (N, 4) int64 unique rows [batch, x, y, z];
    weight (3, 3, 3, Cin, Cout), weight[i, j, k] multiplies the neighbour at offset
    (i-1, j-1, k-1). Returns (N, Cout). Pass nmap to reuse a neighbour map."""
    if nmap is None:
        nmap = build_neighbour_map(coords)
    if nmap.num_voxels != len(feats):
        raise ValueError(f"neighbour map has {nmap.num_voxels} voxels but feats has {len(feats)} rows")
    return _SubMConv3dFunction.apply(feats, weight, nmap)


class SubMConv3d(nn.Module):
    """3x3x3 submanifold convolution without bias (the student never uses one)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3, 3, 3, cin, cout))
        bound = 1 / math.sqrt(27 * cin)  # nn.Conv3d's default init
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, feats, coords, nmap=None):
        return submconv3d(feats, coords, self.weight, nmap)


# =====================================================================================
# 7. The student (2DPASS baseline, 4 scales x 64 channels, 1,933,460 parameters)
# =====================================================================================

@dataclass
class StudentConfig:
    in_dims: int = 4
    hidden: int = 64
    num_classes: int = NUM_CLASSES
    scales: tuple[int, ...] = SCALES


class VoxelInputEncoder(nn.Module):
    """Per-point 10-d input -> mean per 0.1 m voxel (V1, 64)."""

    def __init__(self, hidden=64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, hidden))

    def forward(self, points, vox: Voxels):
        xyz = points[:, :3]  # (N, 3)
        voxel_mean = scatter_mean(xyz, vox.inv, len(vox))[vox.inv]  # (N, 3)
        # Upstream calls this the voxel centre; it is the voxel's lower corner.
        lo = torch.tensor(RANGE_MIN, device=xyz.device)
        corner = vox.coords[vox.inv, 1:].to(xyz.dtype) * 0.1 + lo
        x = torch.cat([points, xyz - voxel_mean, xyz - corner], 1)  # (N, 10)
        # mean(Linear(h)) == Linear(mean(h)): the second layer runs per voxel, not per point.
        h = scatter_mean(self.mlp[1](self.mlp[0](x)), vox.inv, len(vox))  # (V1, 64)
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

    def forward(self, x, coords, nmap):
        h = F.leaky_relu(self.bn1(self.conv1(x, coords, nmap)), 0.1)
        h = self.bn2(self.conv2(h, coords, nmap))
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

    def forward(self, feats, vox_l: Voxels):
        """feats (V_L, 64) -> (V_L, 64): the point features, one row per L voxel.

        Upstream runs layer_out on every point; all points of a voxel carry the same row,
        so running it once per voxel gives the same values for a fraction of the work."""
        # Context is always pooled by factor 2 of the L voxels, not by the next scale.
        coarse = torch.cat([vox_l.coords[:, :1], torch.div(vox_l.coords[:, 1:], 2, rounding_mode="floor")], 1)
        _, group = unique_rows(coarse)
        num_groups = int(group.max()) + 1 if len(group) else 0
        ctx = self.context(scatter_mean(feats, group, num_groups)).index_select(0, group)  # (V_L, 64)
        return self.layer_out(torch.cat([self.layer_in(feats), ctx], 1))  # (V_L, 128) -> (V_L, 64)


@dataclass
class ScaleLink:
    """How the points tie scale-L voxels to scale-s voxels: the distinct (src, dst) pairs
    and weight = (points in both) / (points in dst). Scales are quantised independently,
    so one L voxel can feed several s voxels."""
    src: torch.Tensor
    dst: torch.Tensor
    weight: torch.Tensor
    size: int


def link_scales(vox_l: Voxels, vox_s: Voxels) -> ScaleLink:
    n_s = len(vox_s)
    pair, count = torch.unique(vox_l.inv * n_s + vox_s.inv, return_counts=True)
    src, dst = pair // n_s, pair % n_s
    points_in_dst = torch.bincount(vox_s.inv, minlength=n_s)
    return ScaleLink(src, dst, count / points_in_dst[dst], n_s)


def move_to_scale(feats: torch.Tensor, link: ScaleLink) -> torch.Tensor:
    """scatter_mean(feats[inv_L], inv_s) computed over voxel pairs instead of points:
    (V_L, C) -> (V_s, C)."""
    out = torch.zeros(link.size, feats.shape[1], dtype=feats.dtype, device=feats.device)
    return out.index_add_(0, link.dst, feats.index_select(0, link.src) * link.weight[:, None].to(feats.dtype))


class SPVBlock(nn.Module):
    def __init__(self, c=64):
        super().__init__()
        self.v_enc = nn.ModuleList([SparseBasicBlock(c, c), SparseBasicBlock(c, c)])
        self.point_enc = PointEncoder(c)

    def forward(self, x, vox_l: Voxels, vox_s: Voxels):
        """x (V_L, 64) at scale L -> (x_s (V_s, 64), p (V_s, 64), v (V_L, 64)).

        p, the point branch averaged into the s voxels, is what the classifier reads;
        x_s = p + v_down feeds the next block; v is what PPMSKD's 3D heads read."""
        nmap = build_neighbour_map(vox_l.coords)  # shared by the block's four convolutions
        v = x
        for block in self.v_enc:
            v = block(v, vox_l.coords, nmap)  # (V_L, 64)
        link = link_scales(vox_l, vox_s)
        c = v.shape[1]
        p, v_down = move_to_scale(torch.cat([self.point_enc(x + v, vox_l), v], 1), link).split(c, 1)
        return p + v_down, p, v


@dataclass
class StudentOutput:
    logits: torch.Tensor                                  # (N, 20) per point
    stage_feats: list[torch.Tensor] = field(default_factory=list)  # v_enc output at scales 1, 2, 4, 8
    stage_voxels: list[Voxels] = field(default_factory=list)


class Student(nn.Module):
    """The ELiTe/2DPASS LiDAR student: 1,933,460 parameters with the defaults."""

    def __init__(self, cfg: StudentConfig | None = None):
        super().__init__()
        self.cfg = cfg or StudentConfig()
        c, k = self.cfg.hidden, self.cfg.num_classes
        self.input_encoder = VoxelInputEncoder(c)
        self.blocks = nn.ModuleList([SPVBlock(c) for _ in self.cfg.scales])
        self.classifier = nn.Sequential(nn.Linear(c * len(self.cfg.scales), 128), nn.ReLU(), nn.Linear(128, k))

    def forward(self, points: torch.Tensor, batch_idx: torch.Tensor) -> StudentOutput:
        """points (N, 4) [x, y, z, remission], batch_idx (N,) -> logits (N, 20)."""
        with torch.no_grad():
            voxels = [voxelize(points[:, :3], batch_idx, s) for s in (1,) + tuple(self.cfg.scales)]
        x = self.input_encoder(points, voxels[0])  # (V1, 64)
        point_feats, stage_feats = [], []
        for block, vox_l, vox_s in zip(self.blocks, voxels[:-1], voxels[1:]):
            x, p, v = block(x, vox_l, vox_s)
            point_feats.append(p)
            stage_feats.append(v)
        # A point's feature is cat(p_2[its scale-2 voxel], ..., p_16[its scale-16 voxel]).
        # Points that share all four voxels share it, so classify each combination once.
        combos, combo_of_point = unique_rows(torch.stack([v.inv for v in voxels[1:]], 1))  # (U, 4), (N,)
        feats = torch.cat([p.index_select(0, combos[:, k]) for k, p in enumerate(point_feats)], 1)  # (U, 256)
        logits = self.classifier(feats).index_select(0, combo_of_point)  # (N, 20)
        return StudentOutput(logits, stage_feats, voxels[:-1])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# =====================================================================================
# 8. Losses
# =====================================================================================

def class_weights() -> torch.Tensor:
    """w_c = (max_frac / frac_c)^(1/3) from the training-split counts; w_0 = 0 (ignored)."""
    counts = torch.tensor(CLASS_COUNTS, dtype=torch.float64)
    frac = counts / counts.sum()
    w = torch.zeros(NUM_CLASSES, dtype=torch.float64)
    w[1:] = (frac.max() / frac[1:]) ** (1 / 3)
    return w.float()


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor, ignore=IGNORE) -> torch.Tensor:
    """Lovasz-softmax (Berman et al. 2018): probs (P, C), labels (P,); mean over the
    classes present, all points pooled, ignored points dropped."""
    valid = labels != ignore
    probs, labels = probs[valid], labels[valid]
    if len(labels) == 0:
        return probs.sum() * 0
    losses = []
    for c in torch.unique(labels).tolist():
        fg = (labels == c).to(probs.dtype)  # (P,)
        errors = (fg - probs[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, descending=True)
        fg_sorted = fg[perm]
        # Gradient of the Lovasz extension of the Jaccard loss at the sorted errors.
        gts = fg_sorted.sum()
        intersection = gts - fg_sorted.cumsum(0)
        union = gts + (1 - fg_sorted).cumsum(0)
        jaccard = 1 - intersection / union
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
        losses.append(torch.dot(errors_sorted, jaccard))
    return torch.stack(losses).mean()


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, lovasz_weight: float) -> torch.Tensor:
    """Class-weighted cross-entropy (label 0 ignored) + lovasz_weight * Lovasz-softmax."""
    if not bool((labels != IGNORE).any()):
        return logits.sum() * 0  # nothing labelled: no signal, but keep the graph
    ce = F.cross_entropy(logits.float(), labels, weight=weight, ignore_index=IGNORE)
    return ce + lovasz_weight * lovasz_softmax(F.softmax(logits.float(), 1), labels)


# =====================================================================================
# 9. Evaluation: the official SemanticKITTI IoU
# =====================================================================================
# One confusion matrix over the whole split. A point whose ground truth is 0 never counts;
# a labelled point predicted 0 (or left unpredicted) counts as a miss for its class. IoU of
# each class 1..19 = tp / (tp + fp + fn); mIoU averages all 19, absent classes as 0.

class ConfusionMatrix:
    def __init__(self, num_classes=NUM_CLASSES):
        self.n = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # rows: prediction

    def add(self, pred: torch.Tensor, gt: torch.Tensor):
        idx = pred.flatten().long().cpu() * self.n + gt.flatten().long().cpu()
        self.matrix += torch.bincount(idx, minlength=self.n * self.n).view(self.n, self.n)

    def iou(self) -> torch.Tensor:
        """(19,) IoU of classes 1..19 with the official evaluator's rules."""
        m = self.matrix.clone().double()
        m[:, IGNORE] = 0  # ground truth 0 is ignored whatever was predicted
        tp = m.diagonal()
        fp = m.sum(1) - tp
        fn = m.sum(0) - tp
        return (tp / (tp + fp + fn + 1e-15))[1:]

    def miou(self) -> float:
        return float(self.iou().mean())

    def present(self) -> torch.Tensor:
        """(19,) bool: classes with ground-truth points."""
        return self.matrix.sum(0)[1:] > 0

    def table(self) -> str:
        iou, present = self.iou(), self.present()
        lines = [f"{'class':<14} {'IoU':>6}"]
        for c in range(1, self.n):
            mark = "" if present[c - 1] else "   (no ground-truth points)"
            lines.append(f"{CLASS_NAMES[c]:<14} {100 * iou[c - 1]:6.1f}{mark}")
        lines.append(f"{'mIoU':<14} {100 * self.miou():6.1f}   (official: mean over all 19 classes)")
        if not bool(present.all()):
            k = int(present.sum())
            lines.append(f"{'mIoU present':<14} {100 * float(iou[present].mean()):6.1f}   "
                         f"(mean over the {k} classes with ground truth)")
        return "\n".join(lines)


# =====================================================================================
# 10. Checkpoints and the optimiser recipe
# =====================================================================================

def atomic_write(path, write) -> None:
    """Call write(file) on a temporary file in the same folder, then rename it to path:
    a crash mid-write never leaves a truncated checkpoint or label file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path):
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


STUDENT_KIND = "elite-student"


def load_checkpoint(path, kind: str, map_location="cpu") -> dict:
    """Load a checkpoint written by our trainers and check what it holds."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise DataError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e}); "
                        "the file is truncated or not a torch checkpoint") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise DataError(f"{path}: not a checkpoint written by this project (no 'kind' entry)")
    if ckpt["kind"] != kind:
        raise DataError(f"{path}: holds a '{ckpt['kind']}' model, expected '{kind}'")
    return ckpt


def load_student(path, map_location="cpu") -> tuple[Student, dict]:
    ckpt = load_checkpoint(path, STUDENT_KIND, map_location)
    cfg = StudentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["student_config"].items()})
    model = Student(cfg)
    model.load_state_dict(ckpt["model"])
    return model, ckpt


def student_state(model: Student) -> dict:
    return {"kind": STUDENT_KIND, "student_config": asdict(model.cfg), "model": model.state_dict()}


def make_optimizer(params, lr=0.24, momentum=0.9, weight_decay=1e-4) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, as both official configs."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)


def cosine_factor(step: int, total_steps: int) -> float:
    """Per-iteration cosine decay from 1 to 0 (no warm-up on one GPU, as upstream)."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def clip_or_skip(params, max_norm=1.0) -> bool:
    """Clip the global gradient norm to max_norm; False (skip the step) if it is not finite."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not torch.isfinite(norm):
        for p in params:
            p.grad = None
        return False
    return True
