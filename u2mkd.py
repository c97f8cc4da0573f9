"""U2MKD (Sun et al., TPAMI 2024): uni-to-multi modal knowledge distillation for bidirectional
LiDAR-camera semantic segmentation, on SemanticKITTI, in plain PyTorch.

A camera+LiDAR student can only use augmentations that keep points and pixels aligned, and a
single front camera sees a small part of a 360-degree scan. U2MKD answers both:

  * a LiDAR-only teacher (the voxel student at twice the width), trained with strong
    augmentation (instance paste, flip, rotation, scaling, translation), distils into
  * a fusion student: the 1.9M voxel student plus a ResNet-18 image branch, with one
    bidirectional fusion block per encoder stage. LiDAR-to-camera splats point features into
    the image stage; camera-to-LiDAR gates the image feature at each point's pixel into the
    point features. Points the camera does not see get an image feature imputed from their
    point feature by a small "learner" MLP, so the student still predicts with no image at all.

Read top to bottom, as the data flows:
    1. The camera for fusion: the whole image, each point's normalised pixel, the field of view
    2. The LiDAR teacher's strong augmentation: the instance database and instance paste
    3. Datasets: the teacher's training scans; a raw scan's student view and teacher view
    4. The image branch: ResNet-18, a ladder decoder, a 2D head
    5. Bidirectional fusion: the multi-scale splat, L2C and C2L fusion, the learner
    6. The fusion student
    7. Uni-to-multi KD and the total loss
    8. One training step on one page: `python u2mkd.py`

It reuses semantickitti.py's and nusc.py's readers, scandata.py's augmentation, and elite.py's
voxel student and losses. Facts follow the official code (isunLt/U2MKD; it covers nuScenes only:
the choices made for SemanticKITTI's single camera are listed in docs/u2mkd.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import elite
import elite_fast
import nusc
import scandata
import semantickitti

# =====================================================================================
# 1. The camera for fusion
# =====================================================================================
# U2MKD feeds the whole camera frame, resized, with no crop, flip or colour jitter. Each point
# carries its pixel as normalised (x, y) in (-1, 1) computed from the ORIGINAL image size, so
# the same coordinates address every resized feature map through grid_sample(align_corners=True).
# The pixel is found on the raw points, before the 3D augmentation moves them.

IMAGE_HW = (376, 1241)  # the paper preset: the whole KITTI frame
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def camera_uv(xyz: np.ndarray, proj: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """xyz (N, 3) raw coordinates -> uv (N, 2) float32 normalised (x along the width, y down),
    and fov (N,) bool: in front of the camera and strictly inside the image. uv is 0 outside."""
    keep, rows_cols = semantickitti.project_points(xyz, proj, height, width)
    uv = np.zeros((len(xyz), 2), dtype=np.float32)
    uv[keep, 0] = rows_cols[:, 1] / (width - 1) * 2 - 1
    uv[keep, 1] = rows_cols[:, 0] / (height - 1) * 2 - 1
    fov = keep & (np.abs(uv) < 1).all(axis=1)
    uv[~fov] = 0
    return uv, fov


def no_camera(n: int, image_hw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n points no camera sees: uv (n, 2) zeros, camera (n,) -1, images (0, 3, H, W)."""
    return np.zeros((n, 2), np.float32), np.full(n, -1), np.zeros((0, 3, *image_hw), dtype=np.float32)


def prepare_full_image(image: np.ndarray, image_hw=IMAGE_HW) -> np.ndarray:
    """(H0, W0, 3) uint8 -> (3, H, W) float32, resized (bilinear) and ImageNet-normalised."""
    from PIL import Image  # Pillow comes with torchvision
    height, width = image_hw
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR), dtype=np.float32)
    normed = (resized / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(normed.transpose(2, 0, 1))


# =====================================================================================
# 2. The LiDAR teacher's strong augmentation: instance paste
# =====================================================================================
# A LiDAR-only teacher may use augmentations a camera-LiDAR student cannot: pasting objects cut
# from other scans would leave them without pixels. The database holds every "thing" instance
# (car .. motorcyclist) with at least 40 points from the training scans, cut once and cached.

THING_CLASSES = (1, 2, 3, 4, 5, 6, 7, 8)  # car, bicycle, motorcycle, truck, other-vehicle, person, bicyclist, motorcyclist
GROUND_CLASSES = (9, 10, 11, 12, 17)     # road, parking, sidewalk, other-ground, terrain
MIN_INSTANCE_POINTS = 40


@dataclass
class InstanceDB:
    points: np.ndarray     # (M, 4) float32: every instance's points, where they were in their scan
    offsets: np.ndarray    # (I + 1,) int64: instance i is points[offsets[i]:offsets[i + 1]]
    classes: np.ndarray    # (I,) int64 training id of each instance
    sequences: list[str]   # the sequences they were cut from
    min_points: int

    def __len__(self):
        return len(self.classes)

    def instance(self, i: int) -> np.ndarray:
        return self.points[self.offsets[i]:self.offsets[i + 1]]


def cut_instances(points: np.ndarray, labels: np.ndarray, instance: np.ndarray,
                  min_points=MIN_INSTANCE_POINTS) -> list[tuple[int, np.ndarray]]:
    """One scan's things: [(training id, (n, 4) points)] for each (class, instance id != 0)
    with at least min_points points inside the voxel range."""
    inside = scandata.in_range(points[:, :3], semantickitti.RANGE_MIN, semantickitti.RANGE_MAX)
    keep = inside & np.isin(labels, THING_CLASSES) & (instance != 0)
    out = []
    pairs, inverse, counts = np.unique(np.stack([labels[keep], instance[keep]], 1), axis=0,
                                       return_inverse=True, return_counts=True)
    pts = points[keep]
    for j, (cls, _) in enumerate(pairs):
        if counts[j] >= min_points:
            out.append((int(cls), pts[inverse.reshape(-1) == j].astype(np.float32)))
    return out


def build_instance_db(root, sequences, min_points=MIN_INSTANCE_POINTS, progress=True) -> InstanceDB:
    from tqdm import tqdm
    found = []
    for scan in tqdm(semantickitti.list_scans(root, sequences), desc="instance database", unit="scan",
                     disable=not progress, dynamic_ncols=True):
        label_file = semantickitti.label_path(scan)
        if not label_file.is_file():
            continue
        points = semantickitti.read_scan(scan)
        semantic, instance = semantickitti.read_labels(label_file, len(points))
        found += cut_instances(points, semantickitti.to_train_ids(semantic, label_file), instance, min_points)
    sizes = [len(p) for _, p in found]
    return InstanceDB(points=np.concatenate([p for _, p in found]) if found else np.zeros((0, 4), np.float32),
                      offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                      classes=np.array([c for c, _ in found], dtype=np.int64),
                      sequences=sorted(sequences), min_points=min_points)


def rotate_z(xy: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return xy @ np.array([[c, s], [-s, c]], dtype=xy.dtype)


def paste_instances(points: np.ndarray, labels: np.ndarray, db: InstanceDB, rng: np.random.Generator,
                    add_num=5, max_points=5000, tries=20) -> tuple[np.ndarray, np.ndarray]:
    """Paste up to add_num database instances onto the scan's ground -> (points, labels) with
    the pasted points appended. The class is drawn by database frequency; the instance goes
    to a random ground point at about its own range, turned about z so the side the LiDAR
    saw still faces the sensor, its lowest point on that ground point. A placement whose
    footprint holds any non-ground point (or an earlier paste) is rejected."""
    ground = np.isin(labels, GROUND_CLASSES)
    if not len(db) or not ground.any():
        return points, labels
    ground_pts = points[ground]
    ground_range = np.linalg.norm(ground_pts[:, :2], axis=1)
    obstacles = points[~ground, :2]
    pasted_pts, pasted_labels, total = [], [], 0
    for _ in range(tries):
        if len(pasted_pts) == add_num or total >= max_points:
            break
        i = int(rng.integers(len(db)))  # uniform over instances = classes by database frequency
        inst = db.instance(i)
        centre = inst[:, :2].mean(0)
        src_range = float(np.linalg.norm(centre))
        near = np.flatnonzero(np.abs(ground_range - src_range) < max(0.1 * src_range, 1.0))
        if not len(near):
            continue
        target = ground_pts[rng.choice(near)]
        turn = math.atan2(target[1], target[0]) - math.atan2(centre[1], centre[0])
        new = inst.copy()
        new[:, :2] = rotate_z(inst[:, :2] - centre, turn) + target[:2]
        new[:, 2] += target[2] - inst[:, 2].min()
        lo, hi = new[:, :2].min(0) - 0.2, new[:, :2].max(0) + 0.2
        if ((obstacles >= lo) & (obstacles <= hi)).all(axis=1).any():
            continue
        pasted_pts.append(new)
        pasted_labels.append(np.full(len(new), db.classes[i], dtype=labels.dtype))
        obstacles = np.concatenate([obstacles, new[:, :2]])
        total += len(new)
    if not pasted_pts:
        return points, labels
    return np.concatenate([points, *pasted_pts]), np.concatenate([labels, *pasted_labels])


# =====================================================================================
# 3. Datasets
# =====================================================================================

class LidarTeacherData(semantickitti.SemanticKITTI):
    """The LiDAR teacher's training scans: instance paste, then flip, rotation, scaling and
    translation (scandata.augment_xyz). Pasted points have index -1 (no row in the file)."""

    def __init__(self, root, sequences, db: InstanceDB | None, seed=0, add_num=5):
        super().__init__(root, sequences, train=True, seed=seed)
        self.db, self.add_num = db, add_num

    def __getitem__(self, i) -> scandata.Scan:
        points, labels, keep = self.as_in_file(i)
        rng = self.rng(i, scandata.Stream.POINTS)
        pts, lab = points[keep].copy(), labels[keep]
        if self.db is not None and self.add_num > 0:
            pts, lab = paste_instances(pts, lab, self.db, rng, self.add_num)
        index = np.concatenate([keep, np.full(len(pts) - len(keep), -1)])
        pts[:, :3] = scandata.augment_xyz(pts[:, :3], rng)
        return scandata.Scan(pts.astype(np.float32), lab, index, len(points), self.scans[i])


def student_rows(dataset, i: int):
    """A scan's raw points (N, 4), labels (N,), in-range rows, and the rows the student keeps
    (point dropout in training), with the scan's 3D random stream."""
    points, labels, in_range = dataset.as_in_file(i)
    rng = dataset.rng(i, scandata.Stream.POINTS)
    keep = in_range[scandata.dropout_points(len(in_range), rng)] if dataset.train and len(in_range) else in_range
    return points, labels, in_range, keep, rng


@dataclass
class PairScan:
    scan: scandata.Scan              # the student's view: dropout, pixels found, then its own augmentation
    images: np.ndarray               # (K, 3, H, W) float32: the scan's cameras (K = 0 when none or all dropped)
    uv: np.ndarray                   # (n, 2) float32 normalised pixel of each student point
    camera: np.ndarray               # (n,) int64: which of the K images sees the point, -1 if none
    teacher: scandata.Scan | None    # the teacher's view of the same raw scan, independently augmented
    sightings: nusc.Sightings | None = None  # nuScenes: every image holding each point (L2C); None: `camera`'s


class PairData(semantickitti.SemanticKITTI):
    """Scans for the fusion student. images=False gives every scan without its image (all
    points imputed); image_drop drops a training scan's image with that probability (the
    single-camera analogue of upstream's camera dropout); teacher_view=True adds the teacher's
    own view of the same in-range raw points, augmented with an independent stream."""

    def __init__(self, root, sequences, train=False, seed=0, image_hw=IMAGE_HW, images=True, image_drop=0.0,
                 teacher_view=False):
        super().__init__(root, sequences, train=train, seed=seed)
        self.image_hw, self.images, self.image_drop, self.teacher_view = tuple(image_hw), images, image_drop, teacher_view
        self.camera = images  # semantickitti.check_datasets checks every scan's image and calibration up front

    def __getitem__(self, i) -> PairScan:
        path = self.scans[i]
        points, labels, in_range, keep, rng = student_rows(self, i)
        pts = points[keep].copy()
        uv, camera, images = no_camera(len(pts), self.image_hw)
        dropped = self.train and self.rng(i, scandata.Stream.CAMERA).random() < self.image_drop
        if self.images and not dropped:
            calib = semantickitti.sequence_calib(path.parent.parent)
            frame = semantickitti.read_frame(path, calib)
            uv, fov = camera_uv(pts[:, :3], calib["proj"], *frame.shape[:2])  # raw coordinates
            camera = np.where(fov, 0, -1)
            images = prepare_full_image(frame, self.image_hw)[None]
        if self.train:
            pts[:, :3] = scandata.augment_xyz(pts[:, :3], rng)  # after the pixels: they stay valid
        teacher = None
        if self.teacher_view:
            t_pts = points[in_range].copy()
            if self.train:
                t_pts[:, :3] = scandata.augment_xyz(t_pts[:, :3], self.rng(i, scandata.Stream.SECOND))
            teacher = scandata.Scan(t_pts, labels[in_range], in_range, len(points), path)
        return PairScan(scandata.Scan(pts, labels[keep], keep, len(points), path), images, uv, camera, teacher)


NUSC_IMAGE_HW = (360, 640)  # nuScenes: 0.4 of the 1600 x 900 frame (upstream im_cr 0.4)
CAMERA_DROP = 3             # nuScenes: cameras dropped per training sample (upstream im_drop)


class NuScenesPairData(nusc.NuScenesScans):
    """Keyframes for the fusion student on nuScenes: all six cameras in evaluation, in training
    `camera_drop` of them dropped at random (upstream im_drop = 3), so about half the points of
    every scan are imputed. Pixels are found in every kept camera on the raw points, before the 3D
    augmentation (nusc.project_keyframe); images=False gives no camera at all. teacher_view adds
    the LiDAR teacher's own view: the same in-range points plus `sweeps` sweeps, augmented with an
    independent stream."""

    def __init__(self, root, version: str, split: str, train=False, seed=0, image_hw=NUSC_IMAGE_HW, images=True,
                 camera_drop=CAMERA_DROP, teacher_view=False, sweeps=0):
        super().__init__(root, version, split, train=train, seed=seed, cameras=images)  # checks its files
        if teacher_view and sweeps:
            nusc.check_files(self.tables, root, self.frames, sweeps)  # and the sweeps the teacher's view reads
        self.image_hw, self.images, self.camera_drop = tuple(image_hw), images, camera_drop
        self.teacher_view, self.teacher_sweeps = teacher_view, sweeps

    def __getitem__(self, i) -> PairScan:
        frame = self.frames[i]
        points, labels, in_range, keep, rng = student_rows(self, i)
        pts = points[keep].copy()
        uv, camera, images = no_camera(len(pts), self.image_hw)
        sightings = None
        if self.images:
            kept = range(len(frame.cameras))
            if self.train and self.camera_drop:
                n = len(frame.cameras)
                kept = sorted(self.rng(i, scandata.Stream.CAMERA).choice(n, n - self.camera_drop, replace=False))
            cameras = [frame.cameras[c] for c in kept]
            sightings = nusc.camera_sightings(self.tables, replace(frame, cameras=cameras), pts[:, :3])
            camera, uv = nusc.last_sighting(sightings, len(pts))
            images = np.stack([prepare_full_image(nusc.read_camera_image(c), self.image_hw) for c in cameras]) \
                if cameras else images
        if self.train:
            pts[:, :3] = scandata.augment_xyz(pts[:, :3], rng)  # after the pixels: they stay valid
        teacher = None
        if self.teacher_view:
            t_pts, t_labels, t_index = points[in_range], labels[in_range], in_range
            if self.teacher_sweeps:
                t_pts, t_labels, t_index = self.add_sweeps(i, t_pts, t_labels, t_index, len(points))
            t_pts = t_pts.copy()
            if self.train:
                t_pts[:, :3] = scandata.augment_xyz(t_pts[:, :3], self.rng(i, scandata.Stream.SECOND))
            teacher = scandata.Scan(t_pts, t_labels, t_index, len(points), frame.points)
        return PairScan(scandata.Scan(pts, labels[keep], keep, len(points), frame.points), images, uv, camera, teacher,
                        sightings)


@dataclass
class Splat:
    """What L2C splats into the images: every (point, image) pair where the image holds the
    point. On nuScenes a point two cameras see is splatted into both (upstream: each camera takes
    all points in its view), while C2L reads one pixel per point, the last camera's."""
    point: torch.Tensor  # (P,) int64 row of the batch's points
    row: torch.Tensor    # (P,) int64 row of the images
    uv: torch.Tensor     # (P, 2) normalised pixel

    @classmethod
    def of_seen(cls, image_of_point: torch.Tensor, uv: torch.Tensor) -> "Splat":
        """One camera per point (SemanticKITTI's single image): the seen points themselves."""
        seen = (image_of_point >= 0).nonzero()[:, 0]
        return cls(seen, image_of_point.index_select(0, seen), uv.index_select(0, seen))

    def to(self, device) -> "Splat":
        return Splat(self.point.to(device), self.row.to(device), self.uv.to(device))


@dataclass
class PairBatch:
    lidar: scandata.Batch              # the student's points, as any student batch
    images: torch.Tensor | None        # (B', 3, H, W) every camera image of the batch (None: none)
    image_of_point: torch.Tensor       # (N,) int64 row of `images` that sees the point, -1 if none
    uv: torch.Tensor                   # (N, 2) normalised pixel (x, y); meaningful where seen
    splat: Splat                       # every (point, image) sighting, for L2C
    teacher: scandata.Batch | None = None       # the teacher's view
    teacher_row: torch.Tensor | None = None  # (N,) row of teacher.points that is the same raw point

    @property
    def fov(self) -> torch.Tensor:
        return self.image_of_point >= 0

    @property
    def paths(self) -> list:
        return self.lidar.paths

    def to(self, device) -> "PairBatch":
        opt = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PairBatch(self.lidar.to(device), opt(self.images), self.image_of_point.to(device),
                         self.uv.to(device), self.splat.to(device), opt(self.teacher), opt(self.teacher_row))


def teacher_rows(student_index: np.ndarray, teacher_index: np.ndarray) -> np.ndarray:
    """Row of the teacher view holding each student point's raw point: through raw-point
    indices, never coordinates, so the two augmentations cannot misalign them."""
    rows = np.searchsorted(teacher_index, student_index)  # teacher_index is ascending
    if (rows >= len(teacher_index)).any() or not np.array_equal(teacher_index[rows], student_index):
        raise ValueError("a student point has no raw point in the teacher's view")
    return rows


def collate_pairs(items: list[PairScan]) -> PairBatch:
    lidar = scandata.collate([it.scan for it in items])
    first = np.cumsum([0] + [len(it.images) for it in items[:-1]])  # each scan's first row of `images`
    all_images = np.concatenate([it.images for it in items])  # (B', 3, H, W)
    images = torch.from_numpy(all_images) if len(all_images) else None
    image_of_point = np.concatenate([np.where(it.camera >= 0, it.camera + f, -1) for it, f in zip(items, first)])
    starts = np.cumsum([0] + [len(it.scan.points) for it in items[:-1]])  # each scan's first point row
    sights = [it.sightings or nusc.Sightings(np.flatnonzero(it.camera >= 0), it.camera[it.camera >= 0],
                                             it.uv[it.camera >= 0]) for it in items]
    splat = Splat(torch.from_numpy(np.concatenate([s.point + o for s, o in zip(sights, starts)]).astype(np.int64)),
                  torch.from_numpy(np.concatenate([s.camera + f for s, f in zip(sights, first)]).astype(np.int64)),
                  torch.from_numpy(np.concatenate([s.uv for s in sights]).astype(np.float32)))
    teacher = teacher_row = None
    if items[0].teacher is not None:
        teacher = scandata.collate([it.teacher for it in items])
        offsets = np.cumsum([0] + [len(it.teacher.points) for it in items[:-1]])
        teacher_row = torch.from_numpy(np.concatenate(
            [teacher_rows(it.scan.index, it.teacher.index) + o for it, o in zip(items, offsets)]))
    return PairBatch(lidar, images, torch.from_numpy(image_of_point.astype(np.int64)),
                     torch.from_numpy(np.concatenate([it.uv for it in items])), splat, teacher, teacher_row)


# =====================================================================================
# 4. The image branch: ResNet-18, SwiftNet's ladder decoder, a 2D head
# =====================================================================================

def bn_relu_conv(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, k, padding=k // 2, bias=False))


class ImageBranch(nn.Module):
    """torchvision's ResNet-18 (built without weights) as four stages at 1/4, 1/8, 1/16, 1/32 of
    the image; a BN-ReLU-1x1 conv 512 -> 128 stands in for SwiftNet's pyramid pooling. The
    ladder decoder adds each stage's lateral map to the upsampled coarser one; the 2D head
    classifies its 1/4-resolution output."""

    channels = (64, 128, 256, 128)  # the image channels each fusion stage sees

    def __init__(self, num_classes=semantickitti.NUM_CLASSES):
        super().__init__()
        import torchvision
        r = torchvision.models.resnet18(weights=None)
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.stages = nn.ModuleList([r.layer1, r.layer2, r.layer3, r.layer4])
        self.reduce = bn_relu_conv(512, 128, 1)
        self.lateral = nn.ModuleList([bn_relu_conv(c, 128, 1) for c in (256, 128, 64)])
        self.blend = nn.ModuleList([bn_relu_conv(128, 128, 3) for _ in range(3)])
        self.head = bn_relu_conv(128, num_classes, 1)

    def stage(self, k: int, x: torch.Tensor) -> torch.Tensor:
        y = self.stages[k](x)
        return self.reduce(y) if k == 3 else y

    def decode(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """The four fused stage maps -> class logits (B', 20, H/4, W/4)."""
        x = skips[3]
        for skip, lateral, blend in zip(skips[2::-1], self.lateral, self.blend):
            side = lateral(skip)
            x = blend(side + F.interpolate(x, size=side.shape[-2:], mode="bilinear", align_corners=False))
        return self.head(x)


# =====================================================================================
# 5. Bidirectional fusion: L2C, C2L and the learner's imputation
# =====================================================================================

def splat_multiscale(feats: torch.Tensor, uv: torch.Tensor, image_row: torch.Tensor, num_images: int,
                     height: int, width: int, num_scales: int) -> torch.Tensor:
    """LiDAR -> camera: the mean feature of the points in each cell of a (h/2^s, w/2^s) grid,
    for s < num_scales, each upsampled to (h, w), averaged. feats (K, C) of the seen points,
    uv (K, 2), image_row (K,) -> (B', C, h, w); empty cells are 0. Coarse grids fill the holes
    a sparse LiDAR leaves in a fine one."""
    out = feats.new_zeros(num_images, feats.shape[1], height, width)
    for s in range(num_scales):
        h, w = coarser(height, s), coarser(width, s)
        col = ((uv[:, 0] + 1) / 2 * (w - 1)).floor().long()
        row = ((uv[:, 1] + 1) / 2 * (h - 1)).floor().long()
        grid = elite.scatter_mean(feats, (image_row * h + row) * w + col, num_images * h * w)  # (B'*h*w, C)
        grid = grid.view(num_images, h, w, -1).permute(0, 3, 1, 2)
        out = out + F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=True)
    return out / num_scales


def coarser(n: int, s: int) -> int:
    """A side of n cells on the 2^s times coarser grid, as upstream: round(n / 2^s + 0.01), the
    0.01 rounding halves up (Python's round alone would round 2.5 to 2)."""
    return round(n / 2 ** s + 0.01)


def sample_image(feats: torch.Tensor, uv: torch.Tensor, image_row: torch.Tensor) -> torch.Tensor:
    """Camera -> point: bilinear samples of (B', C, h, w) maps at each point's pixel -> (K, C)."""
    out = feats.new_zeros(len(uv), feats.shape[1])
    for r in range(len(feats)):
        sel = (image_row == r).nonzero()[:, 0]
        grid = uv.index_select(0, sel).view(1, 1, -1, 2)
        sampled = F.grid_sample(feats[r:r + 1], grid, align_corners=True)[0, :, 0].T  # (K_r, C), float32 under --amp
        out = out.index_put((sel,), sampled.to(out.dtype))
    return out


class L2CFusion(nn.Module):
    """Points into the image: a per-pixel scalar gate sigma(fc3(tanh(fc1(img) + fc2(P)))) on the
    projected splat, then a 1x1 conv over [image, gated splat]. Returns (ReLU(fused), fused):
    the first feeds the next ResNet stage, the second the decoder and the C2L sampling."""

    def __init__(self, ic: int, pc: int):
        super().__init__()
        rc = ic // 4
        self.fc1, self.fc2, self.fc3 = nn.Conv2d(ic, rc, 1), nn.Conv2d(pc, rc, 1), nn.Conv2d(rc, 1, 1)
        self.lift = nn.Sequential(nn.Conv2d(pc, ic, 1), nn.BatchNorm2d(ic), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(2 * ic, ic, 1), nn.BatchNorm2d(ic))

    def forward(self, image: torch.Tensor, splat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.sigmoid(self.fc3(torch.tanh(self.fc1(image) + self.fc2(splat))))  # (B', 1, h, w)
        fused = self.fuse(torch.cat([image, self.lift(splat) * gate], 1))  # (B', ic, h, w)
        return F.relu(fused), fused


class C2LFusion(nn.Module):
    """The image into the points (EPNet's LI-fusion): a per-point scalar gate
    sigma(fc3(tanh(fc1(ReLU(BN(img))) + fc2(pt)))) on the image feature lifted to the point
    width, then Linear-BN-ReLU over [point, gated image]. BatchNorm pools all points of the batch."""

    def __init__(self, ic: int, pc: int):
        super().__init__()
        rc = pc // 4
        self.img_norm = nn.Sequential(nn.BatchNorm1d(ic), nn.ReLU())
        self.fc1, self.fc2, self.fc3 = nn.Linear(ic, rc), nn.Linear(pc, rc), nn.Linear(rc, 1)
        self.lift = nn.Sequential(nn.Linear(ic, pc), nn.BatchNorm1d(pc), nn.ReLU())
        self.fuse = nn.Sequential(nn.Linear(2 * pc, pc), nn.BatchNorm1d(pc), nn.ReLU())

    def forward(self, points: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc3(torch.tanh(self.fc1(self.img_norm(image)) + self.fc2(points))))  # (N, 1)
        return self.fuse(torch.cat([points, self.lift(image) * gate], 1))  # (N, pc)


def learner(pc: int, ic: int) -> nn.Sequential:
    """Imputes a point's image feature from its point feature. It ends in BN without ReLU: it
    mimics the pre-activation fused image feature that seen points sample."""
    return nn.Sequential(nn.Linear(pc, ic), nn.BatchNorm1d(ic), nn.ReLU(), nn.Linear(ic, ic), nn.BatchNorm1d(ic))


# =====================================================================================
# 6. The fusion student
# =====================================================================================

SPLAT_SCALES = (4, 3, 2, 1)  # L2C splats stage k's points onto this many grids, fine to coarse (upstream: 4 - k)


@dataclass
class FusionOutput:
    logits: torch.Tensor               # (N, 20) the 3D prediction of every point
    pixel_logits: torch.Tensor | None  # (K, 20) the 2D head at the seen points; None without images
    imputed_seen: list[torch.Tensor]   # per stage (K, ic): the learner's imputation at the seen points
    image_seen: list[torch.Tensor]     # per stage (K, ic): the real image feature there, detached (its target)
    stage4_feats: torch.Tensor         # (N, 64) stage-4 point features before fusion: what the feature KD reads


class FusionStudent(nn.Module):
    """elite.Student (the LiDAR branch, unchanged) + ImageBranch + per stage k = 1..4 (voxel
    scales 2, 4, 8, 16 with ResNet stages 1/4 .. 1/32): L2C fusion, C2L fusion, a learner.

    At stage k the voxel student's point branch p_k is read at every point; its image feature
    is the fused image map sampled at the point's pixel if the camera sees it, else the
    learner's imputation; C2L fuses the two; the result is averaged back into the stage's
    voxels, where the classifier and the next stage read it. Without images (images=None)
    every point is imputed and the image branch does not run."""

    def __init__(self, cfg: elite.StudentConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or elite.StudentConfig()
        self.lidar = elite.Student(cfg)
        self.image = ImageBranch(cfg.num_classes)
        pc = cfg.hidden
        self.l2c = nn.ModuleList([L2CFusion(ic, pc) for ic in ImageBranch.channels])
        self.c2l = nn.ModuleList([C2LFusion(ic, pc) for ic in ImageBranch.channels])
        self.learners = nn.ModuleList([learner(pc, ic) for ic in ImageBranch.channels])

    def forward(self, points: torch.Tensor, batch_idx: torch.Tensor, images: torch.Tensor | None,
                image_of_point: torch.Tensor, uv: torch.Tensor, splat: Splat | None = None) -> FusionOutput:
        """The voxel student's stages with the camera fused in between, stage by stage: LiDAR
        block -> (image stage -> L2C) -> learner's imputation -> C2L -> the next block. splat:
        what L2C splats (default: each seen point into its one image)."""
        lidar = self.lidar
        seen = (image_of_point >= 0).nonzero()[:, 0] if images is not None else image_of_point.new_zeros(0)
        seen_uv, seen_row = uv.index_select(0, seen), image_of_point.index_select(0, seen)  # (K, 2), (K,)
        splat = splat or Splat.of_seen(image_of_point, uv)
        scales = lidar.voxelize(points, batch_idx)  # the voxels of scales 1, 2, 4, 8, 16 and each block's indices
        x = lidar.input_encoder(points, scales.voxels[0])  # (V1, 64)
        x_im = self.image.stem(images) if images is not None else None
        point_feats, skips, imputed_seen, image_seen = [], [], [], []
        for k, (block, stage) in enumerate(zip(lidar.blocks, scales.stages)):
            p, v_down, _ = block(x, stage)  # the LiDAR block: point branch (V_s, 64) at scale s
            vox = stage.next_voxels
            p_pts = p.index_select(0, vox.inv)  # (N, 64) each point's stage-k point feature
            if k == 3:
                stage4_feats = p_pts
            imputed = self.learners[k](p_pts)  # (N, ic) every point's image feature, imputed
            img_feat = imputed
            if x_im is not None:
                y = self.image.stage(k, x_im)  # the image stage (B', ic, h, w)
                splatted = splat_multiscale(p_pts.index_select(0, splat.point), splat.uv, splat.row, len(y),
                                            *y.shape[-2:], SPLAT_SCALES[k])  # (B', 64, h, w)
                x_im, skip = self.l2c[k](y, splatted)  # L2C: LiDAR features splatted into the images
                skips.append(skip)
                sampled = sample_image(skip, seen_uv, seen_row)  # (K, ic)
                img_feat = imputed.index_put((seen,), sampled)  # seen points: the real image feature
                if len(seen):
                    imputed_seen.append(imputed.index_select(0, seen))
                    image_seen.append(sampled.detach())  # the target: imputation must not move the image side
            fused = self.c2l[k](p_pts, img_feat)  # C2L: (N, 64)
            p = elite.scatter_mean(fused, vox.inv, len(vox), vox.count)  # back into the stage's voxels
            x = p + v_down  # the next block's input
            point_feats.append(p)
        logits = lidar.classify(point_feats, scales.voxels)
        pixel_logits = sample_image(self.image.decode(skips), seen_uv, seen_row) if skips else None
        return FusionOutput(logits, pixel_logits, imputed_seen, image_seen, stage4_feats)


# =====================================================================================
# 7. Uni-to-multi KD and the total loss
# =====================================================================================
# The teacher sees its own augmentation of the same raw scan; its per-point outputs reach the
# student's points through raw-point indices (PairBatch.teacher_row). Two terms:
#   KL(teacher || student) on the per-point logits, temperature 1, 'batchmean' over ALL points;
#   MSE between the student's stage-4 point features through an adapter (Linear-BN-ReLU, 64 ->
#   128) and the teacher's stage-4 point features. The teacher is frozen, in eval mode.

LIDAR_TEACHER_WIDTH = 2  # the teacher is the voxel student at twice the width
W_KL = 1.0
W_FEAT = 1.0


def lidar_teacher(width_multiplier=LIDAR_TEACHER_WIDTH, base: elite.StudentConfig | None = None) -> elite.Student:
    """The voxel student at `width_multiplier` times the width (on `base`'s dataset: classes, grid)."""
    base = base or elite.StudentConfig()
    return elite.Student(replace(base, hidden=base.hidden * width_multiplier))


def kd_adapter(c_student=64, c_teacher=128) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c_student, c_teacher), nn.BatchNorm1d(c_teacher), nn.ReLU())


@torch.no_grad()
def teacher_targets(teacher: elite.Student, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher on its view -> (logits (N, 20), stage-4 point features (N, C_t)) at
    the student's points."""
    t = batch.teacher
    out = teacher(t.points, t.batch_idx)
    feats = out.point_feats[3].index_select(0, out.point_voxels[3].inv)  # (N_t, C_t)
    return out.logits.index_select(0, batch.teacher_row), feats.index_select(0, batch.teacher_row)


def u2mkd_losses(out: FusionOutput, batch: PairBatch, targets=None, adapter: nn.Module | None = None
                 ) -> dict[str, torch.Tensor]:
    """The fusion student's loss by name (their sum is the loss; upstream weights):
        seg3d            CE + Lovasz of the 3D logits (unweighted CE, as upstream)
        seg2d            CE + Lovasz of the 2D head at the seen points
        impute_stage{k}  MSE(learner's imputation, detached image feature) at the seen points, k = 1..4
        kd_logits        W_KL * KL(teacher || student), all points       (with a teacher)
        kd_feature       W_FEAT * MSE(adapter(the student's stage-4 point features), the teacher's)"""
    labels = batch.lidar.labels
    terms = {"seg3d": elite.seg_loss(out.logits, labels, None, lovasz_weight=1.0)}
    if out.pixel_logits is not None and len(out.pixel_logits):
        terms["seg2d"] = elite.seg_loss(out.pixel_logits, labels[batch.fov], None, lovasz_weight=1.0)
    for k, (imputed, target) in enumerate(zip(out.imputed_seen, out.image_seen)):
        terms[f"impute_stage{k + 1}"] = F.mse_loss(imputed, target)
    if targets is not None:
        t_logits, t_feats = targets
        terms["kd_logits"] = W_KL * F.kl_div(F.log_softmax(out.logits, 1), F.softmax(t_logits, 1),
                                             reduction="batchmean")
        terms["kd_feature"] = W_FEAT * F.mse_loss(adapter(out.stage4_feats), t_feats)
    return terms


# =====================================================================================
# 8. One U2MKD training step on one page: python u2mkd.py
# =====================================================================================
# batch (the student's view with its camera, the teacher's own view) -> the LiDAR teacher's
# targets -> the fusion student (L2C, imputation, C2L per stage) -> the losses -> backward ->
# the optimiser step, on one synthetic scan, in elite.py's reference forms, without runs.py.

def one_step_demo(seed=0) -> dict[str, float]:
    import synthkitti
    from pathlib import Path
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    # The batch: the student's points with each one's pixel, the whole frame, the teacher's view.
    points, raw, image, proj = synthkitti.make_frame(seed, columns=512)  # (N, 4), (N,), (376, 1241, 3), (3, 4)
    keep = np.flatnonzero(scandata.in_range(points[:, :3], semantickitti.RANGE_MIN, semantickitti.RANGE_MAX))
    labels = semantickitti.to_train_ids(raw & 0xFFFF)
    uv, fov = camera_uv(points[keep, :3].astype(np.float64), proj, *image.shape[:2])  # before augmentation
    student_pts, teacher_pts = points[keep].copy(), points[keep].copy()
    student_pts[:, :3] = scandata.augment_xyz(student_pts[:, :3], rng)  # each view its own augmentation
    teacher_pts[:, :3] = scandata.augment_xyz(teacher_pts[:, :3], rng)
    scan = lambda pts: scandata.Scan(pts, labels[keep], keep, len(points), Path("synthetic"))  # noqa: E731
    batch = collate_pairs([PairScan(scan(student_pts), prepare_full_image(image, (188, 620))[None], uv,
                                    np.where(fov, 0, -1), scan(teacher_pts))])
    print(f"points {tuple(batch.lidar.points.shape)}, of which the camera sees {int(batch.fov.sum())}; "
          f"image {tuple(batch.images.shape)}; the teacher's view {tuple(batch.teacher.points.shape)}")

    # The networks: the LiDAR teacher (the voxel student at twice the width; trained, in a real
    # run, with instance paste), the fusion student and the adapter of the feature KD.
    teacher, student, adapter = lidar_teacher().eval(), FusionStudent(), kd_adapter()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD(list(student.parameters()) + list(adapter.parameters()), lr=0.01, momentum=0.9)
    targets = teacher_targets(teacher, batch)  # its logits and stage-4 features at the student's points
    print(f"teacher targets: logits {tuple(targets[0].shape)}, stage-4 features {tuple(targets[1].shape)}")

    out = student(batch.lidar.points, batch.lidar.batch_idx, batch.images, batch.image_of_point, batch.uv)
    print(f"fusion student: logits {tuple(out.logits.shape)}, 2D head at the seen points "
          f"{tuple(out.pixel_logits.shape)}, stage-4 features {tuple(out.stage4_feats.shape)}")
    for k, (imputed, real) in enumerate(zip(out.imputed_seen, out.image_seen)):
        print(f"  stage {k + 1}: imputed and real image features at the seen points {tuple(imputed.shape)}")

    terms = u2mkd_losses(out, batch, targets, adapter)
    loss = sum(terms.values())
    for name, value in terms.items():
        print(f"  {name:<14} {value.item():.4g}")
    print(f"  {'loss':<14} {loss.item():.4g}")
    loss.backward()
    optimizer.step()
    frozen = all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    print(f"one optimiser step taken, over the fusion student and the adapter; the teacher unchanged: {frozen}")
    return {name: value.item() for name, value in terms.items()}


if __name__ == "__main__":
    with elite_fast.forms("reference"):  # the forms elite.py defines, nothing from elite_fast.py
        one_step_demo()
