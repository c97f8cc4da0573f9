"""Tests of the data both methods read: scandata.py (augmentation, the atomic writer) and
semantickitti.py, in its order (files and the label map against the official yaml, projection
with the real calibration, the camera crop, the dataset and the synthetic scenes it reads, the
official evaluator's rules). Real SemanticKITTI scans are used when ../shared/realdata is there."""
from __future__ import annotations

import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import elite
import scandata
import semantickitti
import synthkitti

HERE = Path(__file__).resolve().parent
REAL = HERE.parent / "shared" / "realdata"
REAL_SEQ = REAL / "semantickitti" / "sequences" / "00"
needs_real = pytest.mark.skipif(not REAL_SEQ.is_dir(), reason="../shared/realdata not present")


# ------------------------------------------------------------------------------------
# scandata.py: augmentation and the one atomic writer
# ------------------------------------------------------------------------------------

def test_augmentation_matches_official_conventions():
    rng = np.random.default_rng(0)
    xyz = np.random.default_rng(1).normal(size=(200, 3)).astype(np.float32) * 10
    out = scandata.augment_xyz(xyz, rng, flip_scale=False)
    # Rotation about z plus one shared translation: pairwise distances are kept.
    d0 = np.linalg.norm(xyz[1:] - xyz[:-1], axis=1)
    d1 = np.linalg.norm(out[1:] - out[:-1], axis=1)
    np.testing.assert_allclose(d0, d1, rtol=1e-4, atol=1e-4)
    idx = scandata.dropout_points(10_000, np.random.default_rng(2))
    dropped = idx != np.arange(10_000)
    assert (idx[dropped] == 0).all() and dropped.mean() < 0.2


def test_written_files_get_the_mode_a_plain_open_gives(tmp_path):
    with open(tmp_path / "plain", "wb") as f:
        f.write(b"x")
    scandata.atomic_write(tmp_path / "atomic", lambda f: f.write(b"x"))
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "atomic") == mode(tmp_path / "plain") != 0o600


# ------------------------------------------------------------------------------------
# 1. Files: reading, errors, the label map
# ------------------------------------------------------------------------------------

def write_scan(folder: Path, name="000000", n=100, seed=0, labels=True):
    rng = np.random.default_rng(seed)
    (folder / "velodyne").mkdir(parents=True, exist_ok=True)
    pts = (rng.random((n, 4)) * [40, 40, 4, 1] - [20, 20, 3, 0]).astype(np.float32)
    pts.tofile(folder / "velodyne" / f"{name}.bin")
    if labels:
        (folder / "labels").mkdir(exist_ok=True)
        raw = rng.choice([0, 10, 40, 48, 70, 252], n).astype(np.uint32) | (7 << 16)
        raw.tofile(folder / "labels" / f"{name}.label")
    return pts


def test_read_scan_and_labels_roundtrip(tmp_path):
    pts = write_scan(tmp_path)
    assert np.array_equal(semantickitti.read_scan(tmp_path / "velodyne" / "000000.bin"), pts)
    sem, inst = semantickitti.read_labels(tmp_path / "labels" / "000000.label", 100)
    assert set(np.unique(sem)) <= {0, 10, 40, 48, 70, 252} and (inst == 7).all()
    ids = semantickitti.to_train_ids(sem)
    assert set(np.unique(ids[sem == 252])) <= {1}  # moving car -> car


def test_bad_files_give_clear_errors(tmp_path):
    write_scan(tmp_path)
    scan = tmp_path / "velodyne" / "000000.bin"
    with open(scan, "ab") as f:
        f.write(b"\0" * 5)
    with pytest.raises(scandata.DataError, match=r"000000\.bin.*not a multiple of 16"):
        semantickitti.read_scan(scan)
    with pytest.raises(scandata.DataError, match=r"000000\.label: 100 labels but its scan has 99"):
        semantickitti.read_labels(tmp_path / "labels" / "000000.label", 99)
    with pytest.raises(scandata.DataError, match="calib.txt: calibration file not found"):
        semantickitti.read_calib(tmp_path / "calib.txt")
    (tmp_path / "calib.txt").write_text("P0: 1 2 3\nTr: " + " ".join(["0"] * 12) + "\n")
    with pytest.raises(scandata.DataError, match="no 'P2:' line"):
        semantickitti.read_calib(tmp_path / "calib.txt")
    (tmp_path / "calib.txt").write_text("P2: 1 2 3\nTr: " + " ".join(["0"] * 12) + "\n")
    with pytest.raises(scandata.DataError, match="'P2' has 3 values"):
        semantickitti.read_calib(tmp_path / "calib.txt")
    twelve = " ".join(["1"] * 12)
    (tmp_path / "calib.txt").write_text(f"P2: {twelve}\nTr: {twelve}\nP2: {twelve}\n")  # a second camera matrix
    with pytest.raises(scandata.DataError, match="'P2' is given twice"):
        semantickitti.read_calib(tmp_path / "calib.txt")
    with pytest.raises(scandata.DataError, match="image not found"):
        scandata.read_image(tmp_path / "image_2" / "000000.png")
    from PIL import Image
    Image.fromarray(np.full((4, 6), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")  # a 16-bit PNG
    with pytest.raises(scandata.DataError, match=r"deep\.png: a I;16 image; the camera frames are 8-bit RGB"):
        scandata.read_image(tmp_path / "deep.png")
    Image.fromarray(np.full((4, 6), 40, dtype=np.uint8)).save(tmp_path / "gray.png")  # image_0's kind
    with pytest.raises(scandata.DataError, match=r"gray\.png: a grayscale image; the camera frames are colour"):
        scandata.read_image(tmp_path / "gray.png")
    (tmp_path / "calib_crlf.txt").write_text("P2:\t1 0 0 0 0 1 0 0 0 0 1 0\r\nTr: 1 0 0 0 0 1 0 0 0 0 1 0\r\n")
    assert np.array_equal(semantickitti.read_calib(tmp_path / "calib_crlf.txt")["P2"], np.eye(3, 4))  # tabs, CRLF: read
    with pytest.raises(scandata.DataError, match="no 'sequences' folder"):
        semantickitti.list_scans(tmp_path, ["00"])
    (tmp_path / "sequences" / "00").mkdir(parents=True)
    with pytest.raises(scandata.DataError, match="no scans"):
        semantickitti.list_scans(tmp_path, ["00"])
    velodyne = tmp_path / "sequences" / "00" / "velodyne"
    velodyne.mkdir()
    for name in ("000000.bin", "._000000.bin", "000000 copy.bin"):  # a scan, macOS metadata, a file manager's copy
        (velodyne / name).write_bytes(bytes(16))
    assert [p.name for p in semantickitti.list_scans(tmp_path, ["00"])] == ["000000.bin"]
    image_2 = tmp_path / "sequences" / "00" / "image_2"
    image_2.mkdir()
    (image_2 / "._000000.png").write_bytes(bytes(4096))  # sorts before the frames; not an image
    from PIL import Image
    Image.new("RGB", (40, 30)).save(image_2 / "000000.png")
    assert semantickitti.sequence_frame(image_2.parent) == (image_2 / "000000.png", 30, 40)
    calib = tmp_path / "calib_bom.txt"  # saved by an editor with a byte-order mark; then with a stray Latin-1 byte
    calib.write_bytes(b"\xef\xbb\xbfP2: 1 0 0 0 0 1 0 0 0 0 1 0\nTr: 1 0 0 0 0 1 0 0 0 0 1 0\n")
    assert np.array_equal(semantickitti.read_calib(calib)["Tr"], np.eye(4))
    calib.write_bytes(b"P2: 1 0 0 0 0 1 0 0 0 0 1 0\nTr: 1 0 0 0 0 1 0 0 0 0 1 \xe9\n")
    with pytest.raises(scandata.DataError, match=r"calib_bom\.txt: line 'Tr' has a non-numeric value"):
        semantickitti.read_calib(calib)


def test_a_scan_in_another_element_type_is_refused_and_real_scans_pass(tmp_path):
    rng = np.random.default_rng(0)
    scan = np.concatenate([rng.uniform(-60, 60, (500, 3)), rng.uniform(0, 1, (500, 1))], 1).astype(np.float32)
    scan[:3] = 0.0  # points at the origin are real (a sensor's no-return), not a wrong element type
    scan.tofile(tmp_path / "ok.bin")
    assert np.array_equal(semantickitti.read_scan(tmp_path / "ok.bin"), scan)
    scan.astype(np.float64).tofile(tmp_path / "f64.bin")  # 32 bytes a point: the size fits 2x the points
    with pytest.raises(scandata.DataError, match=r"f64\.bin: \d+% of its points have coordinates beyond 10 km"):
        semantickitti.read_scan(tmp_path / "f64.bin")
    real = REAL / "semantickitti" / "sequences" / "00" / "velodyne" / "000000.bin"
    if real.is_file():
        assert len(semantickitti.read_scan(real)) == real.stat().st_size // 16


def test_unknown_raw_ids_warn_and_become_unlabelled():
    with pytest.warns(UserWarning, match="not in semantic-kitti.yaml"):
        ids = semantickitti.to_train_ids(np.array([10, 77, 70000, 40]), "x.label")
    assert ids.tolist() == [1, 0, 0, 9]


def test_read_pixel_labels_checks_shape_dtype_and_classes(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.zeros((2, 4, 5), np.uint16))
    assert semantickitti.read_pixel_labels(p, 4, 5).shape == (2, 4, 5)
    with pytest.raises(scandata.DataError, match=r"x.npy: holds uint16 \(2, 4, 5\), expected uint16 \(2, 4, 6\)"):
        semantickitti.read_pixel_labels(p, 4, 6)
    np.save(p, np.zeros((2, 4, 5), np.int32))
    with pytest.raises(scandata.DataError, match="holds int32"):
        semantickitti.read_pixel_labels(p, 4, 5)
    bad = np.zeros((2, 4, 5), np.uint16)
    bad[0, 0, 0] = 20
    np.save(p, bad)
    with pytest.raises(scandata.DataError, match="class id 20"):
        semantickitti.read_pixel_labels(p, 4, 5)


def yaml_map(text: str, section: str) -> dict[int, int]:
    """The `section:` block of int -> int lines of semantic-kitti.yaml (no PyYAML needed)."""
    block = text.split(f"\n{section}:", 1)[1]
    out = {}
    for line in block.splitlines()[1:]:
        m = re.match(r"\s+(\d+)\s*:\s*(\d+)", line)
        if not m:
            break
        out[int(m.group(1))] = int(m.group(2))
    return out


@needs_real
def test_label_maps_match_official_yaml():
    text = (REAL / "semantic-kitti.yaml").read_text()
    assert yaml_map(text, "learning_map") == semantickitti.LEARNING_MAP
    assert yaml_map(text, "learning_map_inv") == semantickitti.LEARNING_MAP_INV
    names = dict(re.findall(r"^\s+(\d+)\s*:\s*\"([^\"]+)\"", text.split("\ncolor_map:")[0], re.M))
    assert [names[str(semantickitti.LEARNING_MAP_INV[i])] for i in range(1, 20)] == semantickitti.CLASS_NAMES[1:]
    colours = text.split("\ncolor_map:")[1].split("\ncontent:")[0]
    bgr = {int(k): [int(v) for v in vals.split(",")] for k, vals in re.findall(r"^\s+(\d+)\s*:\s*\[([^\]]+)\]", colours, re.M)}
    assert [bgr[semantickitti.LEARNING_MAP_INV[i]][::-1] for i in range(20)] == semantickitti.CLASS_COLORS.tolist()


@needs_real
def test_real_scans_and_labels_load():
    for k in range(3):
        pts = semantickitti.read_scan(REAL_SEQ / "velodyne" / f"{k:06d}.bin")
        sem, inst = semantickitti.read_labels(REAL_SEQ / "labels" / f"{k:06d}.label", len(pts))
        assert 124_000 < len(pts) < 125_000 and pts.dtype == np.float32
        assert set(np.unique(sem)) <= set(semantickitti.LEARNING_MAP) and inst.max() > 0


# ------------------------------------------------------------------------------------
# 2. Geometry: the real calibration
# ------------------------------------------------------------------------------------

@needs_real
def test_real_calibration_projects_15_percent():
    calib = semantickitti.read_calib(REAL_SEQ / "calib.txt")
    assert np.allclose(calib["P2"][0, 3], 45.38225)
    pts = semantickitti.read_scan(REAL_SEQ / "velodyne" / "000000.bin")
    keep, rows_cols = semantickitti.project_points(pts[:, :3], calib["proj"], 376, 1241)
    assert abs(keep.mean() - 0.155) < 0.003 and len(rows_cols) == keep.sum()
    assert (rows_cols[:, 0] < 376).all() and (rows_cols[:, 1] < 1241).all()


# ------------------------------------------------------------------------------------
# 4. The camera crop
# ------------------------------------------------------------------------------------

def painted_scene(h=60, w=200, n=300, seed=0):
    """An image black except for one uniquely coloured pixel per point, the points at
    fractional positions inside those pixels, and a dense map of (row, col) per pixel."""
    rng = np.random.default_rng(seed)
    flat = rng.choice(h * w, n, replace=False)
    pix = np.stack([flat // w, flat % w], 1)
    image = np.zeros((h, w, 3), np.uint8)
    ids = np.arange(1, n + 1)
    image[pix[:, 0], pix[:, 1]] = np.stack([ids % 256, ids // 256, np.full(n, 200)], 1)
    points = pix + rng.random((n, 2))
    dense = np.stack(np.mgrid[:h, :w]).astype(np.int64)  # (2, H, W)
    return image, points, pix, dense


def decode_ids(crop_image: torch.Tensor) -> np.ndarray:
    rgb = crop_image.permute(1, 2, 0) * torch.tensor(semantickitti.SAM_PIXEL_STD) + torch.tensor(semantickitti.SAM_PIXEL_MEAN)
    rgb = rgb.round().to(torch.int64).numpy()
    return np.where(rgb[..., 2] == 200, rgb[..., 0] + 256 * rgb[..., 1], 0)  # (ch, cw) point id + 1, or 0


def test_points_follow_their_pixels_through_crop_and_flip():
    image, points, pix, dense = painted_scene()
    flips = set()
    for seed in range(8):
        out = semantickitti.prepare_image(image, points, (32, 96), np.random.default_rng(seed), train=True,
                                          dense_labels=dense, jitter=0)
        ids = decode_ids(out.image)
        assert out.image.shape == (3, 32, 96) and out.pixels.dtype == torch.int64
        r, c = out.pixels[:, 0].numpy(), out.pixels[:, 1].numpy()
        assert (ids[r, c] == out.kept + 1).all()  # each kept point sits on its own colour
        assert set(ids[ids > 0].tolist()) == set((out.kept + 1).tolist())  # and every visible point is kept
        assert (out.dense_labels[:, r, c].T == pix[out.kept]).all()  # the dense map moved with the image
        assert (out.dense_labels[0] == 60 - 32 + np.arange(32)[:, None]).all()  # the bottom rows
        flips.add(bool(out.dense_labels[1, 0, 0] > out.dense_labels[1, 0, -1]))
    assert flips == {True, False}


def test_eval_crop_is_centred_and_deterministic():
    image, points, pix, _ = painted_scene()
    out = semantickitti.prepare_image(image, points, (32, 96), rng=None, train=False)
    left = (200 - 96) // 2
    expected = (torch.from_numpy(image[28:, left:left + 96]).float() - torch.tensor(semantickitti.SAM_PIXEL_MEAN)) \
        / torch.tensor(semantickitti.SAM_PIXEL_STD)
    torch.testing.assert_close(out.image, expected.permute(2, 0, 1))
    assert (out.pixels.numpy() == pix[out.kept] - [28, left]).all()
    assert out.dense_labels is None


def test_colour_jitter_is_seeded_and_changes_colours():
    image = np.random.default_rng(0).integers(0, 256, (40, 100, 3), dtype=np.uint8)
    points = np.zeros((0, 2))
    a = semantickitti.prepare_image(image, points, (32, 96), np.random.default_rng(3), train=True)
    b = semantickitti.prepare_image(image, points, (32, 96), np.random.default_rng(3), train=True)
    c = semantickitti.prepare_image(image, points, (32, 96), np.random.default_rng(3), train=True, jitter=0)
    assert torch.equal(a.image, b.image) and not torch.equal(a.image, c.image)
    with pytest.raises(ValueError, match="smaller than the crop"):
        semantickitti.prepare_image(image, points, (64, 96), np.random.default_rng(0), train=True)


# ------------------------------------------------------------------------------------
# 5. The dataset, and the synthetic scenes it reads
# ------------------------------------------------------------------------------------

def test_dataset_drops_non_finite_points_and_survives_empty_range(tmp_path):
    seq = tmp_path / "sequences" / "00"
    pts = write_scan(seq, n=50)
    pts[3] = np.nan
    pts[7, 0] = np.inf
    pts.tofile(seq / "velodyne" / "000000.bin")
    far = np.full((20, 4), 80.0, dtype=np.float32)  # every point out of range
    far.tofile(seq / "velodyne" / "000001.bin")
    np.zeros(20, dtype=np.uint32).tofile(seq / "labels" / "000001.label")
    ds = semantickitti.SemanticKITTI(tmp_path, ["00"], train=True)
    with pytest.warns(UserWarning, match="dropped 2 points with NaN or Inf"):
        scan = ds[0]
    assert np.isfinite(scan.points).all() and 3 not in scan.index and 7 not in scan.index
    empty = ds[1]
    assert len(empty.points) == 0 and empty.num_raw == 20
    batch = scandata.collate([scan, empty])
    model = elite.Student().eval()
    with torch.no_grad():
        assert model(batch.points, batch.batch_idx).logits.shape == (len(scan.points), 20)
    import infer
    pred = infer.predict_scan(model, far, votes=2, rng=np.random.default_rng(0), device="cpu")
    assert pred.shape == (20,) and (pred == 0).all()


def test_camera_crops_keep_points_on_their_pixels_through_crop_and_flip(synth_copy):
    # Rendered ground truth stands in for pseudo-labels, so the dense crop must agree with
    # the labels of the points at their (cropped, flipped) pixels.
    for scan in semantickitti.list_scans(synth_copy, ["00"]):
        semantickitti.plg_path(scan).parent.mkdir(exist_ok=True)
        shutil.copy(synthkitti.rendered_labels_path(scan), semantickitti.plg_path(scan))
    ds = semantickitti.SemanticKITTI(synth_copy, ["00"], train=True, seed=1, camera=True, crop_hw=(160, 512), dense=True)
    agree = total = 0
    for epoch in range(4):
        ds.set_epoch(epoch)
        batch = scandata.collate([ds[i] for i in range(len(ds))])
        crops = batch.crops
        # The crops' labels are the labels of the batch points behind its pixels.
        assert torch.equal(crops.labels, batch.labels[batch.crop_points])
        assert crops.images.shape == (len(ds), 3, 160, 512) and crops.dense.shape == (len(ds), 160, 512)
        start = 0
        for b, pix in enumerate(crops.pixels):
            labels = crops.labels[start:start + len(pix)]
            start += len(pix)
            assert pix[:, 0].min() >= 0 and pix[:, 0].max() < 160 and pix[:, 1].max() < 512
            assert (batch.batch_idx[batch.crop_points[start - len(pix):start]] == b).all()  # its own scan
            hit = crops.dense[b, pix[:, 0], pix[:, 1]] == labels
            agree, total = agree + int(hit.sum()), total + len(pix)
        assert start == len(crops.labels)
    assert total > 1000 and agree / total > 0.95, (agree, total)


def test_instance_cutmix_adds_instance_points_without_pixels(synth_root):
    kw = dict(train=True, seed=5, camera=True, crop_hw=(64, 128))
    plain = semantickitti.SemanticKITTI(synth_root, ["00"], **kw)[0]
    mixed_set = semantickitti.SemanticKITTI(synth_root, ["00"], cutmix=True, **kw)
    mixed = mixed_set[0]
    n = len(plain.points)
    # The scan's own points, labels, rows and point-to-pixel pairs are as without CutMix.
    assert np.array_equal(mixed.points[:n], plain.points) and np.array_equal(mixed.labels[:n], plain.labels)
    assert np.array_equal(mixed.index[:n], plain.index)
    assert torch.equal(mixed.crop.pixels, plain.crop.pixels) and np.array_equal(mixed.crop_points, plain.crop_points)
    assert mixed.crop_points.max() < n  # no pasted point has a pixel
    # The pasted points: the other scan's instance points (rows counted on from the scan's), labels kept.
    draws = mixed_set.rng(0, 2)
    j = int(draws.integers(len(mixed_set)))
    while j == 0:
        j = int(draws.integers(len(mixed_set)))  # never the scan itself
    other = mixed_set.scans[j]
    raw, instance = semantickitti.read_labels(semantickitti.label_path(other))
    rows = mixed.index[n:] - plain.num_raw
    assert len(rows) > 50 and (instance[rows] != 0).all()
    assert np.array_equal(mixed.labels[n:], semantickitti.to_train_ids(raw[rows]))
    assert mixed.num_raw == plain.num_raw + len(raw)
    assert not np.allclose(mixed.points[n:, :3], semantickitti.read_scan(other)[rows, :3])  # augmented on their own
    assert np.array_equal(mixed.points[n:, 3], semantickitti.read_scan(other)[rows, 3])  # remission as in the file
    assert len(semantickitti.SemanticKITTI(synth_root, ["00"], cutmix=True)[0].points) == n  # evaluation: no CutMix
    sizes = [semantickitti.scan_size(p) for p in mixed_set.scans]  # each scan known by its size
    assert len(set(sizes)) == len(sizes)
    sources = set()
    for epoch in range(12):  # upstream draws again until it picks another scan
        mixed_set.set_epoch(epoch)
        sources.add(mixed_set[0].num_raw - sizes[0])
    assert sizes[0] not in sources and sources <= set(sizes[1:])
    batch = scandata.collate([mixed, plain])  # the second scan's pixels still point at its own points
    assert torch.equal(batch.points[batch.crop_points[len(mixed.crop_points):]],
                       torch.from_numpy(plain.points[plain.crop_points]))


def test_synthetic_scenes_read_by_the_real_loader(synth_root):
    import synthkitti
    scans = semantickitti.list_scans(synth_root, ["00", "08"])
    assert len(scans) == 3
    classes = set()
    for scan in scans:
        points, labels = semantickitti.load_scan(scan)
        assert len(points) > 5000 and (points[:, 3] >= 0).all() and (points[:, 3] < 1).all()
        classes |= set(np.unique(labels).tolist())
        image = scandata.read_image(scan.parent.parent / "image_2" / f"{scan.stem}.png")
        assert image.shape == (synthkitti.IMAGE_HEIGHT, synthkitti.IMAGE_WIDTH, 3)
    assert len(classes - {0}) >= 12, [semantickitti.CLASS_NAMES[c] for c in classes]
    real = (REAL_SEQ / "calib.txt") if REAL_SEQ.is_dir() else None
    calib = semantickitti.read_calib(synth_root / "sequences" / "00" / "calib.txt")
    if real is not None:
        assert np.allclose(calib["proj"], semantickitti.read_calib(real)["proj"])


def test_synthetic_points_and_pixels_agree(synth_root):
    """A LiDAR point projected with the calibration lands on a pixel of its own class."""
    seq = synth_root / "sequences" / "00"
    calib = semantickitti.read_calib(seq / "calib.txt")
    points, labels = semantickitti.load_scan(seq / "velodyne" / "000001.bin")
    gt = np.load(seq / "image_2_gt" / "000001.npy")
    assert gt.dtype == np.uint16 and gt.shape[0] == 2
    keep, rows_cols = semantickitti.project_points(points[:, :3], calib["proj"], gt.shape[1], gt.shape[2])
    pixel_class = gt[0][rows_cols[:, 0].astype(int), rows_cols[:, 1].astype(int)]
    assert keep.sum() > 1000 and (pixel_class == labels[keep]).mean() > 0.9


def test_synthetic_scenes_are_deterministic():
    import synthkitti
    a, la = synthkitti.make_scan(seed=5, columns=256)
    b, lb = synthkitti.make_scan(seed=5, columns=256)
    c, _ = synthkitti.make_scan(seed=6, columns=256)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a[:100], c[:100])


def test_synthetic_ground_classes_differ_in_colour_not_in_height_or_remission():
    """The world's premise: road and parking share a height, so do sidewalk and grass, and the
    four overlap in remission (their means closer than a point's spread); their colours differ."""
    import synthkitti as sk
    points, raw = sk.make_scan(seed=2, columns=512)
    stats = {}
    for name in sk.CAMERA_CLASSES:
        on = (raw & 0xFFFF) == sk.MAT_RAW[sk.MAT[name]]
        assert on.sum() > 100, name
        stats[name] = (np.median(points[on, 2]), points[on, 3].mean(), points[on, 3].std())
    assert abs(stats["road"][0] - stats["parking"][0]) < 0.03
    assert abs(stats["sidewalk"][0] - stats["terrain"][0]) < 0.03
    means = [m for _, m, _ in stats.values()]
    assert max(means) - min(means) < min(sd for _, _, sd in stats.values())
    rgb = {name: sk.MAT_RGB[sk.MAT[name]] for name in sk.CAMERA_CLASSES}
    assert min(np.abs(rgb[a] - rgb[b]).sum() for a in rgb for b in rgb if a < b) > 0.15


def test_synthetic_layouts_change_along_the_street():
    """Where sidewalk, grass, parking and road lie changes from segment to segment, so the
    distance from the kerb alone does not give the class."""
    import synthkitti as sk
    st = sk.street_profile(sk.rng_for(0, 1, 0))
    side = int(st.curb[1] > st.road_half)  # a side with a parking strip
    x = np.arange(0, 600, sk.SEGMENT) + 1.0
    s = (1, -1)[side]
    beside_kerb = sk.ground_material(st, x, np.full_like(x, s * (st.curb[side] + 0.3)))
    beside_road = sk.ground_material(st, x, np.full_like(x, s * (st.curb[side] - 0.3)))
    assert {sk.MAT["sidewalk"], sk.MAT["terrain"]} <= set(beside_kerb.tolist())
    if st.curb[side] > st.road_half:
        assert {sk.MAT["parking"], sk.MAT["road"]} <= set(beside_road.tolist())


def test_synthetic_scenes_of_an_older_world_are_refused(tmp_path):
    import json
    import synthkitti as sk
    sk.make_dataset(tmp_path, {"01": 1}, columns=64, progress=False)
    (tmp_path / sk.MARKER).write_text(json.dumps({"seed": 0, "columns": 64}))  # world 1 wrote no version
    with pytest.raises(scandata.DataError, match="older world"):
        sk.make_dataset(tmp_path, {"01": 1}, columns=64, progress=False)
    for bad in ('{"world": 2, "seed": "0", "columns": 64}', '[2, 0, 64]', '{"world": 2, "seed": 0.5, "columns": 64}',
                '{"world": 2'):
        (tmp_path / sk.MARKER).write_text(bad)  # edited by hand: one line naming the file, no traceback
        with pytest.raises(scandata.DataError, match="synthkitti.json: "):
            sk.make_dataset(tmp_path, {"01": 1}, columns=64, progress=False)


def test_the_scene_writer_never_writes_into_a_dataset_whose_scans_are_still_coming(tmp_path):
    """Fault-hunting round 5 (issue 34): labels, images and calibration without velodyne/ yet (a
    download in progress) were written over; any file under sequences/ without the record is refused."""
    import synthkitti as sk
    seq = tmp_path / "sequences" / "00"
    (seq / "labels").mkdir(parents=True)
    (seq / "labels" / "000000.label").write_bytes(b"mine")
    (seq / "calib.txt").write_text("P2: my calibration\n")
    with pytest.raises(scandata.DataError, match=r"holds files in sequences/ \(sequences/00/.*\) but no synthkitti\.json"):
        sk.make_dataset(tmp_path, {"00": 1}, columns=64, progress=False)
    assert (seq / "calib.txt").read_text() == "P2: my calibration\n" and not (tmp_path / sk.MARKER).exists()
    assert sorted(p.name for p in seq.rglob("*")) == ["000000.label", "calib.txt", "labels"]


def test_synthetic_scenes_resumed_with_another_seed_keep_the_recorded_one(tmp_path, capsys):
    """An interrupted first run (seed 1), finished by a run with --seed 0: one street, seed 1's."""
    synthkitti.make_dataset(tmp_path / "a", {"01": 1}, columns=64, seed=1, progress=False)
    synthkitti.make_dataset(tmp_path / "a", {"01": 2}, columns=64, seed=0, progress=False)
    assert "made with seed 1 and 64 columns; kept as they are" in capsys.readouterr().out
    synthkitti.make_dataset(tmp_path / "b", {"01": 2}, columns=64, seed=1, progress=False)
    for name in ("000000.bin", "000001.bin"):
        assert (tmp_path / "a/sequences/01/velodyne" / name).read_bytes() == \
            (tmp_path / "b/sequences/01/velodyne" / name).read_bytes()


# ------------------------------------------------------------------------------------
# 7. Evaluation: the official evaluator's rules
# ------------------------------------------------------------------------------------

def evaluator_reference(pred, gt, n=20):
    """The official np_ioueval logic, as described in reference/evaluator.md."""
    conf = np.zeros((n, n), dtype=np.int64)
    np.add.at(conf, (pred, gt), 1)
    conf[:, 0] = 0
    tp = np.diag(conf).astype(float)
    fp, fn = conf.sum(1) - tp, conf.sum(0) - tp
    iou = tp / (tp + fp + fn + 1e-15)
    return iou[1:].mean(), iou[1:]


def test_confusion_matrix_follows_official_rules():
    rng = np.random.default_rng(0)
    conf = semantickitti.SemanticKittiConfusion()
    preds, gts = [], []
    for _ in range(3):  # accumulated over several scans, not averaged per scan
        gt = rng.integers(0, 12, 1000)
        pred = np.where(rng.random(1000) < 0.6, gt, rng.integers(0, 20, 1000))
        conf.add(torch.from_numpy(pred), torch.from_numpy(gt))
        preds.append(pred)
        gts.append(gt)
    miou, iou = evaluator_reference(np.concatenate(preds), np.concatenate(gts))
    assert abs(conf.miou() - miou) < 1e-12
    np.testing.assert_allclose(conf.iou().numpy(), iou)


def test_confusion_matrix_edge_cases():
    conf = semantickitti.SemanticKittiConfusion()
    # GT 0 never counts; a labelled point predicted 0 is a miss for its class.
    conf.add(torch.tensor([5, 0, 1, 1]), torch.tensor([0, 1, 1, 1]))
    iou = conf.iou()
    assert abs(iou[0].item() - 2 / 3) < 1e-12  # car: tp 2, fn 1 (predicted 0), the GT-0 point ignored
    assert iou[4].item() == 0  # class 5 absent: IoU 0, and it counts in the 19-class mean
    assert abs(conf.miou() - (2 / 3) / 19) < 1e-12
    assert "mIoU present" in conf.table()


@pytest.mark.parametrize("argv", [["--columns", "0"], ["--sequences", "../../x"], ["--scans-per-sequence", "0"],
                                  ["--seed", "-1"], ["--columns", "1e9"]])
def test_synthetic_writer_flags_are_checked_when_parsed(argv, tmp_path, capsys):
    """Impossible sizes are a usage error naming the flag, before any file is written (issue 34)."""
    import synthkitti as sk
    with pytest.raises(SystemExit) as e:
        sk.main(["--out", str(tmp_path / "x"), "--quiet", *argv])
    assert e.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_synthetic_nuscenes_writer_flags_are_checked_when_parsed(tmp_path, capsys):
    import synthnusc
    for argv in (["--columns", "0"], ["--image-scale", "0"]):
        with pytest.raises(SystemExit):
            synthnusc.main(["--out", str(tmp_path / "x"), *argv])
        assert f"argument {argv[0]}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def street_points(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 5) float32 points as a nuScenes .pcd.bin holds them: x, y, z, intensity 0..255, ring."""
    return np.stack([rng.uniform(-40, 40, n), rng.uniform(-40, 40, n), rng.uniform(-2, 3, n),
                     rng.uniform(0, 255, n), rng.integers(0, 32, n)], 1).astype(np.float32)


def test_a_scan_in_another_layout_is_refused_by_its_values(tmp_path):
    """issue 34: a nuScenes .pcd.bin cut to a multiple of 80 bytes passes the size check of a
    KITTI scan; its shifted columns put x, y, z in remission, which is never negative."""
    rng = np.random.default_rng(0)
    nuscenes = tmp_path / "000000.bin"
    nuscenes.write_bytes(street_points(1000, rng).tobytes())  # 20,000 bytes: 1,250 rows of 16
    with pytest.raises(scandata.DataError, match=r"000000\.bin: \d+% of its points have a negative remission .*a "
                                                 r"nuScenes \.pcd\.bin \(5 float32 per point\) read as a KITTI scan\?"):
        semantickitti.read_scan(nuscenes)
    kitti = tmp_path / "kitti.bin"
    kitti.write_bytes(np.concatenate([street_points(1000, rng)[:, :3], rng.uniform(0, 1, (1000, 1))], 1)
                      .astype(np.float32).tobytes())
    assert len(semantickitti.read_scan(kitti)) == 1000  # the same points in KITTI's layout are read
    import nusc
    with pytest.raises(scandata.DataError, match=r"kitti\.bin: \d+% of its points have a negative intensity or a "
                                                 r"ring index that is not a whole number"):
        nusc.read_points(kitti)  # 16,000 bytes: 800 rows of 20
    nuscenes.rename(tmp_path / "n.pcd.bin")
    assert len(nusc.read_points(tmp_path / "n.pcd.bin")) == 1000


def test_byte_swapped_or_foreign_label_files_are_refused_by_their_values(tmp_path):
    """issue 34: big-endian .label files read mostly as 0 (unlabelled) and used to score a handful
    of points; their values give them away, as do ids semantic-kitti.yaml does not have."""
    rng = np.random.default_rng(0)
    semantic = rng.choice([10, 40, 44, 48, 50, 70, 72, 80], 5000).astype(np.uint32)  # car, road, ... pole
    raw = semantic | (rng.integers(0, 3, 5000).astype(np.uint32) << 16)  # a few instance ids
    path = tmp_path / "000000.label"
    path.write_bytes(raw.tobytes())
    assert (semantickitti.read_labels(path)[0] == semantic).all()
    path.write_bytes(raw.byteswap().tobytes())
    with pytest.raises(scandata.DataError, match=r"000000\.label: byte-swapped \(big-endian\)"):
        semantickitti.read_labels(path)
    path.write_bytes(rng.integers(0, 2**32, 5000, dtype=np.uint32).tobytes())
    with pytest.raises(scandata.DataError, match=r"000000\.label: \d+% of its labels carry raw ids that "
                                                 r"semantic-kitti\.yaml does not have"):
        semantickitti.read_labels(path)
    path.write_bytes(np.zeros(5000, np.uint32).tobytes())  # all unlabelled is a layout, not an error here
    assert not semantickitti.read_labels(path)[0].any()


def test_a_grayscale_split_is_found_before_training(synth_copy):
    """Fault-hunting round 5 (issue 34): a U2MKD run met grayscale validation images only at its
    first validation, an epoch later; the up-front checks decode a spread of each split's images."""
    from PIL import Image
    ds = semantickitti.SemanticKITTI(synth_copy, ["08"], camera=True, crop_hw=(64, 128))
    path = semantickitti.image_path(ds.scans[0])
    Image.open(path).convert("L").save(path)
    with pytest.raises(scandata.DataError, match=r"000000\.png: a grayscale image"):
        semantickitti.check_camera_files(ds)
