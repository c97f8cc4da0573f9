"""nuScenes-lidarseg in plain numpy, read top to bottom, without the nuScenes devkit.

U2MKD's official code and headline result are on nuScenes. This file reads the official
layout (its tables are plain JSON), maps the 32 fine classes to the 16 of the challenge,
projects a keyframe's LiDAR points into its six cameras, gathers the sweeps around a keyframe,
scores with the devkit's lidarseg rules and writes the submission format:

    1. The tables: v1.0-*/{scene, sample, sample_data, calibrated_sensor, ego_pose, sensor,
       lidarseg, category}.json, indexed by token
    2. Classes: category.json's index and name -> the 16 evaluation classes and ignore (0)
    3. Splits: the official scenes of train / val / test, and v1.0-mini's
    4. Keyframes: a sample's LiDAR file, its labels, its cameras
    5. Files: points (x, y, z, intensity, ring), labels (uint8 per point), images
    6. Projection: LiDAR -> ego -> global -> ego -> camera -> pixel, in normalised coordinates
    7. Sweeps: the LiDAR sweeps around a keyframe, in the keyframe's LiDAR frame
    8. The dataset: keyframes as the voxel student reads them (nuScenes' range and grid)
    9. Evaluation: the devkit's lidarseg confusion matrix
   10. Submission: <lidar_sample_data_token>_lidarseg.bin and submission.json

Facts follow nutonomy/nuscenes-devkit (docs/schema_nuscenes.md, eval/lidarseg) and U2MKD's
loader (u2mkd-code.md section 7.1); deliberate differences are in docs/nuscenes.md.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scandata import (ConfusionMatrix, DataError, Scan, ScanDataset, Stream, augment_xyz, check_point_values,
                      dropout_points, in_range, read_image, spread, usable_rows, whole_records)

# =====================================================================================
# 1. The tables
# =====================================================================================
# Every row has a unique "token"; foreign keys name other rows' tokens. Only the eight
# tables a LiDAR segmenter needs are read.

TABLES = ("scene", "sample", "sample_data", "calibrated_sensor", "ego_pose", "sensor", "lidarseg", "category")
# Upstream's camera order: where two cameras see a point, the later one's pixel is the point's.
CAMERAS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")
LIDAR = "LIDAR_TOP"
IMAGE_SIZE = (900, 1600)  # (height, width) of every nuScenes camera


@dataclass
class Tables:
    version: str
    rows: dict[str, dict[str, dict]]  # table -> token -> row

    def __getitem__(self, table: str) -> dict[str, dict]:
        return self.rows[table]

    def channel(self, sample_data: dict) -> str:
        """The sensor channel (LIDAR_TOP, CAM_FRONT, ...) a sample_data row was recorded by."""
        calib = self.rows["calibrated_sensor"][sample_data["calibrated_sensor_token"]]
        return self.rows["sensor"][calib["sensor_token"]]["channel"]


def read_tables(root, version: str) -> Tables:
    """ROOT/<version>/<table>.json for the eight tables -> Tables; a missing or malformed table
    is a DataError naming the file."""
    folder = Path(root) / version
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (expected ROOT/{version}/*.json, the nuScenes tables)")
    rows = {}
    for table in TABLES:
        path = folder / f"{table}.json"
        if table == "lidarseg" and version.endswith("-test") and not path.is_file():
            rows[table] = {}  # the test release has no labels: lidarseg.json absent (or empty)
            continue
        if not path.is_file():
            raise DataError(f"{path}: table not found (nuScenes-lidarseg needs {', '.join(TABLES)})")
        try:
            records = json.loads(path.read_text())
            rows[table] = {r["token"]: r for r in records}
        except (ValueError, TypeError, KeyError, RecursionError) as e:  # nesting deeper than Python recurses too
            raise DataError(f"{path}: not a table of the nuScenes schema ({type(e).__name__}: {e})") from None
        if len(rows[table]) < len(records):  # a repeated token: the same row twice is harmless, two rows are not
            for r in records:
                if r != rows[table][r["token"]]:
                    raise DataError(f"{path}: token {r['token']} names two different rows; which one holds cannot be "
                                    "told (tables of two releases merged?)")
    tables = Tables(version, rows)
    check_tables(tables, folder)
    return tables


PLAIN_TOKEN = re.compile(r"[0-9A-Za-z_-]+")
# The fields the readers use beside the links, by the type they use them as.
FIELDS = {
    "scene": {"name": str},
    "sample_data": {"filename": str, "is_key_frame": bool, "timestamp": int, "width": int, "height": int},
    "sensor": {"channel": str, "modality": str},
    "lidarseg": {"filename": str},
    "category": {"name": str},
}
KIND_NAMES = {str: "a string", bool: "true or false", int: "an integer"}

# Every token a row names must be a row of the table it points into ("?": or empty, a chain's end).
LINKS = {
    "scene": [("first_sample_token", "sample")],
    "sample": [("next", "sample?"), ("prev", "sample?")],
    "sample_data": [("sample_token", "sample"), ("calibrated_sensor_token", "calibrated_sensor"),
                    ("ego_pose_token", "ego_pose"), ("next", "sample_data?"), ("prev", "sample_data?")],
    "calibrated_sensor": [("sensor_token", "sensor")],
    "lidarseg": [("sample_data_token", "sample_data")],
}


def check_tables(tables: Tables, folder: Path) -> None:
    """The tables' links and geometry, checked once when read, so a bad row is one line naming
    table, row and field, not a traceback or a wrong projection later: every token points to a
    row; poses hold a non-zero quaternion and 3 finite numbers; cameras a finite 3 x 3 intrinsic."""
    def fail(table, token, field, what):
        raise DataError(f"{folder / table}.json: row {token}: '{field}' {what}")

    for table, rows in tables.rows.items():  # tokens name output files (<token>_lidarseg.bin): plain names only
        for token in rows:
            if not PLAIN_TOKEN.fullmatch(str(token)):
                fail(table, repr(token), "token", "holds characters other than letters, digits, '_' and '-' (the "
                     "dataset's are 32 hex digits); a token with '/' or '..' would name a file outside --out")
    for table, fields in FIELDS.items():  # what the readers use of each row, of the type they use it as
        for token, row in tables[table].items():
            for field, kind in fields.items():
                if not isinstance(row.get(field), kind) or (kind is int and isinstance(row.get(field), bool)):
                    fail(table, token, field, f"is {row.get(field)!r}, not {KIND_NAMES[kind]}")
    for table, links in LINKS.items():
        for token, row in tables[table].items():
            for field, target in links:
                value = row.get(field)
                if target.endswith("?") and value in ("", None):
                    continue
                if not isinstance(value, str) or value not in tables[target.rstrip("?")]:
                    fail(table, token, field, f"is {value!r}, not a token of {target.rstrip('?')}.json")
    for table in ("calibrated_sensor", "ego_pose"):
        for token, row in tables[table].items():
            rotation, translation = numbers(row.get("rotation"), 4), numbers(row.get("translation"), 3)
            if rotation is None or not np.linalg.norm(rotation) > 0:
                fail(table, token, "rotation", f"is {row.get('rotation')!r}, not a non-zero quaternion (w, x, y, z)")
            if translation is None:
                fail(table, token, "translation", f"is {row.get('translation')!r}, not 3 finite numbers")
    for token, row in tables["calibrated_sensor"].items():
        if tables["sensor"][row["sensor_token"]].get("modality") != "camera":
            continue
        k = numbers(row.get("camera_intrinsic"), 9)
        if k is None:
            fail("calibrated_sensor", token, "camera_intrinsic",
                 f"is {row.get('camera_intrinsic')!r}, not a camera's 3 x 3 matrix of finite numbers")
        if not (k[0] > 0 and k[4] > 0 and k[8] > 0):  # a sign flipped mirrors the camera
            fail("calibrated_sensor", token, "camera_intrinsic",
                 f"has focal lengths ({k[0]:g}, {k[4]:g}) and scale {k[8]:g}; they must be positive (a negative one "
                 "mirrors the image)")


def numbers(value, count: int) -> np.ndarray | None:
    """value as `count` finite float64 numbers (nested lists flattened), or None."""
    try:
        a = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return None
    return a if a.size == count and np.isfinite(a).all() else None


# =====================================================================================
# 2. Classes: 32 fine classes -> 16 evaluation classes + ignore
# =====================================================================================
# A .bin label holds category.json's `index` of each point's fine class. The challenge maps
# fine names to coarse ones (the devkit's LidarsegClassMapper); the indices are read from
# category.json, never assumed.

CLASS_NAMES = ["ignore", "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
               "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain",
               "manmade", "vegetation"]
NUM_CLASSES = 17  # class 0 is ignored in losses and metrics
IGNORE = 0
FINE_TO_COARSE = {
    "noise": "ignore", "animal": "ignore",
    "human.pedestrian.adult": "pedestrian", "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian", "human.pedestrian.police_officer": "pedestrian",
    "human.pedestrian.personal_mobility": "ignore", "human.pedestrian.stroller": "ignore",
    "human.pedestrian.wheelchair": "ignore",
    "movable_object.barrier": "barrier", "movable_object.trafficcone": "traffic_cone",
    "movable_object.debris": "ignore", "movable_object.pushable_pullable": "ignore",
    "static_object.bicycle_rack": "ignore",
    "vehicle.bicycle": "bicycle", "vehicle.bus.bendy": "bus", "vehicle.bus.rigid": "bus", "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle", "vehicle.motorcycle": "motorcycle",
    "vehicle.trailer": "trailer", "vehicle.truck": "truck",
    "vehicle.emergency.ambulance": "ignore", "vehicle.emergency.police": "ignore", "vehicle.ego": "ignore",
    "flat.driveable_surface": "driveable_surface", "flat.other": "other_flat", "flat.sidewalk": "sidewalk",
    "flat.terrain": "terrain", "static.manmade": "manmade", "static.vegetation": "vegetation",
    "static.other": "ignore",
}
CLASS_COLORS = np.array([  # the devkit's coarse colour map, RGB
    [0, 0, 0], [112, 128, 144], [220, 20, 60], [255, 127, 80], [255, 158, 0], [233, 150, 70], [255, 61, 99],
    [0, 0, 230], [47, 79, 79], [255, 140, 0], [255, 99, 71], [0, 207, 191], [175, 0, 75], [75, 0, 75],
    [112, 180, 60], [222, 184, 135], [0, 175, 0]], dtype=np.uint8)


UNCLAIMED = 255  # in fine_to_coarse's table: an index no category claims (read_labels refuses it)


def fine_to_coarse(tables: Tables) -> np.ndarray:
    """(256,) uint8 lookup: category.json index -> evaluation class 0..16, UNCLAIMED where no
    category has that index. A category name the challenge does not know, or two categories on
    one index, is a DataError."""
    path = f"{tables.version}/category.json"
    lut = np.full(256, UNCLAIMED, dtype=np.uint8)
    claimed: dict[int, str] = {}
    for row in tables["category"].values():
        name, index = row.get("name"), row.get("index")
        if index is None:
            raise DataError(f"{path}: category '{name}' has no 'index' (nuScenes-lidarseg adds it to category.json)")
        if name not in FINE_TO_COARSE:
            raise DataError(f"{path}: category '{name}' is not one of the 32 nuScenes-lidarseg classes")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 256:
            raise DataError(f"{path}: category '{name}' has index {index!r}, not an integer in 0..255 (labels are uint8)")
        if index in claimed:
            raise DataError(f"{path}: categories '{claimed[index]}' and '{name}' both have index {index}")
        claimed[index] = name
        lut[index] = CLASS_NAMES.index(FINE_TO_COARSE[name])
    return lut


# =====================================================================================
# 3. Splits
# =====================================================================================
# The official scene lists (the devkit's utils/splits.py), written as runs of scene numbers.
# v1.0-trainval holds train and val (700 + 150 scenes), v1.0-test the 150 test scenes.

def scene_names(runs: str) -> set[str]:
    names = set()
    for run in runs.split():
        lo, _, hi = run.partition("-")
        names |= {f"scene-{k:04d}" for k in range(int(lo), int(hi or lo) + 1)}
    return names


VAL_SCENES = scene_names(
    "3 12-18 35-36 38-39 92-110 221 268-278 329-332 344-346 519-524 552-565 625-627 629-630 632-638 770-771 775 "
    "777-778 780-784 794-800 802 904-917 919-931 962-963 966-969 971-972 1059-1073")
MINI_SPLITS = {"train": scene_names("61 553 655 757 796 1077 1094 1100"), "val": scene_names("103 916")}


def split_scenes(tables: Tables, split: str) -> list[dict]:
    """The scene rows of an official split, sorted by name: train and val of v1.0-trainval,
    test of v1.0-test, or the mini split's train and val of v1.0-mini (versions named
    otherwise, such as the synthetic scenes', split by VAL_SCENES too)."""
    scenes = sorted(tables["scene"].values(), key=lambda s: s["name"])
    if tables.version.endswith("-mini"):
        return [s for s in scenes if s["name"] in MINI_SPLITS[split]]
    if tables.version.endswith("-test"):
        if split != "test":
            raise DataError(f"{tables.version}: holds the test scenes only; --split {split} needs v1.0-trainval")
        return scenes
    if split == "test":
        raise DataError(f"{tables.version}: the test scenes are in v1.0-test")
    return [s for s in scenes if (s["name"] in VAL_SCENES) == (split == "val")]


# =====================================================================================
# 4. Keyframes
# =====================================================================================

@dataclass
class Camera:
    channel: str
    token: str      # the camera's sample_data token
    image: Path
    hw: tuple[int, int]  # (height, width) as recorded, from sample_data


@dataclass
class Keyframe:
    """One annotated LiDAR sweep (a sample) and the six camera images taken with it."""
    token: str            # the sample's token
    lidar_token: str      # its LIDAR_TOP sample_data token: the name of its submission file
    points: Path          # samples/LIDAR_TOP/*.pcd.bin
    labels: Path | None   # lidarseg/<version>/<lidar_token>_lidarseg.bin (None in v1.0-test)
    cameras: list[Camera]
    scene: str


def keyframes(tables: Tables, root, scenes: list[dict], labelled=True) -> list[Keyframe]:
    """The keyframes of some scenes, in scene order and then time order. labelled: every
    keyframe must have its lidarseg file (a sample without one is a DataError)."""
    root = Path(root)
    by_sample: dict[str, list[dict]] = {}
    for sd in tables["sample_data"].values():
        if sd["is_key_frame"]:
            by_sample.setdefault(sd["sample_token"], []).append(sd)
    label_of = {row["sample_data_token"]: row["filename"] for row in tables["lidarseg"].values()}
    out = []
    for scene in scenes:
        token, seen = scene["first_sample_token"], set()
        while token:
            if token in seen:
                raise DataError(f"{root / tables.version}/sample.json: the samples of scene {scene['name']} loop: "
                                f"'next' leads back to sample {token}")
            seen.add(token)
            sample = tables["sample"][token]
            data = {tables.channel(sd): sd for sd in by_sample.get(token, [])}
            if LIDAR not in data:
                raise DataError(f"{root / tables.version}/sample_data.json: sample {token} has no {LIDAR} keyframe")
            lidar = data[LIDAR]
            labels = label_of.get(lidar["token"])
            if labelled and labels is None:
                raise DataError(f"{root / tables.version}/lidarseg.json: sample {token} (LiDAR {lidar['token']}) has "
                                "no lidarseg file")
            cameras = [Camera(c, data[c]["token"], root / data[c]["filename"], (data[c]["height"], data[c]["width"]))
                       for c in CAMERAS if c in data]
            out.append(Keyframe(token, lidar["token"], root / lidar["filename"],
                                root / labels if labels is not None else None, cameras, scene["name"]))
            token = sample["next"]
    return out


# =====================================================================================
# 5. Files
# =====================================================================================

def read_points(path) -> np.ndarray:
    """samples/LIDAR_TOP/*.pcd.bin: float32 rows (x, y, z, intensity, ring index) -> (N, 5)."""
    whole_records(path, 20, "LiDAR file", "5 float32 per point")
    points = np.fromfile(path, dtype=np.float32).reshape(-1, 5)
    check_point_values(points, path, "float32 (x, y, z, intensity, ring)")
    odd = (points[:, 3] < 0) | (points[:, 4] != np.round(points[:, 4])) | (points[:, 4] < 0)  # shifted columns
    if odd.mean() > 0.01:
        raise DataError(f"{path}: {100 * odd.mean():.0f}% of its points have a negative intensity or a ring index that "
                        "is not a whole number: not nuScenes' rows of 5 float32 (x, y, z, intensity, ring); a "
                        "SemanticKITTI .bin (4 float32 per point) read as a nuScenes scan?")
    return points


def read_labels(path, num_points: int, lut: np.ndarray) -> np.ndarray:
    """lidarseg/*_lidarseg.bin: uint8 fine class per point -> (N,) int64 evaluation classes."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: lidarseg label file not found")
    labels = np.fromfile(path, dtype=np.uint8)
    if len(labels) != num_points:
        raise DataError(f"{path}: {len(labels)} labels but its LiDAR file has {num_points} points")
    unclaimed = np.unique(labels[lut[labels] == UNCLAIMED])
    if len(unclaimed):
        raise DataError(f"{path}: label index {int(unclaimed[0])} ({len(unclaimed)} such) is no category's index in "
                        "category.json: labels and tables of different releases?")
    return lut[labels].astype(np.int64)


def read_camera_image(camera: Camera) -> np.ndarray:
    """A camera's .jpg -> (H, W, 3) uint8 RGB, checked against the size sample_data records."""
    if not camera.image.is_file():
        raise DataError(f"{camera.image}: camera image not found ({camera.channel}, sample_data {camera.token})")
    image = read_image(camera.image)
    if image.shape[:2] != camera.hw:
        raise DataError(f"{camera.image}: a {image.shape[1]}x{image.shape[0]} image, but sample_data records "
                        f"{camera.hw[1]}x{camera.hw[0]}")
    return image


# =====================================================================================
# 6. Projection into the cameras
# =====================================================================================
# A point goes LiDAR -> ego (at the LiDAR's time) -> global -> ego (at the camera's time) ->
# camera, then through the intrinsics. The two ego poses differ because the car moves while
# the cameras fire. Rotations are unit quaternions (w, x, y, z).

def quaternion_matrix(q) -> np.ndarray:
    """(w, x, y, z) -> (3, 3) rotation matrix (normalised first)."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def pose_matrix(row: dict) -> np.ndarray:
    """A calibrated_sensor or ego_pose row -> (4, 4): child frame -> parent frame."""
    m = np.eye(4)
    m[:3, :3] = quaternion_matrix(row["rotation"])
    m[:3, 3] = row["translation"]
    return m


def sensor_to_global(tables: Tables, sample_data_token: str) -> np.ndarray:
    """(4, 4): a sample_data's sensor frame -> global, through the ego pose at its timestamp."""
    sd = tables["sample_data"][sample_data_token]
    return pose_matrix(tables["ego_pose"][sd["ego_pose_token"]]) @ pose_matrix(
        tables["calibrated_sensor"][sd["calibrated_sensor_token"]])


def lidar_to_camera(tables: Tables, lidar_token: str, camera_token: str) -> np.ndarray:
    """(4, 4): the keyframe's LiDAR frame -> the camera frame."""
    return np.linalg.inv(sensor_to_global(tables, camera_token)) @ sensor_to_global(tables, lidar_token)


def project(xyz: np.ndarray, lidar_to_cam: np.ndarray, intrinsic, hw: tuple[int, int]):
    """Raw LiDAR points (N, 3) -> (seen (N,) bool, uv (N, 2) float32) in normalised image
    coordinates against the recorded size: u_n = 2 u / (W - 1) - 1, v_n = 2 v / (H - 1) - 1, the
    frame grid_sample(align_corners=True) reads at any resolution. A point is seen when it lies
    more than 1 m in front of the camera and strictly inside (-1, 1) on both axes (U2MKD)."""
    hom = np.concatenate([xyz.astype(np.float64), np.ones((len(xyz), 1))], 1)  # (N, 4)
    cam = (hom @ lidar_to_cam.T)[:, :3]  # (N, 3) x right, y down, z forward
    depth = cam[:, 2]
    front = depth > 1.0
    pix = cam @ np.asarray(intrinsic, dtype=np.float64).T  # (N, 3)
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v = pix[:, 0] / pix[:, 2], pix[:, 1] / pix[:, 2]
    h, w = hw
    uv = np.stack([2 * u / (w - 1) - 1, 2 * v / (h - 1) - 1], 1)
    seen = front & (np.abs(uv) < 1).all(1)
    return seen, np.where(seen[:, None], uv, 0).astype(np.float32)


def camera_intrinsic(tables: Tables, camera_token: str) -> np.ndarray:
    sd = tables["sample_data"][camera_token]
    return np.asarray(tables["calibrated_sensor"][sd["calibrated_sensor_token"]]["camera_intrinsic"], dtype=np.float64)


@dataclass
class Sightings:
    """Every (point, camera) pair where the camera's image holds the point, camera by camera:
    a point two cameras see is here twice (U2MKD's LiDAR-to-camera splat takes both)."""
    point: np.ndarray   # (P,) int64 row of the points
    camera: np.ndarray  # (P,) int64 index in frame.cameras
    uv: np.ndarray      # (P, 2) float32 normalised pixel in that camera


def camera_sightings(tables: Tables, frame: Keyframe, xyz: np.ndarray) -> Sightings:
    """Every camera of a keyframe at once: the sightings of the raw points (N, 3)."""
    parts = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2), np.float32))]
    for k, cam in enumerate(frame.cameras):
        seen, uv_k = project(xyz, lidar_to_camera(tables, frame.lidar_token, cam.token),
                             camera_intrinsic(tables, cam.token), cam.hw)
        rows = np.flatnonzero(seen)
        parts.append((rows, np.full(len(rows), k, np.int64), uv_k[rows]))
    return Sightings(*(np.concatenate(column) for column in zip(*parts)))


def last_sighting(sightings: Sightings, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The camera whose pixel a point takes (C2L): the last that sees it, as upstream writes the
    cameras in order -> camera (n,) int64 (-1: none) and uv (n, 2) float32."""
    last = np.full(n, -1, dtype=np.int64)  # each point's last sighting (they come camera by camera)
    np.maximum.at(last, sightings.point, np.arange(len(sightings.point)))
    seen = last >= 0
    camera = np.full(n, -1, dtype=np.int64)
    uv = np.zeros((n, 2), dtype=np.float32)
    camera[seen], uv[seen] = sightings.camera[last[seen]], sightings.uv[last[seen]]
    return camera, uv


def project_keyframe(tables: Tables, frame: Keyframe, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every camera of a keyframe -> camera (N,) int64: the index in frame.cameras of the camera
    that sees each point (-1: none; when two do, the last in the list wins, as upstream) and
    uv (N, 2) float32 in that camera's normalised coordinates."""
    return last_sighting(camera_sightings(tables, frame, xyz), len(xyz))


# =====================================================================================
# 7. Sweeps
# =====================================================================================
# Between keyframes the LiDAR records at 20 Hz without labels. U2MKD's LiDAR teacher adds 2
# sweeps before and 2 after (fewer on one side, more on the other at a scene's ends), moved into
# the keyframe's LiDAR frame; their points within 1 m of the sensor (the car itself) go.

def sweep_tokens(tables: Tables, lidar_token: str, count: int) -> list[str]:
    """Up to `count` sweeps around a keyframe: count // 2 before where the scene has them, the
    rest after, nearest first."""
    def walk(key):
        token, out = tables["sample_data"][lidar_token][key], []
        while token and len(out) < count:
            out.append(token)
            token = tables["sample_data"][token][key]
        return out
    before = walk("prev")[:count // 2]
    return before + walk("next")[:count - len(before)]


def read_sweeps(tables: Tables, root, lidar_token: str, count: int) -> np.ndarray:
    """The sweeps' points (M, 4) [x, y, z, intensity] in the keyframe's LiDAR frame."""
    to_key = np.linalg.inv(sensor_to_global(tables, lidar_token))
    parts = [np.zeros((0, 4), dtype=np.float32)]
    for token in sweep_tokens(tables, lidar_token, count):
        pts = read_points(Path(root) / tables["sample_data"][token]["filename"])[:, :4]
        pts = pts[~((np.abs(pts[:, 0]) < 1.0) & (np.abs(pts[:, 1]) < 1.0))]  # the car's own returns
        m = to_key @ sensor_to_global(tables, token)
        xyz = pts[:, :3].astype(np.float64) @ m[:3, :3].T + m[:3, 3]
        parts.append(np.concatenate([xyz.astype(np.float32), pts[:, 3:4]], 1))
    return np.concatenate(parts)


def check_files(tables: Tables, root, frames: list[Keyframe], sweeps=0, cameras=False, samples=16) -> None:
    """Every file a run will read of these keyframes, checked before its first step from the
    sizes alone: each LiDAR file whole, its lidarseg file there with one label per point, the
    sweeps around it (sweeps > 0) whole, its camera images there (cameras); and the points of
    `samples` keyframes spread over the split read (check_point_values). One line naming the
    first bad file, not an error in epoch 2."""
    for frame in frames:
        n = whole_records(frame.points, 20, "LiDAR file", "5 float32 per point")
        if frame.labels is not None:
            if not frame.labels.is_file():
                raise DataError(f"{frame.labels}: lidarseg label file not found")
            labels = frame.labels.stat().st_size  # one uint8 per point
            if labels != n:
                read_points(frame.points)  # a file of float64 values has twice the points: said, if it is the cause
                raise DataError(f"{frame.labels}: {labels} labels but its LiDAR file has {n} points")
        for token in sweep_tokens(tables, frame.lidar_token, sweeps) if sweeps else ():
            whole_records(Path(root) / tables["sample_data"][token]["filename"], 20, "LiDAR sweep", "5 float32 per point")
        for camera in frame.cameras if cameras else ():
            if not camera.image.is_file():
                raise DataError(f"{camera.image}: camera image not found ({camera.channel} of sample {frame.token})")
    for k in spread(len(frames), samples):  # a few read whole: a split written in another element type
        read_points(frames[k].points)


# =====================================================================================
# 8. The dataset: keyframes as the voxel student reads them
# =====================================================================================
# 2DPASS's nuScenes config: the range -50 < x, y < 50, -4 < z < 3 m on a 0.1 m grid, and the
# same augmentation as on SemanticKITTI (point dropout, rotation, flip, scale, translation).

RANGE_MIN, RANGE_MAX, GRID_SHAPE = (-50.0, -50.0, -4.0), (50.0, 50.0, 3.0), (1000, 1000, 70)


class NuScenesScans(ScanDataset):
    """The keyframes of a split as scandata.Scan (x, y, z, intensity; evaluation classes), so the
    voxel student, the loaders and the training loop run on them unchanged. `train` turns on
    dropout and augmentation; sweeps=k adds k unlabelled sweeps (label 0) in the keyframe's frame
    (U2MKD's LiDAR teacher), their rows counted on after the keyframe's own."""

    def __init__(self, root, version: str, split: str, train=False, seed=0, sweeps=0, labelled=True, cameras=False):
        self.root, self.train, self.seed, self.sweeps = Path(root), train, seed, sweeps
        self.tables = read_tables(root, version)
        self.lut = fine_to_coarse(self.tables)
        self.frames = keyframes(self.tables, root, split_scenes(self.tables, split), labelled)
        if not self.frames:
            raise DataError(f"{self.root / version}: no scene of split '{split}'")
        check_files(self.tables, root, self.frames, sweeps, cameras)
        self.scans = [f.points for f in self.frames]  # what progress warnings name
        self.has_labels = [f.labels is not None for f in self.frames]

    def __len__(self):
        return len(self.frames)

    def as_in_file(self, i) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keyframe i as in its file: points (N, 4), labels (N,) and the usable rows (ascending)."""
        frame = self.frames[i]
        points = read_points(frame.points)[:, :4]
        labels = read_labels(frame.labels, len(points), self.lut) if frame.labels else np.zeros(len(points), np.int64)
        return points, labels, usable_rows(points, frame.points, RANGE_MIN, RANGE_MAX)

    def __getitem__(self, i) -> Scan:
        frame = self.frames[i]
        points, labels, keep = self.as_in_file(i)
        rng = self.rng(i, Stream.POINTS)
        if self.train and len(keep):
            keep = keep[dropout_points(len(keep), rng)]
        pts, lab, index = points[keep], labels[keep], keep
        if self.sweeps:
            pts, lab, index = self.add_sweeps(i, pts, lab, index, len(points))
        pts = pts.copy()
        if self.train:
            pts[:, :3] = augment_xyz(pts[:, :3], rng)
        return Scan(pts, lab, index, len(points), frame.points)

    def add_sweeps(self, i, pts, labels, index, num_raw):
        sweep = read_sweeps(self.tables, self.root, self.frames[i].lidar_token, self.sweeps)
        sweep = sweep[in_range(np.nan_to_num(sweep[:, :3]), RANGE_MIN, RANGE_MAX)]
        return (np.concatenate([pts, sweep]), np.concatenate([labels, np.zeros(len(sweep), np.int64)]),
                np.concatenate([index, num_raw + np.arange(len(sweep))]))


# =====================================================================================
# 9. Evaluation: the devkit's lidarseg rules
# =====================================================================================
# One confusion matrix over the split. Row and column 0 (ignore) are
# zeroed, so a point labelled 0 never counts and a prediction of 0 is never a hit or a false
# positive. IoU = tp / (gt + pred - tp); mIoU = the mean over the classes whose union is not
# empty (a class absent from both ground truth and predictions is left out, as nanmean does).

class LidarsegConfusion(ConfusionMatrix):
    """scandata.ConfusionMatrix (rows: prediction, columns: ground truth) with the devkit's rules."""
    num_classes = NUM_CLASSES
    scored_by = "nuScenes-lidarseg rules"  # what the epoch line names

    def counted(self) -> torch.Tensor:
        """The matrix with row and column 0 (ignore) zeroed, in float64: what every score reads."""
        m = self.matrix.clone().double()
        m[IGNORE, :] = 0
        m[:, IGNORE] = 0
        return m

    def iou(self) -> torch.Tensor:
        """(16,) IoU of classes 1..16, NaN where a class has no union."""
        m = self.counted()
        tp = m.diagonal()
        return (tp / (m.sum(0) + m.sum(1) - tp))[1:]  # 0 / 0 = NaN for a class with no union

    def miou(self) -> float:
        iou = self.iou()
        return float(iou.nanmean()) if not iou.isnan().all() else 0.0

    def fw_iou(self) -> float:
        """The devkit's frequency-weighted IoU: each class's IoU weighted by its share of the
        labelled points (sum_c points_c IoU_c / points)."""
        points = self.counted().sum(0)[1:]  # (16,) ground-truth points per class
        return float((points * self.iou().nan_to_num()).sum() / points.sum()) if points.sum() else 0.0

    def table(self) -> str:
        iou, present = self.iou(), self.present()
        lines = [f"{'class':<20} {'IoU':>6}"]
        for c in range(1, self.num_classes):
            value = "   n/a   (no point, not predicted)" if iou[c - 1].isnan() else f"{100 * iou[c - 1]:6.1f}"
            lines.append(f"{CLASS_NAMES[c]:<20} {value}" + ("" if present[c - 1] else "   (no ground-truth points)"))
        lines.append(f"{'mIoU':<20} {100 * self.miou():6.1f}   (nuScenes-lidarseg rules: over the classes with points)")
        lines.append(f"{'fwIoU':<20} {100 * self.fw_iou():6.1f}   (frequency-weighted, as the devkit also reports)")
        return "\n".join(lines)


# =====================================================================================
# 10. Submission
# =====================================================================================
# OUT/lidarseg/<split>/<lidar_sample_data_token>_lidarseg.bin: uint8 class 1..16 per point of
# the keyframe's file, in its order (0 is not allowed); OUT/<split>/submission.json: the inputs.

def submission_labels(pred: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
    """Predictions -> the uint8 array a submission holds. A point predicted 0 (it reached no
    voxel) takes the fallback class (the model's second choice where given, else 1): the format
    allows 1..16 only."""
    pred = np.asarray(pred).astype(np.int64)
    if (pred == 0).any():
        pred = pred.copy()
        pred[pred == 0] = 1 if fallback is None else np.asarray(fallback)[pred == 0]
    if pred.min(initial=1) < 1 or pred.max(initial=1) >= NUM_CLASSES:
        raise ValueError(f"submission classes must be 1..{NUM_CLASSES - 1}")
    return pred.astype(np.uint8)


def submission_meta(use_camera: bool) -> dict:
    return {"meta": {"use_camera": use_camera, "use_lidar": True, "use_radar": False, "use_map": False,
                     "use_external": False}}
