"""SemanticKITTI, read top to bottom: the files of the odometry benchmark as the
voxel student and the SAM teacher read them.

    1. Files: scans, labels, calibration, images, splits, the label map
    2. Geometry: LiDAR points onto the camera image
    3. The voxel range and its 0.1 m grid
    4. The camera crop: the bottom of the frame, colour jitter, flip (what the image teacher reads)
    5. The dataset: scans (and their camera crops, and instance CutMix) as scandata.Scan; the
       files a run reads, checked before its first step
    6. SAM-PLG's files: where the pseudo-labels lie and what made them
    7. Evaluation: the official SemanticKITTI IoU

The types both datasets share (Scan, Batch, augmentation) are in scandata.py; nuScenes is in
nusc.py. Facts follow the official semantic-kitti.yaml, the semantic-kitti-api evaluator and
2DPASS's loader.
"""
from __future__ import annotations

import functools
import json
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scandata import (ConfusionMatrix, DataError, ImageCrop, Scan, ScanDataset, Stream, augment_xyz, check_point_values,
                      dropout_points, read_image, spread, usable_rows, whole_records)

# =====================================================================================
# 1. Files
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
CLASS_COLORS = np.array([  # training id -> RGB, the official color_map (which the yaml lists as BGR)
    [0, 0, 0], [100, 150, 245], [100, 230, 245], [30, 60, 150], [80, 30, 180], [0, 0, 255],
    [255, 30, 30], [255, 40, 200], [150, 30, 90], [255, 0, 255], [255, 150, 255], [75, 0, 75],
    [175, 0, 75], [255, 200, 0], [255, 120, 50], [0, 175, 0], [135, 60, 0], [150, 240, 80],
    [255, 240, 150], [255, 0, 0],
], dtype=np.uint8)
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
_KNOWN_RAW = np.isin(np.arange(len(_RAW_TO_TRAIN)), list(LEARNING_MAP))  # (max id + 1,) bool
TRAIN_TO_RAW = np.array([LEARNING_MAP_INV[i] for i in range(NUM_CLASSES)], dtype=np.uint32)


def scan_size(path) -> int:
    """Points in a velodyne .bin, from its size alone (a truncated file is an error)."""
    return whole_records(path, 16, "scan file", "4 float32 per point")


def label_count(path, num_points: int | None = None) -> int:
    """Labels in a .label file, from its size alone, checked against its scan's points."""
    count = whole_records(path, 4, "label file", "one uint32 per point")
    if num_points is not None and count != num_points:
        raise DataError(f"{path}: {count} labels but its scan has {num_points} points")
    return count


def read_scan(path) -> np.ndarray:
    """A velodyne .bin: float32 rows (x, y, z, remission) -> (N, 4). Remission is 0..1 in
    SemanticKITTI; a file on another scale (0..255) is named in a warning, as the network would
    read it as a different surface."""
    scan_size(path)
    points = np.fromfile(path, dtype=np.float32).reshape(-1, 4)
    check_point_values(points, path, "float32 (x, y, z, remission)")
    negative = np.count_nonzero(points[:, 3] < 0)  # a remission is never below 0; shifted columns put x, y, z there
    if negative > 0.01 * len(points):
        raise DataError(f"{path}: {100 * negative / len(points):.0f}% of its points have a negative remission (the "
                        "4th value): not SemanticKITTI's rows of 4 float32 (x, y, z, remission); a nuScenes .pcd.bin "
                        "(5 float32 per point) read as a KITTI scan?")
    highest = np.max(points[:, 3], initial=0.0, where=np.isfinite(points[:, 3]))  # one pass, no copy
    if highest > REMISSION_MAX:
        warnings.warn(f"{path}: remission up to {highest:g}, beyond SemanticKITTI's 0..1 (a 0..255 scale?): "
                      "the models here learn it on 0..1, so their predictions on this scan will be poor")
    return points


REMISSION_MAX = 1.5  # a little room above 1: real scans stay within 0..1


def read_labels(path, num_points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A .label file: uint32 per point -> (semantic raw id, instance id), both (N,)."""
    label_count(path, num_points)
    raw = np.fromfile(path, dtype=np.uint32)
    check_label_layout(raw, path)
    return (raw & 0xFFFF).astype(np.int64), (raw >> 16).astype(np.int64)


def known_ids(semantic: np.ndarray) -> np.ndarray:
    """(N,) bool: which raw semantic ids semantic-kitti.yaml's learning map has. A table lookup,
    not np.isin: every scan read in training passes here (read_labels, then to_train_ids)."""
    inside = semantic < len(_KNOWN_RAW)
    return inside & _KNOWN_RAW[np.where(inside, semantic, 0)]


def check_label_layout(raw: np.ndarray, path) -> None:
    """A .label file's values say whether it is SemanticKITTI's layout (little-endian uint32, the
    semantic id in the lower 16 bits). Most points of a real file carry a known id; byte-swapped
    (big-endian) files put the instance's bytes there, mostly 0, and are refused by name, as is a
    file whose ids are mostly unknown (another layout)."""
    semantic = raw & 0xFFFF
    known = known_ids(semantic)
    if known.mean() < 0.5:
        raise DataError(f"{path}: {100 * (1 - known.mean()):.0f}% of its labels carry raw ids that semantic-kitti.yaml "
                        "does not have: not SemanticKITTI's .label layout (uint32, semantic id in the lower 16 bits)"
                        + (", or byte-swapped (big-endian)" if known_ids(raw.byteswap() & 0xFFFF).mean() > 0.9 else ""))
    labelled = float((_RAW_TO_TRAIN[np.where(known, semantic, 0)] > 0).mean())
    if labelled < 0.5:  # swapped files read as mostly 0: swapped back, a real file is mostly labelled
        swapped = raw.byteswap() & 0xFFFF
        back = known_ids(swapped)
        if float((_RAW_TO_TRAIN[np.where(back, swapped, 0)] > 0).mean()) > 0.9:
            raise DataError(f"{path}: byte-swapped (big-endian): read as SemanticKITTI's little-endian uint32, "
                            f"{100 * labelled:.0f}% of its points are labelled; swapped back, over 90% are; convert "
                            "it (numpy's .byteswap()) before use")


def to_train_ids(raw_semantic: np.ndarray, path="labels") -> np.ndarray:
    """Raw SemanticKITTI ids -> training ids 0..19; unknown ids become 0 with a warning."""
    known = known_ids(raw_semantic)
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
    text = path.read_bytes().decode("utf-8-sig", errors="replace")  # a BOM or stray bytes: no traceback
    for line in text.splitlines():
        if not line.strip():
            break  # the official reader stops at the first blank line
        key, _, values = line.partition(":")
        if key.strip() in mats:  # two P2 lines: which one the camera is cannot be told
            raise DataError(f"{path}: '{key.strip()}' is given twice; keep one line per matrix")
        try:
            mats[key.strip()] = np.array([float(v) for v in values.split()], dtype=np.float64)
        except ValueError as e:
            raise DataError(f"{path}: line '{key}' has a non-numeric value ({e})") from None
    for key in ("P2", "Tr"):
        if key not in mats:
            raise DataError(f"{path}: no '{key}:' line")
        if mats[key].size != 12:
            raise DataError(f"{path}: '{key}' has {mats[key].size} values, expected 12 (a 3x4 matrix)")
        if not np.isfinite(mats[key]).all():
            raise DataError(f"{path}: '{key}' holds non-finite values (NaN or Inf): no point could be projected")
    p2 = mats["P2"].reshape(3, 4)
    if not (p2[0, 0] > 0 and p2[1, 1] > 0 and p2[2, 2] > 0):  # a camera's focal lengths: a sign flipped mirrors it
        raise DataError(f"{path}: P2's focal lengths ({p2[0, 0]:g}, {p2[1, 1]:g}) and scale {p2[2, 2]:g} must be "
                        "positive; a negative one mirrors the image, so every point would land on a wrong pixel")
    tr = np.eye(4)
    tr[:3] = mats["Tr"].reshape(3, 4)
    return {"P2": p2, "Tr": tr, "proj": p2 @ tr}


def file_version(path: Path) -> tuple[int, int] | None:
    """(modification time, size) of a file or folder, None if absent: a cache key that changes
    when the file does."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def sequence_calib(sequence: Path) -> dict[str, np.ndarray]:
    """read_calib() of a sequence folder's calib.txt, read once per process while the file
    stays as it is: every reader of a scan's camera asks here."""
    return _read_calib_once(sequence / "calib.txt", file_version(sequence / "calib.txt"))


@functools.lru_cache(maxsize=64)
def _read_calib_once(path: Path, version) -> dict[str, np.ndarray]:
    return read_calib(path)


def list_scans(root, sequences) -> list[Path]:
    """All velodyne/NNNNNN.bin of the given sequences under ROOT/sequences, sorted. Other files
    there (macOS's ._000000.bin metadata twins, editor backups) are not scans and are left out."""
    check_root(root)
    root = Path(root)
    scans = []
    for seq in sequences:
        scans += sorted(p for p in (root / "sequences" / seq / "velodyne").glob("*.bin") if p.stem.isdigit())
    if not sequences:  # every sequence asked for was missing (the notes above name them)
        raise DataError(f"{root}/sequences: holds none of the sequences asked for (the note above names them); "
                        f"it has {sorted(p.name for p in (root / 'sequences').iterdir() if p.is_dir())[:12]}")
    if not scans:
        raise DataError(f"{root}/sequences: no scans in sequences {list(sequences)}")
    return scans


def check_root(root) -> None:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: {'a file, not a dataset folder' if root.exists() else 'dataset folder not found'}")
    if not (root / "sequences").is_dir():
        raise DataError(f"{root}: no 'sequences' folder (expected ROOT/sequences/XX/velodyne/*.bin)")


def label_path(scan_path: Path) -> Path:
    return scan_path.parent.parent / "labels" / (scan_path.stem + ".label")


def image_path(scan_path: Path) -> Path:
    return scan_path.parent.parent / "image_2" / (scan_path.stem + ".png")


def plg_path(scan_path: Path, derived: Path | None = None) -> Path:
    """Where SAM-PLG writes the pseudo-labels of a scan: sequences/XX/image_2_plg/NNNNNN.npy
    inside the dataset, or under `derived` (--derived-dir) when the dataset is read-only."""
    sequence = scan_path.parent.parent
    folder = sequence if derived is None else Path(derived) / "sequences" / sequence.name
    return folder / "image_2_plg" / (scan_path.stem + ".npy")


def calib_path(scan_path: Path) -> Path:
    return scan_path.parent.parent / "calib.txt"


def sequence_frame(sequence: Path) -> tuple[Path, int, int] | None:
    """The first image of a sequence's image_2/ and its (height, width), read from the file's
    header once while the folder stays as it is: every frame of a KITTI sequence has this size
    (None: the sequence has no image)."""
    return _first_frame(sequence / "image_2", file_version(sequence / "image_2"))


@functools.lru_cache(maxsize=64)
def _first_frame(folder: Path, version) -> tuple[Path, int, int] | None:
    from PIL import Image
    first = min((p for p in folder.glob("*.png") if p.stem.isdigit()), default=None)  # not macOS's ._000000.png
    if first is None:
        return None
    try:
        with Image.open(first) as im:
            return first, im.height, im.width
    except OSError as e:
        raise DataError(f"{first}: cannot decode image ({e})") from None


def read_frame(scan_path: Path, calib: dict[str, np.ndarray]) -> np.ndarray:
    """The scan's camera frame (H, W, 3), checked against its sequence's calibration. In every
    KITTI sequence P2 puts the principal point within 2% of the image centre (checked at 10%), and all frames
    of a sequence have one size; an image of another size (resized, cropped, from another
    camera) would put every projected point on a wrong pixel."""
    path = image_path(scan_path)
    image = read_image(path)
    h, w = image.shape[:2]
    first, fh, fw = sequence_frame(scan_path.parent.parent)
    if (h, w) != (fh, fw):
        raise DataError(f"{path}: a {w}x{h} image, but the frames of this sequence are {fw}x{fh} ({first.name}); "
                        f"{calib_path(scan_path)} holds one camera for all of them: image_2 must hold the frames "
                        "as recorded, not resized or cropped")
    cx, cy = calib["P2"][0, 2], calib["P2"][1, 2]
    if not (abs(cx - w / 2) < 0.1 * w and abs(cy - h / 2) < 0.1 * h):
        raise DataError(f"{path}: a {w}x{h} image does not match {calib_path(scan_path)}, whose P2 puts the "
                        f"principal point at ({cx:.0f}, {cy:.0f}), not near the image centre ({w / 2:.0f}, "
                        f"{h / 2:.0f}); image_2 must hold the camera frames as recorded")
    return image


def read_pixel_labels(path, height: int, width: int) -> np.ndarray:
    """A (2, H, W) uint16 [training id, instance] file: SAM-PLG output or SynthKITTI's image_2_gt."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: pixel-label file not found")
    try:
        labels = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: cannot read pixel labels ({type(e).__name__}: {e}); "
                        "the file is truncated or not a .npy array") from None
    if labels.dtype != np.uint16 or labels.shape != (2, height, width):
        raise DataError(f"{path}: holds {labels.dtype} {labels.shape}, expected uint16 (2, {height}, {width}) "
                        "([training id, instance] at the image's size)")
    if labels[0].max(initial=0) >= NUM_CLASSES:
        raise DataError(f"{path}: class id {int(labels[0].max())} in channel 0, expected training ids 0..19")
    return labels


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
# 3. The voxel range and its 0.1 m grid
# =====================================================================================
# The official dataset keeps -50 < x, y < 50 and -4 < z < 2 m (scandata.in_range, strict) and
# quantises it into 0.1 m cells; elite.StudentConfig takes these as its defaults.

RANGE_MIN = (-50.0, -50.0, -4.0)
RANGE_MAX = (50.0, 50.0, 2.0)
GRID_SHAPE = (1000, 1000, 60)  # 0.1 m voxels over the range


# =====================================================================================
# 4. The camera crop: bottom rows, colour jitter, flip (what the image teacher reads)
# =====================================================================================
# The teacher sees the bottom 320 x 1024 crop of the KITTI frame: the rows above hold sky,
# where no LiDAR point lands. Every change to the image is applied to the points' pixel
# indices too, so a point keeps reading the pixel it projects onto.

CROP_HW = (320, 1024)  # (height, width): the bottom rows of the KITTI frame, a window of columns
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB on the 0..255 scale (no /255)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength=0.4) -> np.ndarray:
    """torchvision's ColorJitter(0.4, 0.4, 0.4) on a uint8 (H, W, 3) image: brightness, contrast
    and saturation factors ~ U(0.6, 1.4), applied in random order. The factors are drawn from
    rng (not torch's global generator) so a seeded loader is reproducible."""
    from PIL import Image
    import torchvision.transforms.functional as TF
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    im = Image.fromarray(image)
    for i in rng.permutation(3):
        im = ops[i](im, rng.uniform(1 - strength, 1 + strength))
    return np.asarray(im)


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W) with SAM's pixel mean/std."""
    x = torch.from_numpy(np.array(image, dtype=np.float32))  # a writable float copy
    x = (x - torch.tensor(SAM_PIXEL_MEAN)) / torch.tensor(SAM_PIXEL_STD)
    return x.permute(2, 0, 1).contiguous()


def prepare_image(image: np.ndarray, pixel_rc: np.ndarray, crop_hw=CROP_HW,
                  rng: np.random.Generator | None = None, train=False,
                  dense_labels: np.ndarray | None = None, jitter=0.4) -> ImageCrop:
    """The teacher's crop of one frame (official steps 7-11, in their order).

    image (H, W, 3) uint8 RGB; pixel_rc (K, 2) float (row, col) of the projected points.
    Training: a random window of columns at the bottom, colour jitter, a flip with p = 0.5.
    Evaluation: the centred window at the bottom, nothing random (rng may be None)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    ch, cw = crop_hw
    if height < ch or width < cw:
        raise ValueError(f"image {height}x{width} (HxW) is smaller than the crop {ch}x{cw}")
    if train and rng is None:
        raise ValueError("training augmentation needs a numpy Generator (rng)")
    top = height - ch  # the bottom rows: the sky above them holds no LiDAR points
    left = int(rng.random() * (width + 1 - cw)) if train else (width - cw) // 2
    rows, cols = pixel_rc[:, 0], pixel_rc[:, 1]
    kept = np.flatnonzero((rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw))
    pixels = (pixel_rc[kept] - np.array([top, left])).astype(np.int64)  # shift, then truncate
    crop = image[top:, left:left + cw]
    dense = None if dense_labels is None else dense_labels[..., top:, left:left + cw]
    if train:
        if jitter:
            crop = color_jitter(np.ascontiguousarray(crop), rng, jitter)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
            pixels[:, 1] = cw - 1 - pixels[:, 1]
            dense = None if dense is None else dense[..., ::-1]
    dense = None if dense is None else np.ascontiguousarray(dense)
    return ImageCrop(normalize_image(crop), torch.from_numpy(pixels), kept, dense)


def camera_crop(image: np.ndarray, xyz: np.ndarray, proj: np.ndarray, crop_hw, rng, train: bool,
                dense: np.ndarray | None) -> tuple[ImageCrop, np.ndarray]:
    """Project points (n, 3) with their raw (un-augmented) coordinates, then crop, jitter and
    flip the image. Returns the crop and the point behind each row of crop.pixels: indices
    (K,) into xyz."""
    visible, pixel_rc = project_points(xyz.astype(np.float64), proj, *image.shape[:2])
    crop = prepare_image(image, pixel_rc, crop_hw, rng, train, dense)
    return crop, np.flatnonzero(visible)[crop.kept]


# =====================================================================================
# 5. The dataset
# =====================================================================================
# A scan is read, cropped to the voxel range, thinned by dropout (training), projected into
# the camera with its raw coordinates when the teacher needs it, and only then augmented in
# 3D: the pixel indices stay valid because projection comes first (official order).

def load_scan(path: Path, with_labels=True) -> tuple[np.ndarray, np.ndarray]:
    """Raw points (N, 4) and training labels (N,) of one scan; non-finite points are
    kept in the arrays (so indices match the file); usable_rows() leaves them out."""
    points = read_scan(path)
    if with_labels:
        raw, _ = read_labels(label_path(path), len(points))
        labels = to_train_ids(raw, label_path(path))
    else:
        labels = np.zeros(len(points), dtype=np.int64)
    return points, labels


class SemanticKITTI(ScanDataset):
    """Scans of some sequences; `train` turns on dropout and augmentation (3D, and 2D on the
    crop). camera=True adds each scan's crop of image_2 and the points inside it; dense=True
    also the crop of its SAM-PLG pseudo-labels (image_2_plg/); cutmix=True (training) stacks
    the instance points of another scan after each scan's (ELiTe's benchmark config)."""

    def __init__(self, root, sequences, train=False, seed=0, camera=False, crop_hw=CROP_HW, dense=False,
                 derived: Path | None = None, cutmix=False):
        self.scans = list_scans(root, sequences)  # their files are checked up front by check_datasets
        self.train, self.seed = train, seed
        self.has_labels = [label_path(p).is_file() for p in self.scans]
        unlabelled = [s for s, has in zip(self.scans, self.has_labels) if not has]
        if train and unlabelled:
            raise DataError(f"{label_path(unlabelled[0])}: label file not found ({len(unlabelled)} training scans "
                            "have none)")
        self.camera, self.crop_hw, self.dense, self.derived = camera, tuple(crop_hw), dense, derived
        self.cutmix = cutmix and train

    def __len__(self):
        return len(self.scans)

    def as_in_file(self, i) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scan i as in its file: points (N, 4), training labels (N,), and the rows that are
        finite and inside the voxel range (ascending)."""
        path = self.scans[i]
        points, labels = load_scan(path, with_labels=self.has_labels[i])
        return points, labels, usable_rows(points, path, RANGE_MIN, RANGE_MAX)

    def __getitem__(self, i) -> Scan:
        path = self.scans[i]
        points, labels, keep = self.as_in_file(i)
        rng = self.rng(i, Stream.POINTS)
        if self.train and len(keep):
            keep = keep[dropout_points(len(keep), rng)]
        pts = points[keep].copy()
        crop = crop_points = None
        if self.camera:
            calib = sequence_calib(path.parent.parent)
            image = read_frame(path, calib)
            dense = read_pixel_labels(plg_path(path, self.derived), *image.shape[:2])[0] if self.dense else None
            crop, crop_points = camera_crop(image, pts[:, :3], calib["proj"], self.crop_hw,
                                            self.rng(i, Stream.CAMERA), self.train, dense)
        if self.train:
            pts[:, :3] = augment_xyz(pts[:, :3], rng)  # after projection: pixels stay valid
        scan = Scan(pts, labels[keep], keep, len(points), path, crop, crop_points)
        return self.paste_instances(scan, i, self.rng(i, Stream.SECOND)) if self.cutmix else scan

    def paste_instances(self, scan: Scan, i: int, rng: np.random.Generator) -> Scan:
        """Instance CutMix (official dataset.py, cutmix: True): the points of another random
        training scan (drawn again while it is scan i itself, as upstream) that carry an instance
        id, in range, thinned and augmented on their own, stacked after the scan's points. They
        get no pixel: the camera crop stays the scan's own."""
        j = int(rng.integers(len(self)))
        while j == i and len(self) > 1:
            j = int(rng.integers(len(self)))
        path = self.scans[j]
        points = read_scan(path)
        raw, instance = read_labels(label_path(path), len(points))
        rows = usable_rows(points, path, RANGE_MIN, RANGE_MAX)
        rows = rows[instance[rows] != 0]
        rows = rows[dropout_points(len(rows), rng)] if len(rows) else rows
        pasted = points[rows].copy()
        pasted[:, :3] = augment_xyz(pasted[:, :3], rng)
        return Scan(np.concatenate([scan.points, pasted]),
                    np.concatenate([scan.labels, to_train_ids(raw[rows], label_path(path))]),
                    np.concatenate([scan.index, scan.num_raw + rows]), scan.num_raw + len(points), scan.path,
                    scan.crop, scan.crop_points)


# ---- 5.1 The files a run reads, checked before its first step, not when a bad file's turn comes ----

def existing_sequences(root, sequences: list[str]) -> list[str]:
    """The sequences that have a velodyne folder under ROOT/sequences; the others are named and skipped."""
    check_root(root)
    found = [s for s in sequences if (Path(root) / "sequences" / s / "velodyne").is_dir()]
    missing = sorted(set(sequences) - set(found))
    if missing:
        print(f"note: sequences {missing} not found under {root}/sequences; skipped")
    return found


def check_scan_files(scans: list[Path]) -> None:
    """Every scan's .bin and, where it has one, its .label are whole, checked from their sizes
    before a long run starts rather than when a bad file's turn comes."""
    for scan in scans:
        n = scan_size(scan)
        if label_path(scan).is_file() and label_count(label_path(scan)) != n:
            read_scan(scan)  # a scan of float64 values has twice the points: say that, if it is the cause
            label_count(label_path(scan), n)


def check_camera_files(dataset) -> None:
    """Every scan's image and calibration are there, and the crop fits in each sequence's
    frames (read from the first image's header): found now, not when the scan's turn comes."""
    for scan in dataset.scans:
        sequence_calib(scan.parent.parent)
        if not image_path(scan).is_file():
            raise DataError(f"{image_path(scan)}: image not found (the camera crop needs image_2/ of every scan)")
    ch, cw = dataset.crop_hw
    for sequence in sorted({scan.parent.parent for scan in dataset.scans}):
        first, h, w = sequence_frame(sequence)
        if ch > h or cw > w:
            raise DataError(f"{first}: a {w}x{h} frame is smaller than the {ch}x{cw} crop (--crop H W)")
    for scan in [dataset.scans[i] for i in spread(len(dataset.scans), 8)]:  # decoded: a grayscale split, said now
        read_image(image_path(scan))


def check_datasets(train_set, val_set, samples=16) -> None:
    """Before training, the up-front checks of a run. Every scan's files are whole
    and, when the run reads the camera, there. The splits can teach and be scored: training
    labels that are all 0 (unlabeled, checked on up to `samples` scans spread over the split)
    teach nothing; validation scans without labels cannot be scored; a sequence in both splits
    scores scans the model trained on. The sampled scans are read whole (read_scan's value checks)."""
    for dataset in (train_set, val_set):
        check_scan_files(dataset.scans)
        if dataset.camera:
            check_camera_files(dataset)
    both = sorted({s.parent.parent.name for s in train_set.scans} & {s.parent.parent.name for s in val_set.scans})
    if both:
        warnings.warn(f"sequences {both} are both training and validation sequences: validation then "
                      "scores scans the model trained on")
    if not any(val_set.has_labels):
        raise DataError(f"{label_path(val_set.scans[0]).parent}: none of the {len(val_set)} validation scans has a "
                        ".label file, so validation cannot score them; give --val-sequences that have labels")
    unlabelled = val_set.has_labels.count(False)
    if unlabelled:
        warnings.warn(f"{label_path(val_set.scans[val_set.has_labels.index(False)])}: {unlabelled} of the "
                      f"{len(val_set)} validation scans have no .label file and are not scored")
    picks = spread(len(train_set), samples)
    for scan in [train_set.scans[i] for i in picks] + val_set.scans[:1]:
        read_scan(scan)  # a split written in another element type (check_point_values), said now
    checked = [label_path(train_set.scans[i]) for i in picks]
    if all(not to_train_ids(read_labels(path)[0], path).any() for path in checked):
        raise DataError(f"{checked[0].parent}: every point of the {len(checked)} training .label files checked "
                        f"({checked[0].name} ... {checked[-1].name}) is unlabeled (training id 0): there is nothing "
                        "to learn from")
    scored = [label_path(s) for s, labelled in zip(val_set.scans, val_set.has_labels) if labelled]
    scored = [scored[i] for i in spread(len(scored), samples)]
    if all(not to_train_ids(read_labels(path)[0], path).any() for path in scored):
        raise DataError(f"{scored[0].parent}: every point of the {len(scored)} validation .label files checked "
                        f"({scored[0].name} ... {scored[-1].name}) is unlabeled (training id 0): validation would score "
                        "nothing and report 0 mIoU every epoch; give --val-sequences with labels")
    if getattr(train_set, "cutmix", False) and all(not read_labels(path)[1].any() for path in checked):
        raise DataError(f"{checked[0].parent}: --cutmix pastes the points of other scans' instances, but no point of "
                        f"the {len(checked)} training .label files checked carries an instance id (their upper 16 "
                        "bits are 0): there is nothing to paste; run without --cutmix (--no-cutmix)")


# =====================================================================================
# 6. SAM-PLG's files: where the pseudo-labels lie and what made them
# =====================================================================================

@dataclass
class PlgFrame:
    """What pseudo-labelling needs of one scan: its image and the labels of the points
    that project into it (all points of the file: PLG crops no range)."""
    image: np.ndarray     # (H, W, 3) uint8 RGB
    semantic: np.ndarray  # (K,) int64 training ids
    instance: np.ndarray  # (K,) int64
    pixel_rc: np.ndarray  # (K, 2) int64 (row, col), truncated as upstream's img_indices
    scan_path: Path


def load_plg_frame(scan_path: Path, calib: dict[str, np.ndarray]) -> PlgFrame:
    points = read_scan(scan_path)
    raw, instance = read_labels(label_path(scan_path), len(points))
    semantic = to_train_ids(raw, label_path(scan_path))
    image = read_frame(scan_path, calib)
    keep, rows_cols = project_points(points[:, :3].astype(np.float64), calib["proj"], *image.shape[:2])
    return PlgFrame(image, semantic[keep], instance[keep], rows_cols.astype(np.int64), scan_path)


def missing_pseudo_labels(root, sequences, derived: Path | None = None, masks: str | None = None,
                          weights: Path | None = None) -> int:
    """Labelled scans without a pseudo-label file (scans without labels get none), after
    check_pseudo_labels: the files there were made from these inputs (and with these masks)."""
    check_pseudo_labels(root, sequences, derived, masks, weights)
    return sum(label_path(s).is_file() and not plg_path(s, derived).is_file() for s in list_scans(root, sequences))


# The pseudo-labels are a cache of hours of SAM: each sequence's image_2_plg/ records what made it
# (PLG_RECORD), so that files made from other labels or with other masks are never read as these.
PLG_RECORD = "made_with.json"


def label_files(sequence: Path) -> list[Path]:
    return sorted(p for p in (sequence / "labels").glob("*.label") if p.stem.isdigit())


def file_crc(path: Path) -> int:
    """CRC-32 of a file's bytes, read in 1 MiB pieces."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def fingerprint(path: Path) -> list[int]:
    """[size, status-change time, CRC-32]: the time says at a glance that a file is as it was,
    the content says so after a copy gave it a new time. The status-change time (ctime), unlike
    the modification time, cannot be set back (touch -r, cp -p): any write moves it."""
    st = path.stat()
    return [st.st_size, st.st_ctime_ns, file_crc(path)]


def same_file(path: Path, recorded: list[int]) -> bool:
    """The file is as the fingerprint recorded it (its content is read only when its time changed)."""
    if not path.is_file():
        return False
    st = path.stat()
    return st.st_size == recorded[0] and (st.st_ctime_ns == recorded[1] or file_crc(path) == recorded[2])


def plg_inputs(scan: Path, source=None) -> list[Path]:
    """The files a scan's pseudo-labels are made from: its labels, points and image, and the
    mask source's own per-scan files (source.inputs: the synthetic scenes' rendered regions)."""
    extra = source.inputs(scan) if source is not None and hasattr(source, "inputs") else []
    return [label_path(scan), scan, image_path(scan)] + list(extra)


def plg_record(sequence: Path, source, weights: Path | None = None) -> dict:
    """Every input a sequence's pseudo-labels are made from (issue 34): the mask source with its
    options (source.name), SAM's weights file, the calibration, and each labelled scan's files
    (plg_inputs), each as its fingerprint, keyed by its path in the sequence's folder."""
    scans = [p for p in sorted((sequence / "velodyne").glob("*.bin")) if p.stem.isdigit() and label_path(p).is_file()]
    files = [sequence / "calib.txt"] + [f for scan in scans for f in plg_inputs(scan, source)]
    return {"masks": source.name, "weights": fingerprint(weights) if weights is not None else None,
            "files": {f.relative_to(sequence).as_posix(): fingerprint(f) for f in files}}


def read_plg_record(path: Path) -> dict:
    """A made_with.json, entry by entry: a hand-edited or older record is one line naming it."""
    folder = path.parent
    try:
        made = json.loads(path.read_text())
        if "files" not in made and "labels" in made:
            raise DataError(f"{folder}: pseudo-labels whose record ({PLG_RECORD}) keeps only their labels, not the masks, "
                            f"images, scans and calibration they were made from; delete {folder} to make them again")
        files = made["files"]
        weights = made.get("weights")
        for entry in list(files.values()) + ([weights] if weights is not None else []):
            if not (isinstance(entry, list) and len(entry) == 3 and all(type(x) is int for x in entry)):
                raise ValueError("an entry is not [size, time, crc]")
        if not isinstance(made.get("masks"), str):
            raise ValueError("'masks' is not a name")
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}); delete {folder} to make the pseudo-labels "
                        "again") from None
    return made


def check_pseudo_labels(root, sequences, derived: Path | None = None, masks: str | None = None,
                        weights: Path | None = None) -> None:
    """Refuse pseudo-labels made from other inputs, naming the folder and the input: any file
    they were made from that changed or went (labels, scans, images, calibration, rendered
    regions), a label file added since, and (masks given) another mask source or (weights given)
    another SAM weights file. A file whose size and time are as recorded is taken as it was;
    one whose time changed (a copied dataset) is compared by its content."""
    for seq in sequences:
        sequence = Path(root) / "sequences" / seq
        folder = plg_path(sequence / "velodyne" / "0.bin", derived).parent
        if not (folder / PLG_RECORD).is_file():
            if any(folder.glob("*.npy")):  # the record is written before the first file: these are not ours
                raise DataError(f"{folder}: pseudo-labels without their record ({PLG_RECORD}), so nothing says what "
                                f"they were made from (copied from another sequence?); delete {folder} to make them "
                                "again, or give another --derived-dir")
            continue  # none made yet
        made = read_plg_record(folder / PLG_RECORD)
        why = f"masks {made['masks']} then, {masks} now" if masks and made["masks"] != masks else None
        if why is None and weights is not None and made["weights"] is not None and not same_file(Path(weights),
                                                                                                  made["weights"]):
            why = f"SAM's weights {weights} changed since"
        recorded = {name.split("/")[1] for name in made["files"] if name.startswith("labels/")}
        labels = {p.name for p in label_files(sequence)}
        if why is None and labels != recorded:
            why = f"{len(recorded)} label files then, {len(labels)} now"
        for name, entry in made["files"].items() if why is None else ():
            if not same_file(sequence / name, entry):
                why = f"{name} {'changed' if (sequence / name).is_file() else 'went'} since"
                break
        if why:
            raise DataError(f"{folder}: pseudo-labels made from other inputs ({why}): they do not belong to this "
                            f"data; delete {folder} to make them again, or give another --derived-dir")


# =====================================================================================
# 7. Evaluation: the official SemanticKITTI IoU
# =====================================================================================
# One confusion matrix over the whole split. A point whose ground truth is 0 never counts;
# a labelled point predicted 0 (or left unpredicted) counts as a miss for its class. IoU of
# each class 1..19 = tp / (tp + fp + fn); mIoU averages all 19, absent classes as 0.

class SemanticKittiConfusion(ConfusionMatrix):
    """scandata.ConfusionMatrix (rows: prediction, columns: ground truth) with the official rules."""
    num_classes = NUM_CLASSES
    scored_by = "official, 19 classes"  # what the epoch line names

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

    def table(self) -> str:
        iou, present = self.iou(), self.present()
        lines = [f"{'class':<14} {'IoU':>6}"]
        for c in range(1, self.num_classes):
            mark = "" if present[c - 1] else "   (no ground-truth points)"
            lines.append(f"{CLASS_NAMES[c]:<14} {100 * iou[c - 1]:6.1f}{mark}")
        lines.append(f"{'mIoU':<14} {100 * self.miou():6.1f}   (official: mean over all 19 classes)")
        if not bool(present.all()):
            k = int(present.sum())
            lines.append(f"{'mIoU present':<14} {100 * float(iou[present].mean()):6.1f}   "
                         f"(mean over the {k} classes with ground truth)")
        return "\n".join(lines)
