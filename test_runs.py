"""Tests of runs.py, the machinery of a run, in its order: checkpoint formats and hostile files,
the learning-rate schedules, two processes against one, the training loop's safeguards, SAM-PLG
over every frame (files written once, in shards), pictures and infer.py's measuring tools. The
scripts run end to end are in test_scripts.py."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import elite
import elite_fast
import runs
import scandata
import semantickitti
import synthkitti
from test_elite import backward_once, equal_size_scans, randomize_  # the method's test helpers

REPO = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------
# 2. Checkpoints: formats, hostile files, other layouts
# ------------------------------------------------------------------------------------

def test_checkpoint_roundtrip_and_wrong_kind(tmp_path):
    model = elite.Student()
    runs.atomic_save(runs.student_state(model), tmp_path / "s.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]  # no temporary file left
    loaded, _ = runs.load_student(tmp_path / "s.pt")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    runs.atomic_save({"kind": "elite-teacher"}, tmp_path / "t.pt")
    with pytest.raises(scandata.DataError, match="holds a 'elite-teacher' model, expected 'elite-student'"):
        runs.load_student(tmp_path / "t.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(scandata.DataError, match="cannot read checkpoint"):
        runs.load_student(tmp_path / "bad.pt")


def test_teacher_and_student_checkpoints_are_not_interchangeable(tmp_path):
    torch.manual_seed(0)
    runs.atomic_save(runs.student_state(elite.Student()), tmp_path / "student.pt")
    with pytest.raises(scandata.DataError, match="student.pt"):
        runs.load_teacher(tmp_path / "student.pt")
    teacher = elite.Teacher(elite.TeacherConfig(variant="vit_tiny"))
    runs.atomic_save(runs.teacher_state(teacher), tmp_path / "teacher.pt")
    with pytest.raises(scandata.DataError, match="teacher.pt"):
        runs.load_student(tmp_path / "teacher.pt")


def test_teacher_state_round_trip(tmp_path):
    # With a SAM file: only the trainable tensors are stored; the frozen ones reload from it.
    sam = elite.build_sam_encoder("vit_tiny")
    randomize_(sam, seed=5)
    sam_file = tmp_path / "sam_tiny.pth"
    torch.save({"state_dict": {"image_encoder." + k: t for k, t in sam.state_dict().items()}}, sam_file)  # the {'state_dict': ...} wrapping is accepted too
    cfg = elite.TeacherConfig(variant="vit_tiny", crop_hw=(32, 64))
    for checkpoint in (sam_file, None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            teacher = runs.build_teacher(cfg, checkpoint)
        assert any("randomly initialised" in str(w.message) for w in caught) == (checkpoint is None)
        backward_once(teacher)
        with torch.no_grad():
            for p in teacher.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.01)
        state = runs.teacher_state(teacher)
        if checkpoint is not None:
            assert all(teacher.get_parameter(k).requires_grad for k in state["weights"])
        torch.save(state, tmp_path / "teacher.pt")
        back = runs.load_teacher_state(torch.load(tmp_path / "teacher.pt", weights_only=False))
        # A teacher saved before the patch decoders got their name (upstream's `output_upscaling`).
        old_names = state | {"weights": {k.replace("patch_decoders.", "output_upscaling."): v
                                         for k, v in state["weights"].items()}}
        assert any(k.startswith("output_upscaling.") for k in old_names["weights"])
        old = runs.load_teacher_state(old_names)
        x = torch.randn(1, 3, 32, 64)
        with torch.no_grad():
            for f, g, h in zip(teacher(x), back(x), old(x)):
                torch.testing.assert_close(f, g)
                torch.testing.assert_close(f, h)


def two_dpass_state(seed=0) -> dict:
    """A state dict shaped as an official 2DPASS checkpoint's, from the official key names."""
    gen = torch.Generator().manual_seed(seed)
    ours = elite.Student().state_dict()
    state = {"model_3d.criterion.ce_loss.weight": torch.rand(20), "model_2d.conv1.weight": torch.rand(3)}
    for key, theirs in runs.student_keys_from_2dpass().items():
        shape = tuple(ours[key].shape)
        if key.endswith(("conv1.weight", "conv2.weight")):
            shape = (shape[4], 3, 3, 3, shape[3])  # spconv: (Cout, kz, ky, kx, Cin)
        elif key.endswith(".shortcut.weight"):
            shape = (shape[0], 1, 1, 1, shape[1])
        value = torch.randint(0, 50, shape, generator=gen) if key.endswith("num_batches_tracked") else \
            torch.randn(shape, generator=gen)
        state["model_3d." + theirs] = value.to(ours[key].dtype)
    return state


class RunsACommand:
    """What a hostile checkpoint holds: unpickling it calls os.system (a shell command)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_no_checkpoint_runs_code_when_loaded(tmp_path):
    import u2mkd
    marker = tmp_path / "the command ran"
    evil = RunsACommand(marker)
    student = runs.student_state(elite.Student())
    files = {  # each entry point with a file a user hands over, the hostile object inside what it expects
        "student.pt": student | {"x": evil},                                   # infer.py --checkpoint, --init-3d (ours)
        "last.pt": student | {"optimizer": {}, "config": {}, "step": 0, "x": evil},  # --resume, and a run folder's last.pt
        "2dpass.ckpt": {"state_dict": two_dpass_state(), "hyper_parameters": evil},  # --init-3d (2DPASS)
        "sam.pth": {"image_encoder.patch_embed.proj.weight": torch.zeros(1), "x": evil},  # --sam-checkpoint, --plg-checkpoint
        "resnet.pth": {"conv1.weight": torch.zeros(1), "x": evil},             # --image-weights
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    calls = [
        lambda: runs.load_student(tmp_path / "student.pt"),
        lambda: runs.load_teacher(tmp_path / "student.pt"),
        lambda: runs.load_lidar_teacher(tmp_path / "student.pt"),
        lambda: runs.load_last(tmp_path / "last.pt", runs.STUDENT_KIND),
        lambda: runs.load_sam_checkpoint(elite.build_sam_encoder("vit_tiny"), tmp_path / "sam.pth", "vit_tiny"),
        lambda: runs.load_sam(tmp_path / "sam.pth", "vit_b"),
        lambda: runs.load_imagenet_weights(u2mkd.ImageBranch(), tmp_path / "resnet.pth"),
    ]
    for call in calls:
        with pytest.raises(scandata.DataError, match="cannot read"):
            call()
    # The same files in torch's older, non-zip format, a bare pickle of the hostile object, and an
    # empty file: every loader, the 2DPASS one included, refuses each in one line.
    import pickle
    for name, obj in files.items():
        torch.save(obj, tmp_path / name, _use_new_zipfile_serialization=False)
    for call in calls:
        with pytest.raises(scandata.DataError, match="cannot read"):
            call()
    runs.load_2dpass_student(elite.Student(), tmp_path / "2dpass.ckpt")  # as data: the object is a stand-in
    for content in (pickle.dumps(evil), b""):
        for name in files:
            (tmp_path / name).write_bytes(content)
        for call in calls + [lambda: runs.load_2dpass_student(elite.Student(), tmp_path / "2dpass.ckpt")]:
            with pytest.raises(scandata.DataError, match="cannot read"):
                call()
    assert not marker.exists()
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    # A run folder whose last.pt is hostile: looked at, never executed (a fresh run needs --overwrite).
    with pytest.raises(scandata.DataError, match="already holds a run"):
        runs.claim_run_folder(tmp_path, runs.STUDENT_KIND, resume=False, overwrite=False)
    # The 2DPASS file is read as data: its hostile object becomes an inert stand-in, the tensors load.
    model = elite.Student()
    runs.load_2dpass_student(model, tmp_path / "2dpass.ckpt")
    assert torch.equal(model.state_dict()["classifier.2.bias"], two_dpass_state()["model_3d.classifier.2.bias"])
    assert not marker.exists()
    torch.load(tmp_path / "student.pt", weights_only=False)  # the file does what the test says it does
    assert marker.exists()


def test_a_checkpoint_of_the_right_kind_but_another_layout_is_one_line(tmp_path):
    """A file of this project's kind written by another version (or by hand): its entries and
    config fields are checked before any model is built from them."""
    import u2mkd
    student = runs.student_state(elite.Student())
    cases = {
        "no config": ({"kind": runs.STUDENT_KIND}, r"no 'student_config' entry of the expected type"),
        "unknown field": (student | {"student_config": student["student_config"] | {"evil": 1}},
                          r"its StudentConfig has a field 'evil' this code does not know"),
        "negative width": (student | {"student_config": student["student_config"] | {"hidden": -4}},
                           r"its StudentConfig\.hidden is -4, not a valid int"),
        "huge width": (student | {"student_config": student["student_config"] | {"num_classes": 10**9}},
                       r"its StudentConfig\.num_classes is 1000000000, not a valid int"),
        "config a string": (student | {"student_config": "x"}, r"no 'student_config' entry"),
        "model a list": (student | {"model": [1, 2]}, r"its model is not a dict of tensors"),
    }
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / "x.pt")
        with pytest.raises(scandata.DataError, match=message):
            runs.load_student(tmp_path / "x.pt")
        if "student_config" in message or "StudentConfig" in message:
            torch.save(state | {"kind": runs.LIDAR_TEACHER_KIND}, tmp_path / "t.pt")
            with pytest.raises(scandata.DataError, match=message):
                runs.load_lidar_teacher(tmp_path / "t.pt")
    teacher = runs.teacher_state(elite.Teacher(elite.TeacherConfig(variant="vit_tiny")))
    for state, message in ((teacher | {"teacher_config": teacher["teacher_config"] | {"variant": "nonexist"}},
                            r"its teacher is 'nonexist' with 'adalora' adapters"),
                           ({"kind": runs.TEACHER_KIND}, r"no 'teacher_config' entry")):
        torch.save(state, tmp_path / "teacher.pt")
        with pytest.raises(scandata.DataError, match=message):
            runs.load_teacher(tmp_path / "teacher.pt")
    fusion = runs.fusion_state(u2mkd.FusionStudent(), (94, 310)) | {"image_hw": [0, 310]}
    torch.save(fusion, tmp_path / "f.pt")
    with pytest.raises(scandata.DataError, match=r"its image_hw is \[0, 310\], not an image size"):
        runs.load_fusion_student(tmp_path / "f.pt")


def test_init_3d_maps_every_tensor_of_a_2dpass_checkpoint(tmp_path):
    import sys
    import types
    state = two_dpass_state()
    assert "model_3d.spv_enc.3.v_enc.1.layers.3.weight" in state and "model_3d.spv_enc.0.p_enc.PPmodel.5.running_var" in state
    # A Lightning checkpoint keeps its config as an EasyDict: a class this machine cannot import.
    fake = types.ModuleType("easydict_not_installed")
    config_class = type("EasyDict", (dict,), {"__module__": "easydict_not_installed"})
    fake.EasyDict = config_class
    sys.modules["easydict_not_installed"] = fake
    try:
        torch.save({"state_dict": state, "epoch": 63, "hyper_parameters": config_class(a=1)}, tmp_path / "2dpass.ckpt")
    finally:
        del sys.modules["easydict_not_installed"]
    model = elite.Student()
    runs.load_2dpass_student(model, tmp_path / "2dpass.ckpt")
    got = model.state_dict()
    for key, theirs in runs.student_keys_from_2dpass().items():
        src = state["model_3d." + theirs]
        if key.endswith(("conv1.weight", "conv2.weight")):
            co, iz, iy, ix, ci = 5, 0, 1, 2, 7  # ours is indexed [x, y, z, Cin, Cout]
            assert got[key][ix, iy, iz, ci, co] == src[co, iz, iy, ix, ci]
            assert torch.equal(got[key], src.permute(3, 2, 1, 4, 0)), key
        elif key.endswith(".shortcut.weight"):
            assert torch.equal(got[key], src[:, 0, 0, 0, :]), key
        else:
            assert torch.equal(got[key], src), key

    def refused(bad: dict, match: str):
        torch.save({"state_dict": bad}, tmp_path / "bad.ckpt")
        with pytest.raises(scandata.DataError, match=match):
            runs.load_2dpass_student(elite.Student(), tmp_path / "bad.ckpt")

    refused({k: v for k, v in state.items() if "spv_enc.2.p_enc.layer_out.2.bias" not in k},
            r"bad\.ckpt: model_3d\.spv_enc\.2\.p_enc\.layer_out\.2\.bias is missing")
    refused(state | {"model_3d.classifier.2.weight": torch.zeros(17, 128)},
            r"model_3d\.classifier\.2\.weight has shape \(17, 128\), the student's classifier\.2\.weight needs \(20, 128\)")
    refused(state | {"model_3d.spv_enc.4.v_enc.0.layers.0.weight": torch.zeros(1)}, "no place for")
    refused({"model": {}}, r"no 'model_3d\.\*' tensors")
    first = "model_3d." + next(iter(runs.student_keys_from_2dpass().values()))
    refused(state | {first: [1.0, 2.0]}, rf"{re.escape(first)} is a list, not a tensor")  # issue 34
    weight = "model_3d.classifier.2.weight"  # fault-hunting round 3: integer weights, and NaN, refused when loaded
    refused(state | {weight: torch.zeros(20, 128, dtype=torch.long)}, rf"{re.escape(weight)} holds torch\.int64 values")
    refused(state | {weight: torch.full((20, 128), float("nan"))}, rf"{re.escape(weight)} holds NaN or Inf")
    torch.save({"state_dict": [1, 2]}, tmp_path / "bad.ckpt")
    with pytest.raises(scandata.DataError, match=r"its 'state_dict' is a list, not a mapping"):
        runs.load_2dpass_student(elite.Student(), tmp_path / "bad.ckpt")
    with pytest.raises(scandata.DataError, match="2DPASS checkpoint not found"):
        runs.load_2dpass_student(elite.Student(), tmp_path / "missing.ckpt")


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(config=["lr", 0.1]), r"no 'config' entry of the expected type"),
    (lambda c: c.pop("epoch"), r"no 'epoch' entry of the expected type"),
    (lambda c: c.update(step="12"), r"no 'step' entry of the expected type"),
    (lambda c: c.update(step=-1), r"'step' is -1, not a count"),
    (lambda c: c.update(best_miou="high"), r"'best_miou' is 'high', not a number"),
    (lambda c: c["optimizer"].update(param_groups="all"), r"optimiser state is not torch's layout"),
    (lambda c: c["optimizer"].update(param_groups=[{"lr": 0.1}]), r"optimiser state is not torch's layout")])
def test_a_hand_edited_last_pt_is_one_line_on_resume(tmp_path, edit, match):
    """Each entry --resume reads is checked before it is used (issue 34): a traceback never."""
    model = elite.Student()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = runs.student_state(model) | runs.RunState().record(0.1) | {"optimizer": optimizer.state_dict(),
                                                                         "config": {"lr": 0.1}}
    runs.atomic_save(state, tmp_path / "last.pt")
    runs.load_last(tmp_path / "last.pt", runs.STUDENT_KIND)  # the file as written resumes
    edit(state)
    runs.atomic_save(state, tmp_path / "last.pt")
    with pytest.raises(scandata.DataError, match=match):
        runs.load_last(tmp_path / "last.pt", runs.STUDENT_KIND)


def run_folder(out: Path, run: runs.RunState, epochs: int, best_epoch: int, best: float, ids=False) -> dict:
    """A run folder as a run leaves it after `epochs` epochs: last.pt, best.pt (from best_epoch)
    and metrics.csv. Returns the last.pt state."""
    model = elite.Student()
    state = runs.student_state(model) | {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
                                         "config": {"lr": 0.1}}
    for epoch in range(1, epochs + 1):
        run.epoch, run.step = epoch, 10 * epoch
        miou = best if epoch == best_epoch else best / 10
        run.best_miou = max(run.best_miou, miou)
        runs.log_metrics(out / "metrics.csv", {"epoch": epoch, "miou": 100 * miou, "best_miou": 100 * run.best_miou}
                         | ({"run_id": run.run_id} if ids else {}))
        if epoch == best_epoch:
            runs.atomic_save(runs.student_state(model) | run.record(miou), out / "best.pt")
    return state | run.record(best / 10)


def test_resume_refuses_a_last_pt_from_another_run(tmp_path):
    """issue 34: another run's last.pt copied into a folder is refused by name, by its run id or by
    its figures against metrics.csv; the folder's files stay as they were."""
    out = tmp_path / "out"
    run_folder(out, runs.RunState(), epochs=6, best_epoch=4, best=0.0243)
    foreign = run_folder(tmp_path / "other", runs.RunState(), epochs=2, best_epoch=1, best=0.0029)
    runs.atomic_save(foreign, out / "last.pt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(scandata.DataError, match=r"last\.pt: its best mIoU after epoch 2 is 0\.29, .*metrics\.csv's "
                                                 r"row for that epoch says 0\.24: this last\.pt is not the run"):
        runs.load_last(out / "last.pt", runs.STUDENT_KIND)
    (out / "metrics.csv").unlink()  # without the table, the run ids tell
    with pytest.raises(scandata.DataError, match=r"last\.pt: belongs to run \w+, and best\.pt beside it to run \w+"):
        runs.load_last(out / "last.pt", runs.STUDENT_KIND)
    assert all((out / name).read_bytes() == data for name, data in before.items() if name != "metrics.csv")
    (out / "best.pt").write_bytes(b"another program's file")
    with pytest.raises(scandata.DataError, match=r"best\.pt: not a checkpoint this project wrote .* move it away"):
        runs.load_last(out / "last.pt", runs.STUDENT_KIND)


def test_resume_refuses_another_runs_last_and_best_pt_copied_in_together(tmp_path, capsys):
    """Fault-hunting round (issue 34): another run's last.pt and best.pt copied in together agree
    with each other and may agree in their figures; metrics.csv's rows name the run that wrote
    them. A table cut or deleted by hand is said, not passed over."""
    out = tmp_path / "out"
    run_folder(out, runs.RunState(), epochs=2, best_epoch=1, best=0.02, ids=True)
    other = tmp_path / "other"
    foreign = run_folder(other, runs.RunState(), epochs=2, best_epoch=1, best=0.02, ids=True)
    runs.atomic_save(foreign, out / "last.pt")
    shutil.copy(other / "best.pt", out / "best.pt")
    with pytest.raises(scandata.DataError, match=r"last\.pt: belongs to run \w+, and metrics\.csv beside it was "
                                                 r"written by run \w+"):
        runs.load_last(out / "last.pt", runs.STUDENT_KIND)
    (out / "metrics.csv").write_text("epoch,miou\n")  # the folder's table cut to its header
    runs.load_last(out / "last.pt", runs.STUDENT_KIND)
    assert "metrics.csv: no rows for epochs 1-2 (the table was cut or deleted)" in capsys.readouterr().out


def test_resume_from_an_older_last_pt_keeps_the_table_and_the_better_best_pt(tmp_path, capsys):
    """issue 34: an older last.pt of the folder's own run says which epochs it trains again, keeps
    metrics.csv as it was, and starts from best.pt's figure, so a worse model never replaces it."""
    out, run = tmp_path / "out", runs.RunState()
    older = run_folder(out, run, epochs=1, best_epoch=1, best=0.0243)
    older["best_miou"] = run.best_miou
    run_folder(out, run, epochs=6, best_epoch=4, best=0.0300)  # the same run went on to epoch 6
    table = (out / "metrics.csv").read_bytes()
    runs.atomic_save(older, out / "last.pt")  # then its epoch-1 backup was put back
    ckpt = runs.load_last(out / "last.pt", runs.STUDENT_KIND)
    assert "rows for epochs 3-6 come after" in capsys.readouterr().out
    assert (out / "metrics.before-resume-epoch1.csv").read_bytes() == table
    assert ckpt["best_miou"] == pytest.approx(0.0300)  # best.pt's: only a better epoch replaces it
    assert runs.RunState.resumed(ckpt).run_id == run.run_id


def test_resume_refuses_a_table_with_an_epoch_twice_and_accepts_one_a_spreadsheet_rounded(tmp_path):
    """Fault-hunting round 5 (issue 34): a duplicated row survived a resume; a table re-saved with its
    figures rounded to 2 decimals was taken for another run's, with a message that contradicted itself."""
    out, run = tmp_path / "out", runs.RunState()
    last = run_folder(out, run, epochs=2, best_epoch=2, best=0.024317, ids=True)
    runs.atomic_save(last | {"best_miou": run.best_miou}, out / "last.pt")
    rows = (out / "metrics.csv").read_text().splitlines()
    rounded = [rows[0]] + [",".join(f"{float(v):.2f}" if k in ("miou", "best_miou") else v
                                    for k, v in zip(rows[0].split(","), row.split(","))) for row in rows[1:]]
    (out / "metrics.csv").write_text("\n".join(r.replace(",", ";") for r in rounded) + "\n")
    runs.load_last(out / "last.pt", runs.STUDENT_KIND)  # its own run's rows: the run id proves it
    (out / "metrics.csv").write_text("\n".join(rows + rows[-1:]) + "\n")
    with pytest.raises(scandata.DataError, match=r"metrics\.csv: 1 epoch\(s\) have two rows \(epoch 2 first"):
        runs.load_last(out / "last.pt", runs.STUDENT_KIND)


def test_a_resumed_runs_clock_goes_on_from_its_checkpoint():
    """Fault-hunting round 5 (issue 34): metrics.csv's seconds restarted at 0 after a mid-epoch resume."""
    run = runs.RunState(epoch=1, batch=3, step=7, seconds=12.5)
    assert runs.RunState.resumed(run.record(None)).seconds == 12.5
    with pytest.raises(scandata.DataError, match=r"'seconds' is -1\.0, not a time"):
        runs.check_run_state(run.record(None) | {"seconds": -1.0, "optimizer": {}, "config": {}}, Path("last.pt"))


def test_non_finite_checkpoint_is_never_written(tmp_path):
    path = tmp_path / "best.pt"
    good = runs.student_state(elite.Student())
    runs.atomic_save(good, path)
    before = path.read_bytes()
    bad = runs.student_state(elite.Student())
    bad["model"]["blocks.0.v_enc.0.bn1.running_var"][3] = float("inf")
    with pytest.raises(scandata.DataError, match=r"best\.pt: not written: 1 tensors hold NaN or Inf "
                                                 r"\(e\.g\. 'model\.blocks\.0\.v_enc\.0\.bn1\.running_var'\)"):
        runs.atomic_save(bad, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["best.pt"]


# ------------------------------------------------------------------------------------
# 3. The optimiser recipe: learning-rate schedules
# ------------------------------------------------------------------------------------

def test_learning_rate_schedule_values():
    # Per-iteration cosine from the peak to 0 over the run, no warm-up in one process (as upstream).
    one = runs.lr_schedule("step", 0.24, epochs=10, steps_per_epoch=100, processes=1)
    total = 1000
    assert one.warmup == 0 and one.at(0) == 0.24
    assert one.at(total // 2) == pytest.approx(0.12)
    assert one.at(total // 4) == pytest.approx(0.24 * (0.5 + 0.5 * math.cos(math.pi / 4)))
    assert one.at(total) == pytest.approx(0.0, abs=1e-12)
    assert one.at(total + 7) == pytest.approx(0.0, abs=1e-12)  # held at the end
    rates = [one.at(s) for s in range(total + 1)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # never rises


def test_learning_rate_warm_up_under_torchrun():
    # Two processes: a linear warm-up over 1000 // 2 = 500 steps, (k + 1) / 500 of the peak, then the
    # cosine over the whole run's steps, counted from the warm-up's end (upstream's horizon).
    two = runs.lr_schedule("step", 0.24, epochs=10, steps_per_epoch=100, processes=2)
    assert two.warmup == 500
    assert two.at(0) == pytest.approx(0.24 / 500) and two.at(249) == pytest.approx(0.12)
    assert two.at(499) == pytest.approx(0.24)
    assert two.at(500) == pytest.approx(0.24)  # the cosine's start
    assert two.at(500 + 500) == pytest.approx(0.12)  # half of the 1000-step horizon
    assert two.at(999) == pytest.approx(0.24 * 0.5 * (1 + math.cos(math.pi * 499 / 1000)))  # the run's last step
    assert runs.lr_schedule("step", 0.24, 10, 100, processes=4).warmup == 250
    assert runs.lr_schedule("epoch", 0.24, 10, 100, processes=2).at(0) == 0.24  # per epoch: no warm-up


def test_learning_rate_per_epoch_matches_torch_cosine_annealing():
    # ELiTe-test: CosineAnnealingLR(T_max = epochs - 4, eta_min 1e-5) stepped once an epoch.
    schedule = runs.lr_schedule("epoch", 0.24, epochs=12, steps_per_epoch=3, processes=1)
    assert schedule.t_max == 8 and schedule.eta_min == 1e-5
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.24)
    torch_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8, eta_min=1e-5)
    for epoch in range(12):
        for k in range(3):  # every step of the epoch has the epoch's rate
            assert schedule.at(3 * epoch + k) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), epoch
        opt.step()
        torch_schedule.step()
    assert schedule.at(3 * 8) == pytest.approx(1e-5) and schedule.at(3 * 11) > schedule.at(3 * 8)  # climbs again


# ------------------------------------------------------------------------------------
# 4. Many processes: torchrun and DistributedDataParallel
# ------------------------------------------------------------------------------------

def one_training_step(scans: list[scandata.Scan]) -> dict:
    """The trainers' step (runs.data_parallel, runs.train_step) on a student, from seed 0.
    BatchNorm runs on its running statistics (eval mode): with batch statistics each process
    would normalise its own batch, not the union (--sync-bn fixes that on GPUs)."""
    torch.manual_seed(0)
    model = elite.Student().eval()
    optimizer = runs.make_optimizer(model.parameters(), lr=0.24)

    def loss_terms(batch):
        return {"ce": F.cross_entropy(model(batch.points, batch.batch_idx).logits, batch.labels)}

    objective = runs.data_parallel(runs.Objective([model], loss_terms))
    _, skipped = runs.train_step(objective, scandata.collate(scans), optimizer, amp_device=None)
    assert skipped is None
    return {k: v.clone() for k, v in model.state_dict().items()}


def ddp_worker(rank: int, world: int, port: int, out: str):
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    runs.init_distributed("cpu")
    assert runs.distributed() == runs.World(rank, world)
    state = one_training_step([equal_size_scans()[rank]])  # each process steps on its own scan
    torch.save(state, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_processes_step_like_one_on_the_union(tmp_path):
    """Two gloo processes, a scan each, end a step with identical weights, equal to one
    process stepping on both scans: DDP averages the gradients."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    union = one_training_step(equal_size_scans())
    torch.manual_seed(0)
    start = elite.Student().state_dict()
    moved = 0
    for name in union:
        assert torch.equal(r0[name], r1[name]), name  # the ranks agree bit for bit
        assert torch.allclose(r0[name].float(), union[name].float(), rtol=1e-4, atol=1e-6), name
        moved += not torch.equal(union[name], start[name])
    assert moved > 50  # the step changed the weights, so the comparison has teeth


# ------------------------------------------------------------------------------------
# 7. The training loop: skipped steps, metrics
# ------------------------------------------------------------------------------------

def test_skipped_step_leaves_the_model_exactly_as_before(synth_root):
    torch.manual_seed(0)
    model = elite.Student()
    heads = elite.heads_3d()
    optimizer = runs.make_optimizer(list(model.parameters()) + list(heads.parameters()))
    objective = runs.Objective([model, heads], lambda b: {"ce": F.cross_entropy(
        model(b.points, b.batch_idx).logits, b.labels, ignore_index=0)})
    data = semantickitti.SemanticKITTI(synth_root, ["00"], train=True)
    good = scandata.collate([data[0]])
    bad = scandata.collate([data[1]])
    bad.points[:, 3] = 1e30  # one absurd remission value per point: BatchNorm's variance overflows
    for b in (good, bad):  # the second step finds momentum in the optimiser
        state = {k: v.clone() for k, v in model.state_dict().items()}
        _, skipped = runs.train_step(objective, b, optimizer, amp_device=None)
        if b is bad:
            assert skipped == "non-finite loss or gradient"
            for key, value in model.state_dict().items():
                assert torch.equal(value, state[key]), key  # running_var and num_batches_tracked too
        else:
            assert skipped is None and not torch.equal(model.state_dict()["classifier.2.weight"],
                                                       state["classifier.2.weight"])
    assert not runs.non_finite_tensors(runs.student_state(model) | {"optimizer": optimizer.state_dict()})


def test_metrics_csv_replaces_rows_a_killed_run_left(tmp_path):
    path = tmp_path / "metrics.csv"
    for epoch in (1, 2, 3):
        runs.log_metrics(path, {"epoch": epoch, "miou": 10.0 * epoch})
    runs.log_metrics(path, {"epoch": 2, "miou": 25.0, "extra": 1})  # resumed after epoch 1
    text = path.read_text().splitlines()
    assert text == ["epoch,miou,extra", "1,10.0,", "2,25.0,1"]
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_default_outputs_are_ignored_by_git():
    ignored = set((REPO / ".gitignore").read_text().split())
    for folder in ("/data/", "/runs/", "/predictions/", "/vis/", "/pred_*/", "/submission/"):  # README's commands
        assert folder in ignored, folder


# ------------------------------------------------------------------------------------
# 8. SAM-PLG: SAM over every frame, the files written once, in shards
# ------------------------------------------------------------------------------------

def tiny_sam():
    """A randomly initialised SAM with a one-block, 16-wide image encoder: the real
    prompt encoder and mask decoder, cheap enough for a CPU test."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=16, depth=1, num_heads=1, mlp_ratio=2,
                              out_chans=256, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), window_size=0)
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                           mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=512, num_heads=8))
    return Sam(encoder, prompt, decoder).eval()


def test_sam_mask_source_plumbing_with_a_random_tiny_sam():
    h, w = 96, 512
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rc = np.array([(2, 0), (10, 60), (30, 100)])  # even: on the 256 grid of a 512-wide image
    frame = semantickitti.PlgFrame(image, np.array([9, 1, 13]), np.array([0, 5, 0]), rc, None)
    source = runs.SamMaskSource(tiny_sam(), points_per_batch=2, stability_thresh=0.0)
    calls = []
    predict = source.predictor.predict_torch

    def spy(**kw):
        calls.append({k: tuple(v.shape) for k, v in kw.items() if torch.is_tensor(v)} | {
            "multimask_output": kw["multimask_output"], "return_logits": kw["return_logits"]})
        return predict(**kw)
    source.predictor.predict_torch = spy
    masks, iou = source.masks(frame)
    assert [c["point_coords"] for c in calls] == [(2, 1, 2), (1, 1, 2)]  # batches of points_per_batch
    assert calls[0]["mask_input"] == (2, 1, 256, 256) and calls[0]["point_labels"] == (2, 1)
    assert calls[0]["multimask_output"] and calls[0]["return_logits"]
    assert masks.dtype == bool and masks.shape[1:] == (h, w) and 1 <= len(masks) <= 9
    assert len(iou) == len(masks) and np.all(np.diff(iou) <= 0)  # NMS order
    # Random weights give flat logits (|x| < 1): nothing is stable at the PLG default 0.9.
    source.stability_thresh = 0.9
    masks, iou = source.masks(frame)
    assert masks.shape == (0, h, w) and iou.shape == (0,)
    # No labelled point in the image: no prompt, no SAM call.
    empty = semantickitti.PlgFrame(image, np.zeros(0, int), np.zeros(0, int), np.zeros((0, 2), int), None)
    calls.clear()
    assert source.masks(empty)[0].shape == (0, h, w) and not calls


def test_load_sam_names_the_file_and_the_problem(tmp_path):
    with pytest.raises(scandata.DataError, match="sam_vit_h.pth: SAM checkpoint not found"):
        runs.load_sam(tmp_path / "sam_vit_h.pth")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(scandata.DataError, match="corrupt.pth: cannot read SAM checkpoint"):
        runs.load_sam(bad)
    # A vit_b state (768 wide, 12 blocks) loaded as vit_h: caught before building the model.
    fake = tmp_path / "sam_vit_b.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 1, 1, 1),
                "image_encoder.blocks.11.norm1.weight": torch.zeros(1)}, fake)
    with pytest.raises(scandata.DataError, match="sam_vit_b.pth: holds SAM vit_b, not vit_h; pass variant='vit_b'"):
        runs.load_sam(fake, "vit_h")
    other = tmp_path / "student.pt"
    torch.save({"model": torch.zeros(1)}, other)
    with pytest.raises(scandata.DataError, match="student.pt: not a SAM checkpoint"):
        runs.load_sam(other)
    with pytest.raises(ValueError, match="unknown SAM variant 'vit_x'"):
        runs.load_sam(fake, "vit_x")


def test_ideal_masks_densify_the_labels_and_agree_with_the_rendering(synth):
    h, w = synthkitti.IMAGE_HEIGHT, synthkitti.IMAGE_WIDTH
    calib = semantickitti.read_calib(synth / "sequences/00/calib.txt")
    sparse_px = dense_px = agree = sparse_agree = 0
    chance = []
    for scan in semantickitti.list_scans(synth, ["00"]):
        dense = semantickitti.read_pixel_labels(semantickitti.plg_path(scan), h, w)
        gt = semantickitti.read_pixel_labels(synthkitti.rendered_labels_path(scan), h, w)
        f = semantickitti.load_plg_frame(scan, calib)
        sparse = elite.sparse_label_maps(f.semantic, f.instance, f.pixel_rc, h, w)
        labelled = dense[0] > 0
        point_px = (sparse[0] > 0) & (sparse[0] != elite.NO_POINT)
        sparse_px += int(point_px.sum())
        sparse_agree += int((sparse[0][point_px] == gt[0][point_px]).sum())
        dense_px += int(labelled.sum())
        agree += int((dense[0][labelled] == gt[0][labelled]).sum())
        # chance: agreement of independent labellings with these two class frequencies
        p_dense = np.bincount(dense[0][labelled], minlength=20) / labelled.sum()
        p_gt = np.bincount(gt[0][labelled], minlength=20) / labelled.sum()
        chance.append(float(p_dense @ p_gt))
    ratio, accuracy = dense_px / sparse_px, agree / dense_px
    print(f"\nSAM-PLG, ideal masks, 2 SynthKITTI scans (512 columns): {sparse_px} sparse labelled pixels -> "
          f"{dense_px} dense ({ratio:.1f}x, {dense_px / (2 * h * w):.1%} of the image); agreement with the "
          f"rendered truth {accuracy:.2%} (sparse point labels {sparse_agree / sparse_px:.2%}), "
          f"chance {np.mean(chance):.1%}")
    assert ratio > 10
    assert accuracy > 0.95 and max(chance) < 0.5


def test_generation_resumes_skips_existing_and_leaves_no_temp_files(synth):
    folder = synth / "sequences/00/image_2_plg"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert sorted(before) == ["000000.npy", "000001.npy", semantickitti.PLG_RECORD]  # nothing else: no temp files
    record = json.loads((folder / semantickitti.PLG_RECORD).read_text())
    label = synth / "sequences/00/labels/000001.label"
    assert record["masks"] == "ideal" and record["weights"] is None
    assert sorted(record["files"]) == ["calib.txt"] + [f"{folder}/00000{i}.{ext}" for folder, ext in (
        ("image_2", "png"), ("image_2_gt", "npy"), ("labels", "label"), ("velodyne", "bin")) for i in (0, 1)]
    assert record["files"]["labels/000001.label"] == [label.stat().st_size, label.stat().st_ctime_ns,
                                                      semantickitti.file_crc(label)]
    counts = runs.generate_pseudo_labels(synth, ["00"], synthkitti.IdealMaskSource(), progress=False)
    assert counts == {"written": 0, "existing": 2, "unlabelled": 0}
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


@pytest.mark.parametrize("entry", [[1, 2], [1, 2, 3, 4], ["1", 2, 3], 7])
def test_a_hand_edited_pseudo_label_record_is_one_line(synth, tmp_path, entry):
    """made_with.json with an entry that is not [size, time, crc]: refused naming the file (issue 34)."""
    root = tmp_path / "d"
    shutil.copytree(synth, root)
    record = root / "sequences/00/image_2_plg" / semantickitti.PLG_RECORD
    made = json.loads(record.read_text())
    made["files"]["labels/000001.label"] = entry
    record.write_text(json.dumps(made))
    with pytest.raises(scandata.DataError, match=r"made_with\.json: unreadable"):
        semantickitti.check_pseudo_labels(root, ["00"])


def copy_without_outputs(synth, dst):
    shutil.copytree(synth, dst, ignore=shutil.ignore_patterns("image_2_plg"))
    return dst


def test_shards_split_the_scans_and_existing_files_are_trusted(synth, tmp_path):
    root = copy_without_outputs(synth, tmp_path / "d")
    out = [semantickitti.plg_path(s) for s in semantickitti.list_scans(root, ["00"])]
    src = synthkitti.IdealMaskSource()
    assert runs.generate_pseudo_labels(root, ["00"], src, shard=(1, 2), progress=False)["written"] == 1
    assert [p.is_file() for p in out] == [False, True]
    first_run = semantickitti.plg_path(synth / "sequences/00/velodyne/000001.bin")
    np.testing.assert_array_equal(np.load(out[1]), np.load(first_run))
    # A file already there is skipped whatever it holds; reading it later names the problem.
    out[0].write_bytes(b"garbage")
    assert runs.generate_pseudo_labels(root, ["00"], src, progress=False)["existing"] == 2
    with pytest.raises(scandata.DataError, match="000000.npy: cannot read pixel labels"):
        semantickitti.read_pixel_labels(out[0], synthkitti.IMAGE_HEIGHT, synthkitti.IMAGE_WIDTH)
    with pytest.raises(ValueError, match="need 0 <= i < n"):
        runs.generate_pseudo_labels(root, ["00"], src, shard=(2, 2))
    # Labels changed since: the files are not these labels' pseudo-labels. A copy with new times
    # and the same bytes is still these labels.
    label = root / "sequences/00/labels/000001.label"
    data = label.read_bytes()
    label.write_bytes(data)  # a new modification time, the same content
    assert semantickitti.missing_pseudo_labels(root, ["00"]) == 0
    relabelled = np.frombuffer(data, np.uint32).copy()
    relabelled[:100] = 40  # road, the same size
    label.write_bytes(relabelled.tobytes())
    with pytest.raises(scandata.DataError, match=r"00/image_2_plg: pseudo-labels made from other inputs "
                                                 r"\(labels/000001\.label changed since\)"):
        semantickitti.missing_pseudo_labels(root, ["00"])
    label.unlink()
    with pytest.raises(scandata.DataError, match=r"\(2 label files then, 1 now\)"):
        semantickitti.missing_pseudo_labels(root, ["00"])


def test_missing_inputs_are_named(synth, tmp_path):
    root = copy_without_outputs(synth, tmp_path / "d")
    (root / "sequences/00/image_2/000000.png").unlink()
    with pytest.raises(scandata.DataError, match="image_2/000000.png: image not found"):
        runs.generate_pseudo_labels(root, ["00"], synthkitti.IdealMaskSource(), progress=False)
    (root / "sequences/00/calib.txt").unlink()
    with pytest.raises(scandata.DataError, match="calib.txt: calibration file not found"):
        runs.generate_pseudo_labels(root, ["00"], synthkitti.IdealMaskSource(), progress=False)
    shutil.copy(synth / "sequences/00/calib.txt", root / "sequences/00/calib.txt")
    (root / "sequences/00/image_2_gt/000001.npy").unlink()
    (root / "sequences/00/labels/000000.label").unlink()  # scan 0 now unlabelled: skipped
    with pytest.raises(scandata.DataError, match="image_2_gt/000001.npy: pixel-label file not found"):
        runs.generate_pseudo_labels(root, ["00"], synthkitti.IdealMaskSource(), progress=False)
    assert not semantickitti.plg_path(root / "sequences/00/velodyne/000000.bin").exists()


def test_parse_shard():
    assert runs.parse_shard("1/4") == (1, 4)
    for bad in ["4/4", "-1/2", "x", "1/2/3"]:
        with pytest.raises(ValueError, match="shard"):
            runs.parse_shard(bad)


# ------------------------------------------------------------------------------------
# 9. Pictures, and infer.py's measuring tools
# ------------------------------------------------------------------------------------

def test_prediction_picture_is_legible():
    import infer
    rng = np.random.default_rng(0)
    n = 20000
    xyz = np.c_[rng.uniform(-20, 20, (n, 2)), rng.uniform(-2, 1, n)].astype(np.float32)  # a 40 m scene
    points = np.c_[xyz, np.zeros(n, np.float32)]
    labels = rng.integers(1, 20, n)
    labels[:n // 2] = 11  # sidewalk, the darkest class colour
    pred = labels.copy()
    pred[::7] = 9
    picture = infer.frame_picture(points, pred, labels, None, None, caption="sequences/08/velodyne/000000.bin: ...")
    caption, view = picture[:infer.CAPTION], picture[infer.CAPTION:infer.CAPTION + 600, :600]
    assert (caption < 100).all(2).sum() > 200  # dark caption text on the light band
    drawn = np.argwhere((view != infer.BACKGROUND).any(2))
    assert drawn.shape[0] > 0.3 * 600 * 600  # points are dots, not single pixels
    (r0, c0), (r1, c1) = drawn.min(0), drawn.max(0)
    assert r1 - r0 > 0.8 * 600 and c1 - c0 > 0.8 * 600  # the scene fills the panel
    assert np.mean(infer.BACKGROUND) > 200 and np.abs(semantickitti.CLASS_COLORS[11] - infer.BACKGROUND).sum() > 300
    assert (view == semantickitti.CLASS_COLORS[11]).all(2).sum() > 10000  # sidewalk shows


def test_op_counter_sees_data_dependent_sizes_and_host_reads():
    import infer
    x = torch.arange(10)

    def fn():
        torch.nonzero(x > 5)
        x[x > 3]
        torch.unique(x)
        x.sum().item()
        elite_fast.read_to_host(x)
        x[2:5].t()  # views: not counted
        torch.searchsorted(x, x)  # a fixed size
        x.float()  # a cast, not a read
    ops = infer.count_ops(fn)
    assert ops.data_dependent == {"nonzero": 1, "index*": 1, "_unique2": 1, "_local_scalar_dense": 1, "to_host*": 1}
    assert "slice" not in ops.aten and "t" not in ops.aten and ops.aten["searchsorted"] == 1 and ops.aten["gt"] == 2
    assert ops.aten["_to_copy"] == 1 and ops.triton == {}


def test_benchmark_peak_memory_sees_a_large_allocation():
    import infer
    mib = infer.peak_memory_mib(lambda: torch.ones(2 ** 26).sum(), torch.device("cpu"))  # 256 MiB
    assert 200 < mib < 1000


@pytest.mark.parametrize("change,named", [
    (lambda seq: (seq / "image_2_gt/000001.npy").write_bytes(b"\0" * (seq / "image_2_gt/000001.npy").stat().st_size),
     "image_2_gt/000001.npy changed since"),  # the masks the labels were made from, zeroed
    (lambda seq: (seq / "image_2/000000.png").unlink(), "image_2/000000.png went since"),
    (lambda seq: (seq / "calib.txt").write_text((seq / "calib.txt").read_text().replace("7", "8")),
     "calib.txt changed since"),
    (lambda seq: (seq / "velodyne/000001.bin").write_bytes((seq / "velodyne/000001.bin").read_bytes()[::-1]),
     "velodyne/000001.bin changed since")])
def test_pseudo_labels_are_refused_when_any_input_changed(synth, tmp_path, change, named):
    """issue 34: the pseudo-labels' record holds every input they were made from: the masks (the
    rendered regions here), images, scans, labels and calibration; a change to any is named."""
    root = tmp_path / "d"
    shutil.copytree(synth, root)
    change(root / "sequences/00")
    with pytest.raises(scandata.DataError, match=rf"image_2_plg: pseudo-labels made from other inputs \({re.escape(named)}\)"):
        runs.generate_pseudo_labels(root, ["00"], synthkitti.IdealMaskSource(), progress=False)


def test_pseudo_labels_record_sams_weights_and_refuse_an_older_record(synth, tmp_path):
    """SAM's weights file is an input too, by its fingerprint; a record of before every input was
    kept is refused by name (it cannot say what the masks were made from)."""
    root = tmp_path / "d"
    shutil.copytree(synth, root)
    weights = tmp_path / "sam.pth"
    weights.write_bytes(b"weights")
    record = root / "sequences/00/image_2_plg" / semantickitti.PLG_RECORD
    made = json.loads(record.read_text())
    record.write_text(json.dumps(made | {"weights": semantickitti.fingerprint(weights)}))
    assert semantickitti.missing_pseudo_labels(root, ["00"], masks="ideal", weights=weights) == 0
    weights.write_bytes(b"other weights")
    with pytest.raises(scandata.DataError, match=r"\(SAM's weights .*sam\.pth changed since\)"):
        semantickitti.missing_pseudo_labels(root, ["00"], masks="ideal", weights=weights)
    record.write_text(json.dumps({"masks": "ideal", "labels": {"000000": [1, 2, 3]}}))
    with pytest.raises(scandata.DataError, match=r"whose record \(made_with\.json\) keeps only their labels"):
        semantickitti.missing_pseudo_labels(root, ["00"])
    record.unlink()  # the fault-hunting round: files without a record were used unchecked
    with pytest.raises(scandata.DataError, match=r"image_2_plg: pseudo-labels without their record \(made_with\.json\)"):
        semantickitti.missing_pseudo_labels(root, ["00"])


def test_a_compressed_checkpoint_that_would_expand_to_gigabytes_is_not_loaded(tmp_path, monkeypatch):
    """issue 34: a small zip whose entries expand far beyond it (a 'zip bomb') is refused by name
    before torch or numpy unpacks it, wherever a file handed over is read; a real checkpoint loads."""
    import zipfile
    monkeypatch.setattr(runs, "EXPANSION_FLOOR", 1 << 20)  # the test's bomb: 8 MiB of zeros, not gigabytes
    bomb = tmp_path / "last.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (8 << 20))
    assert bomb.stat().st_size < 100_000
    refused = r"last\.pt: a 0\.0 MB archive that would expand to 0\.0 GB: not a checkpoint"
    for load in (lambda: runs.load_checkpoint(bomb, None), lambda: runs.read_tensor_file(bomb, "SAM checkpoint"),
                 lambda: runs.load_2dpass_student(elite.Student(), bomb),
                 lambda: runs.claim_run_folder(tmp_path, runs.STUDENT_KIND, resume=True, overwrite=False)):
        with pytest.raises(scandata.DataError, match=refused):
            load()
    good = tmp_path / "good.pt"
    runs.atomic_save(runs.student_state(elite.Student()), good)  # 1.9M parameters: over the test's floor
    assert runs.load_checkpoint(good, runs.STUDENT_KIND)["kind"] == runs.STUDENT_KIND


def test_pictures_are_never_written_through_a_link(tmp_path):
    """Fault-hunting round (issue 34): VIS/sequences/08 linked to a dataset's image_2 once let a
    picture replace a camera frame; a link anywhere below --vis is now refused by name."""
    frames = tmp_path / "data" / "image_2"
    frames.mkdir(parents=True)
    (frames / "000000.png").write_bytes(b"the camera frame")
    vis = tmp_path / "vis"
    (vis / "sequences").mkdir(parents=True)
    (vis / "sequences" / "08").symlink_to(frames)
    picture = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(scandata.DataError, match=r"vis/sequences/08: is a link; pictures are written only into plain"):
        runs.write_png(vis / "sequences" / "08" / "000000.png", picture, vis)
    assert (frames / "000000.png").read_bytes() == b"the camera frame"
    runs.write_png(vis / "sequences" / "00" / "000000.png", picture, vis)  # a plain folder: written
    assert (vis / "sequences" / "00" / "000000.png").stat().st_size > 0


@pytest.mark.parametrize("env,match", [
    ({"WORLD_SIZE": "abc"}, r"\$WORLD_SIZE='abc': expected a whole number"),
    ({"WORLD_SIZE": "2"}, r"\$WORLD_SIZE=2 with \$RANK=None: a process's rank must be one of 0\.\.1"),
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, r"\$RANK=5: a process's rank"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, r"\$WORLD_SIZE=2 without \$MASTER_ADDR and \$MASTER_PORT")])
def test_a_bad_launch_environment_is_one_line_not_a_wait(env, match, monkeypatch):
    """Fault-hunting round (issue 34): torchrun's variables set by hand used to give a traceback, or
    a process waiting forever for a rank that cannot exist; each is now refused before torch waits."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(scandata.DataError, match=match):
        runs.init_distributed("cpu")
    assert not torch.distributed.is_initialized()


def test_only_the_projects_own_temporaries_are_removed(tmp_path):
    """Fault-hunting round 2 (issue 34): a user's last.pt.mine.tmp or metrics.csv.2024.tmp beside a
    run was deleted as a temporary; only atomic_write's own (NAME.<8 random characters>.tmp) go."""
    ours = tmp_path / "last.pt.k3j_9a0z.tmp"
    theirs = [tmp_path / "last.pt.mine.tmp", tmp_path / "metrics.csv.2024.tmp", tmp_path / "best.pt.notes.tmp"]
    for path in [ours] + theirs:
        path.write_bytes(b"x")
    assert runs.remove_partial_writes(tmp_path / name for name in runs.RUN_FILES) == 1
    assert not ours.exists() and all(path.read_bytes() == b"x" for path in theirs)


def test_a_missing_best_pt_is_written_again_after_the_next_epoch(tmp_path, capsys):
    """Fault-hunting round 3 (issue 34): a best.pt whose write failed (a full disk) was never
    written again, since last.pt carried the best figure; the resume says so and starts over."""
    out, run = tmp_path / "out", runs.RunState()
    runs.atomic_save(run_folder(out, run, epochs=2, best_epoch=1, best=0.02), out / "last.pt")
    (out / "best.pt").unlink()
    ckpt = runs.load_last(out / "last.pt", runs.STUDENT_KIND)
    assert "best.pt: missing (its write failed" in capsys.readouterr().out and ckpt["best_miou"] == -1.0
    assert runs.which_checkpoint(out / "last.pt", out / "best.pt", 0.1, 0.2).endswith("best.pt: not written")


def test_a_teacher_refuses_a_sam_file_other_than_the_one_it_was_trained_on(tmp_path):
    """Fault-hunting round 3 (issue 34): a teacher checkpoint named its SAM file by path only, so
    another file of the same variant at that path ran silently under adapters trained for the first.
    The file's fingerprint is recorded; a moved copy (new time, same bytes) is still accepted."""
    sam = tmp_path / "sam.pth"
    shutil.copy("weights/sam_vit_tiny_synth.pth", sam)
    teacher = runs.build_teacher(elite.TeacherConfig(variant="vit_tiny", crop_hw=(64, 128)), sam)
    runs.atomic_save(runs.teacher_state(teacher) | {"config": {}}, tmp_path / "teacher.pt")
    moved = tmp_path / "moved.pth"
    moved.write_bytes(sam.read_bytes())  # another time, the same bytes
    assert runs.load_teacher(tmp_path / "teacher.pt", moved)[0].sam_fingerprint == teacher.sam_fingerprint
    state = torch.load(sam, weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1  # another encoder of the same variant
    torch.save(state, sam)
    with pytest.raises(scandata.DataError, match=r"teacher\.pt: its teacher was trained on another SAM file than "
                                                 r".*sam\.pth"):
        runs.load_teacher(tmp_path / "teacher.pt")


def test_a_label_edited_and_its_time_put_back_is_still_seen(synth, tmp_path):
    """Fault-hunting round 4 (issue 34): a .label rewritten with the same size and its
    modification time put back (touch -r, cp -p) passed as unchanged; the record's time is the
    status-change time, which no tool sets back, so the content is compared."""
    import os
    root = tmp_path / "d"
    shutil.copytree(synth, root, copy_function=shutil.copy2)
    assert semantickitti.missing_pseudo_labels(root, ["00"]) == 0  # a copy: new change times, the same bytes
    label = root / "sequences/00/labels/000000.label"
    st = label.stat()
    raw = np.fromfile(label, dtype=np.uint32)
    raw[::-1].copy().tofile(label)
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns))  # its modification time put back
    with pytest.raises(scandata.DataError, match=r"\(labels/000000\.label changed since\)"):
        semantickitti.missing_pseudo_labels(root, ["00"])


def test_a_forked_worker_ends_on_sigterm_as_it_would_without_the_scripts_handler():
    """run_script's SIGTERM handler (one line, exit 143) is the script's own: a DataLoader worker
    forked from it ends by the signal, silently, as torch expects when it stops its workers."""
    import multiprocessing
    runs.SCRIPT_PID[0] = os.getpid()
    previous = signal.signal(signal.SIGTERM, runs.stopped_by_sigterm)
    try:
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        child.start()
        time.sleep(0.2)
        os.kill(child.pid, signal.SIGTERM)
        child.join(10)
        assert child.exitcode == -signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
