"""Tests: every claim of elite.py against a reference (dense conv3d, the official
evaluator's rules, the official yaml and real SemanticKITTI scans when present)."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import elite

HERE = Path(__file__).resolve().parent
REAL = HERE.parent / "shared" / "realdata"
REAL_SEQ = REAL / "semantickitti" / "sequences" / "00"
needs_real = pytest.mark.skipif(not REAL_SEQ.is_dir(), reason="../shared/realdata not present")


# ------------------------------------------------------------------------------------
# Sparse convolution against a dense reference
# ------------------------------------------------------------------------------------

def random_sparse(batch=3, size=8, density=0.25, cin=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, size, size, size, generator=g) < density
    coords = torch.nonzero(mask)  # (N, 4) [b, x, y, z]
    feats = torch.randn(len(coords), cin, generator=g, dtype=dtype)
    return coords, feats


def dense_submconv(coords, feats, weight, size):
    """Scatter into a dense grid, conv3d with padding 1, read back at the active voxels."""
    batch = int(coords[:, 0].max()) + 1
    grid = torch.zeros(batch, feats.shape[1], size, size, size, dtype=feats.dtype)
    b, x, y, z = coords.T
    grid[b, :, x, y, z] = feats
    out = F.conv3d(grid, weight.permute(4, 3, 0, 1, 2), padding=1)  # (B, Cout, X, Y, Z)
    return out[b, :, x, y, z]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_submconv3d_equals_dense_conv3d(seed):
    coords, feats = random_sparse(seed=seed)
    weight = torch.randn(3, 3, 3, 5, 7, generator=torch.Generator().manual_seed(seed + 10))
    ref = dense_submconv(coords, feats, weight, 8)
    perm = torch.randperm(len(coords), generator=torch.Generator().manual_seed(seed))
    shifted = coords[perm] + torch.tensor([0, -4, 3, -9])  # any integers, negative too, any order
    out = elite.submconv3d(feats[perm], shifted, weight)
    torch.testing.assert_close(out, ref[perm], rtol=1e-4, atol=1e-4)


def test_neighbour_map_matches_brute_force():
    coords, _ = random_sparse(batch=2, size=6, density=0.4, seed=5)
    nmap = elite.build_neighbour_map(coords)
    index = {tuple(c): k for k, c in enumerate(coords.tolist())}
    assert len(nmap.offsets) == 13 and len(set(nmap.offsets)) == 13
    for (i, j), (dx, dy, dz) in zip(nmap.pairs, nmap.offsets):
        expect = sorted((k, index[(b, x + dx, y + dy, z + dz)]) for (b, x, y, z), k in index.items()
                        if (b, x + dx, y + dy, z + dz) in index)
        assert sorted(zip(i.tolist(), j.tolist())) == expect


def test_submconv3d_gradcheck():
    coords, feats = random_sparse(batch=2, size=4, density=0.5, cin=2, seed=3, dtype=torch.float64)
    feats.requires_grad_(True)
    weight = torch.randn(3, 3, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w: elite.submconv3d(f, coords, w), (feats, weight))


def test_submconv3d_identical_across_calls_and_threads():
    coords, feats = random_sparse(batch=2, size=24, density=0.2, cin=64, seed=7)
    weight = torch.randn(3, 3, 3, 64, 64)
    nmap = elite.build_neighbour_map(coords)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            results += [elite.submconv3d(feats, coords, weight, nmap) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_unique_rows_matches_torch_unique():
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(-5, 5, (500, 4), generator=g)
    ref, ref_inv = torch.unique(rows, dim=0, return_inverse=True)
    got, inv = elite.unique_rows(rows)
    assert torch.equal(got, ref) and torch.equal(inv, ref_inv)


# ------------------------------------------------------------------------------------
# Voxelisation and the student
# ------------------------------------------------------------------------------------

def test_voxel_grids_per_scale():
    # A point near the top corner of the range lands in the last cell of every scale's grid:
    # 1000x1000x60, 500x500x30, 250x250x15, 125x125x8 (not 7) and 63x63x4 (not 62).
    xyz = torch.tensor([[49.99, 49.99, 1.99], [-49.99, -49.99, -3.99]])
    last = {1: (999, 999, 59), 2: (499, 499, 29), 4: (249, 249, 14), 8: (124, 124, 7), 16: (62, 62, 3)}
    for s, cell in last.items():
        vox = elite.voxelize(xyz, torch.zeros(2, dtype=torch.long), s)
        assert vox.coords[:, 1:].tolist() == [[0, 0, 0], list(cell)]


def test_voxelize_keeps_out_of_range_points_and_lexicographic_order():
    g = torch.Generator().manual_seed(1)
    xyz = torch.rand(2000, 3, generator=g) * torch.tensor([120.0, 120.0, 8.0]) - torch.tensor([60.0, 60.0, 5.0])
    b = torch.randint(0, 3, (2000,), generator=g)
    vox = elite.voxelize(xyz, b, 4)
    assert (vox.coords[:, 1] < 0).any() and (vox.coords[:, 1] >= 250).any()
    ref, ref_inv = torch.unique(torch.cat([b[:, None], (torch.tensor([250, 250, 15]) * (xyz - torch.tensor(
        elite.RANGE_MIN)) / torch.tensor([100.0, 100.0, 6.0])).long()], 1), dim=0, return_inverse=True)
    assert torch.equal(vox.coords, ref) and torch.equal(vox.inv, ref_inv)


def test_student_has_official_parameter_count():
    assert elite.count_parameters(elite.Student()) == 1_933_460


def reference_student_forward(model: elite.Student, points, batch_idx):
    """The upstream data flow written the slow way: every MLP and mean over points."""
    voxels = [elite.voxelize(points[:, :3], batch_idx, s) for s in (1, 2, 4, 8, 16)]
    xyz, v1 = points[:, :3], voxels[0]
    mean = elite.scatter_mean(xyz, v1.inv, len(v1))[v1.inv]
    corner = v1.coords[v1.inv, 1:].float() * 0.1 + torch.tensor(elite.RANGE_MIN)
    x = elite.scatter_mean(model.input_encoder.mlp(torch.cat([points, xyz - mean, xyz - corner], 1)), v1.inv, len(v1))
    per_point = []
    for block, vl, vs in zip(model.blocks, voxels[:-1], voxels[1:]):
        nmap = elite.build_neighbour_map(vl.coords)
        v = x
        for b in block.v_enc:
            v = b(v, vl.coords, nmap)
        v_down = elite.scatter_mean(v[vl.inv], vs.inv, len(vs))
        pe = block.point_enc
        feats = x + v
        coarse = torch.cat([vl.coords[:, :1], vl.coords[:, 1:] // 2], 1)
        _, group = torch.unique(coarse, dim=0, return_inverse=True)
        ctx = pe.context(elite.scatter_mean(feats, group, int(group.max()) + 1))[group]
        h = torch.cat([pe.layer_in(feats), ctx], 1)
        p = elite.scatter_mean(pe.layer_out(h[vl.inv]), vs.inv, len(vs))
        x = p + v_down
        per_point.append(p[vs.inv])
    return model.classifier(torch.cat(per_point, 1))


def test_student_equals_per_point_reference():
    torch.manual_seed(0)
    model = elite.Student().eval()
    points = torch.rand(3000, 4) * torch.tensor([40.0, 40.0, 5.0, 1.0]) - torch.tensor([20.0, 20.0, 3.5, 0.0])
    batch_idx = (torch.arange(3000) >= 1700).long()
    with torch.no_grad():
        got = model(points, batch_idx).logits
        ref = reference_student_forward(model, points, batch_idx)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_student_trains_on_a_tiny_scene():
    torch.manual_seed(0)
    model = elite.Student()
    points = torch.rand(1500, 4) * torch.tensor([20.0, 20.0, 3.0, 1.0]) - torch.tensor([10.0, 10.0, 2.0, 0.0])
    labels = 1 + (points[:, 2] > -0.5).long() * 8  # two classes split by height
    batch_idx = torch.zeros(1500, dtype=torch.long)
    opt = elite.make_optimizer(model.parameters(), lr=0.05)
    w = elite.class_weights()
    losses = []
    for _ in range(15):
        loss = elite.seg_loss(model(points, batch_idx).logits, labels, w, 0.1)
        opt.zero_grad()
        loss.backward()
        assert elite.clip_or_skip(list(model.parameters()))
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------

def test_class_weights_match_official_values():
    w = elite.class_weights()
    assert w[0] == 0
    expect = {"car": 2.048, "bicycle": 11.410, "motorcyclist": 18.214, "road": 1.255,
              "vegetation": 1.000, "traffic-sign": 7.416, "pole": 4.729, "terrain": 1.543}
    for name, value in expect.items():
        assert abs(w[elite.CLASS_NAMES.index(name)].item() - value) < 1e-3, name


def test_lovasz_on_hard_predictions_is_mean_jaccard_loss():
    # For one-hot probabilities the Lovasz extension equals 1 - IoU for every present class.
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (400,), generator=g)
    pred = torch.where(torch.rand(400, generator=g) < 0.7, labels, torch.randint(1, 5, (400,), generator=g))
    probs = F.one_hot(pred, 5).float()
    valid = labels != 0
    expect = []
    for c in torch.unique(labels[valid]).tolist():
        inter = ((pred == c) & (labels == c) & valid).sum()
        union = (((pred == c) | (labels == c)) & valid).sum()
        expect.append(1 - inter / union)
    assert abs(elite.lovasz_softmax(probs, labels).item() - torch.stack(expect).float().mean().item()) < 1e-6


def test_seg_loss_ignores_unlabelled_points_and_handles_none():
    logits = torch.randn(50, 20, requires_grad=True)
    labels = torch.zeros(50, dtype=torch.long)
    loss = elite.seg_loss(logits, labels, elite.class_weights(), 0.1)
    assert loss.item() == 0
    loss.backward()
    labels[:10] = 3
    a = elite.seg_loss(logits, labels, elite.class_weights(), 0.1)
    b = elite.seg_loss(logits[:10], labels[:10], elite.class_weights(), 0.1)
    assert torch.allclose(a, b)


# ------------------------------------------------------------------------------------
# The official evaluator's rules
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
    conf = elite.ConfusionMatrix()
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
    conf = elite.ConfusionMatrix()
    # GT 0 never counts; a labelled point predicted 0 is a miss for its class.
    conf.add(torch.tensor([5, 0, 1, 1]), torch.tensor([0, 1, 1, 1]))
    iou = conf.iou()
    assert abs(iou[0].item() - 2 / 3) < 1e-12  # car: tp 2, fn 1 (predicted 0), the GT-0 point ignored
    assert iou[4].item() == 0  # class 5 absent: IoU 0, and it counts in the 19-class mean
    assert abs(conf.miou() - (2 / 3) / 19) < 1e-12
    assert "mIoU present" in conf.table()


# ------------------------------------------------------------------------------------
# Files: reading, errors, the label map
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
    assert np.array_equal(elite.read_scan(tmp_path / "velodyne" / "000000.bin"), pts)
    sem, inst = elite.read_labels(tmp_path / "labels" / "000000.label", 100)
    assert set(np.unique(sem)) <= {0, 10, 40, 48, 70, 252} and (inst == 7).all()
    ids = elite.to_train_ids(sem)
    assert set(np.unique(ids[sem == 252])) <= {1}  # moving car -> car


def test_bad_files_give_clear_errors(tmp_path):
    write_scan(tmp_path)
    scan = tmp_path / "velodyne" / "000000.bin"
    with open(scan, "ab") as f:
        f.write(b"\0" * 5)
    with pytest.raises(elite.DataError, match=r"000000\.bin.*not a multiple of 16"):
        elite.read_scan(scan)
    with pytest.raises(elite.DataError, match=r"000000\.label: 100 labels but its scan has 99"):
        elite.read_labels(tmp_path / "labels" / "000000.label", 99)
    with pytest.raises(elite.DataError, match="calib.txt: calibration file not found"):
        elite.read_calib(tmp_path / "calib.txt")
    (tmp_path / "calib.txt").write_text("P0: 1 2 3\nTr: " + " ".join(["0"] * 12) + "\n")
    with pytest.raises(elite.DataError, match="no 'P2:' line"):
        elite.read_calib(tmp_path / "calib.txt")
    (tmp_path / "calib.txt").write_text("P2: 1 2 3\nTr: " + " ".join(["0"] * 12) + "\n")
    with pytest.raises(elite.DataError, match="'P2' has 3 values"):
        elite.read_calib(tmp_path / "calib.txt")
    with pytest.raises(elite.DataError, match="image not found"):
        elite.read_image(tmp_path / "image_2" / "000000.png")
    with pytest.raises(elite.DataError, match="no 'sequences' folder"):
        elite.list_scans(tmp_path, ["00"])
    (tmp_path / "sequences" / "00").mkdir(parents=True)
    with pytest.raises(elite.DataError, match="no scans"):
        elite.list_scans(tmp_path, ["00"])


def test_unknown_raw_ids_warn_and_become_unlabelled():
    with pytest.warns(UserWarning, match="not in semantic-kitti.yaml"):
        ids = elite.to_train_ids(np.array([10, 77, 70000, 40]), "x.label")
    assert ids.tolist() == [1, 0, 0, 9]


def test_dataset_drops_non_finite_points_and_survives_empty_range(tmp_path):
    seq = tmp_path / "sequences" / "00"
    pts = write_scan(seq, n=50)
    pts[3] = np.nan
    pts[7, 0] = np.inf
    pts.tofile(seq / "velodyne" / "000000.bin")
    far = np.full((20, 4), 80.0, dtype=np.float32)  # every point out of range
    far.tofile(seq / "velodyne" / "000001.bin")
    np.zeros(20, dtype=np.uint32).tofile(seq / "labels" / "000001.label")
    ds = elite.SemanticKITTI(tmp_path, ["00"], train=True)
    with pytest.warns(UserWarning, match="dropped 2 points with NaN or Inf"):
        scan = ds[0]
    assert np.isfinite(scan.points).all() and 3 not in scan.index and 7 not in scan.index
    empty = ds[1]
    assert len(empty.points) == 0 and empty.num_raw == 20
    batch = elite.collate([scan, empty])
    model = elite.Student().eval()
    with torch.no_grad():
        assert model(batch.points, batch.batch_idx).logits.shape == (len(scan.points), 20)
    import infer
    pred = infer.predict_scan(model, far, votes=2, rng=np.random.default_rng(0), device="cpu")
    assert pred.shape == (20,) and (pred == 0).all()


def test_augmentation_matches_official_conventions():
    rng = np.random.default_rng(0)
    xyz = np.random.default_rng(1).normal(size=(200, 3)).astype(np.float32) * 10
    out = elite.augment_xyz(xyz, rng, flip_scale=False)
    # Rotation about z plus one shared translation: pairwise distances are kept.
    d0 = np.linalg.norm(xyz[1:] - xyz[:-1], axis=1)
    d1 = np.linalg.norm(out[1:] - out[:-1], axis=1)
    np.testing.assert_allclose(d0, d1, rtol=1e-4, atol=1e-4)
    idx = elite.dropout_points(10_000, np.random.default_rng(2))
    dropped = idx != np.arange(10_000)
    assert (idx[dropped] == 0).all() and dropped.mean() < 0.2


# ------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------

def test_checkpoint_roundtrip_and_wrong_kind(tmp_path):
    model = elite.Student()
    elite.atomic_save(elite.student_state(model), tmp_path / "s.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]  # no temporary file left
    loaded, _ = elite.load_student(tmp_path / "s.pt")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    elite.atomic_save({"kind": "elite-teacher"}, tmp_path / "t.pt")
    with pytest.raises(elite.DataError, match="holds a 'elite-teacher' model, expected 'elite-student'"):
        elite.load_student(tmp_path / "t.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(elite.DataError, match="cannot read checkpoint"):
        elite.load_student(tmp_path / "bad.pt")


# ------------------------------------------------------------------------------------
# Real SemanticKITTI data (skipped without ../shared/realdata)
# ------------------------------------------------------------------------------------

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
    assert yaml_map(text, "learning_map") == elite.LEARNING_MAP
    assert yaml_map(text, "learning_map_inv") == elite.LEARNING_MAP_INV
    names = dict(re.findall(r"^\s+(\d+)\s*:\s*\"([^\"]+)\"", text.split("\ncolor_map:")[0], re.M))
    assert [names[str(elite.LEARNING_MAP_INV[i])] for i in range(1, 20)] == elite.CLASS_NAMES[1:]


@needs_real
def test_real_scans_and_labels_load():
    for k in range(3):
        pts = elite.read_scan(REAL_SEQ / "velodyne" / f"{k:06d}.bin")
        sem, inst = elite.read_labels(REAL_SEQ / "labels" / f"{k:06d}.label", len(pts))
        assert 124_000 < len(pts) < 125_000 and pts.dtype == np.float32
        assert set(np.unique(sem)) <= set(elite.LEARNING_MAP) and inst.max() > 0


@needs_real
def test_real_voxels_per_scale():
    pts = elite.read_scan(REAL_SEQ / "velodyne" / "000000.bin")
    xyz = torch.from_numpy(pts[elite.in_range(pts[:, :3]), :3])
    b = torch.zeros(len(xyz), dtype=torch.long)
    counts = [len(elite.voxelize(xyz, b, s)) for s in (1, 2, 4, 8, 16)]
    for got, expect in zip(counts, (58_500, 30_200, 13_200, 5_300, 1_900)):
        assert abs(got - expect) < 0.01 * expect, counts
    assert abs(elite.build_neighbour_map(elite.voxelize(xyz, b, 1).coords).num_pairs - 362_000) < 1_000


@needs_real
def test_real_calibration_projects_15_percent():
    calib = elite.read_calib(REAL_SEQ / "calib.txt")
    assert np.allclose(calib["P2"][0, 3], 45.38225)
    pts = elite.read_scan(REAL_SEQ / "velodyne" / "000000.bin")
    keep, rows_cols = elite.project_points(pts[:, :3], calib["proj"], 376, 1241)
    assert abs(keep.mean() - 0.155) < 0.003 and len(rows_cols) == keep.sum()
    assert (rows_cols[:, 0] < 376).all() and (rows_cols[:, 1] < 1241).all()


@needs_real
def test_real_scan_forward_and_backward():
    ds = elite.SemanticKITTI(REAL / "semantickitti", ["00"], train=True)
    batch = elite.collate([ds[0]])
    torch.manual_seed(0)
    model = elite.Student()
    out = model(batch.points, batch.batch_idx)
    assert out.logits.shape == (len(batch.points), 20)
    loss = elite.seg_loss(out.logits, batch.labels, elite.class_weights(), 0.1)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].v_enc[0].conv1.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------
# Synthetic scenes and the scripts end to end
# ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    import synthkitti
    root = tmp_path_factory.mktemp("synth")
    return synthkitti.make_dataset(root, {"00": 2, "08": 1}, columns=256, seed=3, progress=False)


def test_synthetic_scenes_read_by_the_real_loader(synth_root):
    import synthkitti
    scans = elite.list_scans(synth_root, ["00", "08"])
    assert len(scans) == 3
    classes = set()
    for scan in scans:
        points, labels = elite.load_scan(scan)
        assert len(points) > 5000 and (points[:, 3] >= 0).all() and (points[:, 3] < 1).all()
        classes |= set(np.unique(labels).tolist())
        image = elite.read_image(scan.parent.parent / "image_2" / f"{scan.stem}.png")
        assert image.shape == (synthkitti.IMAGE_HEIGHT, synthkitti.IMAGE_WIDTH, 3)
    assert len(classes - {0}) >= 12, [elite.CLASS_NAMES[c] for c in classes]
    real = (REAL_SEQ / "calib.txt") if REAL_SEQ.is_dir() else None
    calib = elite.read_calib(synth_root / "sequences" / "00" / "calib.txt")
    if real is not None:
        assert np.allclose(calib["proj"], elite.read_calib(real)["proj"])


def test_synthetic_points_and_pixels_agree(synth_root):
    """A LiDAR point projected with the calibration lands on a pixel of its own class."""
    seq = synth_root / "sequences" / "00"
    calib = elite.read_calib(seq / "calib.txt")
    points, labels = elite.load_scan(seq / "velodyne" / "000001.bin")
    gt = np.load(seq / "image_2_gt" / "000001.npy")
    assert gt.dtype == np.uint16 and gt.shape[0] == 2
    keep, rows_cols = elite.project_points(points[:, :3], calib["proj"], gt.shape[1], gt.shape[2])
    pixel_class = gt[0][rows_cols[:, 0].astype(int), rows_cols[:, 1].astype(int)]
    assert keep.sum() > 1000 and (pixel_class == labels[keep]).mean() > 0.9


def test_synthetic_scenes_are_deterministic():
    import synthkitti
    a, la = synthkitti.make_scan(seed=5, columns=256)
    b, lb = synthkitti.make_scan(seed=5, columns=256)
    c, _ = synthkitti.make_scan(seed=6, columns=256)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a[:100], c[:100])


def test_train_resume_and_infer_end_to_end(synth_root, tmp_path):
    import infer
    import train_student
    common = ["--data", str(synth_root), "--train-sequences", "00", "--val-sequences", "08",
              "--preset", "embedded", "--batch-size", "2", "--out", str(tmp_path / "run"), "--device", "cpu"]
    train_student.main(common + ["--epochs", "1"])
    first = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert first["epoch"] == 0 and (tmp_path / "run" / "best.pt").is_file()
    train_student.main(common + ["--epochs", "2", "--resume"])
    second = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert second["epoch"] == 1 and second["step"] == 2
    assert not torch.equal(first["model"]["classifier.2.weight"], second["model"]["classifier.2.weight"])
    infer.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--data", str(synth_root),
                "--split", "val", "--votes", "2", "--out", str(tmp_path / "pred"), "--device", "cpu"])
    pred = np.fromfile(tmp_path / "pred" / "sequences" / "08" / "predictions" / "000000.label", dtype=np.uint32)
    assert len(pred) == len(elite.read_scan(synth_root / "sequences" / "08" / "velodyne" / "000000.bin"))
    assert set(np.unique(pred).tolist()) <= set(elite.LEARNING_MAP_INV.values())
