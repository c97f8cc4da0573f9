"""Tests of U2MKD (u2mkd.py): the camera for fusion, the splat, the student/teacher pairing,
imputation, the fusion student, the KD losses, the instance database and paste, the ImageNet
weights. The scripts' U2MKD runs are in test_scripts.py, nuScenes' pairs in test_nusc.py."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import runs
import scandata
import semantickitti
import u2mkd


# ------------------------------------------------------------------------------------
# 1. The camera for fusion
# ------------------------------------------------------------------------------------

def test_camera_uv_is_normalised_from_the_original_size_and_strict():
    proj = np.array([[100.0, 0, 50, 0], [0, 100.0, 20, 0], [0, 0, 1, 0]])  # camera looks along +z here
    xyz = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [-0.5, -0.2, 1.0], [5.0, 0.0, 1.0], [-1.0, 0.0, 1.0]])
    # project_points keeps x > 0 (velodyne forward); x here is 1, 0, -0.5, 5, -1
    uv, fov = u2mkd.camera_uv(xyz, proj, height=40, width=201)
    # point 0: u = 150, v = 20 -> x = 150/200*2-1 = 0.5, y = 20/39*2-1
    assert fov.tolist() == [True, False, False, False, False]
    assert np.allclose(uv[0], [0.5, 20 / 39 * 2 - 1]) and (uv[~fov] == 0).all()


# ------------------------------------------------------------------------------------
# 2. The LiDAR teacher's strong augmentation: instance paste
# ------------------------------------------------------------------------------------

def test_instance_database_round_trip_and_paste(synth_copy):
    db = runs.load_instance_db(synth_copy, ["00"], min_points=20, progress=False)
    assert len(db) > 0 and set(db.classes.tolist()) <= set(u2mkd.THING_CLASSES)
    assert runs.instance_db_path(synth_copy).is_file()
    again = runs.load_instance_db(synth_copy, ["00"], min_points=20, progress=False)
    assert np.array_equal(again.points, db.points) and np.array_equal(again.classes, db.classes)
    first = db.instance(0)
    scan = semantickitti.list_scans(synth_copy, ["00"])[0]
    semantic, instance = semantickitti.read_labels(semantickitti.label_path(scan))
    points = semantickitti.read_scan(scan)
    labels = semantickitti.to_train_ids(semantic)
    # The first instance really is the points of one (class, instance) of the first scan.
    match = (labels == db.classes[0]) & scandata.in_range(points[:, :3], semantickitti.RANGE_MIN, semantickitti.RANGE_MAX)
    assert any(np.array_equal(points[match & (instance == i)], first) for i in np.unique(instance[match]))
    other = runs.load_instance_db(synth_copy, ["00", "08"], min_points=20, progress=False)  # other key: rebuilt
    assert len(other) >= len(db)
    # A cache never outlives what it was cut from: one label file put back with other instance ids,
    # the same size and an older time (cp -p, rsync -a) -> rebuilt.
    label = synth_copy / "sequences" / "00" / "labels" / "000000.label"
    before = label.stat().st_mtime_ns
    raw = np.fromfile(label, dtype=np.uint32)
    (raw & 0xFFFF).astype(np.uint32).tofile(label)
    os.utime(label, ns=(before - 10**9, before - 10**9))
    assert len(runs.load_instance_db(synth_copy, ["00"], min_points=20, progress=False)) < len(db)
    # Every label file edited (every instance id 0) -> rebuilt, empty.
    for label in (synth_copy / "sequences" / "00" / "labels").glob("*.label"):
        raw = np.fromfile(label, dtype=np.uint32)
        (raw & 0xFFFF).astype(np.uint32).tofile(label)
    assert len(runs.load_instance_db(synth_copy, ["00"], min_points=20, progress=False)) == 0
    pts, lab = u2mkd.paste_instances(points, labels, db, np.random.default_rng(0), add_num=3)
    added = pts[len(points):]
    assert len(added) > 0 and set(np.unique(lab[len(points):]).tolist()) <= set(u2mkd.THING_CLASSES)
    assert np.array_equal(pts[:len(points)], points)


# ------------------------------------------------------------------------------------
# 3. Datasets: the teacher's scans, a scan's student and teacher views
# ------------------------------------------------------------------------------------

def test_lidar_teacher_data_pastes_before_augmentation(synth_copy):
    db = runs.load_instance_db(synth_copy, ["00"], min_points=20, progress=False)
    plain = semantickitti.SemanticKITTI(synth_copy, ["00"], train=False)[0]
    pasted = u2mkd.LidarTeacherData(synth_copy, ["00"], db, seed=0, add_num=3)[0]
    assert len(pasted.points) > len(plain.points) and (pasted.index == -1).sum() == len(pasted.points) - len(plain.points)
    assert np.array_equal(pasted.index[pasted.index >= 0], plain.index)


def test_teacher_predictions_land_on_the_same_raw_point(synth_root):
    ds = u2mkd.PairData(synth_root, ["00"], train=True, seed=4, image_hw=(64, 192), teacher_view=True)
    batch = u2mkd.collate_pairs([ds[0], ds[1]])
    t, s = batch.teacher, batch.lidar
    assert torch.equal(t.index[batch.teacher_row], s.index)  # the same raw rows
    assert torch.equal(t.batch_idx[batch.teacher_row], s.batch_idx)
    assert torch.equal(t.labels[batch.teacher_row], s.labels)
    # Independent augmentations: the same raw point sits elsewhere in the two views.
    assert (t.points[batch.teacher_row, :3] - s.points[:, :3]).norm(dim=1).median() > 0.5
    # A "teacher" whose prediction encodes the raw row: the student side reads its own rows.
    fake = F.one_hot(t.index % 20, 20).float() * 10
    assert torch.equal(fake[batch.teacher_row].argmax(1), s.index % 20)


# ------------------------------------------------------------------------------------
# 4. The image branch
# ------------------------------------------------------------------------------------

def test_imagenet_weights_load_into_the_backbone(tmp_path):
    import torchvision
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "resnet18.pth")
    branch = u2mkd.ImageBranch()
    runs.load_imagenet_weights(branch, tmp_path / "resnet18.pth")
    assert torch.equal(branch.stem[0].weight, ref.conv1.weight)
    assert torch.equal(branch.stages[3][1].bn2.running_var, ref.layer4[1].bn2.running_var)
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(scandata.DataError, match="bad.pth"):
        runs.load_imagenet_weights(branch, tmp_path / "bad.pth")


# ------------------------------------------------------------------------------------
# 5. Bidirectional fusion: the splat, imputation
# ------------------------------------------------------------------------------------

def test_splat_multiscale_is_a_mean_per_cell_then_upsampled():
    torch.manual_seed(0)
    feats = torch.randn(50, 3)
    uv = torch.rand(50, 2) * 2 - 1
    rows = torch.randint(0, 2, (50,))
    one = u2mkd.splat_multiscale(feats, uv, rows, 2, 8, 16, num_scales=1)
    ref = torch.zeros(2, 3, 8, 16)
    count = torch.zeros(2, 1, 8, 16)
    for f, (x, y), r in zip(feats, uv, rows):
        col, row = int(((x + 1) / 2 * 15).floor()), int(((y + 1) / 2 * 7).floor())
        ref[r, :, row, col] += f
        count[r, :, row, col] += 1
    assert torch.allclose(one, ref / count.clamp_min(1), atol=1e-6)
    two = u2mkd.splat_multiscale(feats, uv, rows, 2, 8, 16, num_scales=2)
    coarse = u2mkd.splat_multiscale(feats, uv, rows, 2, 4, 8, num_scales=1)
    up = F.interpolate(coarse, size=(8, 16), mode="bilinear", align_corners=True)
    assert torch.allclose(two, (one + up) / 2, atol=1e-6)


def fusion_batch(root, images=True):
    ds = u2mkd.PairData(root, ["00"], train=True, seed=0, image_hw=(64, 192), images=images, teacher_view=True)
    return u2mkd.collate_pairs([ds[0], ds[1]])


def test_imputation_target_stays_detached(synth_root):
    torch.manual_seed(0)
    model = u2mkd.FusionStudent()
    b = fusion_batch(synth_root)
    out = model(b.lidar.points, b.lidar.batch_idx, b.images, b.image_of_point, b.uv)
    assert len(out.imputed_seen) == len(out.image_seen) == 4
    assert not any(t.requires_grad for t in out.image_seen)
    # Stage 1's learner reads LiDAR features alone (later stages read features the image fused
    # into), so any gradient of its MSE in the image branch would have come through the target.
    u2mkd.u2mkd_losses(out, b)["impute_stage1"].backward()
    image_side = [p for name, p in model.named_parameters() if name.startswith(("image.", "l2c.", "c2l."))]
    assert image_side and all(p.grad is None or not p.grad.any() for p in image_side)
    assert all(p.grad is not None and p.grad.any() for p in model.learners[0].parameters())  # the learner learns


def test_imputation_is_used_exactly_for_the_points_the_camera_does_not_see(synth_root):
    torch.manual_seed(0)
    batch = fusion_batch(synth_root)
    fov = batch.fov
    assert 0 < int(fov.sum()) < len(fov)
    model = u2mkd.FusionStudent().eval()
    imputed, c2l_inputs, skips = {}, {}, {}
    for k in range(4):
        model.learners[k].register_forward_hook(lambda m, a, out, k=k: imputed.__setitem__(k, out))
        model.c2l[k].register_forward_pre_hook(lambda m, a, k=k: c2l_inputs.__setitem__(k, a[1]))
        model.l2c[k].register_forward_hook(lambda m, a, out, k=k: skips.__setitem__(k, out[1]))
    b = batch
    out = model(b.lidar.points, b.lidar.batch_idx, b.images, b.image_of_point, b.uv)
    for k in range(4):
        img = c2l_inputs[k]
        assert torch.equal(img[~fov], imputed[k][~fov])  # unseen: the learner's imputation
        sampled = u2mkd.sample_image(skips[k], b.uv[fov], b.image_of_point[fov])
        assert torch.allclose(img[fov], sampled) and not torch.allclose(img[fov], imputed[k][fov])
    assert out.pixel_logits.shape == (int(fov.sum()), 20) and len(out.imputed_seen) == 4


# ------------------------------------------------------------------------------------
# 6. The fusion student
# ------------------------------------------------------------------------------------

def test_fusion_student_forward_and_backward_without_any_image(synth_root):
    torch.manual_seed(0)
    b = fusion_batch(synth_root, images=False)
    assert b.images is None and not b.fov.any()
    model = u2mkd.FusionStudent()
    out = model(b.lidar.points, b.lidar.batch_idx, None, b.image_of_point, b.uv)
    assert out.pixel_logits is None and out.imputed_seen == [] and out.logits.shape == (len(b.lidar.points), 20)
    terms = u2mkd.u2mkd_losses(out, b)
    assert list(terms) == ["seg3d"]
    terms["seg3d"].backward()
    assert all(p.grad is None for p in model.image.parameters())
    assert model.learners[0][0].weight.grad.abs().sum() > 0  # imputation still trains through the 3D loss
    assert model.lidar.blocks[0].v_enc[0].conv1.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------
# 7. Uni-to-multi KD and the total loss
# ------------------------------------------------------------------------------------

def test_u2mkd_losses_and_no_gradient_reaches_the_teacher(synth_root):
    torch.manual_seed(0)
    b = fusion_batch(synth_root)
    model, adapter = u2mkd.FusionStudent(), u2mkd.kd_adapter()
    teacher = u2mkd.lidar_teacher().eval()
    assert teacher.cfg.hidden == 128
    targets = u2mkd.teacher_targets(teacher, b)
    out = model(b.lidar.points, b.lidar.batch_idx, b.images, b.image_of_point, b.uv)
    terms = u2mkd.u2mkd_losses(out, b, targets, adapter)
    assert list(terms) == ["seg3d", "seg2d", *[f"impute_stage{k}" for k in range(1, 5)], "kd_logits", "kd_feature"]
    t_logits, t_feats = targets
    assert t_logits.shape == (len(b.lidar.points), 20) and t_feats.shape == (len(b.lidar.points), 128)
    p_t, log_p_s = F.softmax(t_logits, 1), F.log_softmax(out.logits, 1)
    kl = (p_t * (p_t.log() - log_p_s)).sum() / len(p_t)  # batchmean: per point, all points
    assert torch.allclose(terms["kd_logits"], kl, rtol=1e-4)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert adapter[0].weight.grad.abs().sum() > 0 and model.image.stem[0].weight.grad.abs().sum() > 0


def test_an_instance_database_whose_arrays_do_not_fit_is_refused(synth_copy):
    """Fault-hunting round 3 (issue 34): a database hand-edited with its record kept (offsets
    x1000) was trusted and pasted nothing; its arrays are checked against each other."""
    runs.load_instance_db(synth_copy, ["00"], min_points=20, progress=False)
    path = runs.instance_db_path(synth_copy)
    with np.load(path) as f:
        arrays = dict(f)
    np.savez(path, **(arrays | {"offsets": arrays["offsets"] * 1000}))
    with pytest.raises(scandata.DataError, match=r"u2mkd_instances\.npz: the instance database's arrays do not fit"):
        runs.load_instance_db(synth_copy, ["00"], min_points=20, progress=False)
