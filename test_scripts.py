"""Tests: the scripts run end to end, as a user runs them. Training, resuming and inference
on the synthetic scenes; real processes killed (SIGKILL) or stopped (SIGTERM, Ctrl-C) and
resumed; every row of the bad-input table (docs/reliability.md); run folders, read-only places, a full disk.
Marked `slow` (conftest.py); CI runs them with the rest."""
from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import elite
import runs
import scandata
import semantickitti
import synthkitti
import u2mkd

REPO = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


def test_train_resume_and_infer_end_to_end(synth_root, tmp_path, capsys):
    import infer
    import train_student
    where = ["--out", str(tmp_path / "run"), "--device", "cpu"]
    train_student.main(where + ["--data", str(synth_root), "--train-sequences", "00", "--val-sequences", "08",
                                "--preset", "embedded", "--batch-size", "2", "--teacher", "none", "--lr", "0.05",
                                "--epochs", "1"])
    first = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert first["epoch"] == 0 and (tmp_path / "run" / "best.pt").is_file()
    capsys.readouterr()
    # A resume given only what it changes: every other flag as the run started, not the preset's.
    train_student.main(where + ["--epochs", "2", "--resume"])
    second = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert second["epoch"] == 1 and second["step"] == 2
    kept = ("data", "train_sequences", "batch_size", "lr", "teacher", "preset")
    assert {k: second["config"][k] for k in kept} == {k: first["config"][k] for k in kept}
    assert second["config"]["lr"] == 0.05 and second["config"]["epochs"] == 2
    assert "changed from here on: --epochs 2 (was 1)" in capsys.readouterr().out
    assert not torch.equal(first["model"]["classifier.2.weight"], second["model"]["classifier.2.weight"])
    import csv
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and [int(r["step"]) for r in rows] == [1, 2]
    assert {"lr", "seg3d_main", "miou", "best_miou"} <= set(rows[0])
    assert float(rows[1]["miou"]) == pytest.approx(100 * second["miou"])
    infer.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--data", str(synth_root),
                "--split", "val", "--votes", "2", "--out", str(tmp_path / "pred"), "--device", "cpu",
                "--vis", str(tmp_path / "vis")])
    pred = np.fromfile(tmp_path / "pred" / "sequences" / "08" / "predictions" / "000000.label", dtype=np.uint32)
    assert len(pred) == len(semantickitti.read_scan(synth_root / "sequences" / "08" / "velodyne" / "000000.bin"))
    assert set(np.unique(pred).tolist()) <= set(semantickitti.LEARNING_MAP_INV.values())
    message = run_main("infer", ["--checkpoint", str(tmp_path / "run" / "best.pt"), "--data", str(synth_root),
                                 "--split", "val", "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert re.search(r"pred: already holds predictions \(1 file, e\.g\. .*000000\.label\)", message), message
    assert np.array_equal(np.fromfile(tmp_path / "pred" / "sequences" / "08" / "predictions" / "000000.label",
                                      dtype=np.uint32), pred)  # another model's predictions are kept
    # The picture: a caption, the camera image, two 600x600 top views in the predicted classes'
    # colours, a legend.
    from PIL import Image
    picture = np.asarray(Image.open(tmp_path / "vis" / "sequences" / "08" / "000000.png").convert("RGB"))
    camera_rows = round(synthkitti.IMAGE_HEIGHT * 1200 / synthkitti.IMAGE_WIDTH)
    top = infer.CAPTION + camera_rows
    assert picture.shape[:2] > (top + 600, 1199) and picture.shape[1] == 1200
    top_view = picture[top + 20:top + 600, :600].reshape(-1, 3)  # clear of the title
    predicted = np.unique(semantickitti.to_train_ids(pred))
    drawn = [c for c in predicted if (top_view == semantickitti.CLASS_COLORS[c]).all(1).sum() > 20]
    assert drawn == [c for c in predicted if c != 0]  # every predicted class shows, nothing is blank
    errors = picture[top:top + 600, 600:].reshape(-1, 3)
    assert (errors == infer.CORRECT).all(1).sum() + (errors == infer.WRONG).all(1).sum() > 1000
    camera = picture[infer.CAPTION:top].reshape(-1, 3)
    assert len(np.unique(camera, axis=0)) > 100  # the camera image is there
    # Ctrl-C while infer.py writes its second file (issue 34): one line, exit 130, the first file
    # whole, no partial second file and no temporary left.
    written = []

    def half_then_ctrl_c(f):
        f.write(b"half a file")
        raise KeyboardInterrupt

    def interrupted_write(path, train_ids):
        if written:
            scandata.atomic_write(path, half_then_ctrl_c)
        scandata.atomic_write(path, lambda f: semantickitti.TRAIN_TO_RAW[train_ids].astype(np.uint32).tofile(f))
        written.append(path)

    out = tmp_path / "pred_ctrl_c"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(infer, "write_label_file", interrupted_write)
        message = run_main("infer", ["--checkpoint", str(tmp_path / "run" / "best.pt"), "--sequence",
                                     str(synth_root / "sequences" / "00"), "--out", str(out), "--device", "cpu"])
    assert message == "130" and "interrupted (Ctrl-C); every file written so far is whole" in capsys.readouterr().err
    # Fault-hunting round 3: another run's pictures in --vis are not redrawn without --overwrite.
    again = run_main("infer", ["--checkpoint", str(tmp_path / "run" / "best.pt"), "--data", str(synth_root), "--split",
                               "val", "--out", str(tmp_path / "pred_2"), "--device", "cpu", "--vis", str(tmp_path / "vis")])
    assert re.search(r"vis: already holds pictures \(1, e\.g\. .*000000\.png\); give another --vis, or --overwrite",
                     again), again
    files = sorted(p.name for p in (out / "sequences" / "00" / "predictions").iterdir())
    assert files == [written[0].name] and len(np.fromfile(written[0], np.uint32)) == len(
        semantickitti.read_scan(synth_root / "sequences" / "00" / "velodyne" / written[0].name.replace("label", "bin")))


@pytest.mark.parametrize("preset", ["paper", "paper-test"])
def test_each_elite_preset_runs_teacher_then_student(preset, synth_copy, tmp_path, capsys):
    """Each official config, one step of each stage on the synthetic scenes; only the sizes that
    a CPU cannot afford are overridden (the ViT, the crop, the batch, the epochs, the workers)."""
    import train_student
    import train_teacher
    from test_runs import two_dpass_state
    small = ["--data", str(synth_copy), "--preset", preset, "--epochs", "1", "--batch-size", "2", "--workers", "0",
             "--val-batch-size", "1", "--device", "cpu"]
    train_teacher.main(small + ["--variant", "vit_tiny", "--crop", "64", "128", "--mask-source", "ideal",
                                "--out", str(tmp_path / "teacher")])
    teacher = torch.load(tmp_path / "teacher" / "last.pt", weights_only=False)
    assert teacher["config"]["labels"] == {"paper": "sparse", "paper-test": "plg"}[preset]
    printed = " ".join(capsys.readouterr().out.split())
    assert {"paper": "--labels sparse (pseudo_label: False)", "paper-test": "--labels plg (pseudo_label: True)"}[preset] \
        in printed
    extra = []
    if preset == "paper-test":
        torch.save({"state_dict": two_dpass_state()}, tmp_path / "2dpass.ckpt")
        extra = ["--init-3d", str(tmp_path / "2dpass.ckpt")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_student.main(small + ["--teacher", str(tmp_path / "teacher" / "last.pt"),
                                    "--out", str(tmp_path / "student"), *extra])
    student = torch.load(tmp_path / "student" / "last.pt", weights_only=False)
    printed = " ".join(capsys.readouterr().out.split())
    assert student["step"] == 1 and student["config"]["labels"] == teacher["config"]["labels"]
    if preset == "paper":
        assert "--lr-schedule step (lr_scheduler: CosineAnnealingWarmRestarts" in printed
        assert "--cutmix False (no cutmix)" in printed and "2 training scans (00)" in printed
    else:
        assert "--lr-schedule epoch (lr_scheduler: CosineAnnealingLR, T_max 128 - 4, eta_min 1e-5" in printed
        assert "--cutmix True (cutmix: True" in printed and "3 training scans (00 08)" in printed
        assert "initialised from" in printed and "(2DPASS)" in printed
        assert any("both training and validation sequences" in str(w.message) for w in caught)
    assert "global batch 2" in printed and "--epochs 1 (given; the preset's is" in printed
    assert "The model of this run: " + str(tmp_path / "student" / "last.pt") in printed


def test_u2mkd_lr_follows_the_global_batch(synth_copy, tmp_path, capsys):
    import train_student
    train_student.main(["--data", str(synth_copy), "--method", "u2mkd", "--preset", "paper", "--teacher", "none",
                        "--epochs", "1", "--batch-size", "2", "--workers", "0", "--val-batch-size", "1",
                        "--image-size", "94", "310", "--device", "cpu", "--out", str(tmp_path / "run")])
    printed = " ".join(capsys.readouterr().out.split())
    assert "global batch 2; lr 0.03 (= 0.24 x 2/16, scaled to the global batch)" in printed
    with open(tmp_path / "run" / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["lr"]) == pytest.approx(0.03)  # one step of one: the schedule's first rate


def test_nuscenes_teacher_fusion_student_baseline_and_submission(synth_nusc, tmp_path, capsys):
    """U2MKD's own experiment on the synthetic nuScenes scenes: the LiDAR teacher (with sweeps),
    the fusion student distilled from it (six cameras, three dropped in training), the LiDAR-only
    baseline; infer.py scores with and without images, in and out of the cameras' view, and writes
    the submission format."""
    import infer
    import nusc
    import train_student
    import train_teacher
    common = ["--dataset", "nuscenes", "--data", str(synth_nusc), "--preset", "embedded", "--epochs", "1",
              "--device", "cpu"]
    train_teacher.main(["--teacher", "lidar", *common, "--out", str(tmp_path / "teacher")])
    teacher = torch.load(tmp_path / "teacher" / "last.pt", weights_only=False)
    assert teacher["student_config"]["num_classes"] == 17 and teacher["config"]["sweeps"] == 4
    printed = " ".join(capsys.readouterr().out.split())
    assert "the keyframe and 4 sweeps around it" in printed and "validation also reads the sweeps" in printed
    train_student.main(["--method", "u2mkd", *common, "--teacher", str(tmp_path / "teacher" / "last.pt"),
                        "--out", str(tmp_path / "fusion")])
    printed = " ".join(capsys.readouterr().out.split())
    assert "3 of the 6 cameras dropped per training keyframe" in printed and "the teacher sees 4 sweeps" in printed
    assert "(nuScenes-lidarseg rules)" in printed and "train_student.py: the U2MKD fusion student on nuScenes" in printed
    train_student.main([*common, "--out", str(tmp_path / "baseline")])
    assert "the LiDAR-only baseline on nuScenes" in capsys.readouterr().out
    tables = nusc.read_tables(synth_nusc, "v1.0-trainval")
    val = nusc.keyframes(tables, synth_nusc, nusc.split_scenes(tables, "val"))
    for run, columns, camera in (("fusion", ("images all", "images seen", "no images unseen"), True),
                                 ("baseline", ("lidar all", "lidar seen", "lidar unseen"), False)):
        out = tmp_path / f"pred_{run}"
        infer.main(["--dataset", "nuscenes", "--data", str(synth_nusc), "--checkpoint",
                    str(tmp_path / run / "last.pt"), "--out", str(out), "--device", "cpu"])
        printed = capsys.readouterr().out
        assert all(c in printed for c in columns) and "nuScenes-lidarseg rules" in printed
        assert re.search(r"^fwIoU +[\d.]+", printed, re.M)  # beside mIoU, as the devkit reports
        miou = re.search(r"^mIoU +([\d.]+)", printed, re.M)
        assert miou and 0 <= float(miou.group(1)) <= 100
        for frame in val:  # one file per keyframe, a class 1..16 for every point of its file
            pred = np.fromfile(out / "lidarseg" / "val" / f"{frame.lidar_token}_lidarseg.bin", dtype=np.uint8)
            assert len(pred) == len(nusc.read_points(frame.points)) and pred.min() >= 1 and pred.max() <= 16
        meta = json.loads((out / "val" / "submission.json").read_text())["meta"]
        assert meta["use_camera"] is camera and meta["use_lidar"] is True
    # v1.0-test (no labels): the submission files of every test keyframe, nothing scored.
    test_tables = nusc.read_tables(synth_nusc, "v1.0-test")
    test_frames = nusc.keyframes(test_tables, synth_nusc, nusc.split_scenes(test_tables, "test"), labelled=False)
    infer.main(["--dataset", "nuscenes", "--data", str(synth_nusc), "--version", "v1.0-test", "--split", "test",
                "--checkpoint", str(tmp_path / "fusion" / "last.pt"), "--out", str(tmp_path / "pred_test"),
                "--device", "cpu"])
    assert "No labels (the test split): submission files written, nothing scored." in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "pred_test" / "lidarseg" / "test").iterdir()) == \
        sorted(f"{frame.lidar_token}_lidarseg.bin" for frame in test_frames) and len(test_frames) == 2
    meta = json.loads((tmp_path / "pred_test" / "test" / "submission.json").read_text())["meta"]
    assert meta == {"use_camera": True, "use_lidar": True, "use_radar": False, "use_map": False, "use_external": False}
    # Onto the other model's submission: refused; with --overwrite, exactly the new files.
    again = ["--dataset", "nuscenes", "--data", str(synth_nusc), "--checkpoint", str(tmp_path / "baseline" / "last.pt"),
             "--out", str(tmp_path / "pred_fusion"), "--device", "cpu"]
    (tmp_path / "pred_fusion" / "lidarseg" / "val" / "stale_lidarseg.bin").write_bytes(b"\x01")
    before = {p: p.read_bytes() for p in (tmp_path / "pred_fusion").rglob("*") if p.is_file()}
    assert re.search(r"pred_fusion: already holds predictions \(\d+ files?, e\.g\. .*\); give another --out, or "
                     r"--overwrite to replace them", run_main("infer", again))
    assert {p: p.read_bytes() for p in (tmp_path / "pred_fusion").rglob("*") if p.is_file()} == before
    assert run_main("infer", again + ["--overwrite"]) == ""
    assert sorted(p.name for p in (tmp_path / "pred_fusion" / "lidarseg" / "val").iterdir()) == \
        sorted(f"{frame.lidar_token}_lidarseg.bin" for frame in val)  # the stale file is gone
    assert json.loads((tmp_path / "pred_fusion" / "val" / "submission.json").read_text())["meta"]["use_camera"] is False
    runs.atomic_save(runs.lidar_teacher_state(u2mkd.lidar_teacher()), tmp_path / "kitti_teacher.pt")
    with pytest.raises(scandata.DataError, match=r"kitti_teacher\.pt: a LiDAR teacher of 20 classes, but --dataset "
                                                 r"nuscenes has 17"):
        train_student.main(["--method", "u2mkd", *common, "--teacher", str(tmp_path / "kitti_teacher.pt"),
                            "--out", str(tmp_path / "wrong")])
    with pytest.raises(scandata.DataError, match=r"kitti\.pt: a model for semantickitti \(20 classes and its voxel "
                                                 r"grid\), not for nuscenes"):  # a SemanticKITTI student
        runs.atomic_save(runs.student_state(elite.Student()), tmp_path / "kitti.pt")
        infer.predict(infer.parse_args(["--dataset", "nuscenes", "--data", str(synth_nusc), "--checkpoint",
                                        str(tmp_path / "kitti.pt"), "--out", str(tmp_path / "p"), "--device", "cpu"]))


def test_u2mkd_runs_scale_the_lr_with_their_global_batch():
    """Both U2MKD trainers: the preset's lr is for its global batch (the teacher's 4 GPUs x 3 on
    nuScenes); another batch x processes scales it in proportion, as upstream's recipe implies."""
    import train_teacher
    args = train_teacher.parse_args(["--teacher", "lidar", "--dataset", "nuscenes", "--data", "NUSC", "--device",
                                     "cpu"])
    assert (args.batch_size, args.global_batch, args.lr) == (3, 12, 0.24)
    lr, note = runs.scaled_lr(args)  # one process of 3
    assert lr == pytest.approx(0.06) and note == " (= 0.24 x 3/12, scaled to the global batch)"
    args.batch_size = 12
    assert runs.scaled_lr(args) == (0.24, "")
    sam = train_teacher.parse_args(["--data", "KITTI", "--device", "cpu"])
    assert sam.global_batch is None and runs.scaled_lr(sam) == (sam.lr, "")  # the SAM teacher's lr is not scaled


def check_plg_picture(png: Path, scan: Path) -> None:
    """train_teacher.py --vis: the frame with its labelled points above the frame with the
    pseudo-labels blended in, both in the official colours."""
    from PIL import Image
    h, w = synthkitti.IMAGE_HEIGHT, synthkitti.IMAGE_WIDTH
    picture = np.asarray(Image.open(png).convert("RGB"))
    assert picture.shape == (2 * h, w, 3)
    dense = semantickitti.read_pixel_labels(semantickitti.plg_path(scan), h, w)[0]
    frame = scandata.read_image(semantickitti.image_path(scan)).astype(np.float32)
    blended = (0.45 * frame + 0.55 * semantickitti.CLASS_COLORS[dense]).astype(np.uint8)
    lower = picture[h:]
    region = (dense != 0) & (np.arange(h)[:, None] > 20)  # below the title
    region[:, :200] = False  # clear of the legend
    assert (np.abs(lower[region].astype(int) - blended[region]).max(1) <= 1).mean() > 0.99
    upper = picture[:h].reshape(-1, 3)
    semantic = semantickitti.load_plg_frame(scan, semantickitti.read_calib(semantickitti.calib_path(scan))).semantic
    classes, counts = np.unique(semantic[semantic != 0], return_counts=True)
    for c in classes[counts >= 20]:  # each class's points show as dots of its colour
        assert (upper == semantickitti.CLASS_COLORS[c]).all(1).sum() >= 9, semantickitti.CLASS_NAMES[c]


def test_train_teacher_pseudo_labels_shards_train_and_resume(synth_copy, tmp_path):
    import train_teacher
    run = tmp_path / "run"
    common = ["--data", str(synth_copy), "--preset", "embedded", "--train-sequences", "00", "--val-sequences", "08",
              "--crop", "64", "128", "--batch-size", "2", "--out", str(run), "--device", "cpu"]
    train_scans = semantickitti.list_scans(synth_copy, ["00"])
    train_teacher.main(common + ["--plg-only", "--shard", "1/2"])
    assert [semantickitti.plg_path(s).is_file() for s in train_scans] == [False, True]  # shard 1 of 2: the 2nd scan
    vis = tmp_path / "vis"
    train_teacher.main(common + ["--vis", str(vis)])  # makes the missing pseudo-labels, draws them, trains nothing
    assert all(semantickitti.plg_path(s).is_file() for s in train_scans) and not run.exists()
    check_plg_picture(vis / "sequences/00/000001.png", train_scans[1])
    assert not list((synth_copy / "sequences" / "00" / "image_2_plg").glob("*.tmp*"))
    train_teacher.main(common + ["--epochs", "1"])
    first = torch.load(run / "last.pt", weights_only=False)
    assert first["kind"] == runs.TEACHER_KIND and first["epoch"] == 0 and (run / "best.pt").is_file()
    assert first["teacher_config"]["variant"] == "vit_tiny" and first["rank_allocator"]["ipt"]
    train_teacher.main(common + ["--epochs", "2", "--resume"])
    second = torch.load(run / "last.pt", weights_only=False)
    assert second["epoch"] == 1 and second["step"] == 2
    key = "patch_decoders.0.0.weight"
    assert not torch.equal(first["weights"][key], second["weights"][key])
    teacher, _ = runs.load_teacher(run / "last.pt")
    assert torch.equal(teacher.state_dict()[key], second["weights"][key])
    # Sparse point labels (the official default config) train too.
    train_teacher.main(common + ["--labels", "sparse", "--epochs", "1", "--out", str(tmp_path / "sparse")])
    assert (tmp_path / "sparse" / "last.pt").is_file()


def test_train_student_with_a_teacher_saves_only_the_student_and_resumes(synth_copy, tmp_path):
    import infer
    import train_student
    torch.manual_seed(0)
    teacher = elite.Teacher(elite.TeacherConfig(variant="vit_tiny", crop_hw=(64, 128)))
    state = runs.teacher_state(teacher) | {"config": {"labels": "sparse", "target_rank": 8},
                                            "rank_allocator": None}
    runs.atomic_save(state, tmp_path / "teacher.pt")
    run = tmp_path / "run"
    common = ["--data", str(synth_copy), "--train-sequences", "00", "--val-sequences", "08", "--preset", "embedded",
              "--batch-size", "2", "--teacher", str(tmp_path / "teacher.pt"), "--out", str(run), "--device", "cpu"]
    with pytest.raises(scandata.DataError, match="pseudo-labels"):  # dense labels asked for, none made
        train_student.main(common + ["--epochs", "1", "--labels", "plg"])
    train_student.main(common + ["--epochs", "1"])
    last = torch.load(run / "last.pt", weights_only=False)
    assert last["config"]["teacher_mode"] == "joint" and last["config"]["labels"] == "sparse"
    assert last["heads_3d"] is not None and last["teacher"]["kind"] == runs.TEACHER_KIND
    best = torch.load(run / "best.pt", weights_only=False)
    assert "teacher" not in best and "heads_3d" not in best and "optimizer" not in best
    assert sum(v.numel() for v in best["model"].values() if v.is_floating_point()) < 1.95e6  # + BN statistics
    student, _ = runs.load_student(run / "best.pt")
    assert runs.count_parameters(student) == 1_933_460
    # Resume: the teacher's trained tensors come from last.pt, not from teacher.pt.
    key = "patch_decoders.0.0.weight"
    assert not torch.equal(last["teacher"]["weights"][key], state["weights"][key])
    train_student.main(common[:-6] + ["--out", str(run), "--device", "cpu", "--epochs", "2", "--resume"])
    second = torch.load(run / "last.pt", weights_only=False)
    assert second["epoch"] == 1 and second["step"] == 2 and second["config"]["teacher"] == str(tmp_path / "teacher.pt")
    infer.main(["--checkpoint", str(run / "best.pt"), "--data", str(synth_copy), "--split", "val",
                "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert (tmp_path / "pred" / "sequences" / "08" / "predictions" / "000000.label").is_file()


def test_lidar_teacher_then_u2mkd_student_then_infer_with_and_without_images(synth_copy, tmp_path, capsys):
    import infer
    import train_student
    import train_teacher
    data = ["--data", str(synth_copy), "--train-sequences", "00", "--val-sequences", "08", "--batch-size", "2",
            "--preset", "embedded", "--device", "cpu"]
    train_teacher.main(["--teacher", "lidar", "--epochs", "1", "--paste", "2", "--out", str(tmp_path / "lt")] + data)
    teacher, ckpt = runs.load_lidar_teacher(tmp_path / "lt" / "best.pt")
    assert teacher.cfg.hidden == 128 and ckpt["epoch"] == 0 and "optimizer" not in ckpt
    assert runs.instance_db_path(synth_copy).is_file()
    student = ["--method", "u2mkd", "--image-size", "64", "192", "--out", str(tmp_path / "fs")] + data
    with pytest.raises(scandata.DataError, match="elite-student"):  # not a LiDAR teacher
        runs.atomic_save(runs.student_state(elite.Student()), tmp_path / "s.pt")
        train_student.main(student + ["--teacher", str(tmp_path / "s.pt"), "--epochs", "1"])
    train_student.main(student + ["--teacher", str(tmp_path / "lt" / "best.pt"), "--epochs", "1"])
    last = torch.load(tmp_path / "fs" / "last.pt", weights_only=False)
    assert last["kind"] == runs.FUSION_KIND and last["kd_adapter"] is not None and last["image_hw"] == [64, 192]
    train_student.main(student + ["--epochs", "2", "--resume"])
    second = torch.load(tmp_path / "fs" / "last.pt", weights_only=False)
    assert second["epoch"] == 1 and second["step"] == 2 and second["config"]["teacher"] == str(tmp_path / "lt" / "best.pt")
    capsys.readouterr()
    infer.main(["--checkpoint", str(tmp_path / "fs" / "best.pt"), "--data", str(synth_copy), "--split", "val",
                "--out", str(tmp_path / "pred"), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "images all" in printed and "no images unseen" in printed
    pred = np.fromfile(tmp_path / "pred" / "sequences" / "08" / "predictions" / "000000.label", dtype=np.uint32)
    assert len(pred) == len(semantickitti.read_scan(synth_copy / "sequences" / "08" / "velodyne" / "000000.bin"))


# =====================================================================================
# Crash-safe work: real processes killed with SIGKILL, then resumed
# =====================================================================================



def start_script(script: str, args: list[str], log: Path) -> subprocess.Popen:
    """Run one of our scripts in its own process (one thread, so runs are bit-comparable)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, str(REPO / script)] + args, cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def kill_when(proc: subprocess.Popen, ready, timeout=300.0) -> None:
    """SIGKILL proc as soon as ready() holds; fail if it ended by itself first."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the process ended before it could be killed"
        assert time.time() < deadline, "timed out waiting to kill the process"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def finish(proc: subprocess.Popen, log: Path) -> str:
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    return log.read_text()


def test_training_killed_mid_epoch_resumes_to_the_same_weights(synth_root, tmp_path):
    args = ["--data", str(synth_root), "--train-sequences", "00", "--val-sequences", "08", "--preset", "embedded",
            "--batch-size", "1", "--epochs", "3", "--save-every", "1", "--device", "cpu", "--teacher", "none"]
    whole = start_script("train_student.py", args + ["--out", str(tmp_path / "whole")], tmp_path / "whole.log")
    finish(whole, tmp_path / "whole.log")

    out = tmp_path / "killed"
    first = start_script("train_student.py", args + ["--out", str(out)], tmp_path / "first.log")
    kill_when(first, lambda: (out / "last.pt").is_file())  # the first mid-epoch checkpoint
    stopped = torch.load(out / "last.pt", weights_only=False)
    assert stopped["step"] < 6  # killed before the end (2 steps x 3 epochs)
    printed = finish(start_script("train_student.py", args + ["--out", str(out), "--resume"], tmp_path / "r.log"),
                     tmp_path / "r.log")
    assert f"resumed from {out / 'last.pt'}: epoch {stopped['epoch'] + 2}" in printed

    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)
    b = torch.load(out / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 6 and a["batch"] == b["batch"] == 0
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key  # bit-identical, BatchNorm statistics included
    assert a["miou"] == b["miou"] and a["epoch_sums"] == b["epoch_sums"] == {}
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tmp") == []
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_resuming_mid_epoch_with_another_batch_size_is_refused(synth_root, tmp_path):
    import train_student
    args = ["--data", str(synth_root), "--train-sequences", "00", "--val-sequences", "08", "--preset", "embedded",
            "--epochs", "1", "--device", "cpu", "--teacher", "none", "--out", str(tmp_path / "run")]
    train_student.main(args + ["--batch-size", "1"])
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    ckpt.update(epoch=-1, batch=1)  # as if killed after the epoch's first batch
    runs.atomic_save(ckpt, tmp_path / "run" / "last.pt")
    with pytest.raises(scandata.DataError, match="same --batch-size"):
        train_student.main(args + ["--batch-size", "2", "--resume"])
    # issue 34: other training scans would make the skipped batches other scans than those it trained on
    with pytest.raises(scandata.DataError, match=r"in the middle of epoch 1 over other training scans \(2 scans, "
                                                 r"sha256 \w+; now 3 scans, .*same --data and --train-sequences"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 08 is a validation sequence too: said in a warning
        train_student.main(args + ["--batch-size", "1", "--train-sequences", "00", "08", "--resume"])


def test_sam_plg_killed_midway_resumes_without_redoing_or_corrupt_files(tmp_path):
    root = synthkitti.make_dataset(tmp_path / "d", {"00": 8}, columns=128, seed=4, progress=False)
    folder = root / "sequences/00/image_2_plg"
    args = ["--data", str(root), "--preset", "embedded", "--plg-only", "--train-sequences", "00", "--device", "cpu"]
    proc = start_script("train_teacher.py", args, tmp_path / "first.log")
    kill_when(proc, lambda: folder.is_dir() and any(folder.glob("*.npy")))
    done = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npy")}
    assert 1 <= len(done) < 8
    (folder / "000007.npy.killed00.tmp").write_bytes(b"half a file")  # as a kill mid-write leaves it
    printed = finish(start_script("train_teacher.py", args, tmp_path / "second.log"), tmp_path / "second.log")
    assert f"{8 - len(done)} written, {len(done)} already there" in printed
    expected = [f"{i:06d}.npy" for i in range(8)] + [semantickitti.PLG_RECORD]
    assert sorted(p.name for p in folder.iterdir()) == expected  # no temporaries
    assert {n: (folder / n).stat().st_mtime_ns for n in done} == done  # the finished ones were not redone
    calib = semantickitti.read_calib(root / "sequences/00/calib.txt")
    for scan in semantickitti.list_scans(root, ["00"]):  # every file whole and equal to an uninterrupted run's
        expected = elite.pseudo_labels(semantickitti.load_plg_frame(scan, calib), synthkitti.IdealMaskSource())
        np.testing.assert_array_equal(np.load(semantickitti.plg_path(scan)), expected)


# =====================================================================================
# Bad input: the table in docs/reliability.md, each row run through the script a user would run
# =====================================================================================
# Each case spoils a private copy of the synthetic scenes, runs the script in-process through
# runs.run_script (the scripts' own entry point), and checks that it stops with "error:" and
# a message naming the file (or, where the data is usable, warns and finishes), without a
# traceback and without leaving a half-written file behind.

def cut_bytes(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:-n])


def edit_scan(path: Path, change) -> None:
    points = np.fromfile(path, dtype=np.float32).reshape(-1, 4)
    change(points)
    points.tofile(path)


def drop_line(path: Path, key: str) -> None:
    path.write_text("".join(l for l in path.read_text().splitlines(True) if not l.startswith(key)))


def shorten_p2(path: Path) -> None:
    path.write_text("".join(" ".join(l.split()[:-1]) + "\n" if l.startswith("P2:") else l
                            for l in path.read_text().splitlines(True)))


def mirror_p2(path: Path) -> None:
    """calib.txt with P2's horizontal focal length negated: a mirrored camera."""
    path.write_text("".join("P2: " + " ".join([str(-float(l.split()[1]))] + l.split()[2:]) + "\n"
                            if l.startswith("P2:") else l for l in path.read_text().splitlines(True)))


def set_unknown_ids(path: Path) -> None:
    raw = np.fromfile(path, dtype=np.uint32)
    raw[:10] = (raw[:10] & 0xFFFF0000) | 7  # raw id 7 is not in semantic-kitti.yaml
    raw.tofile(path)


def strip_instances(labels: Path) -> None:
    for path in labels.glob("*.label"):
        raw = np.fromfile(path, dtype=np.uint32)
        (raw & 0xFFFF).astype(np.uint32).tofile(path)


def half_size_image(path: Path) -> None:
    from PIL import Image
    with Image.open(path) as im:
        im.resize((im.width // 2, im.height // 2)).save(path)


def resize_image(path: Path, factor: float) -> None:
    from PIL import Image
    with Image.open(path) as im:
        im.resize((round(im.width * factor), round(im.height * factor))).save(path)


def set_tr_nan(path: Path) -> None:
    path.write_text("".join("Tr: " + " ".join(["nan"] * 12) + "\n" if l.startswith("Tr:") else l
                            for l in path.read_text().splitlines(True)))


def zero_labels(folder: Path) -> None:
    for f in folder.glob("*.label"):
        np.zeros(f.stat().st_size // 4, np.uint32).tofile(f)


def huge_remission(p: np.ndarray) -> None:
    p[:, 3] = 1e30


def one_voxel(p: np.ndarray) -> None:
    p[:, :3] = np.array([10.0, 5.0, -1.0]) + 0.1 * (np.arange(len(p))[:, None] % 3) / 3  # all within 0.1 m


def to_float64(path: Path) -> None:
    np.fromfile(path, dtype=np.float32).astype(np.float64).tofile(path)


def make_plg_with(root: Path, masks: str) -> None:
    """Sequence 00's pseudo-labels, recorded as made with other masks."""
    source = synthkitti.IdealMaskSource()
    source.name = masks
    runs.generate_pseudo_labels(root, ["00"], source, progress=False)


S00, S08 = "sequences/00", "sequences/08"


def train_args(d: Path, *more) -> list[str]:
    return ["--data", str(d / "data"), "--train-sequences", "00", "--val-sequences", "08", "--preset", "embedded",
            "--epochs", "1", "--batch-size", "1", "--device", "cpu", "--out", str(d / "out"), *more]


def nusc_train_args(d: Path, *more) -> list[str]:
    """train_args without the SemanticKITTI sequence flags, which nuScenes refuses."""
    args = train_args(d, "--dataset", "nuscenes", *more)
    return [a for i, a in enumerate(args) if a not in ("--train-sequences", "--val-sequences")
            and args[i - 1] not in ("--train-sequences", "--val-sequences")]


def infer_args(d: Path, *more, checkpoint="student.pt") -> list[str]:
    return ["--checkpoint", str(d / checkpoint), "--data", str(d / "data"), "--split", "val", "--device", "cpu",
            "--out", str(d / "pred"), *more]


# (name, script, spoil the copy at d/data and return the arguments, message, usable data?)
BAD_INPUTS = [
    ("truncated .bin", "train_student",
     lambda d: (cut_bytes(d / "data" / S00 / "velodyne/000001.bin", 6), train_args(d, "--teacher", "none"))[1],
     r"00/velodyne/000001\.bin: \d+ bytes is not a multiple of 16", False),
    (".label of the wrong length", "infer",
     lambda d: (cut_bytes(d / "data" / S08 / "labels/000000.label", 4), infer_args(d))[1],
     r"08/labels/000000\.label: \d+ labels but its scan has \d+ points", False),
    ("training scan without its .label", "train_student",
     lambda d: ((d / "data" / S00 / "labels/000001.label").unlink(), train_args(d, "--teacher", "none"))[1],
     r"00/labels/000001\.label: label file not found", False),
    ("unknown raw label id", "infer",
     lambda d: (set_unknown_ids(d / "data" / S08 / "labels/000000.label"), infer_args(d))[1],
     r"000000\.label: 10 points carry raw label ids not in semantic-kitti\.yaml \[7\]", True),
    ("missing calib.txt", "train_teacher",
     lambda d: ((d / "data" / S00 / "calib.txt").unlink(), train_args(d, "--labels", "sparse"))[1],
     r"00/calib\.txt: calibration file not found", False),
    ("calib.txt without P2", "train_teacher",
     lambda d: (drop_line(d / "data" / S00 / "calib.txt", "P2:"), train_args(d, "--plg-only"))[1],
     r"00/calib\.txt: no 'P2:' line", False),
    ("P2 with 11 values", "infer",
     lambda d: (shorten_p2(d / "data" / S08 / "calib.txt"), infer_args(d, "--vis", str(d / "vis")))[1],
     r"08/calib\.txt: 'P2' has 11 values, expected 12", False),
    ("P2 mirrored (a negative focal length)", "infer",
     lambda d: (mirror_p2(d / "data" / S08 / "calib.txt"), infer_args(d, "--vis", str(d / "vis")))[1],
     r"08/calib\.txt: P2's focal lengths \(-\d[\d.e+]*, [\d.e+]+\) and scale 1 must be positive", False),
    ("missing image", "train_teacher",
     lambda d: ((d / "data" / S00 / "image_2/000001.png").unlink(), train_args(d, "--labels", "sparse"))[1],
     r"00/image_2/000001\.png: image not found", False),
    ("corrupt image", "infer",
     lambda d: ((d / "data" / S08 / "image_2/000000.png").write_bytes(b"\x89PNG broken"),
                infer_args(d, "--vis", str(d / "vis")))[1],
     r"08/image_2/000000\.png: cannot decode image", False),
    ("corrupt image read in a DataLoader worker", "train_teacher",
     lambda d: ((d / "data" / S00 / "image_2/000001.png").write_bytes(b"\x89PNG broken"),
                train_args(d, "--labels", "sparse", "--workers", "1"))[1],
     r"^error: \S+00/image_2/000001\.png: cannot decode image", False),
    ("image size not matching the calibration", "train_teacher",
     lambda d: (half_size_image(d / "data" / S00 / "image_2/000000.png"), train_args(d, "--plg-only"))[1],
     r"00/image_2/000000\.png: a 620x188 image does not match \S+00/calib\.txt", False),
    ("non-finite points", "infer",
     lambda d: (edit_scan(d / "data" / S08 / "velodyne/000000.bin", lambda p: p.__setitem__(slice(0, 5), np.nan)),
                infer_args(d))[1],
     r"08/velodyne/000000\.bin: dropped 5 points with NaN or Inf values", True),
    ("empty scan", "train_student",
     lambda d: ((d / "data" / S00 / "velodyne/000001.bin").write_bytes(b""),
                (d / "data" / S00 / "labels/000001.label").write_bytes(b""), train_args(d, "--teacher", "none"))[2],
     r"00/velodyne/000001\.bin: empty scan", True),
    ("remission on a 0..255 scale", "infer",
     lambda d: (edit_scan(d / "data" / S08 / "velodyne/000000.bin", lambda p: p[:, 3].__imul__(255)), infer_args(d))[1],
     r"08/velodyne/000000\.bin: remission up to [\d.]+, beyond SemanticKITTI's 0\.\.1 \(a 0\.\.255 scale\?\)", True),
    ("every point out of range", "infer",
     lambda d: (edit_scan(d / "data" / S08 / "velodyne/000000.bin", lambda p: p.__imul__(100)), infer_args(d))[1],
     r"08/velodyne/000000\.bin: none of its \d+ points lies inside the voxel range", True),
    ("folder without sequences/", "infer",
     lambda d: ((d / "empty").mkdir(), infer_args(d)[:2] + ["--data", str(d / "empty"), "--out", str(d / "pred")])[1],
     r"empty: no 'sequences' folder", False),
    ("infer --sequence given the dataset's root", "infer",
     lambda d: infer_args(d)[:2] + ["--sequence", str(d / "data"), "--out", str(d / "pred")],
     r"--sequence .*data: expected a sequence folder ROOT/sequences/XX with velodyne/ in it", False),
    ("student checkpoint passed as the teacher", "train_student",
     lambda d: train_args(d, "--teacher", str(d / "student.pt")),
     r"student\.pt: holds a 'elite-student' model, expected 'elite-teacher'", False),
    ("teacher checkpoint passed as the student", "infer",
     lambda d: infer_args(d, checkpoint="teacher.pt"),
     r"teacher\.pt: holds a 'elite-teacher' model, expected 'elite-student'", False),
    ("SAM checkpoint of the wrong variant", "train_teacher",
     lambda d: train_args(d, "--labels", "sparse", "--sam-checkpoint", str(d / "sam_vit_b.pth")),
     r"sam_vit_b\.pth: looks like SAM vit_b but the teacher is SAM vit_tiny", False),
    ("truncated checkpoint", "infer",
     lambda d: infer_args(d, checkpoint="truncated.pt"),
     r"truncated\.pt: cannot read checkpoint .*truncated", False),
    ("truncated last.pt on --resume", "train_student",
     lambda d: ((d / "out").mkdir(), shutil.copy(d / "truncated.pt", d / "out/last.pt"),
                train_args(d, "--teacher", "none", "--resume"))[2],
     r"out/last\.pt: cannot read checkpoint", False),
    ("flags: --plg-only with --labels sparse", "train_teacher",
     lambda d: train_args(d, "--plg-only", "--labels", "sparse"),
     r"--plg-only makes pseudo-labels, --labels sparse trains without them", False),
    ("flags: a SAM option for the LiDAR teacher", "train_teacher",
     lambda d: train_args(d, "--teacher", "lidar", "--sam-checkpoint", str(d / "sam_vit_b.pth")),
     r"--sam-checkpoint: for the SAM teacher, not --teacher lidar", False),
    ("flags: an ELiTe option for U2MKD", "train_student",
     lambda d: train_args(d, "--method", "u2mkd", "--labels", "plg"),
     r"--labels does not apply to --method u2mkd", False),
    ("flags: --camera-drop for U2MKD on SemanticKITTI", "train_student",
     lambda d: train_args(d, "--method", "u2mkd", "--camera-drop", "2"),
     r"--camera-drop does not apply to --method u2mkd on --dataset semantickitti", False),
    ("flags: --image-drop for an ELiTe student", "train_student",
     lambda d: train_args(d, "--teacher", "none", "--image-drop", "0.5"),
     r"--image-drop does not apply to --method elite on --dataset semantickitti", False),
    ("flags: --train-sequences on nuScenes", "train_student",
     lambda d: train_args(d, "--dataset", "nuscenes", "--method", "u2mkd"),
     r"--train-sequences and --val-sequences: SemanticKITTI's sequences; nuScenes' splits are the official scenes",
     False),
    ("--cutmix on labels without instance ids", "train_student",
     lambda d: (strip_instances(d / "data" / S00 / "labels"), train_args(d, "--teacher", "none", "--cutmix"))[1],
     r"00/labels: --cutmix pastes the points of other scans' instances, but no point of the 2 training \.label "
     r"files checked carries an instance id", False),
    ("flags: another --teacher on --resume", "train_student",
     lambda d: ((d / "out").mkdir(), shutil.copy(d / "last_none.pt", d / "out/last.pt"),
                train_args(d, "--teacher", str(d / "teacher.pt"), "--resume"))[2],
     r"out/last\.pt: --teacher .*teacher\.pt: the run being resumed keeps 'none', as it started; give a new --out "
     r"to change it", False),
    ("flags: --no-images for an ELiTe student", "infer",
     lambda d: infer_args(d, "--no-images"),
     r"student\.pt: --no-images is for a U2MKD fusion student", False),
    ("flags: --width 100000", "train_teacher", lambda d: train_args(d, "--teacher", "lidar", "--width", "100000"),
     r"argument --width: expected an integer width multiplier from 1 to 16, got '100000'", False),
    ("flags: --image-size 1 1", "train_student", lambda d: train_args(d, "--method", "u2mkd", "--image-size", "1", "1"),
     r"argument --image-size: expected an image side from 32 to 4096 pixels, got '1'", False),
    ("flags: --crop 2048 2048", "train_teacher", lambda d: train_args(d, "--crop", "2048", "2048"),
     r"argument --crop: expected a crop side from 16 to 1024 pixels", False),
    ("flags: --heads-3d with a teacher", "train_student",
     lambda d: train_args(d, "--heads-3d", "--teacher", str(d / "teacher.pt")),
     r"--heads-3d: the 3D heads without a teacher", False),
    ("flags: --sync-bn on a CPU", "train_student",
     lambda d: train_args(d, "--teacher", "none", "--sync-bn"),
     r"--sync-bn needs torchrun on GPUs", False),
    # Issue 15: wrong results that looked right
    ("calib.txt whose Tr holds NaN", "train_teacher",
     lambda d: (set_tr_nan(d / "data" / S00 / "calib.txt"), train_args(d, "--labels", "sparse"))[1],
     r"00/calib\.txt: 'Tr' holds non-finite values", False),
    ("one image of a sequence resized to 80%", "train_teacher",
     lambda d: (resize_image(d / "data" / S00 / "image_2/000001.png", 0.8), train_args(d, "--plg-only"))[1],
     r"00/image_2/000001\.png: a 993x301 image, but the frames of this sequence are 1241x376", False),
    ("every validation label 0 (unlabeled)", "train_student",
     lambda d: (zero_labels(d / "data" / S08 / "labels"), train_args(d, "--teacher", "none"))[1],
     r"08/labels: every point of the 1 validation \.label files checked .* is unlabeled .*validation would score "
     r"nothing", False),
    ("every training label 0 (unlabeled)", "train_student",
     lambda d: (zero_labels(d / "data" / S00 / "labels"), train_args(d, "--teacher", "none"))[1],
     r"00/labels: every point of the 2 training \.label files checked .* is unlabeled", False),
    ("validation scans without .label files", "train_student",
     lambda d: (shutil.rmtree(d / "data" / S08 / "labels"), train_args(d, "--teacher", "none"))[1],
     r"08/labels: none of the 1 validation scans has a \.label file", False),
    ("the validation sequence also in the training list", "train_student",
     lambda d: train_args(d, "--teacher", "none", "--train-sequences", "00", "08"),
     r"sequences \['08'\] are both training and validation sequences", True),
    ("a training scan with remission 1e30", "train_student",
     lambda d: (edit_scan(d / "data" / S00 / "velodyne/000001.bin", huge_remission),
                train_args(d, "--teacher", "none"))[1],
     r"step \d skipped \(non-finite loss or gradient\): \S+00/velodyne/000001\.bin", True),
    ("a training scan that fills one voxel", "train_student",
     lambda d: (edit_scan(d / "data" / S00 / "velodyne/000001.bin", one_voxel), train_args(d, "--teacher", "none"))[1],
     r"step \d skipped \(the batch's \d+ points fill 1 voxel\(s\) at scale 16: BatchNorm needs two\)", True),
    # Issue 15: flags checked when parsed
    ("flags: --batch-size 0", "train_student", lambda d: train_args(d, "--batch-size", "0"),
     r"argument --batch-size: expected a positive integer, got '0'", False),
    ("flags: --val-batch-size 0", "train_teacher", lambda d: train_args(d, "--val-batch-size", "0"),
     r"argument --val-batch-size: expected a positive integer, got '0'", False),
    ("flags: --lr -1", "train_student", lambda d: train_args(d, "--lr", "-1"),
     r"argument --lr: expected a learning rate above 0, at most 10, got '-1'", False),
    ("flags: --lr nan", "train_teacher", lambda d: train_args(d, "--lr", "nan"),
     r"argument --lr: expected a learning rate above 0, at most 10, got 'nan'", False),
    ("flags: --lr 1e308", "train_student", lambda d: train_args(d, "--lr", "1e308"),
     r"argument --lr: expected a learning rate above 0, at most 10, got '1e308'", False),
    ("flags: --seed 99999999999999999999", "train_student", lambda d: train_args(d, "--seed", "99999999999999999999"),
     r"argument --seed: expected a seed from 0 to 2147483647, got '99999999999999999999'", False),
    ("flags: --rank 100000", "train_teacher", lambda d: train_args(d, "--rank", "100000"),
     r"argument --rank: expected an adapter rank from 1 to 256, got '100000'", False),
    ("flags: --threads 5000", "infer", lambda d: infer_args(d, "--threads", "5000"),
     r"argument --threads: expected a thread count from 1 to 256, got '5000'", False),
    ("flags: --workers -1", "train_student", lambda d: train_args(d, "--workers", "-1"),
     r"argument --workers: expected an integer >= 0, got '-1'", False),
    ("flags: --seed -1", "infer", lambda d: infer_args(d, "--seed", "-1"),
     r"argument --seed: expected a seed from 0 to 2147483647, got '-1'", False),
    ("flags: --device cuda without CUDA", "train_student", lambda d: train_args(d, "--device", "cuda:99"),
     r"argument --device: 'cuda:99': this machine has", False),
    ("flags: --crop 0 512", "train_teacher", lambda d: train_args(d, "--crop", "0", "512"),
     r"argument --crop: expected a crop side from 16 to 1024 pixels \(SAM's input is 1024\), got '0'", False),
    ("crop larger than the image", "train_teacher",
     lambda d: train_args(d, "--labels", "sparse", "--crop", "400", "1000"),
     r"00/image_2/000000\.png: a 1241x376 frame is smaller than the 400x1000 crop", False),
    # Issue 18: the presets' files and flags
    ("--init-3d a file that is no 2DPASS checkpoint", "train_student",
     lambda d: train_args(d, "--teacher", "none", "--init-3d", str(d / "student.pt")),
     r"student\.pt: no 'model_3d\.\*' tensors; expected a 2DPASS Lightning checkpoint", False),
    ("--preset paper-test for U2MKD", "train_student",
     lambda d: train_args(d, "--method", "u2mkd", "--preset", "paper-test"),
     r"--preset paper-test is ELiTe's benchmark-submission config; --method u2mkd has paper, embedded", False),
    # Issue 19: nuScenes
    ("--dataset nuscenes for the SAM teacher", "train_teacher", lambda d: train_args(d, "--dataset", "nuscenes"),
     r"--dataset nuscenes: the LiDAR teacher only \(--teacher lidar\)", False),
    ("a SAM teacher for a nuScenes student", "train_student",
     lambda d: train_args(d, "--dataset", "nuscenes", "--teacher", str(d / "student.pt")),
     r"--dataset nuscenes --method elite trains the LiDAR-only baseline \(--teacher none\)", False),
    ("flags: --camera-drop 7", "train_student",
     lambda d: nusc_train_args(d, "--method", "u2mkd", "--camera-drop", "7"),
     r"argument --camera-drop: 7 of the 6 cameras cannot be dropped", False),
    # Issue 15: outputs and checkpoints checked before any work
    ("--out that is an existing file", "train_student",
     lambda d: ((d / "a_file").write_text("x"), train_args(d, "--teacher", "none") + ["--out", str(d / "a_file")])[1],
     r"a_file: --out is an existing file, not a folder", False),
    ("--out of infer.py that is an existing file", "infer",
     lambda d: ((d / "a_file").write_text("x"), infer_args(d) + ["--out", str(d / "a_file")])[1],
     r"a_file: is an existing file, not a folder; give another --out", False),
    ("checkpoint with a tensor of the wrong shape", "infer",
     lambda d: infer_args(d, checkpoint="bad_shape.pt"),
     r"bad_shape\.pt: tensor 'classifier\.2\.weight' has shape \(19, 128\), the model expects \(20, 128\)", False),
    ("last.pt with a tensor of the wrong shape on --resume", "train_student",
     lambda d: ((d / "out").mkdir(), shutil.copy(d / "bad_shape_last.pt", d / "out/last.pt"),
                train_args(d, "--teacher", "none", "--resume"))[2],
     r"out/last\.pt: tensor 'classifier\.2\.weight' has shape \(19, 128\)", False),
    # Issue 25: the size fits, the content does not; caches that outlive their inputs
    ("a scan written as float64", "train_student",
     lambda d: (to_float64(d / "data" / S00 / "velodyne/000000.bin"), train_args(d, "--teacher", "none"))[1],
     r"00/velodyne/000000\.bin: \d+% of its points have coordinates beyond 10 km or below 1e-10 m: not float32 "
     r"\(x, y, z, remission\) records \(float64\?", False),
    ("pseudo-labels made with other masks", "train_teacher",
     lambda d: (make_plg_with(d / "data", "sam vit_b sam_vit_b_01ec64.pth"), train_args(d, "--labels", "plg"))[1],
     r"00/image_2_plg: pseudo-labels made from other inputs \(masks sam vit_b sam_vit_b_01ec64\.pth then, ideal "
     r"now\): they do not belong to this data; delete .* to make them again", False),
    ("best.pt given where --resume expects last.pt", "train_student",
     lambda d: ((d / "out").mkdir(), shutil.copy(d / "student.pt", d / "out/last.pt"),
                train_args(d, "--teacher", "none", "--resume"))[2],
     r"out/last\.pt: holds the model only \(a best\.pt\?\), not the optimiser and run state --resume needs", False),
]


@pytest.fixture(scope="module")
def bad_input_files(tmp_path_factory):
    """Checkpoints the cases pass around: a student, a teacher, a truncated one, a fake SAM ViT-B."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    runs.atomic_save(runs.student_state(elite.Student()), d / "student.pt")
    runs.atomic_save(runs.teacher_state(elite.Teacher(elite.TeacherConfig(variant="vit_tiny"))), d / "teacher.pt")
    (d / "truncated.pt").write_bytes((d / "student.pt").read_bytes()[:5000])
    bad = runs.student_state(elite.Student())
    bad["model"]["classifier.2.weight"] = torch.zeros(19, 128)  # 19 classes, not 20
    runs.atomic_save(bad, d / "bad_shape.pt")
    runs.atomic_save(bad | runs.RunState().record(None) | {"config": {"teacher": "none"}, "optimizer": {}},
                      d / "bad_shape_last.pt")
    runs.atomic_save(runs.student_state(elite.Student()) | runs.RunState().record(None) |
                     {"config": {"teacher": "none"}, "optimizer": {}}, d / "last_none.pt")
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
                "image_encoder.blocks.11.norm1.weight": torch.zeros(768)}, d / "sam_vit_b.pth")
    return d


def test_bad_input_table_has_the_cases_the_issue_names():
    assert len(BAD_INPUTS) >= 15 and len({c[0] for c in BAD_INPUTS}) == len(BAD_INPUTS)
    readme = (REPO / "docs" / "reliability.md").read_text()
    missing = [name for name, *_ in BAD_INPUTS if f"| {name} |" not in readme]
    assert not missing, f"docs/reliability.md's bad-input table lacks {missing}"


@pytest.mark.parametrize("name, script, spoil, message, usable", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(name, script, spoil, message, usable, synth_root, bad_input_files, tmp_path, capsys):
    import importlib
    shutil.copytree(synth_root, tmp_path / "data")
    for f in bad_input_files.iterdir():
        shutil.copy(f, tmp_path / f.name)
    argv = spoil(tmp_path)
    main = importlib.import_module(script).main
    if usable:  # a warning naming the file, and a result
        with pytest.warns(UserWarning, match=message):
            runs.run_script(main, argv)
    else:
        with pytest.raises(SystemExit) as stop:
            runs.run_script(main, argv)
        text = stop.value.code if isinstance(stop.value.code, str) else capsys.readouterr().err  # argparse: stderr
        assert re.search(message, text), text
        assert text.startswith("error: ") or "error: " in text
        assert "Traceback" not in text
        assert not (tmp_path / "out" / "best.pt").exists() and not (tmp_path / "vis").exists()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if p.name.endswith(".tmp")]  # no half-written file
    for pred in (tmp_path / "pred").rglob("*.label"):  # predictions are whole: one label per point
        scan = tmp_path / "data" / "sequences" / pred.parent.parent.name / "velodyne" / (pred.stem + ".bin")
        assert pred.stat().st_size == scan.stat().st_size // 4
    if usable and script == "infer":
        pred = np.fromfile(tmp_path / "pred" / S08 / "predictions/000000.label", dtype=np.uint32)
        points = semantickitti.read_scan(tmp_path / "data" / S08 / "velodyne/000000.bin")
        unusable = ~(np.isfinite(points).all(1) & scandata.in_range(np.nan_to_num(points[:, :3]), semantickitti.RANGE_MIN, semantickitti.RANGE_MAX))
        assert len(pred) == len(points) and (pred[unusable] == 0).all()  # what the model never saw: 'unlabeled'
        assert (pred != 0).any() == (name != "every point out of range")
    if usable and script == "train_student":
        best = torch.load(tmp_path / "out" / "best.pt", weights_only=False)
        assert not runs.non_finite_tensors(best)  # BatchNorm statistics included


# =====================================================================================
# Nothing lost, nothing poisoned: run folders, non-finite values, signals, outputs, help
# =====================================================================================

def fake_run(folder: Path, state: dict) -> dict[str, bytes]:
    """A run folder holding last.pt, best.pt and metrics.csv -> their bytes."""
    folder.mkdir(parents=True)
    runs.atomic_save(state, folder / "last.pt")
    runs.atomic_save(state, folder / "best.pt")
    (folder / "metrics.csv").write_text("epoch,miou\n1,12.5\n")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def run_main(script: str, argv: list[str]) -> str:
    """Run a script in-process through its entry point; the 'error: ...' it ends with, or ''."""
    import importlib
    try:
        runs.run_script(importlib.import_module(script).main, argv)
    except SystemExit as stop:
        return str(stop.code)
    return ""


def test_fresh_run_in_a_run_folder_is_refused_and_overwrite_starts_over(synth_root, tmp_path):
    out = tmp_path / "run"
    before = fake_run(out, runs.student_state(elite.Student()))
    args = train_args(tmp_path, "--teacher", "none") + ["--data", str(synth_root), "--out", str(out)]
    message = run_main("train_student", args)
    assert re.search(r"run: already holds a run \(last\.pt, best\.pt, metrics\.csv\); continue it with --resume, "
                     r"start over in it with --overwrite, or give a new --out", message), message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost
    # --overwrite with a mistyped input: refused before anything of the earlier run is touched.
    for typo in (["--data", str(tmp_path / "no-such-data")], ["--teacher", str(tmp_path / "no-such-teacher.pt")]):
        message = run_main("train_student", args + typo + ["--overwrite"])
        assert "no-such-" in message, message
        assert {name: (out / name).read_bytes() for name in before} == before
    assert run_main("train_student", args + ["--overwrite"]) == ""
    assert (out / "best.pt").read_bytes() != before["best.pt"]
    with open(out / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]  # the old run's rows are gone
    assert "--resume continues" in run_main("train_student", args + ["--overwrite", "--resume"])


@pytest.mark.parametrize("name,content", [
    ("last.pt", b"PK\x03\x04 a Lightning checkpoint weights_only cannot read"),
    ("best.pt", None),  # a readable dict of tensors without this project's 'kind'
    ("metrics.csv", b"step,loss\n1,0.5\n")])
def test_overwrite_never_deletes_a_file_this_project_did_not_write(tmp_path, name, content):
    """--overwrite deletes only run files that prove they are this project's (issue 34): another
    program's checkpoint or table in --out is refused by name and left as it was."""
    out = tmp_path / "run"
    out.mkdir()
    if content is None:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, out / name)
    else:
        (out / name).write_bytes(content)
    before = (out / name).read_bytes()
    with pytest.raises(scandata.DataError, match=rf"{name}: not (a checkpoint this project wrote|the metrics table)"):
        runs.claim_run_folder(out, runs.STUDENT_KIND, resume=False, overwrite=True)
    assert (out / name).read_bytes() == before
    runs.release_run_folders()


def test_one_run_owns_a_folder_at_a_time(tmp_path):
    import subprocess
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r); import runs; runs.lock_run_folder(__import__('pathlib').Path(%r)); "
        "print('held', flush=True); time.sleep(60)") % (str(Path(runs.__file__).parent), str(out))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(scandata.DataError, match=rf"run: another run is using this folder \(pid {holder.pid} on .*\); "
                                                     "wait for it to end, or give another --out"):
            runs.claim_run_folder(out, runs.STUDENT_KIND, resume=False, overwrite=False)
    finally:
        holder.kill()
        holder.wait()
    runs.claim_run_folder(out, runs.STUDENT_KIND, resume=False, overwrite=False)  # a killed holder's lock is free
    runs.release_run_folders()


def test_a_failed_checkpoint_write_is_one_line_and_loses_nothing(tmp_path):
    # A real write failure: a child process may not write files larger than 64 kB (RLIMIT_FSIZE;
    # SIGXFSZ ignored, so the write fails instead of killing it), as on a full disk.
    import subprocess
    runs.atomic_save({"model": torch.zeros(10)}, tmp_path / "last.pt")
    before = (tmp_path / "last.pt").read_bytes()
    code = ("import resource, signal, sys, torch; sys.path.insert(0, %r); import runs; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); "
            "runs.run_script(lambda argv: runs.atomic_save({'model': torch.zeros(100_000)}, %r))"
            % (str(Path(runs.__file__).parent), str(tmp_path / "last.pt")))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.fullmatch(r"error: .*last\.pt: could not be written \(.+\); nothing was lost: the previous file is "
                        r"unchanged\n", result.stderr), result.stderr
    assert (tmp_path / "last.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left


def test_nothing_is_written_through_a_link_or_onto_a_folder_named_as_a_run_file(synth_root, tmp_path):
    """A run.lock that links to a dataset file, a folder named metrics.csv, an infer.py output
    folder that links to a dataset's labels: each refused in one line, the linked file untouched."""
    import infer
    target = tmp_path / "calib.txt"
    target.write_text("P2: 1 2 3\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").symlink_to(target)
    with pytest.raises(scandata.DataError, match=r"run/run\.lock: cannot be used as this folder's lock"):
        runs.lock_run_folder(run)
    assert target.read_text() == "P2: 1 2 3\n"
    other = tmp_path / "other"
    (other / "metrics.csv").mkdir(parents=True)
    with pytest.raises(scandata.DataError, match=r"other/metrics\.csv: is not a regular file"):
        runs.claim_run_folder(other, runs.STUDENT_KIND, resume=False, overwrite=True)
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "000000.label").write_bytes(b"1234")
    (tmp_path / "pred" / "sequences" / "08").mkdir(parents=True)
    (tmp_path / "pred" / "sequences" / "08" / "predictions").symlink_to(labels)
    runs.atomic_save(runs.student_state(elite.Student()), tmp_path / "student.pt")
    message = run_main("infer", ["--checkpoint", str(tmp_path / "student.pt"), "--data", str(synth_root),
                                 "--split", "val", "--out", str(tmp_path / "pred"), "--device", "cpu", "--overwrite"])
    assert re.search(r"08/predictions: is a link or not a folder; predictions and pictures are written only into "
                     r"plain folders", message), message
    assert (labels / "000000.label").read_bytes() == b"1234"
    # Fault-hunting round 5: a --vis whose sequence folder is a link, or a --vis under /proc, were found
    # only after the first prediction was written; now before any scan is read.
    (tmp_path / "pred" / "sequences" / "08" / "predictions").unlink()
    (tmp_path / "vis" / "sequences").mkdir(parents=True)
    (tmp_path / "vis" / "sequences" / "08").symlink_to(labels)
    for vis, said in ((tmp_path / "vis", r"vis/sequences/08: is a link or not a folder; .* give another --vis"),
                      (Path("/proc/elite-vis"), r"/proc/elite-vis: cannot write there")):
        message = run_main("infer", ["--checkpoint", str(tmp_path / "student.pt"), "--data", str(synth_root),
                                     "--split", "val", "--out", str(tmp_path / "pred"), "--device", "cpu",
                                     "--vis", str(vis)])
        assert re.search(said, message), message
        assert not any((tmp_path / "pred").rglob("*.label"))


def test_metrics_csv_resaved_by_a_spreadsheet_is_read_or_refused_up_front(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch;step;miou\r\n1;10;12,5\r\n2;20;13,0\r\n")  # ';' and decimal commas, as a spreadsheet saves
    runs.log_metrics(path, {"epoch": 2, "step": 20, "miou": 14.0})  # epoch 2 again (a resumed run): replaced
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["miou"]) for r in rows] == [("1", "12,5"), ("2", "14.0")]
    path.write_text("\ufeffepoch , miou\n1, 12.5\n")  # a byte-order mark, spaces around the names: read
    assert runs.read_metrics(path) == [{"epoch": 1, "miou": "12.5"}]
    path.write_text("Epoch,mIoU\n1,12.5\n")  # renamed columns: refused by name, before any step
    fake_run(tmp_path / "run", runs.student_state(elite.Student()))
    (tmp_path / "run" / "metrics.csv").write_text(path.read_text())
    with pytest.raises(scandata.DataError, match=r"run/metrics\.csv: not the metrics table a run writes"):
        runs.claim_run_folder(tmp_path / "run", runs.STUDENT_KIND, resume=True, overwrite=False)
    with pytest.raises(scandata.DataError, match=r"metrics\.csv: not the metrics table"):
        runs.log_metrics(path, {"epoch": 2, "miou": 1.0})
    assert path.read_text() == "Epoch,mIoU\n1,12.5\n"  # untouched


def test_a_checkpoint_of_the_other_dataset_or_with_nan_weights_is_refused(tmp_path):
    nusc_student = elite.Student(elite.student_config("nuscenes"))
    runs.atomic_save(runs.student_state(nusc_student), tmp_path / "nusc.pt")
    message = run_main("infer", ["--checkpoint", str(tmp_path / "nusc.pt"), "--data", str(tmp_path / "kitti"),
                                 "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert re.search(r"nusc\.pt: a model for nuscenes \(17 classes and its voxel grid\), not for semantickitti: "
                     r"its class ids would be written as semantickitti's", message), message
    state = runs.student_state(elite.Student())
    state["model"]["classifier.2.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")  # written around atomic_save, which would refuse it
    message = run_main("infer", ["--checkpoint", str(tmp_path / "nan.pt"), "--data", str(tmp_path / "kitti"),
                                 "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert re.search(r"nan\.pt: 1 tensors hold NaN or Inf \(e\.g\. 'classifier\.2\.weight'\): the model diverged",
                     message), message
    assert not (tmp_path / "pred").exists()


def test_a_run_never_writes_over_another_kinds_checkpoint(synth_root, tmp_path):
    teacher_run = tmp_path / "teacher"
    before = fake_run(teacher_run, runs.teacher_state(elite.Teacher(elite.TeacherConfig(variant="vit_tiny"))))
    args = train_args(tmp_path, "--teacher", "none") + ["--data", str(synth_root), "--out", str(teacher_run)]
    for more in ([], ["--overwrite"]):
        message = run_main("train_student", args + more)
        assert re.search(r"teacher/last\.pt: holds a 'elite-teacher' model and this run trains 'elite-student'",
                         message), message
    assert {p.name: p.read_bytes() for p in teacher_run.iterdir()} == before


def test_steps_that_keep_failing_stop_the_run_with_where(synth_root, tmp_path, monkeypatch):
    shutil.copytree(synth_root, tmp_path / "data")
    for scan in (tmp_path / "data" / S00 / "velodyne").glob("*.bin"):
        edit_scan(scan, huge_remission)
    monkeypatch.setattr(runs, "MAX_SKIPS_IN_A_ROW", 2)
    with pytest.warns(UserWarning, match="skipped"):
        message = run_main("train_student", train_args(tmp_path, "--teacher", "none", "--save-every", "0"))
    assert re.search(r"^error: training stopped at epoch 1, batch 2, step 2: the last 2 steps were all skipped "
                     r"\(non-finite loss or gradient\); the model is as it was before them\. Check these scans and "
                     r"--lr\. No checkpoint was written\.", message), message
    assert not (tmp_path / "out" / "best.pt").exists() and not (tmp_path / "out" / "last.pt").exists()


def test_full_disk_names_the_file_and_loses_nothing(synth_root, tmp_path, monkeypatch):
    args = train_args(tmp_path, "--teacher", "none", "--save-every", "0")
    args += ["--data", str(synth_root), "--out", str(tmp_path / "out")]
    assert run_main("train_student", args) == ""
    run_files = lambda: {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()  # noqa: E731
                         if p.is_file() and p.name != "run.lock"}  # run.lock: who holds the folder now
    before = run_files()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runs.os, "fsync", full)
    message = run_main("train_student", args + ["--epochs", "2", "--resume"])
    # The epoch's metrics row is written first (then its checkpoint): that is the write that fails.
    assert re.search(r"^error: \S+out/metrics\.csv: could not be written \(No space left on device\); nothing was "
                     r"lost: the previous file is unchanged \(after epoch 2, step 4\)", message), message
    assert run_files() == before  # no temporary left, every file as it was


@contextlib.contextmanager
def read_only(folder: Path):
    """Make a folder read-only for this process: a read-only bind mount as root (root ignores
    permission bits, as on a cluster's read-only dataset), the permission bits otherwise."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield
        finally:
            for p, m in modes.items():
                p.chmod(m)
        return
    done = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make a read-only mount here: {done.stderr.decode().strip()}")
    try:
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot make a read-only mount here: {remount.stderr.decode().strip()}")
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_out_is_refused_before_any_work(synth_root, tmp_path):
    (tmp_path / "ro").mkdir()
    args = train_args(tmp_path, "--teacher", "none") + ["--data", str(synth_root)]
    with read_only(tmp_path / "ro"):
        message = run_main("train_student", args + ["--out", str(tmp_path / "ro" / "run")])
        assert re.search(r"ro/run: cannot write there \(\S+ro is read-only\); give another --out", message), message
        message = run_main("infer", infer_args(tmp_path, checkpoint="x.pt")[:4] +
                           ["--data", str(synth_root), "--out", str(tmp_path / "ro" / "pred")])
    assert list((tmp_path / "ro").iterdir()) == []


def test_read_only_dataset_writes_derived_files_elsewhere(synth_root, tmp_path):
    data, derived = tmp_path / "data", tmp_path / "derived"
    shutil.copytree(synth_root, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    common = ["--data", str(data), "--train-sequences", "00", "--val-sequences", "08", "--preset", "embedded",
              "--device", "cpu", "--epochs", "1", "--batch-size", "2"]
    with read_only(data):
        message = run_main("train_teacher", common + ["--plg-only"])
        assert re.search(r"data/sequences: cannot write there .*pass --derived-dir DIR", message), message
        assert run_main("train_teacher", common + ["--plg-only", "--derived-dir", str(derived)]) == ""
        message = run_main("train_teacher", common + ["--teacher", "lidar", "--out", str(tmp_path / "lidar")])
        assert "pass --derived-dir DIR" in message
        assert run_main("train_teacher", common + ["--teacher", "lidar", "--out", str(tmp_path / "lidar"),
                                                   "--derived-dir", str(derived)]) == ""
        train = semantickitti.SemanticKITTI(data, ["00"], train=True, camera=True, crop_hw=(160, 512), dense=True,
                                            derived=derived)
        assert train[0].crop.dense_labels is not None  # read from DERIVED
        assert semantickitti.missing_pseudo_labels(data, ["00"], derived) == 0
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # nothing written into the dataset
    assert sorted(p.name for p in (derived / S00 / "image_2_plg").iterdir()) == ["000000.npy", "000001.npy",
                                                                                 semantickitti.PLG_RECORD]
    assert (derived / "u2mkd_instances.npz").is_file() and (tmp_path / "lidar" / "best.pt").is_file()


def test_train_teacher_vis_draws_and_does_not_train(synth_copy, tmp_path):
    out = tmp_path / "teacher"
    args = ["--data", str(synth_copy), "--train-sequences", "00", "--val-sequences", "08", "--preset", "embedded",
            "--device", "cpu", "--out", str(out), "--vis", str(tmp_path / "vis")]
    assert run_main("train_teacher", args) == ""
    assert sorted(p.name for p in (tmp_path / "vis" / S00).iterdir()) == ["000000.png", "000001.png"]
    assert not out.exists()


def signal_when_training(signum: int, synth_root: Path, tmp_path: Path) -> tuple[int, str, dict]:
    """Start a training run, send signum once its first mid-epoch checkpoint is written ->
    (exit status, output, the last.pt it left)."""
    out = tmp_path / "run"
    args = ["--data", str(synth_root), "--train-sequences", "00", "--val-sequences", "08", "--preset", "embedded",
            "--batch-size", "1", "--epochs", "30", "--save-every", "1", "--device", "cpu", "--teacher", "none",
            "--out", str(out)]
    log = tmp_path / "log"
    proc = start_script("train_student.py", args, log)
    deadline = time.time() + 300
    while not (out / "last.pt").is_file():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signum)
    status = proc.wait(timeout=300)
    return status, log.read_text(), torch.load(out / "last.pt", weights_only=False)


def test_sigterm_writes_last_pt_at_the_current_step_and_says_how_to_resume(synth_root, tmp_path):
    status, printed, last = signal_when_training(signal.SIGTERM, synth_root, tmp_path)
    assert status == 143 and "Traceback" not in printed, printed[-3000:]
    where = re.search(r"stopped by SIGTERM at epoch (\d+)(?:, batch (\d+))?, step (\d+): \S+run/last\.pt written; "
                      r"continue with the same command and --resume", printed)
    assert where, printed[-3000:]
    assert last["step"] == int(where.group(3)) < 60  # written at the step it stopped at


def test_ctrl_c_ends_with_one_line_naming_the_last_checkpoint(synth_root, tmp_path):
    status, printed, last = signal_when_training(signal.SIGINT, synth_root, tmp_path)
    assert status == 130 and "Traceback" not in printed and "KeyboardInterrupt" not in printed, printed[-3000:]
    assert re.search(r"interrupted \(Ctrl-C\) at epoch \d+.*: the last checkpoint is \S+run/last\.pt \(epoch \d+"
                     r".*step \d+\); continue with the same command and --resume", printed), printed[-3000:]


def all_help(script: str) -> str:
    import importlib
    module = importlib.import_module(script)
    with contextlib.redirect_stdout(io.StringIO()) as text, pytest.raises(SystemExit):
        module.parse_args(["--help"])
    return text.getvalue()


@pytest.mark.parametrize("script", ["train_student", "train_teacher", "infer"])
def test_every_flag_shows_its_default(script):
    import importlib
    text = all_help(script)
    parser_of = {}

    def capture(self, *a, **k):
        parser_of["p"] = self
        raise SystemExit(0)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(SystemExit):
            importlib.import_module(script).parse_args([])
    formatter = parser_of["p"]._get_formatter()
    missing_default = []
    for action in parser_of["p"]._actions:
        if action.help is argparse.SUPPRESS or action.dest == "help":
            continue
        shown = formatter._get_help_string(action)  # the text --help prints, with the default it adds
        switch = isinstance(action, argparse._StoreTrueAction)
        missing_default.extend([] if switch or "default" in shown or "preset" in shown else [action.option_strings])
    assert not missing_default, missing_default
    words = " ".join(text.split())
    if script == "train_student":  # every preset's values, each with its source
        assert "paper-test: ELiTe-test-semantickitti.yaml" in words and "--lr 0.24 (learning_rate: 0.24)" in words
        assert "--lr-schedule epoch (lr_scheduler: CosineAnnealingLR, T_max 128 - 4" in words
        assert "u2mkd presets" in words and "--global-batch 16 (4 per GPU x 4 GPUs" in words
    if script == "train_teacher":
        assert "--teacher lidar presets" in words and "--epochs 4 (a few CPU minutes)" in words
        assert "--labels sparse (pseudo_label: False)" in words and "--labels plg (pseudo_label: True)" in words
        assert "and stop, without training" in " ".join(text.split())


def test_benchmark_runs_on_the_device_asked_for_and_counts_operations(capsys):
    import infer
    infer.main(["--benchmark", "--device", "cpu", "--repeats", "1", "--teacher-variant", "none", "--batch", "1"])
    printed = capsys.readouterr().out
    assert "not timed (--teacher-variant none)" in printed
    assert "[cpu, " in printed and "[cuda" not in printed  # the device asked for, alone
    assert "convolution paths  torch" in printed  # a CPU: the plain path alone (Triton needs CUDA)
    counted = re.search(r"torch path, float32: ([\d,]+) aten operations dispatched, (\d+) of them waits on the data "
                        r"\(to_host\* 6, nonzero 4, _unique2 3\), 0 Triton launches", printed)
    assert counted and int(counted.group(2)) == 13, printed
    forms = re.search(r"reference forms \(--forms reference\): [\d.]+ ms, ([\d.]+)x the fast forms' [\d.]+ ms timed "
                      r"in turn \(plain-torch convolution\); logits within ([\d.e+-]+) of them", printed)
    assert forms and float(forms.group(1)) > 0 and float(forms.group(2)) < 1e-3, printed
    assert re.search(r"two forwards bitwise equal +True", printed) and re.search(r"gradients bitwise equal +True", printed)


def test_benchmark_times_elites_two_stages_and_counts_a_teacher_step(capsys):
    # The stages on a small synthetic scan (the full benchmark runs them on the real frame).
    import infer
    points, raw = synthkitti.make_scan(seed=0, columns=256)
    labels = torch.from_numpy(semantickitti.to_train_ids(raw & 0xFFFF))
    keep = torch.from_numpy(scandata.in_range(points[:, :3], semantickitti.RANGE_MIN, semantickitti.RANGE_MAX))
    args = argparse.Namespace(teacher_batch=None, repeats=5, teacher_variant="vit_tiny", amp=False)
    infer.benchmark_teacher(torch.from_numpy(points)[keep], labels[keep], torch.device("cpu"), args)
    printed = capsys.readouterr().out
    assert re.search(r"stage 1: teacher step, float32 +[\d.]+ ms", printed)  # ELiTe's two stages, batch 1 on a CPU
    assert re.search(r"stage 2: joint step, float32 +[\d.]+ ms", printed) and "need --teacher-batch 4" in printed
    assert re.search(r"one teacher step on one crop, float32: [\d,]+ aten operations dispatched", printed)


def markdown_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")


def test_readme_is_a_page_a_newcomer_finishes_and_every_link_resolves():
    pages = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
    assert len((REPO / "README.md").read_text().splitlines()) <= 250 and len(pages) > 5
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"https?://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: link to {target}: no such file"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
                assert anchor in {markdown_slug(h) for h in headings}, f"{page.name}: link to {target}: no such heading"


# ------------------------------------------------------------------------------------
# The layout: imports go one way
# ------------------------------------------------------------------------------------

# Lowest first; a module may import only modules of lower layers (lazy imports count too).
LAYERS = [
    ["scandata"],                                 # what both datasets share
    ["semantickitti", "nusc"],                    # the datasets' readers, which never import each other
    ["synthkitti"], ["synthnusc"],                # the synthetic scenes, written in the real layouts
    ["elite", "elite_fast"], ["u2mkd"],           # the methods (U2MKD reuses ELiTe's student), their fast forms
    ["runs"], ["presets"],                        # the machinery of a run, its recipes
    ["train_teacher", "train_student", "infer", "pretrain_sam"],  # the scripts
    ["ablation"],                                 # runs the scripts over seeds, scores with infer
]


def test_imports_go_from_the_scripts_through_the_machinery_and_methods_to_the_data():
    import ast
    layer = {m: k for k, mods in enumerate(LAYERS) for m in mods}
    here = Path(__file__).parent
    modules = {p.stem for p in here.glob("*.py") if not p.stem.startswith("test_") and p.stem != "conftest"}
    assert modules == set(layer), f"a module the layers do not place: {modules ^ set(layer)}"
    upward = []
    for m in modules:
        for node in ast.walk(ast.parse((here / f"{m}.py").read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            upward += [f"{m} imports {n}" for n in names if n in layer and n != m and layer[n] >= layer[m]
                       and {m, n} != {"elite", "elite_fast"}]  # each form beside the other: they read each other
    assert not upward, upward


def test_ablation_tables_give_mean_and_std_over_seeds_and_kd_gain_per_seed():
    """ablation.py's tables from per-run IoUs: mean ± sample std over seeds, the camera classes'
    columns, and what KD adds per seed (a row minus '3D heads, no KD')."""
    import ablation
    iou = lambda v, camera: [camera if c in ablation.CAMERA_COLUMNS else v for c in range(19)]  # (19,) IoU %
    results = {"seed1/heads_no_kd": {"all": iou(10.0, 40.0)}, "seed2/heads_no_kd": {"all": iou(12.0, 44.0)},
               "seed1/standin_plg": {"all": iou(11.0, 50.0)}, "seed2/standin_plg": {"all": iou(15.0, 46.0)}}
    table = ablation.elite_table(results, [1, 2], ["heads_no_kd", "standin_plg"])
    mean_1 = (15 * 10.0 + 4 * 40.0) / 19
    mean_2 = (15 * 12.0 + 4 * 44.0) / 19
    expected = f"{np.mean([mean_1, mean_2]):.1f} ± {np.std([mean_1, mean_2], ddof=1):.1f}"
    assert f"| + PPMSKD's 3D heads, no KD | {expected} | 42.0 ± 2.8 |" in table  # road: 40 and 44
    kd_1 = (15 * 11.0 + 4 * 50.0) / 19 - mean_1
    assert f"seed 1: {kd_1:+.1f} / +10.0" in table and "seed 2: " in table and "/ +2.0" in table
    with pytest.raises(SystemExit):
        ablation.main(["--seeds", "1"])  # a mean ± std needs two seeds at least


def test_ablation_names_its_scenes_and_a_split_with_no_sequence_says_what_there_is(tmp_path, monkeypatch):
    """Fault-hunting rounds 5-6 (issue 34): the table did not say which scenes it came from (a folder of
    256-column scenes was used as made); a split none of whose sequences exist said 'no scans in []'."""
    import json
    import ablation
    data = tmp_path / "scenes"
    (data / "sequences" / "08").mkdir(parents=True)
    (data / synthkitti.MARKER).write_text(json.dumps({"world": 2, "seed": 0, "columns": 256}))
    monkeypatch.setattr(ablation.synthkitti, "embedded_dataset", lambda seed: data)
    iou = {"all": [10.0] * 19}
    monkeypatch.setattr(ablation, "run_seed", lambda seed, rows, d, out, results: results.update(
        {f"seed{seed}/{row}": iou for row in rows}))
    ablation.main(["--part", "elite", "--rows", "alone", "heads_no_kd", "--seeds", "1", "2", "--out", str(tmp_path / "ab")])
    header = (tmp_path / "ab" / "results.md").read_text().splitlines()[0]
    assert f"({data}: world 2, seed 0, 256 columns), seeds 1, 2" in header, header
    with pytest.raises(scandata.DataError, match=r"scenes/sequences: holds none of the sequences asked for .* it has \['08'\]"):
        semantickitti.list_scans(data, [])


@pytest.mark.parametrize("value", ["", "TORCH", "cuda"])
def test_a_bad_elite_conv_variable_is_one_line_not_a_traceback(value, monkeypatch, capsys):
    """$ELITE_CONV sets --conv's default; a value it cannot take is named on one line (issue 34)."""
    import elite_fast
    import train_student
    monkeypatch.setattr(elite_fast, "CONV_PATH", value)  # what elite_fast.py read from the environment
    with pytest.raises(SystemExit):
        train_student.parse_args(["--teacher", "none"])
    assert f"$ELITE_CONV={value!r}: expected one of auto, torch, triton" in capsys.readouterr().err


def test_a_flag_typed_with_its_default_value_counts_as_given():
    """--seed 0 is a flag the user typed even though 0 is the default: a --resume of a seed-3 run
    must see it (issue 34), not take it for 'not given'."""
    import train_student
    typed = train_student.parse_args(["--teacher", "none", "--seed", "0", "--resume"])
    assert "seed" in typed.given and "teacher" in typed.given and "resume" in typed.given
    assert "lr" not in typed.given and "epochs" not in typed.given  # filled by the preset, not typed
    assert "seed" not in train_student.parse_args(["--teacher", "none"]).given


def test_adalora_target_rank_above_the_rank_is_refused(capsys):
    """AdaLoRA prunes from --rank down to --target-rank; a target above the rank means nothing and
    is refused when parsed (issue 34), a target at or below it is taken."""
    import train_teacher
    with pytest.raises(SystemExit):
        train_teacher.parse_args(["--peft", "adalora", "--rank", "4", "--target-rank", "10"])
    assert "--target-rank 10 is above --rank 4" in capsys.readouterr().err
    assert train_teacher.parse_args(["--peft", "adalora", "--rank", "4", "--target-rank", "4"]).target_rank == 4


@pytest.mark.parametrize("script,marker,text", [
    ("synthkitti.py", "synthkitti.json", "[1, 2]"), ("synthnusc.py", "synthnusc.json", '{"format": 4, "seed": "x"}')])
def test_the_scene_writers_end_bad_records_with_one_line(tmp_path, script, marker, text):
    """The synthetic writers' errors are one line, as every script's (issue 34), not a traceback."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / marker).write_text(text)
    done = subprocess.run([sys.executable, script, "--out", str(tmp_path / "out"), "--columns", "64"],
                          capture_output=True, text=True, cwd=Path(__file__).parent, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: {tmp_path / 'out' / marker}: ") and done.stderr.count("\n") == 1


def test_ctrl_c_while_the_imports_load_is_one_line(tmp_path):
    """Fault-hunting round (issue 34): Ctrl-C in the seconds torch takes to load gave a
    KeyboardInterrupt traceback; each script's start-up guard makes it one line."""
    import signal
    import time
    process = subprocess.Popen([sys.executable, "infer.py", "--benchmark", "--repeats", "100000"],
                               cwd=Path(__file__).parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # inside `import torch` (on a fast machine perhaps later: the run's own one line then)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] in ("interrupted (Ctrl-C) while starting; nothing was written",
                                            "interrupted (Ctrl-C); every file written so far is whole")


def test_hand_edited_run_settings_in_last_pt_are_named_on_resume(synth_root, tmp_path):
    """Fault-hunting round 2 (issue 34): the settings a resume takes from last.pt skipped the
    flags' checks (a list as --lr, 0 as --batch-size, 12 as --data: tracebacks; 5 as --teacher:
    silently 'none'); each is now checked against its flag and named. A preset's worker count
    is the run's, also when --data on the resume line would choose another preset."""
    import train_student
    run = tmp_path / "run"
    args = ["--data", str(synth_root), "--train-sequences", "00", "--val-sequences", "08", "--preset", "embedded",
            "--epochs", "1", "--batch-size", "1", "--teacher", "none", "--device", "cpu", "--out", str(run)]
    train_student.main(args)
    good = torch.load(run / "last.pt", weights_only=True)
    for key, value, why in (("lr", [0.1], r"\[0\.1\] is a list"), ("batch_size", 0, r"expected a positive integer"),
                            ("data", 12, r"12 is not a path"), ("teacher", 5, r"5 is a int, not what --teacher takes"),
                            ("train_sequences", "00", r"'00' is not a list"), ("cutmix", "yes", r"'yes' is not true or false")):
        runs.atomic_save(good | {"config": good["config"] | {key: value}}, run / "last.pt")
        message = run_main("train_student", ["--out", str(run), "--epochs", "2", "--resume"])
        assert re.search(rf"last\.pt: its recorded --{key.replace('_', '-')}: {why}", message), (key, message)
    runs.atomic_save(good | {"student_config": good["student_config"] | {"num_classes": "x"}}, run / "last.pt")
    assert "num_classes is 'x'" in run_main("train_student", ["--out", str(run), "--epochs", "2", "--resume"])
    runs.atomic_save(good, run / "last.pt")
    resumed = train_student.parse_args(["--out", str(run), "--resume", "--data", str(synth_root)])  # preset paper now
    runs.resume_settings(resumed, good["config"], train_student.RESUME_KEEPS, run / "last.pt")
    assert resumed.preset == "embedded" and resumed.workers == good["config"]["workers"] == 0


def test_kd_weight_is_elites_lambda_xm_and_applies_only_with_a_teacher(capsys):
    """--kd-weight sets PPMSKD's lambda_xm (the paper's 0.05 by default); without a teacher, or for
    U2MKD, it is refused when parsed."""
    import train_student
    assert train_student.parse_args(["--kd-weight", "2"]).kd_weight == 2.0
    for argv in (["--teacher", "none", "--kd-weight", "2"], ["--method", "u2mkd", "--kd-weight", "2"],
                 ["--kd-weight", "0"]):
        with pytest.raises(SystemExit):
            train_student.parse_args(argv)
    err = capsys.readouterr().err
    assert "--kd-weight: the weight of the KD from a teacher" in err and "not apply to --method u2mkd" in err
    assert "expected a loss weight above 0" in err


def test_the_students_initial_weights_do_not_depend_on_its_teacher(synth_root, tmp_path, monkeypatch):
    """A fair ablation: the student alone, with the 3D heads, and distilling a teacher start from
    the same weights at the same seed. Loading a teacher draws random numbers (its random init,
    overwritten by the file); before the fix the ELiTe rows' students all started elsewhere."""
    import train_student
    teacher = elite.Teacher(elite.TeacherConfig(variant="vit_tiny", crop_hw=(64, 128)))
    runs.atomic_save(runs.teacher_state(teacher) | {"config": {"labels": "sparse", "target_rank": 8},
                                                    "rank_allocator": None}, tmp_path / "teacher.pt")
    started = {}

    class Started(Exception):
        pass

    def first_weights(run, loader, optimizer, objective, *args, **kwargs):
        started[len(started)] = {k: v.clone() for k, v in objective.parts[0].state_dict().items()}
        raise Started

    monkeypatch.setattr(runs, "fit", first_weights)
    for i, teacher_flags in enumerate((["--teacher", "none"], ["--teacher", "none", "--heads-3d"],
                                       ["--teacher", str(tmp_path / "teacher.pt")])):
        with pytest.raises(Started):
            train_student.main(["--data", str(synth_root), "--train-sequences", "00", "--val-sequences", "08",
                                "--preset", "embedded", "--epochs", "1", "--device", "cpu", "--seed", "3",
                                "--out", str(tmp_path / f"run{i}"), *teacher_flags])
    assert all(torch.equal(started[0][k], started[i][k]) for i in (1, 2) for k in started[0])


def test_a_path_the_file_system_refuses_is_one_line(tmp_path):
    """Fault-hunting round 3 (issue 34): a folder name over 255 characters gave an OSError
    traceback in five places; whatever the file system refuses ends in one line."""
    message = run_main("train_student", ["--teacher", "none", "--out", str(tmp_path / ("z" * 256))])
    assert message.startswith("error: ") and "File name too long" in message and "\n" not in message


def test_ablation_stops_its_run_when_stopped_and_keeps_rows_within_part(tmp_path, monkeypatch, capsys):
    """Fault-hunting round 3 (issue 34): SIGTERM to ablation.py left its training run going,
    orphaned and holding its folder; --rows could pick a row of the other --part."""
    import signal
    import ablation
    sent = []

    class Child:
        waits = 0

        def __init__(self, *args, **kwargs):
            pass

        def wait(self):
            Child.waits += 1
            if Child.waits == 1:
                raise KeyboardInterrupt  # as SIGTERM's handler raises while ablation waits for the run
            return -signal.SIGTERM

        def send_signal(self, sig):
            sent.append(sig)

    monkeypatch.setattr(ablation.subprocess, "Popen", Child)
    with pytest.raises(KeyboardInterrupt):
        ablation.train("train_student.py", tmp_path / "run", ["--teacher", "none"], tmp_path, 1)
    assert sent == [signal.SIGTERM] and Child.waits == 2  # the run was told to stop, and waited for
    with pytest.raises(SystemExit):
        ablation.main(["--part", "elite", "--rows", "lidar_only", "--seeds", "1", "2"])
    assert "--rows lidar_only: not a row of --part elite" in capsys.readouterr().err


def test_ablation_refuses_a_kept_run_started_with_another_recipe(tmp_path):
    """Fault-hunting round 5 (issue 34): a run in OUT/seedS/row trained on other data, for other
    epochs, was resumed ('nothing to train') and reported as the row."""
    import ablation
    import train_student
    data = tmp_path / "data"
    (data / "sequences" / "00" / "velodyne").mkdir(parents=True)
    out = tmp_path / "ablation" / "seed1" / "alone"
    out.mkdir(parents=True)
    argv = ["--data", str(data), "--preset", "embedded", "--seed", "1", "--out", str(out), "--teacher", "none"]
    args = train_student.parse_args(argv)
    args.train_sequences, args.val_sequences = ["00"], []  # as the trainer records them: the sequences the data has
    runs.atomic_save({"kind": runs.STUDENT_KIND, "config": runs.config_of(args)}, out / "last.pt")
    ablation.check_row_recipe("train_student.py", out / "last.pt", argv)  # the row's own run: kept
    runs.atomic_save({"kind": runs.STUDENT_KIND, "config": runs.config_of(args) | {"epochs": 1}}, out / "last.pt")
    with pytest.raises(scandata.DataError, match=r"alone/last\.pt: a run started with other settings than this "
                                                 r"row's \(--epochs 1, the row's is 12; 1 setting\(s\) differ\)"):
        ablation.check_row_recipe("train_student.py", out / "last.pt", argv)


def test_benchmark_refuses_the_flags_it_would_ignore(capsys):
    """Fault-hunting round 3 (issue 34): --benchmark with --checkpoint or --data ran a random
    student on its own scan and said nothing of the flags it ignored."""
    import infer
    with pytest.raises(SystemExit):
        infer.parse_args(["--benchmark", "--checkpoint", "nonexist.pt", "--votes", "12"])
    assert "--checkpoint, --votes would be ignored; drop them" in capsys.readouterr().err
    assert infer.parse_args(["--benchmark", "--repeats", "1"]).benchmark


def test_a_sequence_given_twice_is_refused(capsys):
    """Fault-hunting round 3 (issue 34): --train-sequences 00 00 trained on each scan twice."""
    import train_student
    with pytest.raises(SystemExit):
        train_student.parse_args(["--teacher", "none", "--train-sequences", "00", "00"])
    assert "--train-sequences: 00 given twice" in capsys.readouterr().err


def test_an_empty_path_is_refused_not_taken_for_the_current_folder(capsys):
    """Fault-hunting round 4 (issue 34): --out "" (an unset shell variable) wrote a run into the
    current folder without a word."""
    import infer
    import train_student
    for parse, argv in ((train_student.parse_args, ["--teacher", "none", "--out", ""]), (infer.parse_args, ["--out", ""])):
        with pytest.raises(SystemExit):
            parse(argv)
        assert "argument --out: expected a path (an empty one would mean the current folder" in capsys.readouterr().err
    assert train_student.parse_args(["--teacher", "none", "--out", "."]).out == Path(".")


def test_paths_that_are_not_what_they_seem_are_named_for_what_they_are(tmp_path):
    """Fault-hunting round 5 (issue 34): a folder or /dev/zero as a checkpoint said 'not found', a
    dangling --out link 'File exists', a file as the scene writers' --out a failed marker write."""
    import synthkitti
    import synthnusc
    with pytest.raises(scandata.DataError, match=r": a folder, not a SAM checkpoint file"):
        runs.read_sam_state(tmp_path)
    with pytest.raises(scandata.DataError, match=r"/dev/zero: not a regular file \(a device, pipe or socket\)"):
        runs.load_checkpoint("/dev/zero", None)
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(scandata.DataError, match=r"gone: a link to .*nowhere, which does not exist; give another"):
        runs.writable_folder(tmp_path / "gone", "give another --out")
    (tmp_path / "file").write_text("mine")
    for writer in (synthkitti, synthnusc):
        with pytest.raises(scandata.DataError, match=r"file: an existing file, not a folder"):
            writer.make_dataset(tmp_path / "file", progress=False)
    assert (tmp_path / "file").read_text() == "mine"


def test_round_six_stops_and_labels_say_what_happened(tmp_path, capsys, monkeypatch):
    """Fault-hunting round 6 (issue 34): a mid-epoch last.pt was labelled 'epoch 0, the last'; a far-off
    point blanked --vis's top views; SIGTERM outside training's loop killed without a line; the
    stand-in's hint sent a user in another folder to download SAM."""
    import infer
    mid = {"optimizer": {}, "epoch": -1, "batch": 7, "config": {"epochs": 12}}
    assert infer.which_epoch(mid) == ("after epoch 0 and 7 batches of epoch 1, written mid-epoch of the 12 its run "
                                      "asked for: the run has not finished")
    assert infer.which_epoch({"optimizer": {}, "epoch": 11, "config": {"epochs": 12}}) == "epoch 12, the last"
    assert infer.which_epoch({"epoch": 3}) == "epoch 4, selected on the validation split (best.pt)"
    g = np.random.default_rng(0)
    xyz = np.concatenate([g.uniform(-30, 30, (500, 3)), [[3e38, 0, 0], [0, -3e38, 0], [np.nan, 1, 1]]]).astype(np.float32)
    view = infer.top_view(xyz, np.zeros((len(xyz), 3), np.uint8))
    assert (view != np.array(infer.BACKGROUND, np.uint8)).any(2).sum() > 500  # the near points are drawn
    with pytest.raises(SystemExit) as stop:
        runs.run_script(lambda argv: os.kill(os.getpid(), signal.SIGTERM))
    assert stop.value.code == 143 and "stopped by SIGTERM; every file written so far is whole" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    with pytest.raises(scandata.DataError, match=r"SAM checkpoint not found in .*: the pretrained stand-in ships in the "
                                                 r"repository's weights/ folder; run the scripts from the repository's root"):
        runs.read_sam_state(Path("weights/sam_vit_tiny_synth.pth"))
