"""SynthKITTI: a small procedural street world, written as SemanticKITTI files.

Real SemanticKITTI needs the KITTI odometry download (tens of GB, behind a
registration form); this file makes a small stand-in that trains on a laptop. It draws a street (road with lane markings, parking strips,
a raised verge of sidewalk and grass, buildings, fences, trees, poles, signs, parked and moving
cars, trucks, people, bicycles), drives a car along it, and at every stop:

    1. casts the 64 beams of a Velodyne HDL-64-like LiDAR into the world,
    2. renders camera 2 with the real KITTI calibration by casting one ray per pixel,
    3. writes both in the exact SemanticKITTI / KITTI odometry layout:

    ROOT/sequences/XX/velodyne/NNNNNN.bin       float32 (x, y, z, remission) rows
    ROOT/sequences/XX/labels/NNNNNN.label       uint32 (instance << 16) | raw class id
    ROOT/sequences/XX/image_2/NNNNNN.png        RGB 1241 x 376
    ROOT/sequences/XX/image_2_gt/NNNNNN.npy     uint16 (2, 376, 1241): training id, instance
    ROOT/sequences/XX/calib.txt, poses.txt, times.txt

Both sensors share one ray caster, so a LiDAR point projected with P2 @ Tr lands on
the pixel that shows the same surface. The world is built from three primitives
(yawed box, vertical cylinder, ellipsoid) plus an analytic ground (plane z = 0 and two
raised verges, kerb to building line).

The premise: the camera sees what the LiDAR cannot. As in real scans, a point's remission is
drawn from a wide distribution per surface, and the ground classes overlap in it; road and
parking lie at one height, sidewalk and grass at another, and which is where changes every
12 m of street (a lawn before the sidewalk or not, a parking strip or a loading lane). Paint,
paving and colour tell them apart. `python synthkitti.py --premise` measures it (docs/method.md). Rays are culled per 8x8 tile of rays against each primitive's
bounding sphere, then intersected exactly. Everything is numpy and deterministic:
the same (seed, sequence, frame) gives byte-identical files.

World frame: the street runs along +x, y points left, z up, the ground is z = 0.
The velodyne frame is the world frame shifted to the sensor (1.73 m above the road).
Simplified on purpose: the car drives straight, a sweep is instantaneous (no motion
distortion), things are boxes, cylinders and ellipsoids, and there are no shadows.

    python synthkitti.py --out data/synthkitti              # 20 scans, well under a minute
"""
from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from pathlib import Path

import numpy as np

# =====================================================================================
# 1. Constants: image size, calibration, classes and materials
# =====================================================================================
IMAGE_WIDTH, IMAGE_HEIGHT = 1241, 376
DEFAULT_SEQUENCES = {"00": 4, "01": 4, "02": 4, "03": 4, "08": 4}  # 16 train + 4 val (08) scans

SENSOR_HEIGHT = 1.73     # m, velodyne above the road, as on the KITTI car
LIDAR_BEAMS = 64
LIDAR_ELEVATION = (2.0, -24.9)  # degrees, top and bottom beam
LIDAR_MAX_RANGE = 80.0   # m
CAMERA_MAX_RANGE = 400.0  # m, far ground still shows up below the horizon
RANGE_NOISE = 0.02       # m, sigma of the Gaussian range error
DROP_RATE = 0.02         # fraction of LiDAR returns lost at random
SIDEWALK_TOP = 0.13      # m, kerb height
BLOCK = 40.0             # m of street drawn from one random stream
MARGIN = 150.0           # m of street built before the first and after the last frame
OBJECT_RANGE = 140.0     # m; farther primitives are not drawn, so no frame depends on MARGIN
TILE = 8                 # rays per tile side for culling

# The real KITTI odometry calibration of sequence 00 (P0..P3, Tr = velodyne -> camera 0).
CALIB_TEXT = """\
P0: 7.188560000000e+02 0.000000000000e+00 6.071928000000e+02 0.000000000000e+00 0.000000000000e+00 7.188560000000e+02 1.852157000000e+02 0.000000000000e+00 0.000000000000e+00 0.000000000000e+00 1.000000000000e+00 0.000000000000e+00
P1: 7.188560000000e+02 0.000000000000e+00 6.071928000000e+02 -3.861448000000e+02 0.000000000000e+00 7.188560000000e+02 1.852157000000e+02 0.000000000000e+00 0.000000000000e+00 0.000000000000e+00 1.000000000000e+00 0.000000000000e+00
P2: 7.188560000000e+02 0.000000000000e+00 6.071928000000e+02 4.538225000000e+01 0.000000000000e+00 7.188560000000e+02 1.852157000000e+02 -1.130887000000e-01 0.000000000000e+00 0.000000000000e+00 1.000000000000e+00 3.779761000000e-03
P3: 7.188560000000e+02 0.000000000000e+00 6.071928000000e+02 -3.372877000000e+02 0.000000000000e+00 7.188560000000e+02 1.852157000000e+02 2.369057000000e+00 0.000000000000e+00 0.000000000000e+00 1.000000000000e+00 4.915215000000e-03
Tr: 4.276802385584e-04 -9.999672484946e-01 -8.084491683471e-03 -1.198459927713e-02 -7.210626507497e-03 8.081198471645e-03 -9.999413164504e-01 -5.403984729748e-02 9.999738645903e-01 4.859485810390e-04 -7.206933692422e-03 -2.921968648686e-01
"""

# SemanticKITTI learning map, restricted to the raw ids this world uses.
RAW_TO_TRAIN = {10: 1, 11: 2, 18: 4, 30: 6, 40: 9, 60: 9, 44: 10, 48: 11, 50: 13, 51: 14,
                52: 0, 70: 15, 71: 16, 72: 17, 80: 18, 81: 19}

MATERIALS = [  # name, raw SemanticKITTI id, base RGB colour, mean LiDAR remission
    ("road",       40, (0.30, 0.30, 0.32), 0.24),
    ("lane",       60, (0.88, 0.88, 0.84), 0.55),
    ("parking",    44, (0.52, 0.40, 0.33), 0.25),  # red-brown paving stones: the camera's cue, not the LiDAR's
    ("sidewalk",   48, (0.62, 0.60, 0.57), 0.27),
    ("terrain",    72, (0.36, 0.50, 0.20), 0.28),
    ("building",   50, (0.72, 0.66, 0.55), 0.25),
    ("fence",      51, (0.52, 0.42, 0.32), 0.30),
    ("vegetation", 70, (0.18, 0.40, 0.14), 0.45),
    ("trunk",      71, (0.35, 0.25, 0.17), 0.30),
    ("pole",       80, (0.55, 0.56, 0.58), 0.35),
    ("sign",       81, (0.10, 0.25, 0.70), 0.90),
    ("car",        10, (0.70, 0.70, 0.72), 0.45),
    ("glass",      10, (0.12, 0.15, 0.19), 0.10),  # car cabins: still class car
    ("truck",      18, (0.85, 0.85, 0.85), 0.45),
    ("person",     30, (0.30, 0.30, 0.40), 0.25),
    ("skin",       30, (0.85, 0.65, 0.50), 0.30),
    ("bicycle",    11, (0.15, 0.15, 0.15), 0.25),
    ("structure",  52, (0.50, 0.52, 0.48), 0.30),  # other-structure: utility cabinets
]
# The premise of the world (docs/method.md, "What the camera adds"): as in real scans, remission is
# drawn per point from wide, overlapping distributions, and the four ground classes lie at two
# heights only (road and parking at 0, sidewalk and terrain on the raised verge), with layouts that
# change along the street; what tells each pair apart is paint, paving and colour, seen by the camera.
REMISSION_SPREAD = 0.08  # sigma of a point's remission around its surface's mean
CAMERA_CLASSES = ("road", "parking", "sidewalk", "terrain")  # classes whose difference is colour and paint
MAT = {name: i for i, (name, *_) in enumerate(MATERIALS)}
MAT_RAW = np.array([m[1] for m in MATERIALS], dtype=np.uint32)
MAT_TRAIN = np.array([RAW_TO_TRAIN[m[1]] for m in MATERIALS], dtype=np.uint16)
MAT_RGB = np.array([m[2] for m in MATERIALS])
MAT_REMISSION = np.array([m[3] for m in MATERIALS])
CAMERA_TRAIN_IDS = tuple(int(MAT_TRAIN[MAT[name]]) for name in CAMERA_CLASSES)  # their training ids

CAR_COLORS = [(0.90, 0.90, 0.90), (0.68, 0.69, 0.71), (0.08, 0.08, 0.10), (0.60, 0.07, 0.07),
              (0.10, 0.20, 0.50), (0.30, 0.32, 0.35), (0.15, 0.33, 0.20), (0.80, 0.70, 0.35)]
BUILDING_COLORS = [(0.75, 0.68, 0.55), (0.58, 0.30, 0.22), (0.68, 0.68, 0.66),
                   (0.86, 0.83, 0.76), (0.50, 0.45, 0.40)]
SIGN_COLORS = [(0.10, 0.25, 0.70), (0.75, 0.10, 0.10), (0.92, 0.92, 0.92), (0.95, 0.75, 0.10)]

BOX, CYLINDER, ELLIPSOID = 0, 1, 2  # primitive kinds, each a unit shape scaled, yawed, moved
MISS, GROUND, SLAB = -1, -2, -3      # hit codes that are not primitives


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """An independent random stream per (seed, sequence, purpose, index)."""
    return np.random.default_rng([seed, *[k + 10_000 for k in keys]])


def calibration() -> tuple[np.ndarray, np.ndarray]:
    """P2 (3, 4) and Tr (4, 4, velodyne -> camera 0) parsed from CALIB_TEXT."""
    rows = {k: np.array(v.split(), dtype=np.float64) for k, v in
            (line.split(":") for line in CALIB_TEXT.splitlines())}
    tr = np.eye(4)
    tr[:3] = rows["Tr"].reshape(3, 4)
    return rows["P2"].reshape(3, 4), tr


# =====================================================================================
# 2. The street: a cross-section profile plus primitives drawn block by block
# =====================================================================================

@dataclass
class Street:
    """Cross-section of the street; arrays are indexed by side (0 = left y > 0, 1 = right)."""
    road_half: float     # road spans |y| < road_half (two lanes)
    curb: np.ndarray     # (2,) |y| where road or parking ends and the sidewalk starts
    walk_out: np.ndarray  # (2,) |y| of the sidewalk's outer edge
    lot: np.ndarray      # (2,) |y| of the raised verge's outer edge (building line)
    layout: int          # seed of the per-segment layouts (verge_layout, strip_is_parking)

    @property
    def ego_y(self) -> float:
        return -self.road_half / 2  # the car drives in the right lane


@dataclass
class Scene:
    """All primitives as parallel arrays, one row each, sorted by kind."""
    kind: np.ndarray       # (P,) BOX, CYLINDER or ELLIPSOID
    center: np.ndarray     # (P, 3) world position of the shape's centre
    half: np.ndarray       # (P, 3) half sizes (box) or radii (cylinder: r, r, half height)
    yaw: np.ndarray        # (P,) rotation about z
    material: np.ndarray   # (P,) index into MATERIALS
    color: np.ndarray      # (P, 3) RGB in 0..1
    remission: np.ndarray  # (P,)
    instance: np.ndarray   # (P,) 0 for stuff, 1, 2, ... for things


def add(parts, kind, center, half, material, instance=0, yaw=0.0, color=None, remission=None):
    """Append one primitive to a list of rows (turned into a Scene by to_scene)."""
    m = MAT[material]
    parts.append((kind, center, half, yaw, m, instance,
                  MAT_RGB[m] if color is None else color,
                  MAT_REMISSION[m] if remission is None else remission))


def to_scene(parts) -> Scene:
    """Rows from add() -> a Scene sorted by kind (cast() relies on kinds being contiguous)."""
    kind, center, half, yaw, material, instance, color, remission = zip(*parts)
    order = np.argsort(np.array(kind), kind="stable")
    arr = lambda rows, dtype=np.float64: np.array(rows, dtype=dtype)[order]
    return Scene(kind=arr(kind, np.int64), center=arr(center), half=arr(half), yaw=arr(yaw),
                 material=arr(material, np.int64), color=arr(color), remission=arr(remission),
                 instance=arr(instance, np.int64))


def street_profile(rng) -> Street:
    """Road 7-9 m wide, parking strips on one or both sides, 2-3.5 m sidewalks, grass."""
    road_half = rng.uniform(3.5, 4.5)
    parking = rng.random(2) < 0.7
    parking[rng.integers(2)] |= not parking.any()  # at least one side has parking
    curb = road_half + np.where(parking, rng.uniform(2.3, 2.7, 2), 0.0)
    walk_out = curb + rng.uniform(2.0, 3.5, 2)
    lot = walk_out + rng.uniform(2.5, 6.0, 2)
    return Street(road_half, curb, walk_out, lot, int(rng.integers(2**31)))


# ---- Layouts that change along the street, so that geometry alone does not tell the class ----
SEGMENT = 12.0  # m of street over which one side keeps one layout


def segment_uniform(st: Street, x, side, salt: int) -> np.ndarray:
    """A uniform number in [0, 1) per (street, side, segment of x, salt): the same for every
    point of a segment, whatever frame or sensor asks.  (R,)"""
    k = np.floor(np.asarray(x, dtype=np.float64) / SEGMENT).astype(np.int64)
    h = (k * 73856093) ^ (np.asarray(side, dtype=np.int64) * 19349663) ^ (st.layout + salt * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF) / 65536.0


def verge_layout(st: Street, x, side) -> tuple[np.ndarray, np.ndarray]:
    """Where the sidewalk lies on the raised verge (kerb to building line), as distances from
    the kerb (start, end): in 40 % of segments a lawn of 1-2.5 m comes first (a tree lawn), else
    the sidewalk starts at the kerb; the rest of the verge is grass.  (R,), (R,)"""
    width = st.walk_out[side] - st.curb[side]
    lawn = np.where(segment_uniform(st, x, side, 1) < 0.4, 1.0 + 1.5 * segment_uniform(st, x, side, 2), 0.0)
    return lawn, lawn + width


def strip_is_parking(st: Street, x, side) -> np.ndarray:
    """Whether the strip between the road and the kerb is parking here (65 % of segments) or a
    lane of road (loading lanes, bus stops): the same asphalt height, other paving.  (R,) bool"""
    has_strip = st.curb[side] > st.road_half
    return has_strip & (segment_uniform(st, x, side, 3) < 0.65)


def add_car(parts, x, y, yaw, inst, rng):
    """Body box on the road plus a smaller glass cabin box, one random paint colour."""
    length, width = rng.uniform(3.9, 4.7), rng.uniform(1.7, 1.9)
    body_h, cab_h = rng.uniform(0.75, 0.9), rng.uniform(0.45, 0.6)
    color, remission = CAR_COLORS[rng.integers(len(CAR_COLORS))], rng.uniform(0.3, 0.6)
    add(parts, BOX, (x, y, 0.2 + body_h / 2), (length / 2, width / 2, body_h / 2), "car", inst, yaw,
        color, remission)  # 0.2 m of ground clearance under the body
    back = -0.08 * length  # cabins sit a little behind the middle
    add(parts, BOX, (x + back * math.cos(yaw), y + back * math.sin(yaw), 0.2 + body_h + cab_h / 2),
        (0.26 * length, 0.45 * width, cab_h / 2), "glass", inst, yaw)


def add_truck(parts, x, y, yaw, inst, rng):
    """Cab box in front of a taller cargo box; (x, y) is the middle of the whole truck."""
    cab_l, cab_h = 2.2, rng.uniform(2.6, 3.0)
    cargo_l, cargo_h = rng.uniform(5, 8), rng.uniform(3.2, 3.8)
    total = cargo_l + cab_l + 0.3
    c, s = math.cos(yaw), math.sin(yaw)
    cab_color, cargo_color = CAR_COLORS[rng.integers(len(CAR_COLORS))], (0.85, 0.85, 0.83)
    for along, length, width, h, z0, color in ((total / 2 - cab_l / 2, cab_l, 2.3, cab_h, 0.4, cab_color),
                                               (cargo_l / 2 - total / 2, cargo_l, 2.5, cargo_h, 0.5, cargo_color)):
        add(parts, BOX, (x + along * c, y + along * s, z0 + h / 2), (length / 2, width / 2, h / 2),
            "truck", inst, yaw, color)


def add_person(parts, x, y, z0, inst, rng):
    """Cylinder body plus an ellipsoid head, standing on z0."""
    r, h = rng.uniform(0.18, 0.24), rng.uniform(1.35, 1.55)
    clothes = tuple(rng.uniform(0.1, 0.7, 3))
    add(parts, CYLINDER, (x, y, z0 + h / 2), (r, r, h / 2), "person", inst, color=clothes)
    add(parts, ELLIPSOID, (x, y, z0 + h + 0.12), (0.1, 0.1, 0.13), "skin", inst)


def add_bicycle(parts, x, y, z0, inst, rng):
    """A thin low box (wheels and frame) and a handlebar, parked along the street."""
    yaw = rng.choice([0.0, math.pi]) + rng.normal(0, 0.05)
    frame_color = tuple(rng.uniform(0.05, 0.6, 3))
    add(parts, BOX, (x, y, z0 + 0.5), (0.85, 0.04, 0.45), "bicycle", inst, yaw, frame_color)
    bar_x, bar_y = x + 0.55 * math.cos(yaw), y + 0.55 * math.sin(yaw)
    add(parts, BOX, (bar_x, bar_y, z0 + 1.0), (0.04, 0.28, 0.03), "bicycle", inst, yaw)


def add_buildings_and_fences(parts, st, side, x0, x1, rng):
    """Buildings 8-25 m long with gaps; fences on the lot line close most gaps and some
    front yards."""
    s, x = (1, -1)[side], x0
    fence_y = s * (st.lot[side] - 0.1)
    while x < x1 - 3:
        if rng.random() < 0.3:  # a gap between buildings
            gap = min(rng.uniform(3, 12), x1 - x)
            if rng.random() < 0.7:
                h = rng.uniform(1.2, 1.8)
                add(parts, BOX, (x + gap / 2, fence_y, h / 2), (gap / 2, 0.04, h / 2), "fence")
            x += gap
            continue
        length = min(rng.uniform(8, 25), x1 - x)
        if rng.random() < 0.3:  # a front-yard fence or a hedge along this building
            h = rng.uniform(1.2, 1.8)
            mid = x + length / 2
            if rng.random() < 0.5:
                add(parts, BOX, (mid, fence_y, h / 2), (length / 2, 0.04, h / 2), "fence")
            else:
                add(parts, ELLIPSOID, (mid, fence_y, h / 3), (length / 2, 0.5, h / 2), "vegetation")
        depth, height = rng.uniform(6, 15), rng.uniform(5, 20)
        y_mid = s * (st.lot[side] + rng.uniform(0, 2) + depth / 2)  # set back 0-2 m from the lot line
        add(parts, BOX, (x + length / 2, y_mid, height / 2), (length / 2, depth / 2, height / 2),
            "building", color=BUILDING_COLORS[rng.integers(len(BUILDING_COLORS))])
        x += length + rng.uniform(0, 1.0)


def add_tree(parts, x, y, z0, rng):
    """A trunk cylinder (reaching into the crown) under an ellipsoid crown."""
    trunk_h, r = rng.uniform(2.0, 3.5), rng.uniform(0.12, 0.25)
    add(parts, CYLINDER, (x, y, z0 + trunk_h / 2 + 0.25), (r, r, trunk_h / 2 + 0.25), "trunk")
    crown = (rng.uniform(1.5, 3.0), rng.uniform(1.5, 3.0), rng.uniform(1.6, 2.8))
    add(parts, ELLIPSOID, (x, y, z0 + trunk_h + 0.6 * crown[2]), crown, "vegetation")


def add_vegetation(parts, st, side, x0, x1, rng):
    """Trees and bushes on the grass strip; on some blocks a row of street trees in the sidewalk."""
    s, grass = (1, -1)[side], (st.walk_out[side], st.lot[side])
    x = x0 + rng.uniform(0, 5)
    while x < x1:
        add_tree(parts, x, s * rng.uniform(grass[0] + 0.8, grass[1] - 0.8), SIDEWALK_TOP, rng)
        x += rng.uniform(5, 10)
    if rng.random() < 0.5:
        for x in np.arange(x0 + rng.uniform(2, 6), x1, rng.uniform(8, 12)):
            add_tree(parts, x, s * (st.curb[side] + 0.9), SIDEWALK_TOP, rng)
    for _ in range(rng.poisson(4)):
        radii = (rng.uniform(0.5, 1.2), rng.uniform(0.5, 1.2), rng.uniform(0.4, 0.9))
        y = s * rng.uniform(grass[0] + 0.5, grass[1] - 0.5)
        add(parts, ELLIPSOID, (rng.uniform(x0, x1), y, SIDEWALK_TOP + 0.5 * radii[2]), radii, "vegetation")


def add_street_furniture(parts, st, side, x0, x1, rng):
    """Lamp poles and sign poles on the kerb side of the sidewalk; utility cabinets."""
    s, y_pole = (1, -1)[side], (1, -1)[side] * (st.curb[side] + 0.35)
    for x in x0 + rng.uniform(0, 20) + np.arange(0, 40, 20):  # a lamp every 20 m
        h, r = rng.uniform(6, 8), rng.uniform(0.08, 0.12)
        add(parts, CYLINDER, (x, y_pole, SIDEWALK_TOP + h / 2), (r, r, h / 2), "pole")
    for _ in range(1 + (rng.random() < 0.5)):  # sign poles with a plate facing traffic
        x, h, z_sign = rng.uniform(x0, x1), rng.uniform(2.8, 3.4), rng.uniform(2.0, 2.6)
        add(parts, CYLINDER, (x, y_pole, SIDEWALK_TOP + h / 2), (0.05, 0.05, h / 2), "pole")
        size = rng.uniform(0.3, 0.4)
        add(parts, BOX, (x - s * 0.08, y_pole, SIDEWALK_TOP + z_sign), (0.03, size, size), "sign",
            color=SIGN_COLORS[rng.integers(len(SIGN_COLORS))])
    if rng.random() < 0.5:  # a utility cabinet on the grass next to the sidewalk
        half = (rng.uniform(0.3, 0.6), rng.uniform(0.25, 0.4), rng.uniform(0.5, 0.7))
        add(parts, BOX, (rng.uniform(x0, x1), s * (st.walk_out[side] + 0.6), SIDEWALK_TOP + half[2]), half,
            "structure")


def add_people_and_vehicles(parts, st, side, x0, x1, rng, ids):
    """Pedestrians and bicycles on the sidewalk; parked cars and trucks in the parking bays."""
    s = (1, -1)[side]
    for _ in range(rng.poisson(2.5)):
        y = s * rng.uniform(st.curb[side] + 0.8, st.walk_out[side] - 0.4)
        add_person(parts, rng.uniform(x0, x1), y, SIDEWALK_TOP, next(ids), rng)
    for _ in range(rng.poisson(1.2)):
        add_bicycle(parts, rng.uniform(x0, x1), s * (st.walk_out[side] - 0.3), SIDEWALK_TOP, next(ids), rng)
    if st.curb[side] > st.road_half:  # a parking strip: 5.5 m bays
        y, x = s * (st.road_half + st.curb[side]) / 2, x0
        while x + 5.5 <= x1:
            u = rng.random()
            if u < 0.04 and x + 11 <= x1 and strip_is_parking(st, x + 5.5, side):
                add_truck(parts, x + 5.5, y, rng.choice([0.0, math.pi]), next(ids), rng)
                x += 11
                continue
            if u < 0.45 and strip_is_parking(st, x + 2.75, side):  # cars park where the strip is parking
                add_car(parts, x + 2.75 + rng.normal(0, 0.2), y + rng.normal(0, 0.1),
                        rng.choice([0.0, math.pi]) + rng.normal(0, 0.03), next(ids), rng)
            x += 5.5


def build_street(seed: int, seq: int, x_lo: float, x_hi: float) -> tuple[Street, Scene]:
    """The static world of one sequence between x_lo and x_hi.

    Each 40 m block has its own random stream, so frame i looks the same however many
    frames the sequence has. Instance ids 1 and 2 are kept for the moving traffic."""
    st = street_profile(rng_for(seed, seq, 0))
    parts, ids = [], itertools.count(3)
    for k in range(math.floor(x_lo / BLOCK), math.ceil(x_hi / BLOCK)):
        rng, x0, x1 = rng_for(seed, seq, 1, k), k * BLOCK, (k + 1) * BLOCK
        for side in (0, 1):
            add_buildings_and_fences(parts, st, side, x0, x1, rng)
            add_vegetation(parts, st, side, x0, x1, rng)
            add_street_furniture(parts, st, side, x0, x1, rng)
            add_people_and_vehicles(parts, st, side, x0, x1, rng, ids)
        for _ in range(rng.poisson(1.2)):  # oncoming traffic in the left lane
            if rng.random() < 0.1:
                add_truck(parts, rng.uniform(x0, x1), st.road_half / 2, math.pi, next(ids), rng)
            else:
                add_car(parts, rng.uniform(x0, x1), st.road_half / 2, math.pi, next(ids), rng)
    return st, to_scene(parts)


def ego_track(seed: int, seq: int, n: int) -> np.ndarray:
    """x of the sensor at each of n frames: 3-5 m apart, starting at 0.  (n,)"""
    steps = rng_for(seed, seq, 2).uniform(3.0, 5.0, max(n - 1, 0))
    return np.concatenate([[0.0], np.cumsum(steps)])[:n]


def moving_traffic(seed: int, seq: int, st: Street, frame: int, x_ego: float) -> list:
    """A car ahead and a truck behind in the ego lane; their gaps breathe over the frames."""
    parts, rng = [], rng_for(seed, seq, 3)  # same stream every frame: same sizes and colours
    phase = rng.uniform(0, 2 * math.pi)
    add_car(parts, x_ego + 14 + 5 * math.sin(0.6 * frame + phase), st.ego_y, 0.0, 1, rng)
    add_truck(parts, x_ego - 17 - 4 * math.cos(0.5 * frame + phase), st.ego_y, 0.0, 2, rng)
    return parts


# =====================================================================================
# 3. Ray casting: one origin, many rays, nearest hit
# =====================================================================================

@dataclass
class RayGrid:
    """Unit ray directions of a sensor and the 8x8 tiles they are culled by."""
    dirs: np.ndarray   # (R, 3) world-frame unit directions (the car never turns)
    dirs32: np.ndarray  # (3, R) the same, float32 and component-major, for the many pairs
    tiles: np.ndarray  # (T, TILE*TILE) ray indices per tile (edges repeat the last ray)
    axis: np.ndarray   # (T, 3) unit mean direction per tile
    angle: np.ndarray  # (T,) largest angle between a tile's axis and its rays


def make_ray_grid(dirs: np.ndarray) -> RayGrid:
    """dirs (H, W, 3) -> RayGrid with tiles of TILE x TILE neighbouring rays."""
    h, w = dirs.shape[:2]
    rows = np.minimum(np.arange(-(-h // TILE) * TILE), h - 1)
    cols = np.minimum(np.arange(-(-w // TILE) * TILE), w - 1)
    idx = rows[:, None] * w + cols[None, :]  # (Hp, Wp)
    tiles = idx.reshape(len(rows) // TILE, TILE, len(cols) // TILE, TILE).transpose(0, 2, 1, 3)
    tiles = tiles.reshape(-1, TILE * TILE)  # (T, 64)
    flat = dirs.reshape(-1, 3)
    axis = flat[tiles].mean(1)
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    cos_min = np.einsum("tkc,tc->tk", flat[tiles], axis).min(1)
    angle = np.arccos(np.clip(cos_min, -1, 1)) + 1e-4  # a hair wider against round-off
    return RayGrid(flat, np.ascontiguousarray(flat.T, np.float32), tiles, axis, angle)


@lru_cache(maxsize=None)
def lidar_grid(columns: int, beams=LIDAR_BEAMS, elevation=LIDAR_ELEVATION) -> RayGrid:
    """`beams` beams (KITTI's 64 by default) x `columns` azimuth steps over 360 degrees, top beam first."""
    elev = np.radians(np.linspace(*elevation, beams))[:, None]  # (B, 1)
    azim = 2 * np.pi * np.arange(columns)[None, :] / columns  # (1, C)
    x, y, z = np.cos(elev) * np.cos(azim), np.cos(elev) * np.sin(azim), np.sin(elev) + 0 * azim
    return make_ray_grid(np.stack([x, y, z], -1))  # (64, C, 3)


@lru_cache(maxsize=None)
def camera_rig() -> tuple[RayGrid, np.ndarray]:
    """Camera 2 rays (pixel centres) and its centre, both in the velodyne frame.

    Tr = [R|t] takes velodyne to camera 0; P2 = K [I|t2] takes camera 0 to pixels, so
    camera 2 sits at -R^T (t + t2) and its axes map to the velodyne frame by R^T."""
    p2, tr = calibration()
    k, (r, t) = p2[:, :3], (tr[:3, :3], tr[:3, 3])
    t2 = np.linalg.solve(k, p2[:, 3])
    u, v = np.meshgrid(np.arange(IMAGE_WIDTH) + 0.5, np.arange(IMAGE_HEIGHT) + 0.5)
    pix = np.stack([u, v, np.ones_like(u)], -1)  # (H, W, 3)
    dirs = pix @ np.linalg.inv(k).T @ r  # (H, W, 3), rows are R^T d
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    return make_ray_grid(dirs), -r.T @ (t + t2)


def cast_street(st: Street, origin, dirs, max_t):
    """Nearest hit on the ground plane z = 0 or the two raised verges (sidewalk and grass,
    kerb to building line).  (R,), (R,)"""
    o, d = origin, dirs
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d[:, 2] < 0, -o[2] / d[:, 2], np.inf)  # ground plane
        what = np.where(t < max_t, GROUND, MISS)
        tz = np.stack([(-1.0 - o[2]) / d[:, 2], (SIDEWALK_TOP - o[2]) / d[:, 2]])  # (2, R)
        for s, lo, hi in ((1, st.curb[0], st.lot[0]), (-1, st.curb[1], st.lot[1])):  # the raised verges
            ty = np.stack([(s * lo - o[1]) / d[:, 1], (s * hi - o[1]) / d[:, 1]])  # (2, R)
            near = np.maximum(ty.min(0), tz.min(0))  # slab test, unbounded along x
            far = np.minimum(ty.max(0), tz.max(0))
            hit = (near <= far) & (near > 0) & (near < t) & (near < max_t)
            t, what = np.where(hit, near, t), np.where(hit, SLAB, what)
    return np.where(what == MISS, np.inf, t), what


def candidate_pairs(scene: Scene, origin, grid: RayGrid, max_t):
    """(ray, primitive) pairs whose tile cone meets the primitive's bounding sphere.

    A sphere at distance D with radius r is seen within asin(r / D) of its centre's
    direction; it can touch a tile whose rays are within `angle` of the tile axis if
    the angle between axis and centre is below the sum (cos(a + b) keeps it separable).
    Pairs come out grouped by primitive, so each kind is one contiguous run."""
    c = scene.center - origin  # (P, 3)
    dist = np.linalg.norm(c, axis=1)
    radius = np.linalg.norm(scene.half, axis=1)  # encloses box, cylinder and ellipsoid
    near = np.flatnonzero(dist - radius < max_t)
    c, dist, radius = c[near], dist[near], radius[near]
    sin_r = np.minimum(radius / dist, 1.0)
    cos_to_center = (c / dist[:, None]) @ grid.axis.T  # (K, T)
    cos_reach = np.sqrt(1 - sin_r**2)[:, None] * np.cos(grid.angle) - sin_r[:, None] * np.sin(grid.angle)
    ok = (cos_to_center >= cos_reach) | (dist <= radius)[:, None]  # (K, T)
    k, tile = np.nonzero(ok)
    rays = grid.tiles[tile].reshape(-1)  # (Q,) ray indices, TILE*TILE per (prim, tile)
    return rays, near, ok.sum(1) * grid.tiles.shape[1]


def unit_frames(scene: Scene, origin):
    """Per primitive, float32 and component-major: the ray origin in its unit-shape frame
    (3, P) and (cos yaw, sin yaw, 1/hx, 1/hy, 1/hz) (5, P) to take directions there.

    x' = diag(1/half) R(-yaw) (x - centre) is affine, so the ray parameter t is the same
    in both frames: a hit on the unit shape at t is the world hit at t."""
    c, s = np.cos(scene.yaw), np.sin(scene.yaw)
    rel = (origin - scene.center).T  # (3, P)
    o = np.stack([c * rel[0] + s * rel[1], c * rel[1] - s * rel[0], rel[2]]) / scene.half.T
    return o.astype(np.float32), np.concatenate([[c, s], 1.0 / scene.half.T]).astype(np.float32)


def unit_rays(maps, d):
    """World directions d (3, Q) into unit frames; maps (5, Q) as from unit_frames."""
    c, s, ix, iy, iz = maps
    return np.stack([(c * d[0] + s * d[1]) * ix, (c * d[1] - s * d[0]) * iy, d[2] * iz])


def hit_unit_box(o, d):
    """Slab test against the cube [-1, 1]^3: entry distance or inf.  o, d (3, Q) -> (Q,)"""
    near, far = np.full(o.shape[1], -np.inf, np.float32), np.full(o.shape[1], np.inf, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis in range(3):
            inv = 1.0 / d[axis]
            t0, t1 = (-1.0 - o[axis]) * inv, (1.0 - o[axis]) * inv
            near, far = np.maximum(near, np.minimum(t0, t1)), np.minimum(far, np.maximum(t0, t1))
    return np.where((near <= far) & (near > 0), near, np.inf)


def hit_unit_cylinder(o, d):
    """Vertical unit cylinder x^2 + y^2 <= 1, |z| <= 1: side or cap, whichever is first."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a = d[0] ** 2 + d[1] ** 2
        b = o[0] * d[0] + o[1] * d[1]
        disc = b * b - a * (o[0] ** 2 + o[1] ** 2 - 1)
        side = (-b - np.sqrt(disc)) / a
        side_ok = (disc >= 0) & (side > 0) & (np.abs(o[2] + side * d[2]) <= 1)
        cap = (-np.sign(d[2]) - o[2]) / d[2]  # the cap facing the ray
        cx, cy = o[0] + cap * d[0], o[1] + cap * d[1]
        cap_ok = (cap > 0) & (cx * cx + cy * cy <= 1)
    return np.minimum(np.where(side_ok, side, np.inf), np.where(cap_ok, cap, np.inf))


def hit_unit_sphere(o, d):
    """Unit sphere (an ellipsoid in its own frame): entry distance or inf."""
    a, b = (d * d).sum(0), (o * d).sum(0)
    disc = b * b - a * ((o * o).sum(0) - 1)
    t = (-b - np.sqrt(np.maximum(disc, 0))) / a
    return np.where((disc >= 0) & (t > 0), t, np.inf)


HIT_UNIT = {BOX: hit_unit_box, CYLINDER: hit_unit_cylinder, ELLIPSOID: hit_unit_sphere}


def cast(scene: Scene, st: Street, origin, grid: RayGrid, max_t):
    """Distance and what was hit for every ray of the grid.  (R,) float32, (R,) int

    what is a primitive index, GROUND, SLAB (the raised verge) or MISS (t = inf)."""
    t, what = cast_street(st, origin, grid.dirs, max_t)
    t = t.astype(np.float32)
    rays, near, counts = candidate_pairs(scene, origin, grid, min(max_t, OBJECT_RANGE))
    o_unit, maps = unit_frames(scene, origin)
    per_pair = lambda v: np.repeat(v[..., near], counts, axis=-1)  # pairs are grouped by primitive
    o, d = per_pair(o_unit), unit_rays(per_pair(maps), grid.dirs32[:, rays])  # (3, Q) each
    t_pair = np.full(len(rays), np.inf, dtype=np.float32)
    bounds = np.cumsum([0] + [counts[scene.kind[near] == k].sum() for k in (BOX, CYLINDER, ELLIPSOID)])
    for kind in (BOX, CYLINDER, ELLIPSOID):  # the scene is sorted by kind, so each is one run
        run = slice(bounds[kind], bounds[kind + 1])
        t_pair[run] = HIT_UNIT[kind](o[:, run], d[:, run])
    prim = np.repeat(near, counts)
    closer = t_pair < np.minimum(t[rays], min(max_t, OBJECT_RANGE))  # beats the street surface
    rays, prim, t_pair = rays[closer], prim[closer], t_pair[closer]
    np.minimum.at(t, rays, t_pair)  # nearest hit per ray
    won = t_pair == t[rays]
    what[rays[won]] = prim[won]
    return t, what


def surface_normals(scene: Scene, origin, dirs, t, what):
    """Unit normal of the surface each ray hit (ground and misses get +z).  (R, 3)"""
    n = np.zeros_like(dirs)
    n[:, 2] = 1.0
    kerb = (what == SLAB) & (origin[2] + dirs[:, 2] * t < SIDEWALK_TOP - 1e-3)  # slab's side face
    n[kerb] = [0, 1, 0] * -np.sign(dirs[kerb, 1:2])
    idx = np.flatnonzero(what >= 0)
    prim = what[idx]
    o_unit, maps = unit_frames(scene, origin)
    q = o_unit[:, prim] + unit_rays(maps[:, prim], dirs[idx].T) * t[idx]  # hit on the unit shape (3, Q)
    kind = scene.kind[prim]
    local = q.copy()  # ellipsoid: the unit-sphere normal is the point itself
    box = np.flatnonzero(kind == BOX)
    face = np.abs(q[:, box]).argmax(0)  # the cube face is the coordinate at +-1
    local[:, box] = 0
    local[face, box] = np.sign(q[face, box])
    cyl = kind == CYLINDER
    on_cap = cyl & (np.abs(q[2]) > np.hypot(q[0], q[1]))
    local[2, cyl & ~on_cap] = 0
    local[:, on_cap] = [[0], [0], [1]] * np.sign(q[2:3, on_cap])
    local *= maps[2:, prim]  # normals transform with the inverse scale ...
    c, s = maps[0, prim], maps[1, prim]  # ... and the forward rotation
    world = np.stack([c * local[0] - s * local[1], s * local[0] + c * local[1], local[2]], 1)
    n[idx] = world / np.linalg.norm(world, axis=1, keepdims=True)
    return n


# =====================================================================================
# 4. Surfaces: what a hit point is made of
# =====================================================================================

def ground_material(st: Street, x, y):
    """Material of the ground at (x, y): road, lane marking, parking, or on the verge (kerb to
    building line) sidewalk or grass by the segment's layout; terrain beyond."""
    a, side = np.abs(y), (y < 0).astype(np.int64)
    mat = np.full(x.shape, MAT["terrain"])
    from_kerb = a - st.curb[side]
    walk_lo, walk_hi = verge_layout(st, x, side)
    on_verge = (from_kerb >= 0) & (a < st.lot[side])
    mat[on_verge & (from_kerb >= walk_lo) & (from_kerb < walk_hi)] = MAT["sidewalk"]
    strip = a < st.curb[side]
    mat[strip] = np.where(strip_is_parking(st, x[strip], side[strip]), MAT["parking"], MAT["road"])
    mat[a < st.road_half] = MAT["road"]
    dashes = (a < 0.08) & (np.mod(x, 9.0) < 3.0)  # 3 m dashes, 6 m gaps on the centre line
    edge = np.abs(a - (st.road_half - 0.25)) < 0.06  # solid edge lines
    mat[dashes | edge] = MAT["lane"]
    return mat


def hit_properties(scene: Scene, st: Street, p, what):
    """Material, colour, mean remission and instance of every hit.  (R,), (R, 3), (R,), (R,)"""
    prim = np.maximum(what, 0)
    is_prim = what >= 0
    mat = np.where(is_prim, scene.material[prim], ground_material(st, p[:, 0], p[:, 1]))
    kerb = (what == SLAB) & (p[:, 2] < SIDEWALK_TOP - 1e-3)  # the verge's side face: the kerb stone
    mat[kerb] = MAT["sidewalk"]
    color = np.where(is_prim[:, None], scene.color[prim], MAT_RGB[mat])
    remission = np.where(is_prim, scene.remission[prim], MAT_REMISSION[mat])
    instance = np.where(is_prim, scene.instance[prim], 0)
    return mat, color, remission, instance


def hash_noise(p, cell):
    """Deterministic value noise in [0, 1): a hash of the lattice cell containing p.  (R,)"""
    i = np.floor(p / cell).astype(np.int64)
    h = (i[:, 0] * 73856093) ^ (i[:, 1] * 19349663) ^ (i[:, 2] * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF) / 65536.0


def texture(mat, p, n):
    """Per-channel brightness factor from the world position of each hit.  (R, 3)"""
    f = np.ones((len(mat), 3))
    grain = hash_noise(p, 0.05)
    patches = hash_noise(p, 1.3)
    is_ = lambda *names: np.isin(mat, [MAT[k] for k in names])
    asphalt = is_("road", "lane", "parking")
    f[asphalt] *= (0.85 + 0.2 * grain[asphalt] + 0.1 * patches[asphalt])[:, None]
    pavers = is_("parking")  # small paving stones with dark joints
    stone_joint = (np.mod(p[:, 0], 0.3) < 0.025) | (np.mod(p[:, 1], 0.2) < 0.025)
    f[pavers] = np.where(stone_joint[pavers], 0.65, 0.9 + 0.15 * hash_noise(p, 0.2)[pavers])[:, None]
    bay_line = is_("parking") & (np.mod(p[:, 0], 5.5) < 0.12)  # white lines between bays
    f[bay_line] = 1.7
    tiles = is_("sidewalk")
    joint = (np.mod(p[:, 0], 0.8) < 0.03) | (np.mod(p[:, 1], 0.8) < 0.03)
    f[tiles] *= np.where(joint[tiles], 0.7, 0.92 + 0.12 * grain[tiles])[:, None]
    grass = is_("terrain")
    f[grass] *= (0.65 + 0.5 * grain[grass] * (0.6 + 0.4 * patches[grass]))[:, None]
    leaves = is_("vegetation")
    f[leaves] *= (0.5 + 0.45 * hash_noise(p, 0.35)[leaves] + 0.35 * hash_noise(p, 0.1)[leaves])[:, None]
    bark = is_("trunk")
    f[bark] *= (0.75 + 0.4 * hash_noise(p * [1, 1, 0.2], 0.04)[bark])[:, None]
    facade = np.where(np.abs(n[:, 0]) > np.abs(n[:, 1]), p[:, 1], p[:, 0])  # along the wall
    window = (is_("building") & (np.abs(n[:, 2]) < 0.5) & (np.mod(facade, 3.0) > 0.9)
              & (np.mod(facade, 3.0) < 2.2) & (np.mod(p[:, 2], 3.2) > 1.0) & (np.mod(p[:, 2], 3.2) < 2.4))
    f[window] = [0.30, 0.36, 0.48]
    slats = is_("fence") & (np.mod(facade, 0.15) < 0.03)
    f[slats] *= 0.6
    return f


# =====================================================================================
# 5. Sensors
# =====================================================================================
SUN = np.array([-0.35, 0.45, 0.82]) / np.linalg.norm([-0.35, 0.45, 0.82])
HORIZON, ZENITH = np.array([0.80, 0.85, 0.92]), np.array([0.35, 0.55, 0.85])


def lidar_scan(scene: Scene, st: Street, sensor, grid: RayGrid, rng, with_rays=False):
    """Points (N, 4) float32 in the velodyne frame and labels (N,) uint32 (with_rays: also the
    ray of each point (N,), whose row in the grid is its beam)."""
    t, what = cast(scene, st, sensor, grid, LIDAR_MAX_RANGE)
    hit = np.flatnonzero(what != MISS)  # rays that hit nothing give no point
    d, t, what = grid.dirs[hit], t[hit], what[hit]
    mat, _, remission, instance = hit_properties(scene, st, sensor + d * t[:, None], what)
    p_lost = np.full(len(t), DROP_RATE)
    p_lost[(t > 50) & (remission < 0.3)] = 0.5  # far, dark surfaces give weak echoes
    p_lost[mat == MAT["glass"]] = 0.5  # windows often return nothing
    keep = rng.random(len(t)) >= p_lost
    xyz = d * (t + rng.normal(0, RANGE_NOISE, len(t)))[:, None]  # sensor at the origin
    remission = np.clip(remission + rng.normal(0, REMISSION_SPREAD, len(t)), 0.0, 0.99)  # overlapping per material
    points = np.concatenate([xyz, remission[:, None]], 1).astype(np.float32)[keep]
    labels = ((instance.astype(np.uint32) << 16) | MAT_RAW[mat])[keep]
    return (points, labels, hit[keep]) if with_rays else (points, labels)


def render_camera(scene: Scene, st: Street, sensor):
    """Camera 2 image (H, W, 3) uint8 and ground truth (2, H, W) uint16 (train id, instance)."""
    grid, centre = camera_rig()
    return render_view(scene, st, sensor + centre, grid, IMAGE_HEIGHT, IMAGE_WIDTH)


def render_view(scene: Scene, st: Street, origin, grid: RayGrid, height: int, width: int):
    """Any pinhole camera at `origin` whose pixel rays are `grid` -> image (H, W, 3) uint8 and
    ground truth (2, H, W) uint16 (train id, instance)."""
    t, what = cast(scene, st, origin, grid, CAMERA_MAX_RANGE)
    hit = np.isfinite(t)
    d = grid.dirs
    p = origin + d * np.where(hit, t, 0)[:, None]
    mat, color, _, instance = hit_properties(scene, st, p, what)
    n = surface_normals(scene, origin, d, np.where(hit, t, 0), what)
    n *= np.where((n * d).sum(1) > 0, -1.0, 1.0)[:, None]  # face the camera
    shade = 0.45 + 0.6 * np.clip(n @ SUN, 0, None)  # ambient + Lambert
    rgb = color * texture(mat, p, n) * shade[:, None]
    fog = np.exp(-np.where(hit, t, 0) / 300.0)[:, None]  # distant things fade to haze
    rgb = rgb * fog + HORIZON * (1 - fog)
    sky = HORIZON + (ZENITH - HORIZON) * np.clip(d[:, 2:3] * 4, 0, 1)
    rgb = np.where(hit[:, None], rgb, sky)
    image = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(height, width, 3)
    gt = np.stack([np.where(hit, MAT_TRAIN[mat], 0), np.where(hit, instance, 0)]).astype(np.uint16)
    return image, gt.reshape(2, height, width)


def frame_world(seed, seq, st, scene, frame, x_ego):
    """The static scene plus this frame's moving traffic, and the sensor position."""
    moving = to_scene(moving_traffic(seed, seq, st, frame, x_ego))
    fields = Scene.__dataclass_fields__
    merged = {f: np.concatenate([getattr(scene, f), getattr(moving, f)]) for f in fields}
    order = np.argsort(merged["kind"], kind="stable")  # keep kinds contiguous for cast()
    sensor = np.array([x_ego, st.ego_y, SENSOR_HEIGHT])
    return Scene(**{f: v[order] for f, v in merged.items()}), sensor


def make_scan(seed=0, columns=2048) -> tuple[np.ndarray, np.ndarray]:
    """One LiDAR scan (frame 0 of sequence 00) without touching disk:
    points (N, 4) float32 and raw labels (N,) uint32 as stored in .label files."""
    st, scene = build_street(seed, 0, -MARGIN, MARGIN)
    world, sensor = frame_world(seed, 0, st, scene, 0, 0.0)
    return lidar_scan(world, st, sensor, lidar_grid(columns), rng_for(seed, 0, 4, 0))


def make_frame(seed=0, columns=2048) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """make_scan's scan with its camera: points (N, 4), raw labels (N,), the camera-2 image
    (H, W, 3) uint8 and proj (3, 4) = P2 @ Tr, which takes a point to its pixel (what
    elite.py's and u2mkd.py's one-step demos read)."""
    st, scene = build_street(seed, 0, -MARGIN, MARGIN)
    world, sensor = frame_world(seed, 0, st, scene, 0, 0.0)
    points, raw = lidar_scan(world, st, sensor, lidar_grid(columns), rng_for(seed, 0, 4, 0))
    image, _ = render_camera(world, st, sensor)
    p2, tr = calibration()
    return points, raw, image, p2 @ tr


# =====================================================================================
# 6. Files: atomic writes in the SemanticKITTI layout
# =====================================================================================

def write_atomic(path: Path, data: bytes):
    """Bytes to a file through the project's one atomic writer (scandata.atomic_write)."""
    import scandata  # here, not at the top: it brings torch, the scenes themselves need only numpy
    scandata.atomic_write(path, lambda f: f.write(data))


def frame_files(seq_dir: Path, i: int) -> dict[str, Path]:
    name = f"{i:06d}"
    return {"velodyne": seq_dir / "velodyne" / f"{name}.bin",
            "labels": seq_dir / "labels" / f"{name}.label",
            "image_2": seq_dir / "image_2" / f"{name}.png",
            "image_2_gt": seq_dir / "image_2_gt" / f"{name}.npy"}


def kitti_poses(xs: np.ndarray) -> str:
    """Camera-0 poses relative to frame 0: Tr @ V_i @ inv(Tr), V_i the velodyne motion."""
    _, tr = calibration()
    lines = []
    for x in xs:
        v = np.eye(4)
        v[0, 3] = x - xs[0]  # the car drives straight along +x
        pose = tr @ v @ np.linalg.inv(tr)
        pose[np.abs(pose) < 1e-12] = 0.0  # drop round-off so the file reads cleanly
        lines.append(" ".join(f"{a:.12e}" for a in pose[:3].reshape(-1)))
    return "\n".join(lines) + "\n"


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image
    buf = BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buf = BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_sequence(root: Path, seed: int, seq: str, n: int, columns: int, bar=None):
    """All files of one sequence; skipped when they are all there already."""
    seq_dir = root / "sequences" / seq
    if n < 1:
        return
    files = [f for i in range(n) for f in frame_files(seq_dir, i).values()]
    files += [seq_dir / "calib.txt", seq_dir / "poses.txt", seq_dir / "times.txt"]
    if all(f.is_file() for f in files):
        if bar is not None:
            bar.update(n)
        return
    for sub in ("velodyne", "labels", "image_2", "image_2_gt"):
        (seq_dir / sub).mkdir(parents=True, exist_ok=True)
    xs = ego_track(seed, int(seq), n)
    st, scene = build_street(seed, int(seq), xs[0] - MARGIN, xs[-1] + MARGIN)
    for i, x in enumerate(xs):
        out = frame_files(seq_dir, i)
        if not all(f.is_file() for f in out.values()):
            world, sensor = frame_world(seed, int(seq), st, scene, i, x)
            noise = rng_for(seed, int(seq), 4, i)  # range noise, remission noise, dropped returns
            points, labels = lidar_scan(world, st, sensor, lidar_grid(columns), noise)
            image, gt = render_camera(world, st, sensor)
            write_atomic(out["velodyne"], points.tobytes())
            write_atomic(out["labels"], labels.astype(np.uint32).tobytes())
            write_atomic(out["image_2"], encode_png(image))
            write_atomic(out["image_2_gt"], encode_npy(gt))
        if bar is not None:
            bar.update(1)
    write_atomic(seq_dir / "calib.txt", CALIB_TEXT.encode())
    write_atomic(seq_dir / "poses.txt", kitti_poses(xs).encode())
    write_atomic(seq_dir / "times.txt", "".join(f"{0.1 * i:.6e}\n" for i in range(n)).encode())


# ---- SAM-PLG's stand-in: the masks a perfect SAM would return ----

def rendered_labels_path(scan_path: Path) -> Path:
    """SynthKITTI's ground-truth pixel labels (real SemanticKITTI has none)."""
    return scan_path.parent.parent / "image_2_gt" / (scan_path.stem + ".npy")


class IdealMaskSource:
    """Stage 1 as a perfect SAM would do it, from SynthKITTI's rendered image_2_gt: one mask
    per distinct (class, instance) region (each object, each stuff class as a whole, the sky),
    predicted IoU 1. The masks tile the image, so painting order does not matter, and what
    stage 2 gets wrong comes from the point labels and the voting alone."""
    name = "ideal"  # what the pseudo-labels' record keeps (semantickitti.PLG_RECORD)

    def inputs(self, scan_path: Path) -> list[Path]:
        """The files a scan's masks are made from, which the pseudo-labels' record fingerprints."""
        return [rendered_labels_path(scan_path)]

    def masks(self, frame) -> tuple[np.ndarray, np.ndarray]:
        """frame: a semantickitti.PlgFrame -> masks (M, H, W) bool, predicted IoU (M,)."""
        from semantickitti import read_pixel_labels  # here: the scenes themselves need only numpy
        height, width = frame.image.shape[:2]
        gt = read_pixel_labels(rendered_labels_path(frame.scan_path), height, width)
        key = (gt[0].astype(np.int64) << 16 | gt[1]).ravel()  # (H*W,) one id per region
        regions, region_of_pixel = np.unique(key, return_inverse=True)
        masks = region_of_pixel.reshape(height, width)[None] == np.arange(len(regions))[:, None, None]
        return masks, np.ones(len(regions), dtype=np.float32)


def make_dataset(root, sequences=DEFAULT_SEQUENCES, columns=1024, seed=0, progress=True) -> Path:
    """Write a SynthKITTI dataset under root; sequences maps "XX" -> number of scans.

    Each sequence is its own street drawn from (seed, sequence id); its frames are the
    car's positions 3-5 m apart along it. Complete sequences are skipped, so a second
    call is instant and an interrupted one resumes, with the seed and columns root records."""
    from tqdm import tqdm
    root = Path(root)
    if root.exists() and not root.is_dir():
        from scandata import DataError
        raise DataError(f"{root}: an existing file, not a folder; give --out a folder (it is made if missing)")
    seed, columns = world_of(root, seed, columns)
    with tqdm(total=sum(sequences.values()), desc="synthkitti", unit="scan", disable=not progress) as bar:
        for seq, n in sequences.items():
            write_sequence(root, seed, seq, n, columns, bar)
    return root


EMBEDDED_ROOT = Path("data/synthkitti")  # where the trainers write the scenes when no --data is given
EMBEDDED_COLUMNS = 512  # LiDAR azimuth steps of the embedded scenes (about 30k points a scan)


def embedded_dataset(seed: int, write=True) -> Path:
    """The scenes the trainers read without --data (the embedded preset), in the real layout
    under EMBEDDED_ROOT; write=False: another process writes them (runs.training_root waits)."""
    print(f"No --data given: using synthetic scenes in {EMBEDDED_ROOT} (embedded preset; pass --data for "
          "SemanticKITTI)")
    if write:
        make_dataset(EMBEDDED_ROOT, columns=EMBEDDED_COLUMNS, seed=seed)
    return EMBEDDED_ROOT


MARKER = "synthkitti.json"  # ROOT/synthkitti.json: the world, seed and columns the files are made with
WORLD = 2  # the world's version: 2 raised the grass to the verge, varied layouts, per-point remission (1: before)


def world_of(root: Path, seed: int, columns: int) -> tuple[int, int]:
    """The seed and columns of the scenes in root: those it records, so that a run resumed or
    extended with another --seed never mixes two streets in one sequence (a note says so);
    else these, recorded before the first file is written."""
    import json
    marker = root / MARKER
    if marker.is_file():
        from scandata import DataError  # here: the scenes themselves need only numpy
        try:
            made = json.loads(marker.read_text(encoding="utf-8-sig"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{marker}: not the JSON this script writes ({e}); delete the folder to remake the scenes") \
                from None
        if not (isinstance(made, dict) and all(type(made.get(k, 1)) is int for k in ("world", "seed", "columns"))
                and "seed" in made and "columns" in made):
            raise DataError(f"{marker}: expected {{\"world\": int, \"seed\": int, \"columns\": int}}, got {made!r:.80}; "
                            "delete the folder to remake the scenes")
        if made.get("world", 1) != WORLD:
            raise DataError(f"{root}: holds synthetic scenes of an older world (version {made.get('world', 1)}; this "
                            f"code draws version {WORLD}); delete the folder to remake them, or give another one")
        if (made["seed"], made["columns"]) != (seed, columns):
            print(f"note: {root} holds synthetic scenes made with seed {made['seed']} and {made['columns']} "
                  f"columns; kept as they are (give another folder for seed {seed}, {columns} columns)")
        return made["seed"], made["columns"]
    held = next((p for p in (root / "sequences").rglob("*") if p.is_file()), None)  # stops at the first file
    if held is not None:
        from scandata import DataError
        raise DataError(f"{root}: holds files in sequences/ ({held.relative_to(root)}, ...) but no {MARKER}: a real "
                        "dataset (also one whose scans are still downloading), or synthetic scenes of an older world; "
                        "nothing is written there: give another --out (only if it holds old synthetic scenes, delete "
                        "it to remake them)")
    write_atomic(marker, json.dumps({"world": WORLD, "seed": seed, "columns": columns}).encode())
    return seed, columns


# ---- The premise, measured: what height and remission tell of the ground classes, against colour ----

def ground_points(root: Path, sequences) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The camera-visible points of the CAMERA_CLASSES in these sequences: LiDAR features
    (height, remission) (N, 2), the colour of the pixel each projects onto (N, 3), class (N,) in
    0..3."""
    import semantickitti as kitti  # here: the scenes themselves need only numpy
    lidar, colour, classes = [], [], []
    for scan in kitti.list_scans(root, sequences):
        calib = kitti.sequence_calib(scan.parent.parent)
        points = kitti.read_scan(scan)
        semantic, _ = kitti.read_labels(kitti.label_path(scan), len(points))
        train_id = kitti.to_train_ids(semantic)
        image = kitti.read_frame(scan, calib)
        keep, rc = kitti.project_points(points[:, :3], calib["P2"] @ calib["Tr"], *image.shape[:2])
        lookup = np.full(256, -1)
        lookup[list(CAMERA_TRAIN_IDS)] = np.arange(len(CAMERA_TRAIN_IDS))
        cls = lookup[train_id[keep]]  # (K,) 0..3, -1 for the other classes
        ground = cls >= 0
        rows, cols = rc[ground].astype(np.int64).T
        lidar.append(points[keep][ground][:, 2:4])
        colour.append(image[rows, cols] / 255.0)
        classes.append(cls[ground])
    return np.concatenate(lidar), np.concatenate(colour), np.concatenate(classes)


def gaussian_classifier(features: np.ndarray, classes: np.ndarray, k: int):
    """A Gaussian per class (mean, full covariance, prior) fitted to the features -> a function
    that gives the most likely class of each row: the Bayes rule for Gaussian classes."""
    fits = []
    for c in range(k):
        x = features[classes == c]
        cov = np.cov(x.T) + 1e-6 * np.eye(x.shape[1])
        fits.append((x.mean(0), np.linalg.inv(cov), np.linalg.slogdet(cov)[1], np.log(len(x) / len(features))))

    def predict(f: np.ndarray) -> np.ndarray:
        scores = [prior - 0.5 * logdet - 0.5 * np.einsum("ni,ij,nj->n", f - mu, inv, f - mu)
                  for mu, inv, logdet, prior in fits]
        return np.argmax(scores, 0)
    return predict


def premise(root, train_sequences, val_sequences) -> dict[str, np.ndarray]:
    """IoU (%) of each CAMERA_CLASS on the validation scans' camera-visible ground points, for a
    Gaussian classifier fitted on the training scans to: LiDAR height and remission; the pixel's
    colour; both. What a point alone says, before any context a network may add."""
    train = ground_points(Path(root), train_sequences)
    val = ground_points(Path(root), val_sequences)
    k = len(CAMERA_CLASSES)
    table = {}
    for name, pick in (("height + remission", lambda d: d[0]), ("colour", lambda d: d[1]),
                       ("both", lambda d: np.concatenate([d[0], d[1]], 1))):
        predicted = gaussian_classifier(pick(train), train[2], k)(pick(val))
        truth = val[2]
        table[name] = np.array([100 * ((predicted == c) & (truth == c)).sum() / max(((predicted == c) | (truth == c)).sum(), 1)
                                for c in range(k)])
    return table


def bounded(convert, lo, hi):
    """An argparse type: a number (int or float) in [lo, hi], else a usage error naming the range."""
    def check(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if convert is int else ' number'}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text} is outside {lo}..{hi}")
        return value
    return check


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Write SynthKITTI, a procedural street dataset in the SemanticKITTI layout "
                    "(LiDAR scans, point labels, camera-2 images, per-pixel labels, calibration, poses).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="data/synthkitti", help="dataset root; files go to OUT/sequences/XX/...")
    ap.add_argument("--columns", type=bounded(int, 64, 16384), default=1024,
                    help="LiDAR azimuth steps per turn (1024: ~62k points per scan, 2048: ~120k like KITTI)")
    ap.add_argument("--seed", type=bounded(int, 0, 2**31 - 1), default=0, help="world seed; same seed, byte-identical files")
    ap.add_argument("--sequences", nargs="+", type=bounded(int, 0, 99), default=[int(s) for s in DEFAULT_SEQUENCES],
                    metavar="XX",
                    help="sequence ids to write, each its own street (the official split validates on 08)")
    ap.add_argument("--scans-per-sequence", type=bounded(int, 1, 100_000), default=4, metavar="N",
                    help="scans per sequence: car positions 3-5 m apart along the street")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--premise", action="store_true",
                    help="after writing, measure the world's premise: how well a point's height and remission, "
                         "against its pixel's colour, tell the ground classes apart (training sequences: all but "
                         "08; validation: 08)")
    args = ap.parse_args(argv)
    seqs = {f"{s:02d}": args.scans_per_sequence for s in args.sequences}
    root = make_dataset(args.out, seqs, columns=args.columns, seed=args.seed, progress=not args.quiet)
    print(f"{sum(seqs.values())} scans in {len(seqs)} sequences under {root}")
    if args.premise:
        train, val = [s for s in seqs if s != "08"], [s for s in seqs if s == "08"]
        if not train or not val:
            ap.error("--premise needs sequence 08 (validation) and at least one other")
        table = premise(root, train, val)
        print(f"IoU of the ground classes on 08's camera-visible points, a Gaussian classifier fitted on "
              f"{' '.join(train)}:\n{'features':<20}" + "".join(f"{c:>10}" for c in CAMERA_CLASSES) + f"{'mean':>10}")
        for name, iou in table.items():
            print(f"{name:<20}" + "".join(f"{v:10.1f}" for v in iou) + f"{iou.mean():10.1f}")


def run_script(main) -> None:
    """A scene writer's entry point (synthnusc's too): bad input and Ctrl-C end it with one line,
    as every script's (runs.run_script, which imports this module, so it cannot be called here)."""
    from scandata import DataError  # here: the scenes themselves need only numpy
    try:
        main()
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted (Ctrl-C); every file written so far is whole") from None


if __name__ == "__main__":
    run_script(main)
