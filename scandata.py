"""What both datasets' readers share, read top to bottom: the scan and batch types the models
read, the checks of a points file, augmentation, one atomic writer, and a confusion matrix.

    1. Files: the error every reader raises, whole records, plausible values, 8-bit camera
       frames, atomic writes
    2. Range and augmentation: the voxel range, point dropout, rotation, flip, scale, translation
    3. Scans and batches: the random streams of a sample, one scan's points (and camera crop),
       a batch of them
    4. Evaluation: one confusion matrix over a split (each dataset's module holds its rules)

semantickitti.py and nusc.py import from here and never from each other; the methods (elite.py,
u2mkd.py) import all three.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np
import torch

# =====================================================================================
# 1. Files
# =====================================================================================

class DataError(ValueError):
    """A data file is missing or malformed; the message names the file."""


def whole_records(path, record: int, what: str, layout: str) -> int:
    """How many `record`-byte records a file holds, from its size alone: a missing file or a
    size that is not a whole number of records (a truncated file) is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    size = path.stat().st_size
    if size % record:
        raise DataError(f"{path}: {size} bytes is not a multiple of {record} ({layout}): the file is truncated")
    return size // record


def check_point_values(points: np.ndarray, path, layout: str) -> None:
    """A file whose size fits the layout but whose bytes are another element type (float64
    rows read as float32 put the low halves of the doubles in x or z: values like 1e-19 or
    4e19) is refused: in a real scan no coordinate is beyond 10 km or closer to 0 than 1e-10
    without being 0. A few such points are left to usable_rows; a tenth of the scan is not."""
    xyz = np.abs(points[:, :3])
    odd = ((xyz > 1e4) & np.isfinite(xyz)) | ((xyz > 0) & (xyz < 1e-10))  # (N, 3)
    share = float(odd.any(1).mean()) if len(points) else 0.0
    if share > 0.1:
        raise DataError(f"{path}: {100 * share:.0f}% of its points have coordinates beyond 10 km or below 1e-10 m: "
                        f"not {layout} records (float64? another sensor's layout?)")


def read_image(path) -> np.ndarray:
    """A camera frame (PNG, JPEG) -> (H, W, 3) uint8 RGB."""
    from PIL import Image  # Pillow comes with torchvision
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA", "L", "LA", "P"):  # 16-bit or float: convert() would clip it to garbage
                raise DataError(f"{path}: a {im.mode} image; the camera frames are 8-bit RGB, as KITTI's image_2 PNGs "
                                "and nuScenes' JPEGs (16-bit, floating-point and CMYK images are not converted)")
            if im.mode in ("L", "LA"):  # the colour the teacher learns from is not there
                raise DataError(f"{path}: a grayscale image; the camera frames are colour (KITTI's image_2, nuScenes' "
                                "CAM_*); KITTI's image_0 and image_1 hold its grayscale cameras")
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None


def spread(n: int, samples: int) -> list[int]:
    """Indices of up to `samples` items spread evenly over n, first and last included: the few
    files an up-front check reads whole (a split written in another element type shows in any)."""
    m = min(samples, n)
    return sorted({round(k * (n - 1) / max(m - 1, 1)) for k in range(m)})


_UMASK = os.umask(0o022)  # read once, put back at once: written files get 0o666 & ~umask, as open() gives
os.umask(_UMASK)


def atomic_write(path, write) -> None:
    """Call write(file) on a temporary file in the same folder, then rename it to path:
    a crash mid-write never leaves a truncated checkpoint or label file, and a write that
    fails (a full disk, a read-only folder) leaves the previous file as it was. Every file
    the project writes goes through here."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as e:
        raise DataError(f"{path}: cannot be written ({e.strerror or e}); nothing was written") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; others may need to read them
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # A failed write: OSError from Python, RuntimeError from torch.save's C++ writer (a full
        # disk: "[enforce fail at inline_container.cc] ... file write failed").
        if isinstance(e, (OSError, RuntimeError)):
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1][:200]
            kept = "the previous file is unchanged" if path.exists() else "no partial file was left"
            raise DataError(f"{path}: could not be written ({why}); nothing was lost: {kept}") from None
        raise


# =====================================================================================
# 2. Range and augmentation (augmentation comes after projection, so pixel indices stay valid)
# =====================================================================================

def in_range(xyz: np.ndarray, lo: tuple, hi: tuple) -> np.ndarray:
    """The official datasets' strict range test lo < xyz < hi on every axis: (N, 3) -> (N,) bool."""
    return ((xyz > np.array(lo)) & (xyz < np.array(hi))).all(axis=1)


def usable_rows(points: np.ndarray, path, lo: tuple, hi: tuple) -> np.ndarray:
    """Rows of a scan (N, 4) that are finite and inside the voxel range, ascending. Dropped
    non-finite points, and a scan with nothing in range, are reported in a warning naming
    the file (the model then sees no point of it; prediction gives such points 0)."""
    finite = np.isfinite(points).all(axis=1)
    if not finite.all():
        warnings.warn(f"{path}: dropped {int((~finite).sum())} points with NaN or Inf values")
    rows = np.flatnonzero(finite & in_range(np.nan_to_num(points[:, :3]), lo, hi))
    if len(rows) == 0:
        what = ("empty scan" if len(points) == 0 else f"none of its {len(points)} points lies inside the voxel "
                f"range (x, y in ({lo[0]:g}, {hi[0]:g}) m, z in ({lo[2]:g}, {hi[2]:g}) m)")
        warnings.warn(f"{path}: {what}: nothing of it reaches the model")
    return rows


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
# 3. Scans and batches
# =====================================================================================
# A dataset (semantickitti.SemanticKITTI, nusc.NuScenesScans) gives one Scan per sample; collate
# stacks a list of them into the Batch every model reads, the points of all scans in one array.

class Stream(IntEnum):
    """A sample's random streams in one epoch. Separate streams keep the 3D points the same
    whatever else draws numbers (a camera crop, a teacher's view), so switching the camera on
    or off does not change what the LiDAR branch sees."""
    POINTS = 0  # point dropout and the 3D augmentation of the scan's own points
    CAMERA = 1  # the camera side: ELiTe's crop, jitter and flip; U2MKD's image and camera dropout
    SECOND = 2  # a second set of points: ELiTe's CutMix instances; U2MKD's LiDAR teacher's own view


class ScanDataset(torch.utils.data.Dataset):
    """What both datasets' readers share: `train` (dropout and augmentation on), the seed, and
    the epoch, which set_epoch() moves on, so augmentation differs per epoch yet is reproducible.
    A reader also has `scans` (the file of each sample), `has_labels` (whether it has labels) and
    as_in_file(i) -> points (N, 4), labels (N,), the usable rows: sample i as in its file."""
    train: bool
    seed: int
    scans: list[Path]
    has_labels: list[bool]
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, i, stream: Stream) -> np.random.Generator | None:
        """Sample i's random stream for this epoch (None in evaluation: nothing is random)."""
        return np.random.default_rng([self.seed, self.epoch, i, int(stream)]) if self.train else None


@dataclass
class ImageCrop:
    """One scan's camera crop (ELiTe's teacher reads it) and the points that land in it."""
    image: torch.Tensor               # (3, ch, cw) float32, normalised with SAM's mean/std
    pixels: torch.Tensor              # (Ki, 2) int64 (row, col) of the kept points in the crop
    kept: np.ndarray                  # (Ki,) int64: which input points are in the crop
    dense_labels: np.ndarray | None   # (..., ch, cw) cropped (and flipped) like the image


@dataclass
class Scan:
    """One scan, cropped to the voxel range: n points kept of the num_raw its file holds. Points
    added from other files follow the scan's own, their rows counted on past num_raw: SemanticKITTI's
    CutMix instances (num_raw then includes their file's points: upstream's ref_index + origin_len),
    nuScenes' sweeps (num_raw stays the keyframe's). U2MKD's pasted instances have row -1."""
    points: np.ndarray      # (n, 4) float32: x, y, z (augmented in training), remission or intensity
    labels: np.ndarray      # (n,) int64 the dataset's class ids (zeros when the scan has no labels)
    index: np.ndarray       # (n,) int64 row of each point in its file
    num_raw: int
    path: Path
    crop: ImageCrop | None = None          # the camera crop, when the dataset has camera=True
    crop_points: np.ndarray | None = None  # (K,) rows of points seen at crop.pixels


@dataclass
class CameraCrops:
    """The camera side of a batch: one crop per scan and the labelled points inside them."""
    images: torch.Tensor              # (B, 3, ch, cw) normalised with SAM's mean/std
    pixels: list[torch.Tensor]        # B x (K_b, 2) int64 (row, col) in the crop
    labels: torch.Tensor              # (sum K_b,) training ids of those points, samples in order
    dense: torch.Tensor | None        # (B, ch, cw) int64 pseudo-labels, or None

    def to(self, device) -> CameraCrops:
        return CameraCrops(self.images.to(device), [p.to(device) for p in self.pixels], self.labels.to(device),
                           None if self.dense is None else self.dense.to(device))


@dataclass
class Batch:
    points: torch.Tensor     # (N, 4) float
    batch_idx: torch.Tensor  # (N,) int64: which scan each point belongs to
    labels: torch.Tensor     # (N,) int64
    index: torch.Tensor      # (N,) int64 row in its raw scan
    num_raw: list[int]
    paths: list[Path]
    crops: CameraCrops | None = None         # the camera crops (camera=True)
    crop_points: torch.Tensor | None = None  # (sum K_b,) rows of `points` behind crops.pixels, in order

    def to(self, device) -> Batch:
        return Batch(self.points.to(device), self.batch_idx.to(device), self.labels.to(device),
                     self.index.to(device), self.num_raw, self.paths,
                     None if self.crops is None else self.crops.to(device),
                     None if self.crop_points is None else self.crop_points.to(device))


def collate(scans: list[Scan]) -> Batch:
    offsets = np.cumsum([0] + [len(s.points) for s in scans[:-1]])
    crops = crop_points = None
    if scans[0].crop is not None:
        dense = None
        if scans[0].crop.dense_labels is not None:
            dense = torch.from_numpy(np.stack([s.crop.dense_labels for s in scans]).astype(np.int64))
        crop_points = torch.from_numpy(np.concatenate([s.crop_points + o for s, o in zip(scans, offsets)]))
        crops = CameraCrops(torch.stack([s.crop.image for s in scans]), [s.crop.pixels for s in scans],
                            torch.from_numpy(np.concatenate([s.labels[s.crop_points] for s in scans])), dense)
    return Batch(
        points=torch.from_numpy(np.concatenate([s.points for s in scans])).float(),
        batch_idx=torch.cat([torch.full((len(s.points),), b, dtype=torch.long) for b, s in enumerate(scans)]),
        labels=torch.from_numpy(np.concatenate([s.labels for s in scans])),
        index=torch.from_numpy(np.concatenate([s.index for s in scans])),
        num_raw=[s.num_raw for s in scans],
        paths=[s.path for s in scans],
        crops=crops,
        crop_points=crop_points,
    )


# =====================================================================================
# 4. Evaluation: one confusion matrix over a split
# =====================================================================================
# The rules that turn it into IoU differ: semantickitti.SemanticKittiConfusion follows the
# official SemanticKITTI evaluator, nusc.LidarsegConfusion the nuScenes devkit.

class ConfusionMatrix:
    """Counts of (prediction, ground truth) over every point of a split: rows are predictions. A
    dataset's subclass sets its `num_classes` (0 = ignore included) and scores it: iou(), miou(),
    table(), and `scored_by`, the rules' name."""
    num_classes: int
    scored_by: str

    def __init__(self):
        n = self.num_classes
        self.matrix = torch.zeros(n, n, dtype=torch.int64)  # rows: prediction

    def add(self, pred: torch.Tensor, gt: torch.Tensor):
        n = self.num_classes
        idx = pred.flatten().long().cpu() * n + gt.flatten().long().cpu()
        self.matrix += torch.bincount(idx, minlength=n * n).view(n, n)

    def present(self) -> torch.Tensor:
        """(n - 1,) bool: classes 1.. with ground-truth points."""
        return self.matrix.sum(0)[1:] > 0
