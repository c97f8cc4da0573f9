"""Synthetic scenes in the nuScenes-lidarseg layout: the streets of synthkitti.py, recorded by
a nuScenes-like car, so that nusc.py's reader, projection and evaluation run on files that look
like the real ones (the embedded default of the nuScenes commands, and the tests' data).

The car: a 32-beam LiDAR on the roof (+10 to -30 degrees, its x axis to the right and y
forward, as nuScenes' LIDAR_TOP) and six cameras around it (FRONT, FRONT_RIGHT, BACK_RIGHT,
BACK, BACK_LEFT, FRONT_LEFT) with nuScenes' focal lengths and the 1600 x 900 frame scaled by
--image-scale (0.25: 400 x 225). The car drives along the street at about 8 m/s, weaving (yaw
within +-9 degrees) and rocking (pitch and roll within about 1 degree), so every rotation of the
projection and sweep chains matters; its ego pose is stored per timestamp, and each camera fires
a few milliseconds after the LiDAR, so the two ego poses of the projection chain differ as on the
real car. The LiDAR also returns a few points off the car's own roof, within 1 m of the sensor
(vehicle.ego), which the sweeps' near-point filter removes. Keyframes are 0.5 s apart with two
unlabelled LiDAR sweeps between them. Labels are the 32 fine classes of category.json.

    python synthnusc.py --out data/synthnusc      # 3 + 1 scenes x 4 (2) keyframes, about a minute

Written, as the official devkit (nuscenes-devkit 1.2.0's NuScenes(version, dataroot)) loads it:
    ROOT/v1.0-trainval/{attribute, calibrated_sensor, category, ego_pose, instance, log, map, sample,
                        sample_annotation, sample_data, scene, sensor, visibility, lidarseg}.json
    ROOT/v1.0-test/    the same tables for the test scene, without lidarseg.json (no labels)
    ROOT/maps/<token>.png                   the map's mask (the devkit checks the file is there)
    ROOT/synthnusc.json                     the format of these files (older scenes are written again)
    ROOT/samples/LIDAR_TOP/*.pcd.bin        float32 x, y, z, intensity, ring
    ROOT/sweeps/LIDAR_TOP/*.pcd.bin
    ROOT/samples/CAM_*/*.jpg
    ROOT/lidarseg/v1.0-trainval/<lidar_token>_lidarseg.bin   uint8 category index per point; the
                                            lidarseg row's token is its LiDAR sample_data token
    ROOT/synth_gt/<camera_token>.npy        uint16 (H, W) rendered SemanticKITTI training id per pixel,
                                            an extra of the synthetic scenes (the tests check projection)

The synthetic scenes carry no 3D boxes: instance and sample_annotation are empty tables (as in
the real v1.0-test), attribute and visibility hold the real releases' fixed rows. Scenes
scene-0001 and scene-0002 are training scenes, scene-0003 a validation scene (it is in the
official val list), so the official split rules apply unchanged; scene-0077 is v1.0-test's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from io import BytesIO
from pathlib import Path

import numpy as np

import synthkitti as sk

VERSION, TEST_VERSION = "v1.0-trainval", "v1.0-test"
DEFAULT_SCENES = {"scene-0001": 4, "scene-0002": 4, "scene-0003": 4}  # name -> keyframes
DEFAULT_TEST_SCENES = {"scene-0077": 2}  # v1.0-test: no labels
SWEEPS_BETWEEN = 2           # unlabelled LiDAR sweeps between two keyframes (the real car: 9)
KEYFRAME_DT = 500_000        # us between keyframes (2 Hz)
SPEED = 8.0                  # m/s along the street
LIDAR_BEAMS, LIDAR_ELEVATION = 32, (10.0, -30.0)
LIDAR_MOUNT = (0.94, 0.0, 1.84)  # m, in the ego frame (x forward, y left, z up, on the ground)
CAMERA_FIRE = (12_000, 20_000, 28_000, 36_000, 44_000, 4_000)  # us after the LiDAR, per camera
# channel, yaw of the optical axis from the car's forward axis (deg, left positive), mount in the
# ego frame (m), focal length at 1600 x 900 (px): nuScenes' rig, rounded
CAMERA_RIG = (
    ("CAM_FRONT", 0.0, (1.70, 0.00, 1.51), 1266.0),
    ("CAM_FRONT_RIGHT", -55.0, (1.55, -0.49, 1.50), 1260.0),
    ("CAM_BACK_RIGHT", -110.0, (1.02, -0.48, 1.56), 1257.0),
    ("CAM_BACK", 180.0, (0.03, 0.00, 1.57), 809.0),
    ("CAM_BACK_LEFT", 110.0, (1.04, 0.48, 1.57), 1257.0),
    ("CAM_FRONT_LEFT", 55.0, (1.52, 0.49, 1.51), 1272.0),
)
# The 32 fine classes with their category.json index (nuScenes-lidarseg's).
FINE_CLASSES = [
    "noise", "animal", "human.pedestrian.adult", "human.pedestrian.child", "human.pedestrian.construction_worker",
    "human.pedestrian.personal_mobility", "human.pedestrian.police_officer", "human.pedestrian.stroller",
    "human.pedestrian.wheelchair", "movable_object.barrier", "movable_object.debris",
    "movable_object.pushable_pullable", "movable_object.trafficcone", "static_object.bicycle_rack",
    "vehicle.bicycle", "vehicle.bus.bendy", "vehicle.bus.rigid", "vehicle.car", "vehicle.construction",
    "vehicle.emergency.ambulance", "vehicle.emergency.police", "vehicle.motorcycle", "vehicle.trailer",
    "vehicle.truck", "flat.driveable_surface", "flat.other", "flat.sidewalk", "flat.terrain", "static.manmade",
    "static.other", "static.vegetation", "vehicle.ego",
]
RAW_TO_FINE = {  # synthkitti's raw SemanticKITTI ids -> fine class
    10: "vehicle.car", 11: "vehicle.bicycle", 18: "vehicle.truck", 30: "human.pedestrian.adult",
    40: "flat.driveable_surface", 60: "flat.driveable_surface", 44: "flat.other", 48: "flat.sidewalk",
    50: "static.manmade", 51: "static.manmade", 52: "static.other", 70: "static.vegetation",
    71: "static.vegetation", 72: "flat.terrain", 80: "static.manmade", 81: "static.manmade",
}
RAW_LUT = np.zeros(256, dtype=np.uint8)  # raw id -> category index
for _raw, _fine in RAW_TO_FINE.items():
    RAW_LUT[_raw] = FINE_CLASSES.index(_fine)
NOISE_RATE = 0.005  # points labelled "noise" (index 0), as stray returns are in the real data
EGO_RETURNS = 24  # points per sweep off the car's own roof, 0.4-0.95 m from the sensor (vehicle.ego)
# The tables every version has besides the lidarseg ones (the devkit loads all thirteen).
TABLES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample",
          "sample_annotation", "sample_data", "scene", "sensor", "visibility")
ATTRIBUTES = ("vehicle.moving", "vehicle.stopped", "vehicle.parked", "cycle.with_rider", "cycle.without_rider",
              "pedestrian.sitting_lying_down", "pedestrian.standing", "pedestrian.moving")
VISIBILITY = (("1", "v0-40"), ("2", "v40-60"), ("3", "v60-80"), ("4", "v80-100"))  # token, level


def token(*parts) -> str:
    """A deterministic 32-hex token, as nuScenes' are."""
    return hashlib.md5("/".join(map(str, parts)).encode()).hexdigest()


def yaw_quaternion(yaw: float) -> list[float]:
    """Rotation about z by yaw (rad) as (w, x, y, z)."""
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def ego_rotation(timestamp: int) -> np.ndarray:
    """(3, 3) ego -> world at a timestamp (us): yaw, then pitch, then roll (Rz Ry Rx), each a
    slow sine of the time, so no two timestamps share a rotation."""
    seconds = (timestamp % 600_000_000) / 1e6  # within ten minutes: exact in float64
    yaw = 0.15 * math.sin(2 * math.pi * seconds / 6.0)
    pitch = 0.02 * math.sin(2 * math.pi * seconds / 2.5)
    roll = 0.015 * math.sin(2 * math.pi * seconds / 3.5 + 1.0)
    cz, sz, cy, sy, cx, sx = (math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch), math.cos(roll),
                              math.sin(roll))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


LIDAR_AXES = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # LiDAR -> ego: x right, y forward


def matrix_quaternion(r: np.ndarray) -> list[float]:
    """A (3, 3) rotation -> (w, x, y, z), w >= 0."""
    w = math.sqrt(max(0.0, 1 + r[0, 0] + r[1, 1] + r[2, 2])) / 2
    x = math.copysign(math.sqrt(max(0.0, 1 + r[0, 0] - r[1, 1] - r[2, 2])) / 2, r[2, 1] - r[1, 2])
    y = math.copysign(math.sqrt(max(0.0, 1 - r[0, 0] + r[1, 1] - r[2, 2])) / 2, r[0, 2] - r[2, 0])
    z = math.copysign(math.sqrt(max(0.0, 1 - r[0, 0] - r[1, 1] + r[2, 2])) / 2, r[1, 0] - r[0, 1])
    return [w, x, y, z]


def camera_axes(yaw_deg: float) -> np.ndarray:
    """(3, 3) camera -> ego rotation: camera x right, y down, z along the optical axis."""
    yaw = math.radians(yaw_deg)
    forward = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    return np.stack([right, [0.0, 0.0, -1.0], forward], 1)


def intrinsic(focal: float, scale: float) -> np.ndarray:
    return np.array([[focal * scale, 0, 800 * scale], [0, focal * scale, 450 * scale], [0, 0, 1]])


def camera_rays(yaw_deg: float, k: np.ndarray, height: int, width: int, ego_to_world: np.ndarray) -> sk.RayGrid:
    """The camera's pixel-centre rays in the world frame, the car turned by ego_to_world (3, 3)."""
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    pix = np.stack([u, v, np.ones_like(u)], -1)  # (H, W, 3)
    dirs = pix @ np.linalg.inv(k).T @ (ego_to_world @ camera_axes(yaw_deg)).T  # (H, W, 3) world axes
    return sk.make_ray_grid(dirs / np.linalg.norm(dirs, axis=-1, keepdims=True))


def lidar_rays(columns: int, lidar_to_world: np.ndarray) -> sk.RayGrid:
    """The LiDAR's beams x columns rays (in its own frame: synthkitti's grid) turned into the world."""
    grid = sk.lidar_grid(columns, LIDAR_BEAMS, LIDAR_ELEVATION)
    return sk.make_ray_grid((grid.dirs @ lidar_to_world.T).reshape(LIDAR_BEAMS, columns, 3))


def ego_returns(rng: np.random.Generator) -> np.ndarray:
    """(EGO_RETURNS, 5) points off the car's roof in the LiDAR frame: within 0.4-0.95 m of the
    sensor, 0.35 m below it, on the lowest beam."""
    r, angle = rng.uniform(0.4, 0.95, EGO_RETURNS), rng.uniform(0, 2 * np.pi, EGO_RETURNS)
    return np.stack([r * np.cos(angle), r * np.sin(angle), np.full(EGO_RETURNS, -0.35),
                     np.full(EGO_RETURNS, 0.2), np.full(EGO_RETURNS, LIDAR_BEAMS - 1.0)], 1).astype(np.float32)


def encode_jpg(image: np.ndarray) -> bytes:
    from PIL import Image
    buf = BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


class Writer:
    """Collects the table rows of one version's scenes, then writes its tables once."""

    def __init__(self, root: Path, version: str, image_scale: float, columns: int, rewrite=False):
        self.root, self.version, self.scale, self.columns, self.rewrite = root, version, image_scale, columns, rewrite
        self.labelled = not version.endswith("-test")
        self.height, self.width = round(900 * image_scale), round(1600 * image_scale)
        self.rows = {t: [] for t in TABLES + (("lidarseg",) if self.labelled else ())}
        self.rows["category"] = [{"token": token("category", name), "name": name, "description": name, "index": i}
                                 for i, name in enumerate(FINE_CLASSES)]
        self.rows["attribute"] = [{"token": token("attribute", a), "name": a, "description": a} for a in ATTRIBUTES]
        self.rows["visibility"] = [{"token": t, "level": level, "description": f"visibility of the instance: {level}"}
                                   for t, level in VISIBILITY]
        self.rows["log"] = [{"token": token("log"), "logfile": "synthnusc", "vehicle": "synthetic",
                             "date_captured": "2026-11-30", "location": "synthkitti-street"}]
        self.rows["map"] = [{"token": token("map"), "log_tokens": [token("log")], "category": "semantic_prior",
                             "filename": f"maps/{token('map')}.png"}]
        channels = [("LIDAR_TOP", "lidar")] + [(c[0], "camera") for c in CAMERA_RIG]
        self.rows["sensor"] = [{"token": token("sensor", c), "channel": c, "modality": m} for c, m in channels]
        self.rows["calibrated_sensor"] = [{
            "token": token("calib", "LIDAR_TOP"), "sensor_token": token("sensor", "LIDAR_TOP"),
            "translation": list(LIDAR_MOUNT), "rotation": yaw_quaternion(-math.pi / 2), "camera_intrinsic": []}]
        for channel, yaw, mount, focal in CAMERA_RIG:
            self.rows["calibrated_sensor"].append({
                "token": token("calib", channel), "sensor_token": token("sensor", channel), "translation": list(mount),
                "rotation": matrix_quaternion(camera_axes(yaw)),
                "camera_intrinsic": intrinsic(focal, image_scale).tolist()})
        self.intrinsics = {c[0]: intrinsic(c[3], image_scale) for c in CAMERA_RIG}

    def ego_pose(self, translation: np.ndarray, rotation: np.ndarray, timestamp: int) -> str:
        t = token("ego", timestamp)
        self.rows["ego_pose"].append({"token": t, "translation": [float(v) for v in translation],
                                      "rotation": matrix_quaternion(rotation), "timestamp": timestamp})
        return t

    def write(self, relative: str, data: bytes) -> None:
        if self.rewrite or not (self.root / relative).is_file():
            sk.write_atomic(self.root / relative, data)

    def scene(self, seed: int, number: int, name: str, keyframes: int) -> None:
        """One scene: keyframes with six images and (in a labelled version) labels, sweeps between them."""
        steps = keyframes + (keyframes - 1) * SWEEPS_BETWEEN  # LiDAR sweeps in all, keyframes included
        dt = KEYFRAME_DT // (SWEEPS_BETWEEN + 1)
        t0 = 1_500_000_000_000_000 + number * 100_000_000
        st, static = sk.build_street(seed, number, -sk.MARGIN, SPEED * steps * dt / 1e6 + sk.MARGIN)
        sample_tokens = [token(name, "sample", k) for k in range(keyframes)]
        lidar_tokens = [token(name, "lidar", s) for s in range(steps)]
        for s in range(steps):
            key, k = s % (SWEEPS_BETWEEN + 1) == 0, s // (SWEEPS_BETWEEN + 1)
            stamp = t0 + s * dt
            x_ego = SPEED * (stamp - t0) / 1e6
            world, ego = sk.frame_world(seed, number, st, static, s, x_ego)
            ego[2] = 0.0  # the ego frame sits on the ground
            turn = ego_rotation(stamp)  # ego -> world
            sensor = ego + turn @ np.array(LIDAR_MOUNT)
            lidar_to_world = turn @ LIDAR_AXES
            noise = sk.rng_for(seed, number, 4, s)
            points, raw, rays = sk.lidar_scan(world, st, sensor, lidar_rays(self.columns, lidar_to_world), noise,
                                              with_rays=True)
            xyz = points[:, :3].astype(np.float64) @ lidar_to_world  # world axes -> the LiDAR's
            ring = (rays // self.columns).astype(np.float32)
            own = ego_returns(sk.rng_for(seed, number, 5, s))  # the car's roof, within 1 m
            folder = "samples" if key else "sweeps"
            file = f"{folder}/LIDAR_TOP/{name}__LIDAR_TOP__{stamp}.pcd.bin"
            self.write(file, np.concatenate([np.concatenate([xyz.astype(np.float32), points[:, 3:], ring[:, None]], 1),
                                             own]).tobytes())
            sample = sample_tokens[min(k + (not key), keyframes - 1)]  # a sweep belongs to the next keyframe
            self.rows["sample_data"].append({
                "token": lidar_tokens[s], "sample_token": sample, "ego_pose_token": self.ego_pose(ego, turn, stamp),
                "calibrated_sensor_token": token("calib", "LIDAR_TOP"), "filename": file, "fileformat": "pcd",
                "width": 0, "height": 0, "timestamp": stamp, "is_key_frame": key,
                "prev": lidar_tokens[s - 1] if s else "", "next": lidar_tokens[s + 1] if s + 1 < steps else ""})
            if not key:
                continue
            if self.labelled:
                labels = RAW_LUT[raw & 0xFFFF]
                labels[noise.random(len(labels)) < NOISE_RATE] = 0  # stray returns: "noise"
                labels = np.concatenate([labels, np.full(EGO_RETURNS, FINE_CLASSES.index("vehicle.ego"), np.uint8)])
                label_file = f"lidarseg/{self.version}/{lidar_tokens[s]}_lidarseg.bin"
                self.write(label_file, labels.tobytes())
                self.rows["lidarseg"].append({"token": lidar_tokens[s], "filename": label_file,
                                              "sample_data_token": lidar_tokens[s]})  # as in the real release
            self.rows["sample"].append({"token": sample_tokens[k], "timestamp": stamp, "scene_token": token(name),
                                        "prev": sample_tokens[k - 1] if k else "",
                                        "next": sample_tokens[k + 1] if k + 1 < keyframes else ""})
            for (channel, yaw, mount, _), fire in zip(CAMERA_RIG, CAMERA_FIRE):
                cam_stamp = stamp + fire
                x_cam = SPEED * (cam_stamp - t0) / 1e6  # the car moved on since the LiDAR fired
                ego_cam, turn_cam = np.array([x_cam, ego[1], 0.0]), ego_rotation(cam_stamp)
                origin = ego_cam + turn_cam @ np.array(mount)
                file = f"samples/{channel}/{name}__{channel}__{cam_stamp}.jpg"
                gt_file = f"synth_gt/{token(name, channel, k)}.npy"
                if self.rewrite or not (self.root / file).is_file() or not (self.root / gt_file).is_file():
                    rays = camera_rays(yaw, self.intrinsics[channel], self.height, self.width, turn_cam)
                    image, gt = sk.render_view(world, st, origin, rays, self.height, self.width)
                    self.write(gt_file, sk.encode_npy(gt[0]))  # SemanticKITTI training ids: tests only
                    self.write(file, encode_jpg(image))
                self.rows["sample_data"].append({
                    "token": token(name, channel, k), "sample_token": sample_tokens[k],
                    "ego_pose_token": self.ego_pose(ego_cam, turn_cam, cam_stamp),
                    "calibrated_sensor_token": token("calib", channel), "filename": file, "fileformat": "jpg",
                    "width": self.width, "height": self.height, "timestamp": cam_stamp, "is_key_frame": True,
                    "prev": "", "next": ""})
        self.rows["scene"].append({"token": token(name), "name": name, "description": "a synthetic street",
                                   "log_token": token("log"), "nbr_samples": keyframes,
                                   "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[-1]})

    def finish(self) -> None:
        """The map's mask, then the tables (scene.json last: make_dataset's sign of a complete version)."""
        self.write(self.rows["map"][0]["filename"], map_mask())
        for table in sorted(self.rows, key=lambda t: t == "scene"):
            self.write_table(table, self.rows[table])

    def write_table(self, table: str, rows: list[dict]) -> None:
        sk.write_atomic(self.root / self.version / f"{table}.json", json.dumps(rows, indent=1).encode())


def map_mask() -> bytes:
    """A small semantic-prior mask PNG (8-bit, 255 on the street's band): the devkit's MapMask
    only checks the file is there until a map is drawn."""
    from PIL import Image
    mask = np.zeros((100, 400), dtype=np.uint8)
    mask[40:60] = 255
    buf = BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()


FORMAT = 4  # of the files written here: 4 records the seed, columns and image scale; 3 synthkitti's world 2 (raised verge, per-point remission); 2 turned the car and took the devkit's layout (1: before)
MARKER = "synthnusc.json"  # ROOT/synthnusc.json: {"format": FORMAT, "seed", "columns", "image_scale"}


def complete(root: Path, version: str, scenes: dict) -> bool:
    """A version whose scene.json (written last) names exactly these scenes."""
    path = root / version / "scene.json"
    return path.is_file() and {s["name"] for s in json.loads(path.read_text())} == set(scenes)


def written_here(root: Path) -> int | None:
    """The format of the synthetic scenes in root: MARKER's, 1 for scenes of before the marker
    (their log says synthnusc), None for an empty root; other tables (a real nuScenes) are refused."""
    if (root / MARKER).is_file():
        return read_marker(root).get("format")
    versions = sorted(p for p in root.glob("v1.0-*") if p.is_dir())  # v1.0-mini too: never this script's
    tables = [t for version in versions for t in sorted(version.glob("*.json"))]
    if not tables:
        held = next((p for folder in ("samples", "sweeps", "lidarseg") for p in (root / folder).rglob("*")
                     if p.is_file()), None)
        if held is not None:
            raise refused(f"{root}: holds nuScenes files that synthnusc.py did not write ({held.relative_to(root)}, "
                          "...) and no synthnusc.json: they are never written beside; give another folder")
        return None
    logs = [version / "log.json" for version in versions]
    try:  # scenes of before the marker: only this script's versions, every one's log saying synthnusc
        ours = all(version.name in (VERSION, TEST_VERSION) for version in versions) and all(
            log.is_file() and all(row.get("logfile") == "synthnusc" for row in json.loads(log.read_text()))
            for log in logs)
    except (ValueError, TypeError, AttributeError):
        ours = False
    if ours:
        return 1
    raise refused(f"{root}: holds nuScenes tables that synthnusc.py did not write ({tables[0]}, ...): they are never "
                  "written over; give another folder")


def refused(message: str) -> Exception:
    from scandata import DataError  # here: the scenes themselves need only numpy
    return DataError(message)


def read_marker(root: Path) -> dict:
    try:
        made = json.loads((root / MARKER).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise refused(f"{root / MARKER}: not the JSON this script writes ({e}); delete the folder to remake the "
                         "scenes") from None
    if not isinstance(made, dict):
        raise refused(f"{root / MARKER}: expected a JSON object, got {made!r:.80}; delete the folder to remake the "
                         "scenes")
    return made


def recorded_world(root: Path, seed: int, image_scale: float, columns: int) -> tuple[int, float, int]:
    """The seed, image scale and columns the scenes in root were made with: a run extended or
    started again with others never mixes two worlds in one folder (a note says so)."""
    made = read_marker(root)
    if not (type(made.get("seed")) is int and type(made.get("columns")) is int
            and isinstance(made.get("image_scale"), (int, float)) and not isinstance(made.get("image_scale"), bool)):
        raise refused(f"{root / MARKER}: expected {{\"format\": int, \"seed\": int, \"columns\": int, "
                         f"\"image_scale\": number}}, got {made!r:.80}; delete the folder to remake the scenes")
    if (made["seed"], made["image_scale"], made["columns"]) != (seed, image_scale, columns):
        print(f"note: {root} holds synthetic nuScenes scenes made with seed {made['seed']}, {made['columns']} columns "
              f"and image scale {made['image_scale']}; kept as they are (give another folder for seed {seed}, "
              f"{columns} columns, image scale {image_scale})")
    return made["seed"], float(made["image_scale"]), made["columns"]


def write_marker(root: Path, seed: int, image_scale: float, columns: int) -> None:
    sk.write_atomic(root / MARKER, json.dumps({"format": FORMAT, "seed": seed, "columns": columns,
                                               "image_scale": image_scale}).encode())


def make_dataset(root, scenes=None, seed=0, image_scale=0.25, columns=1024, progress=True,
                 test_scenes=None) -> Path:
    """Write the synthetic nuScenes-lidarseg scenes under root: v1.0-trainval with `scenes`, and
    v1.0-test with `test_scenes` ({} for none). Files already there are kept, the tables
    rewritten; returns root."""
    from tqdm import tqdm
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise refused(f"{root}: an existing file, not a folder; give --out a folder (it is made if missing)")
    versions = {VERSION: DEFAULT_SCENES if scenes is None else scenes,
                TEST_VERSION: DEFAULT_TEST_SCENES if test_scenes is None else test_scenes}
    found = written_here(root)
    stale = found not in (None, FORMAT)  # an older format: every file is written again, the marker last
    if found == FORMAT:
        seed, image_scale, columns = recorded_world(root, seed, image_scale, columns)
    elif found is None:  # first: a run broken off and started again with other flags keeps these
        write_marker(root, seed, image_scale, columns)
    for version, names in versions.items():
        if not names or (complete(root, version, names) and not stale):
            continue
        writer = Writer(root, version, image_scale, columns, rewrite=stale)
        for name, keyframes in tqdm(names.items(), desc=f"synthetic nuScenes scenes ({version})",
                                    disable=not progress):
            writer.scene(seed, int(name.split("-")[1]), name, keyframes)
        writer.finish()
    if stale:
        write_marker(root, seed, image_scale, columns)
    return root


EMBEDDED_ROOT = Path("data/synthnusc")  # where the trainers write the scenes for --dataset nuscenes without --data


def embedded_dataset(seed: int, write=True) -> Path:
    """The scenes the trainers read for --dataset nuscenes without --data (the embedded preset);
    write=False: another process writes them (runs.training_root waits)."""
    print(f"No --data given: using synthetic nuScenes scenes in {EMBEDDED_ROOT} (embedded preset; pass --data "
          "for nuScenes-lidarseg)")
    if write:
        make_dataset(EMBEDDED_ROOT, seed=seed, columns=sk.EMBEDDED_COLUMNS)
    return EMBEDDED_ROOT


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/synthnusc"), help="root folder (default: data/synthnusc)")
    p.add_argument("--seed", type=sk.bounded(int, 0, 2**31 - 1), default=0, help="seed of the streets (default: 0)")
    p.add_argument("--columns", type=sk.bounded(int, 64, 16384), default=1024,
                   help="LiDAR azimuth steps per turn (1024: about 31k points a keyframe, as nuScenes' ~34k)")
    p.add_argument("--image-scale", type=sk.bounded(float, 0.05, 2.0), default=0.25,
                   help="camera images at this fraction of 1600 x 900 (default: 0.25, 400 x 225)")
    args = p.parse_args(argv)
    make_dataset(args.out, seed=args.seed, image_scale=args.image_scale, columns=args.columns)
    print(f"Synthetic nuScenes-lidarseg scenes in {args.out} ({VERSION}, {TEST_VERSION})")


if __name__ == "__main__":
    sk.run_script(main)
