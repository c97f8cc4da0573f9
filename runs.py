"""The machinery of a run, shared by the three scripts; elite.py and u2mkd.py hold the methods.

    1. Files: checked output folders, partial writes cleaned (scandata.atomic_write writes them)
    2. Checkpoints: what each model's files hold, and loading them with clear errors
    3. The optimiser recipe: SGD with Nesterov momentum, the learning-rate schedules, clipping
    4. Many processes: torchrun and DistributedDataParallel
    5. The data of a run: the dataset's root, the loaders
    6. The scripts: flags checked when parsed, the start-up summary, one-line errors
    7. The training loop: steps that never poison the model, checkpoints, signals, metrics
    8. SAM-PLG over every frame: SAM run with elite.py's rules, files written once, in shards
    9. Pictures: classes in the official colours, over the camera frame
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import signal
import stat
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import elite
import elite_fast
import nusc
import scandata
import semantickitti
import synthkitti
import synthnusc
import u2mkd
from elite import PEFT_CHOICES, SAM_VARIANTS, Student, StudentConfig, Teacher, TeacherConfig, TooFewVoxels
from scandata import DataError, atomic_write, collate
from semantickitti import (CLASS_COLORS, CLASS_NAMES, IGNORE, PLG_RECORD, SPLITS, check_pseudo_labels, label_path,
                           list_scans, load_plg_frame, plg_path, plg_record, project_points, read_pixel_labels,
                           sequence_calib)


# =====================================================================================
# 1. Files: checked output folders, partial writes cleaned
# =====================================================================================
# Every file a script writes goes through scandata.atomic_write: a temporary in the same folder,
# flushed, then renamed over the target, so a reader sees the old file or the new one.

TEMPORARY = re.compile(r"[a-z0-9_]{8}")  # tempfile.mkstemp's random part: a user's NAME.mine.tmp is not ours


def remove_partial_writes(targets) -> int:
    """Delete the temporaries atomic_write left beside these target files when its process was
    killed mid-write (PATH.<random>.tmp) -> how many. Only the targets' own: another process
    may be writing its files into the same folder."""
    by_folder: dict[Path, set[str]] = {}
    for target in map(Path, targets):
        by_folder.setdefault(target.parent, set()).add(target.name)
    removed = 0
    for folder, names in by_folder.items():
        for tmp in folder.glob("*.tmp") if folder.is_dir() else ():
            stem, _, random = tmp.name[:-len(".tmp")].rpartition(".")
            if stem in names and TEMPORARY.fullmatch(random) and tmp.is_file():  # mkstemp's 8 characters only
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed


def writable_folder(folder: Path, hint: str) -> None:
    """Check, before any work and without creating anything, that this process can write
    files into `folder` (or create it): a read-only place fails now with `hint`, not hours
    later. os.access also sees a read-only file system, for root too."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise DataError(f"{folder}: a link to {os.readlink(folder)}, which does not exist; {hint}")
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: is an existing file, not a folder; {hint}")
    existing = next(p for p in [folder, *folder.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise DataError(f"{folder}: cannot be made, {existing} is a file; {hint}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{folder}: cannot write there ({existing} is read-only); {hint}")
    try:  # os.access says yes for root in /proc and /sys; a file made and removed at once says it for sure
        fd, probe = tempfile.mkstemp(prefix=".elite-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DataError(f"{folder}: cannot write there ({existing}: {e.strerror or e}); {hint}") from None


def non_finite_tensors(obj, prefix="") -> list[str]:
    """Names of the floating-point tensors in a (nested) checkpoint that hold NaN or Inf."""
    if isinstance(obj, torch.Tensor):
        return [prefix] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in non_finite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [n for i, v in enumerate(obj) for n in non_finite_tensors(v, f"{prefix}[{i}]")]
    return []


def atomic_save(obj, path):
    """torch.save, atomically; a checkpoint with a non-finite tensor is never written."""
    bad = non_finite_tensors(obj)
    if bad:
        raise DataError(f"{path}: not written: {len(bad)} tensors hold NaN or Inf (e.g. '{bad[0]}'), the model "
                        f"has diverged; {Path(path).name} on disk is unchanged")
    atomic_write(path, lambda f: torch.save(obj, f))


# =====================================================================================
# 2. Checkpoints: what each model's files hold, and loading them with clear errors
# =====================================================================================

EXPANSION_RATIO = 20         # torch.save stores its entries; fp16 weights deflate by ~1.1x (pretrain_sam.py)
EXPANSION_FLOOR = 256 << 20  # bytes a small file may always expand to


def check_expansion(path) -> None:
    """A zip (torch.save's format, an .npz) whose entries would expand far beyond the file is
    refused before anything is unpacked: a small file never fills the memory. Its declared sizes
    are what torch and numpy allocate, and they never read past them."""
    import zipfile
    try:
        if not zipfile.is_zipfile(path):
            return  # a legacy pickle holds its data as it is
        with zipfile.ZipFile(path) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return  # torch.load names what is wrong with the file
    size = Path(path).stat().st_size
    if total > max(EXPANSION_RATIO * size, EXPANSION_FLOOR):
        raise DataError(f"{path}: a {size / 2**20:.1f} MB archive that would expand to {total / 2**30:.1f} GB: not a "
                        "checkpoint (torch.save stores its tensors uncompressed); not loaded")


def load_checkpoint(path, kind: str | None, map_location="cpu") -> dict:
    """Load a checkpoint written by our trainers and check that it holds `kind` (any kind: None)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {missing_file(path, 'checkpoint')}")
    try:
        # weights_only: tensors and plain containers are built, no other class is ever imported or
        # called, so a hostile file cannot run code here (our checkpoints hold nothing else).
        check_expansion(path)
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read checkpoint ({type(e).__name__}: {first_line(e)}); "
                        "the file is truncated, not a torch checkpoint, or holds objects other than "
                        "tensors and plain containers (never loaded here: unpickling them could run code)") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise DataError(f"{path}: not a checkpoint written by this project (no 'kind' entry)")
    if kind is not None and ckpt["kind"] != kind:
        raise DataError(f"{path}: holds a '{ckpt['kind']}' model, expected '{kind}'")
    return ckpt


def load_state(module: nn.Module, state: dict, path, strict=True):
    """module.load_state_dict(state), with an error that names the file and the tensor when
    the checkpoint does not fit the model or holds NaN or Inf (a diverged model would predict
    class 0 everywhere). strict=False: tensors may be missing."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: its model is not a dict of tensors: not a checkpoint of this project's format")
    bad = non_finite_tensors(state)
    if bad:
        raise DataError(f"{path}: {len(bad)} tensors hold NaN or Inf (e.g. '{bad[0]}'): the model diverged; "
                        "use an earlier checkpoint of its run")
    own = module.state_dict()
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise DataError(f"{path}: tensor '{key}' has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(own[key].shape)}")
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if unexpected or (strict and missing):
        raise DataError(f"{path}: does not fit the model: {len(missing)} tensors missing, {len(unexpected)} "
                        f"unexpected (e.g. '{(missing + unexpected)[0]}')")
    return module.load_state_dict(state, strict=strict)


def load_last(path, kind: str, map_location="cpu") -> dict:
    """--resume: a last.pt of this kind, with the optimiser and run state a model-only file
    (a best.pt copied in its place) does not have."""
    ckpt = load_checkpoint(path, kind, map_location)
    if ckpt.get("optimizer") is None or "config" not in ckpt or "step" not in ckpt:
        raise DataError(f"{path}: holds the model only (a best.pt?), not the optimiser and run state --resume "
                        "needs; resume from the last.pt its run wrote")
    check_run_state(ckpt, path)
    for key, cls in (("student_config", StudentConfig), ("teacher_config", TeacherConfig)):
        if key in ckpt:  # the model's own config: checked as infer.py checks it
            checked_config(cls, entry(ckpt, key, dict, path), path)
    check_folder_history(Path(path), ckpt)
    return ckpt


def check_run_state(ckpt: dict, path) -> None:
    """The run state of a last.pt, entry by entry (a hand-edited file is one line, not a traceback
    later): the config a mapping, the counters non-negative integers, the optimiser state torch's layout."""
    entry(ckpt, "config", dict, path)
    for key, least in (("epoch", -1), ("step", 0)):  # epoch: the last finished one, -1 within the first
        if type(entry(ckpt, key, int, path)) is not int or ckpt[key] < least:
            raise DataError(f"{path}: '{key}' is {ckpt[key]!r}, not a count; not a last.pt this project wrote")
    for key in ("batch", "skipped", "batch_size"):
        if key in ckpt and (type(ckpt[key]) is not int or ckpt[key] < 0):
            raise DataError(f"{path}: '{key}' is {ckpt[key]!r}, not a count; not a last.pt this project wrote")
    if not isinstance(ckpt.get("best_miou"), (int, float)) or isinstance(ckpt["best_miou"], bool):
        raise DataError(f"{path}: 'best_miou' is {ckpt.get('best_miou')!r}, not a number; not a last.pt this project "
                        "wrote")
    for key in ("run_id", "train_scans"):
        if not isinstance(ckpt.get(key, ""), str):
            raise DataError(f"{path}: '{key}' is {ckpt[key]!r}, not a name; not a last.pt this project wrote")
    if not isinstance(ckpt.get("epoch_sums", {}), dict):
        raise DataError(f"{path}: 'epoch_sums' is not a mapping; not a last.pt this project wrote")
    seconds = ckpt.get("seconds", 0.0)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < float("inf"):
        raise DataError(f"{path}: 'seconds' is {seconds!r}, not a time; not a last.pt this project wrote")
    optimizer = entry(ckpt, "optimizer", dict, path)
    groups = optimizer.get("param_groups", [])  # torch says what a missing one means when it is loaded
    if not (isinstance(optimizer.get("state", {}), dict) and isinstance(groups, list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise DataError(f"{path}: its optimiser state is not torch's layout (state, param_groups with params); "
                        "not a last.pt this project wrote")


def check_folder_history(last_path: Path, ckpt: dict) -> None:
    """--resume continues the run its folder holds, or refuses (issue 34). A last.pt copied in from
    another run is refused by name: its run id differs from best.pt's, or its best mIoU from
    metrics.csv's row for its epoch. An older last.pt of the same run says which rows of metrics.csv
    it will train again and keeps the table as it was. best.pt is only replaced by a better model:
    the run's best figure starts at best.pt's (ckpt['best_miou'] is raised to it)."""
    out = last_path.parent
    best_path, metrics = out / "best.pt", out / "metrics.csv"
    done = ckpt["epoch"] + 1  # the checkpoint's last finished epoch, counted from 1 as metrics.csv does
    rows = read_metrics(metrics) if metrics.is_file() else []
    epochs = [r["epoch"] for r in rows]
    twice = sorted({e for e in epochs if epochs.count(e) > 1})
    if twice:
        raise DataError(f"{metrics}: {len(twice)} epoch(s) have two rows (epoch {twice[0]} first; edited by hand?): "
                        "remove the extra rows, then resume")
    lost = [e for e in range(1, done + 1) if e not in {r["epoch"] for r in rows}]
    if lost and distributed().main:  # cut or deleted by hand: said, as the table will not have them
        print(f"{metrics}: no rows for epochs {lost[0]}-{lost[-1]} (the table was cut or deleted); they are not made "
              f"again: the resumed run adds its rows from epoch {done + 1} on")
    writers = sorted({r["run_id"] for r in rows if r.get("run_id")} - {ckpt.get("run_id")})
    if ckpt.get("run_id") and writers:
        raise DataError(f"{last_path}: belongs to run {ckpt['run_id']}, and {metrics.name} beside it was written by run "
                        f"{writers[0]}: this last.pt was not written in this folder (copied from another run?); put the "
                        "folder's own last.pt back, or give another --out")
    if rows:
        row = next((r for r in rows if r["epoch"] == done), None)
        try:
            logged = float(row["best_miou"]) if row is not None else None
        except (KeyError, TypeError, ValueError):
            logged = None  # a table without the column says nothing about the checkpoint
        same_run = row is not None and ckpt.get("run_id") and row.get("run_id") == ckpt["run_id"]
        # Its own run's row needs no figure to prove it; else the figure, to the 2 decimals a table may keep.
        if logged is not None and not same_run and abs(logged - 100 * ckpt["best_miou"]) > 0.006:
            raise DataError(f"{last_path}: its best mIoU after epoch {done} is {100 * ckpt['best_miou']:.2f}, "
                            f"{metrics}'s row for that epoch says {logged:.2f}: this last.pt is not the run that "
                            "wrote this folder (copied from another run?); put the folder's own last.pt back, or "
                            "give another --out")
        later = sorted(r["epoch"] for r in rows if r["epoch"] > done + 1)  # done + 1: a row logged just before a kill
        if later and distributed().main:
            keep = out / f"metrics.before-resume-epoch{done}.csv"
            for n in range(2, 1000):
                if not keep.exists():
                    break
                keep = out / f"metrics.before-resume-epoch{done}.{n}.csv"
            data = metrics.read_bytes()
            atomic_write(keep, lambda f: f.write(data))
            print(f"{metrics}: rows for epochs {later[0]}-{later[-1]} come after {last_path}'s epoch {done}; the "
                  f"resumed run trains those epochs again and rewrites them; the table as it was is kept in {keep}")
    if not best_path.is_file() and ckpt["best_miou"] >= 0:
        if distributed().main:
            print(f"{best_path}: missing (its write failed, or it was moved away); the resumed run writes a new one "
                  "after its next epoch")
        ckpt["best_miou"] = -1.0  # so that the next epoch's model is saved as best.pt
    if best_path.is_file():
        try:
            check_expansion(best_path)
            best = torch.load(best_path, map_location="cpu", weights_only=True, mmap=True)  # lazily
        except DataError:
            raise
        except Exception:
            best = None
        if not isinstance(best, dict) or "kind" not in best:
            raise DataError(f"{best_path}: not a checkpoint this project wrote (unreadable, or without its 'kind'), "
                            "and the resumed run would replace it with its best model; move it away first")
        own, theirs = ckpt.get("run_id"), best.get("run_id")
        if own and theirs and own != theirs:
            raise DataError(f"{last_path}: belongs to run {own}, and {best_path.name} beside it to run {theirs}: this "
                            "last.pt was not written in this folder (copied from another run?); put the folder's own "
                            "last.pt back, or give another --out")
        figure = best.get("miou")
        if isinstance(figure, (int, float)) and not isinstance(figure, bool) and figure > ckpt["best_miou"]:
            ckpt["best_miou"] = float(figure)  # an older last.pt: its later, better best.pt stays until beaten


def load_optimizer_state(optimizer: torch.optim.Optimizer, ckpt: dict, path) -> None:
    """--resume: the optimiser state of a last.pt (load_last), checked against this run's parameters."""
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: its optimiser state does not fit this run's parameters ({e})") from None


def dataset_of(cfg: StudentConfig) -> str | None:
    """Which dataset a voxel model's config was built for: its classes and voxel grid say it."""
    grids = {dataset: elite.student_config(dataset) for dataset in ("semantickitti", "nuscenes")}
    key = lambda c: (c.num_classes, tuple(c.range_min), tuple(c.range_max), tuple(c.grid_shape))  # noqa: E731
    return next((name for name, ref in grids.items() if key(ref) == key(cfg)), None)


def check_dataset(cfg: StudentConfig, dataset: str, path) -> None:
    """A checkpoint of one dataset's classes and grid never predicts or trains on the other's."""
    found = dataset_of(cfg)
    if found != dataset:
        made = f"{found} ({cfg.num_classes} classes and its voxel grid)" if found else \
            f"{cfg.num_classes} classes and the grid {cfg.range_min}..{cfg.range_max}"
        raise DataError(f"{path}: a model for {made}, not for {dataset}: its class ids would be written as "
                        f"{dataset}'s; give a checkpoint trained with --dataset {dataset}")


STUDENT_KIND = "elite-student"

def student_state(model: Student) -> dict:
    return {"kind": STUDENT_KIND, "student_config": asdict(model.cfg), "model": model.state_dict()}


def load_student(path, map_location="cpu") -> tuple[Student, dict]:
    ckpt = load_checkpoint(path, STUDENT_KIND, map_location)
    model = Student(checked_config(StudentConfig, entry(ckpt, "student_config", dict, path), path))
    load_state(model, ckpt["model"], path)
    return model, ckpt


TEACHER_KIND = "elite-teacher"

# ---- An official 2DPASS checkpoint as the student's start (ELiTe-test: pretrained3d) ----
# Keys from yanx27/2DPASS network/baseline.py (get_model, SPVBlock, point_encoder) and
# network/basic_block.py (SparseBasicBlock), under the Lightning module's "model_3d.".

BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def student_keys_from_2dpass(num_blocks=4, blocks_per_scale=2) -> dict[str, str]:
    """Our Student's state-dict key -> the 2DPASS model_3d key that holds the same tensor."""
    names = {f"input_encoder.mlp.{k}.{t}": f"voxel_3d_generator.PPmodel.{k}.{t}" for k in (0, 2) for t in ("weight", "bias")}
    for i in range(num_blocks):
        for b in range(blocks_per_scale):
            ours, theirs = f"blocks.{i}.v_enc.{b}.", f"spv_enc.{i}.v_enc.{b}."
            names |= {ours + "shortcut.weight": theirs + "layers_in.0.weight",   # the 1x1x1 SubMConv3d
                      ours + "conv1.weight": theirs + "layers.0.weight", ours + "conv2.weight": theirs + "layers.3.weight"}
            for bn, index in (("bn_shortcut", "layers_in.1"), ("bn1", "layers.1"), ("bn2", "layers.4")):
                names |= {f"{ours}{bn}.{t}": f"{theirs}{index}.{t}" for t in BN_TENSORS}
        ours, theirs = f"blocks.{i}.point_enc.", f"spv_enc.{i}.p_enc."
        for ours_seq, theirs_seq, linears, bns in (("layer_in", "layer_in", (0,), ()), ("context", "PPmodel", (0, 3, 6), (2, 5)),
                                                   ("layer_out", "layer_out", (0, 2), ())):
            names |= {f"{ours}{ours_seq}.{k}.{t}": f"{theirs}{theirs_seq}.{k}.{t}" for k in linears for t in ("weight", "bias")}
            names |= {f"{ours}{ours_seq}.{k}.{t}": f"{theirs}{theirs_seq}.{k}.{t}" for k in bns for t in BN_TENSORS}
    names |= {f"classifier.{k}.{t}": f"classifier.{k}.{t}" for k in (0, 2) for t in ("weight", "bias")}
    return names


def first_line(error: Exception) -> str:
    """An exception's message, first line only ('' for an empty one, as EOFError on a 0-byte file),
    without torch's advice to load the file with weights_only=False: that would let it run code."""
    line = (str(error).splitlines() or [""])[0]
    return line.split(" This file can still be loaded")[0].split(" Re-running `torch.load`")[0]


class _TensorsOnly:
    """A pickle module for torch.load that reads a Lightning checkpoint (2DPASS) safely: it builds
    tensors and plain containers, and every other global the file names (the classes of its saved
    config, EasyDict, ...; or a function a hostile file asks pickle to call) becomes an inert
    stand-in, never imported and never called. torch.load's weights_only=True would refuse the
    whole file at the first such class."""
    SAFE = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
            ("torch._utils", "_rebuild_parameter"), ("torch", "Size"), ("builtins", "set"), ("builtins", "frozenset")}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            return super().find_class(module, name) if (module, name) in _TensorsOnly.SAFE else _StandIn

    @staticmethod
    def load(file, **kwargs):
        """What torch's loader of the older, non-zip format calls: the same restricted unpickler
        (pickle.load here would build any global the file names)."""
        return _TensorsOnly.Unpickler(file, **kwargs).load()


class _StandIn(dict):
    """Whatever a pickle builds from a global that is not SAFE: an empty dict that ignores its
    arguments and state."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        pass


def spconv_to_ours(weight: torch.Tensor) -> torch.Tensor:
    """A spconv 2.x SubMConv3d weight -> ours. spconv stores (Cout, kz, ky, kx, Cin): 2DPASS hands it
    indices [batch, z, y, x]. Ours is (kx, ky, kz, Cin, Cout) over [batch, x, y, z]; a 1x1x1 one -> (Cout, Cin)."""
    if weight.shape[1:4] == (1, 1, 1):
        return weight[:, 0, 0, 0, :]
    return weight.permute(3, 2, 1, 4, 0)


def load_2dpass_student(model: Student, path) -> None:
    """Every tensor of the student from an official 2DPASS SemanticKITTI checkpoint (its model_3d
    tensors; upstream's loss weights are left out). A file that does not fit is refused by name."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: 2DPASS checkpoint not found")
    try:
        check_expansion(path)
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TensorsOnly)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read the 2DPASS checkpoint ({type(e).__name__}: {e})") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    if not isinstance(state, dict):
        raise DataError(f"{path}: its 'state_dict' is a {type(state).__name__}, not a mapping of tensors")
    prefix = "model_3d."
    src = {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
    if not src:
        raise DataError(f"{path}: no '{prefix}*' tensors; expected a 2DPASS Lightning checkpoint (its 3D network)")
    ours = model.state_dict()
    new = {}
    for key, theirs in student_keys_from_2dpass(len(model.blocks)).items():
        if theirs not in src:
            raise DataError(f"{path}: {prefix}{theirs} is missing; not a 2DPASS 4scale-64dimension checkpoint")
        tensor = src.pop(theirs)
        if not isinstance(tensor, torch.Tensor):  # e.g. the inert stand-in the restricted unpickler makes
            raise DataError(f"{path}: {prefix}{theirs} is a {type(tensor).__name__}, not a tensor; not a 2DPASS "
                            "checkpoint this loader can read")
        tensor = spconv_to_ours(tensor) if tensor.dim() == 5 else tensor  # the SubMConv3d weights
        if tensor.shape != ours[key].shape:
            raise DataError(f"{path}: {prefix}{theirs} has shape {tuple(tensor.shape)}, the student's {key} needs "
                            f"{tuple(ours[key].shape)}; not a 2DPASS 4scale-64dimension checkpoint")
        if tensor.is_floating_point() != ours[key].is_floating_point():  # integer weights load as zeros or garbage
            raise DataError(f"{path}: {prefix}{theirs} holds {tensor.dtype} values, the student's {key} is "
                            f"{ours[key].dtype}; not a 2DPASS checkpoint of trained weights")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DataError(f"{path}: {prefix}{theirs} holds NaN or Inf: the 2DPASS run it comes from diverged")
        new[key] = tensor
    left = sorted(k for k in src if not k.startswith("criterion."))
    if left:
        raise DataError(f"{path}: {len(left)} 3D tensors the student has no place for, e.g. {prefix}{left[0]}")
    model.load_state_dict(new)


def teacher_state(teacher: Teacher) -> dict:
    """A small checkpoint: the config and the trainable tensors (adapters, patch decoders,
    heads); the frozen SAM weights come from the SAM file again. A teacher without a SAM
    file keeps its random frozen weights in the checkpoint too (a few MB for vit_tiny)."""
    trainable = {n for n, p in teacher.named_parameters() if p.requires_grad}
    keep_all = teacher.sam_checkpoint is None
    weights = {k: v for k, v in teacher.state_dict().items() if keep_all or k in trainable}
    return {"kind": TEACHER_KIND, "teacher_config": asdict(teacher.cfg),
            "sam_checkpoint": teacher.sam_checkpoint, "sam_fingerprint": teacher.sam_fingerprint, "weights": weights}


def entry(ckpt: dict, key: str, kind, path):
    """ckpt[key], which must be of `kind`: a file of the right kind but another layout (an older
    or newer version of this code, or a hand-made one) is one line, not a KeyError later."""
    if key not in ckpt or not isinstance(ckpt[key], kind):
        raise DataError(f"{path}: no '{key}' entry of the expected type: not a checkpoint of this project's format "
                        "(written by another version of it?)")
    return ckpt[key]


# Bounds of a config's integers (the others: 1..1,000,000): beyond them a model would not fit in memory.
CONFIG_LIMITS = {"in_dims": 16, "hidden": 4096, "num_classes": 256, "rank": 1024}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def checked_config(cls, values: dict, path):
    """The config dataclass a checkpoint records, each field checked against its default's
    type (and integers against CONFIG_LIMITS) before any model is built from it."""
    from dataclasses import fields
    known = {f.name: f.default for f in fields(cls)}
    for key, value in values.items():
        default = known.get(key, ...)
        if default is ...:
            raise DataError(f"{path}: its {cls.__name__} has a field '{key}' this code does not know (written by "
                            "another version of it?)")
        items = list(value) if isinstance(value, (list, tuple)) and isinstance(default, tuple) else [value]
        wanted = type(default[0]) if isinstance(default, tuple) and default else type(default)
        ok = not isinstance(default, tuple) or isinstance(value, (list, tuple))
        for v in items:
            if wanted is float:
                ok = ok and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            elif wanted is int:
                ok = ok and isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= CONFIG_LIMITS.get(key, 10**6)
            else:
                ok = ok and isinstance(v, wanted)
        if not ok:
            raise DataError(f"{path}: its {cls.__name__}.{key} is {value!r}, not a valid {wanted.__name__}"
                            f"{' list' if isinstance(default, tuple) else ''}")
    if cls is TeacherConfig and (values.get("variant", "vit_b") not in SAM_VARIANTS
                                 or values.get("peft", "adalora") not in PEFT_CHOICES):
        raise DataError(f"{path}: its teacher is '{values.get('variant')}' with '{values.get('peft')}' adapters, "
                        f"not one of {sorted(SAM_VARIANTS)} with {list(PEFT_CHOICES)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})  # lists back to tuples


def load_teacher_state(state: dict, sam_checkpoint=None, path="teacher state") -> Teacher:
    """Rebuild a teacher from teacher_state() (read from path); sam_checkpoint overrides the
    recorded SAM path."""
    cfg = checked_config(TeacherConfig, entry(state, "teacher_config", dict, path), path)
    sam = sam_checkpoint or entry(state, "sam_checkpoint", (str, type(None)), path)
    teacher = Teacher(cfg)
    recorded = state.get("sam_fingerprint")  # [size, time, CRC-32] of the SAM file it was trained on
    if recorded is not None and not (isinstance(recorded, list) and len(recorded) == 3
                                     and all(type(x) is int for x in recorded)):
        raise DataError(f"{path}: 'sam_fingerprint' is {recorded!r}, not [size, time, crc]; not a checkpoint this "
                        "project wrote")
    if sam is not None:
        if recorded is not None and Path(sam).is_file() and not semantickitti.same_file(Path(sam), recorded):
            raise DataError(f"{path}: its teacher was trained on another SAM file than {sam} ({recorded[0]:,} bytes "
                            f"then, {Path(sam).stat().st_size:,} now, or other content); its adapters fit that "
                            "encoder only: give that file with --sam-checkpoint")
        load_sam_checkpoint(teacher.encoder, sam, cfg.variant)
        teacher.sam_checkpoint = str(sam)
        teacher.sam_fingerprint = recorded or semantickitti.fingerprint(Path(sam))
    weights = entry(state, "weights", dict, path)
    # Teachers saved before the patch decoders got their name kept upstream's `output_upscaling`.
    weights = {k.replace("output_upscaling.", "patch_decoders.", 1) if k.startswith("output_upscaling.") else k: v
               for k, v in weights.items()}
    result = load_state(teacher, weights, path, strict=False)
    trainable = {n for n, p in teacher.named_parameters() if p.requires_grad}
    missing = [k for k in result.missing_keys if k in trainable or sam is None]
    if missing:
        raise DataError(f"{path}: does not fit a {cfg.variant}/{cfg.peft} teacher: {len(missing)} tensors "
                        f"missing (e.g. {missing[0]})")
    return teacher


def load_teacher(path, sam_checkpoint=None, map_location="cpu") -> tuple[Teacher, dict]:
    ckpt = load_checkpoint(path, TEACHER_KIND, map_location)
    return load_teacher_state(ckpt, sam_checkpoint, path), ckpt


# ---- SAM's official checkpoint files: the teacher's frozen encoder, SAM-PLG's whole SAM ----

SAM_B_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"


def missing_file(path: Path, what: str) -> str:
    """Why `path` is not a file to read: a folder, a device or pipe (/dev/zero), or nothing there."""
    if path.is_dir():
        return f"a folder, not a {what} file"
    if path.exists():
        return f"not a regular file (a device, pipe or socket), not a {what} file"
    return f"{what} not found"


def read_tensor_file(path: Path, what: str, where="", why="") -> object:
    """An official weights file (SAM's, torchvision's) read with weights_only, so it cannot run
    code; a missing or unreadable one is a DataError naming it (`where`, `why`: hints)."""
    if not path.is_file():
        raise DataError(f"{path}: {missing_file(path, what)}{where if not path.exists() else ''}")
    try:
        check_expansion(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read {what} ({type(e).__name__}: {first_line(e)}){why}") from None


def read_sam_state(path) -> dict:
    """An official SAM checkpoint file -> its state dict, or a DataError naming the file."""
    path = Path(path)
    where = f" (the official files, e.g. {SAM_B_URL})"
    if path.name == "sam_vit_tiny_synth.pth":  # presets.STANDIN: shipped, found from the repository's root
        where = (f" in {Path.cwd()}: the pretrained stand-in ships in the repository's weights/ folder; run the "
                 "scripts from the repository's root, or remake it with python pretrain_sam.py")
    ckpt = read_tensor_file(path, "SAM checkpoint", where, "; the file is truncated or not a torch checkpoint of tensors")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise DataError(f"{path}: not a state dict (got {type(ckpt).__name__})")
    return state


def sam_variant_of(encoder_weights: dict) -> str | None:
    """Which SAM variant image-encoder tensors (keys without 'image_encoder.') belong to,
    from the patch-embedding width and the number of blocks; None if no known one."""
    width = encoder_weights["patch_embed.proj.weight"].shape[0] if "patch_embed.proj.weight" in encoder_weights else None
    depth = 1 + max((int(k.split(".")[1]) for k in encoder_weights if k.startswith("blocks.")), default=-1)
    return next((name for name, v in SAM_VARIANTS.items() if (v.embed_dim, v.depth) == (width, depth)), None)


def encoder_weights_of(state: dict) -> dict:
    """The image_encoder.* tensors of a SAM state dict, prefix removed, neck left out."""
    prefix = "image_encoder."
    return {k[len(prefix):]: v for k, v in state.items()
            if isinstance(k, str) and k.startswith(prefix) and not k.startswith(prefix + "neck.")}


def load_sam_checkpoint(encoder: nn.Module, path, variant="vit_b") -> None:
    """Load the frozen encoder weights of an official SAM checkpoint (sam_vit_b_01ec64.pth):
    its `image_encoder.*` tensors except the neck, under their own names (the teacher keeps SAM's
    fused qkv and puts the q, k, v adapters on its rows). The official ELiTe loader split qkv into
    attn.q/k/v while its modules are q_proj/k_proj/v_proj, so strict=False silently dropped them
    and q, k, v stayed random; here every frozen tensor must be present with the right shape."""
    path = Path(path)
    weights = encoder_weights_of(read_sam_state(path))
    prefix = "image_encoder."
    if not weights:
        raise DataError(f"{path}: no '{prefix}*' tensors; expected a SAM checkpoint such as sam_vit_b_01ec64.pth")
    frozen = encoder.state_dict()
    mismatched = [k for k in frozen if k in weights and weights[k].shape != frozen[k].shape]
    missing = [k for k in frozen if k not in weights]
    if mismatched or missing:
        found = sam_variant_of(weights)
        looks = f"SAM {found}" if found else "an unknown encoder"
        raise DataError(f"{path}: looks like {looks} but the teacher is SAM {variant} "
                        f"(e.g. {(mismatched + missing)[0]}: {len(mismatched)} tensors of the wrong shape, "
                        f"{len(missing)} missing); build the teacher with the matching variant")
    unexpected = sorted(set(weights) - set(frozen))
    if unexpected:
        raise DataError(f"{path}: {len(unexpected)} unexpected encoder tensors, e.g. {prefix}{unexpected[0]}")
    encoder.load_state_dict(weights)


def build_teacher(cfg: TeacherConfig | None = None, sam_checkpoint=None) -> Teacher:
    """The teacher with SAM's weights loaded (frozen), or random ones with a notice."""
    cfg = cfg or TeacherConfig()
    teacher = Teacher(cfg)
    if sam_checkpoint is None:
        warnings.warn(f"teacher: SAM {cfg.variant} encoder is randomly initialised; for the paper "
                      f"setting download sam_vit_b_01ec64.pth ({SAM_B_URL}) and pass --sam-checkpoint")
    else:
        load_sam_checkpoint(teacher.encoder, sam_checkpoint, cfg.variant)
        teacher.sam_checkpoint = str(sam_checkpoint)
        teacher.sam_fingerprint = semantickitti.fingerprint(Path(sam_checkpoint))  # the file's identity, kept
    return teacher


def load_sam(checkpoint, variant="vit_h", device="cpu"):
    """An official SAM checkpoint (PLG uses vit_h, sam_vit_h_4b8939.pth) -> Sam in eval mode."""
    from segment_anything import sam_model_registry
    if variant not in sam_model_registry or variant == "default":
        raise ValueError(f"unknown SAM variant '{variant}'; expected vit_b, vit_l or vit_h")
    path = Path(checkpoint)
    state = read_sam_state(path)
    found = sam_variant_of(encoder_weights_of(state))
    if found is None:
        raise DataError(f"{path}: not a SAM checkpoint (no image encoder of a known variant)")
    if found != variant:
        raise DataError(f"{path}: holds SAM {found}, not {variant}; pass variant='{found}'")
    sam = sam_model_registry[variant]()
    try:
        sam.load_state_dict(state)
    except RuntimeError as e:
        raise DataError(f"{path}: does not fit SAM {variant} ({e})") from None
    return sam.to(device).eval()


# ---- U2MKD's checkpoints: the fusion student and the LiDAR teacher ----

FUSION_KIND = "u2mkd-fusion-student"
LIDAR_TEACHER_KIND = "u2mkd-lidar-teacher"


def fusion_state(model: u2mkd.FusionStudent, image_hw) -> dict:
    return {"kind": FUSION_KIND, "student_config": asdict(model.cfg), "image_hw": list(image_hw),
            "model": model.state_dict()}


def load_fusion_student(path, map_location="cpu") -> tuple[u2mkd.FusionStudent, dict]:
    ckpt = load_checkpoint(path, FUSION_KIND, map_location)
    model = u2mkd.FusionStudent(checked_config(elite.StudentConfig, entry(ckpt, "student_config", dict, path), path))
    hw = entry(ckpt, "image_hw", (list, tuple), path)
    if len(hw) != 2 or not all(isinstance(v, int) and 1 <= v <= 10_000 for v in hw):
        raise DataError(f"{path}: its image_hw is {hw!r}, not an image size (H, W)")
    load_state(model, ckpt["model"], path)
    return model, ckpt


def lidar_teacher_state(model: elite.Student) -> dict:
    return {"kind": LIDAR_TEACHER_KIND, "student_config": asdict(model.cfg), "model": model.state_dict()}


def load_lidar_teacher(path, map_location="cpu") -> tuple[elite.Student, dict]:
    ckpt = load_checkpoint(path, LIDAR_TEACHER_KIND, map_location)
    model = elite.Student(checked_config(elite.StudentConfig, entry(ckpt, "student_config", dict, path), path))
    load_state(model, ckpt["model"], path)
    return model, ckpt


# ---- torchvision's ImageNet ResNet-18 file: the fusion student's image backbone ----

def load_imagenet_weights(branch: u2mkd.ImageBranch, path) -> None:
    """torchvision's ImageNet ResNet-18 file (e.g. resnet18-f37072fd.pth) into the backbone."""
    path = Path(path)
    state = read_tensor_file(path, "ResNet-18 weights")
    rename = {"conv1.": "stem.0.", "bn1.": "stem.1."} | {f"layer{k + 1}.": f"stages.{k}." for k in range(4)}
    mapped = {}
    for key, value in state.items():
        for old, new in rename.items():
            if key.startswith(old):
                mapped[new + key[len(old):]] = value
    own = {k: v for k, v in branch.state_dict().items() if k.startswith(("stem.", "stages."))}
    missing = [k for k in own if k not in mapped or mapped[k].shape != own[k].shape]
    if missing:
        raise DataError(f"{path}: not a torchvision ResNet-18 state dict ({len(missing)} backbone tensors "
                              f"missing or of another shape, e.g. {missing[0]})")
    branch.load_state_dict(mapped, strict=False)


# =====================================================================================
# 3. The optimiser recipe: SGD with Nesterov momentum, the learning-rate schedules, clipping
# =====================================================================================

def make_optimizer(params, lr=0.24, momentum=0.9, weight_decay=1e-4) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, as both official configs."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)


@dataclass
class LRSchedule:
    """The learning rate of every optimiser step, as the two official configs set it.

    per="step" (ELiTe's default config, 2DPASS, U2MKD; upstream's cosine_schedule_with_warmup):
        a linear warm-up over `warmup` steps, lr (k + 1) / warmup, then
        lr * 0.5 (1 + cos(pi (k - warmup) / T)), T = epochs x steps per epoch. The horizon stays T
        after a warm-up, as upstream, so such a run ends a little above 0.
    per="epoch" (ELiTe's benchmark config): CosineAnnealingLR(T_max, eta_min) stepped once an epoch,
        eta_min + (lr - eta_min) 0.5 (1 + cos(pi e / T_max)) in epoch e; with T_max = epochs - 4 the
        rate passes eta_min and climbs a little again over the last 4 epochs, as PyTorch's does."""
    lr: float
    epochs: int
    steps_per_epoch: int
    per: str = "step"
    warmup: int = 0
    t_max: int = 1
    eta_min: float = 0.0

    def at(self, step: int) -> float:
        if self.per == "epoch":
            epoch = step // max(self.steps_per_epoch, 1)
            return self.eta_min + (self.lr - self.eta_min) * 0.5 * (1 + math.cos(math.pi * epoch / self.t_max))
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        total = self.epochs * self.steps_per_epoch
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(step - self.warmup, total) / max(total, 1)))

    def describe(self) -> str:
        if self.per == "epoch":
            return f"CosineAnnealingLR per epoch, T_max {self.t_max}, eta_min {self.eta_min:g}"
        warm = f"linear warm-up over {self.warmup} steps, then " if self.warmup else ""
        return f"{warm}cosine per step to 0 over {self.epochs * self.steps_per_epoch} steps"


def lr_schedule(per: str, lr: float, epochs: int, steps_per_epoch: int, processes: int) -> LRSchedule:
    """The schedule a run uses. Per step: warm-up over 1000 // processes steps under torchrun,
    none in one process (upstream). Per epoch: T_max = epochs - 4, eta_min = 1e-5 (ELiTe-test)."""
    if per == "epoch":
        return LRSchedule(lr, epochs, steps_per_epoch, "epoch", t_max=max(epochs - 4, 1), eta_min=1e-5)
    return LRSchedule(lr, epochs, steps_per_epoch, "step", warmup=1000 // processes if processes > 1 else 0)


def clip_or_skip(params, max_norm=1.0) -> bool:
    """Clip the global gradient norm to max_norm; False (skip the step) if it is not finite."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not torch.isfinite(norm):
        for p in params:
            p.grad = None
        return False
    return True


def autocast(device: torch.device, amp: bool):
    """--amp: bf16 autocast (matrix products in bf16, reductions and losses in float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


# =====================================================================================
# 4. Many processes: torchrun and DistributedDataParallel
# =====================================================================================
# torchrun starts one process per GPU (or several on a CPU) and sets RANK and WORLD_SIZE.
# Every process builds the same model from the same seed, reads its own share of the scans
# and takes the same optimiser steps: DDP averages the gradients during backward. Rank 0
# alone prints and writes files. Without torchrun the same code runs as one process.

@dataclass
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def distributed() -> World:
    """This process's rank and the number of processes (0 of 1 without torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return World(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return World()


def launch_env() -> tuple[int, int, int]:
    """(WORLD_SIZE, RANK, LOCAL_RANK) as torchrun sets them, checked: whole numbers, the rank
    within the world, and for several processes the rendezvous address (a bad value is one line,
    not a traceback or a process waiting for peers that cannot come)."""
    values = {}
    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        text = os.environ.get(name, default).strip()
        if not text.isdigit():
            raise DataError(f"${name}={os.environ.get(name)!r}: expected a whole number >= 0 (torchrun sets it; unset it "
                            "for one process)")
        values[name] = int(text)
    world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if world > 1:
        if "RANK" not in os.environ or rank >= world:
            raise DataError(f"$WORLD_SIZE={world} with $RANK={os.environ.get('RANK')}: a process's rank must be one of "
                            f"0..{world - 1}; start the processes with torchrun, which sets both")
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
        if missing:
            raise DataError(f"$WORLD_SIZE={world} without ${' and $'.join(missing)}: the processes cannot find each other; "
                            "start them with torchrun, which sets these")
    return max(world, 1), rank, local


def init_distributed(device: str, sync_bn=False) -> torch.device:
    """Every trainer's start: join torchrun's process group when started by torchrun (NCCL for
    GPUs, gloo on CPUs) and silence the other ranks' prints. Returns this process's device
    (its own GPU: cuda:LOCAL_RANK)."""
    device = torch.device(device)
    world, rank, local = launch_env()
    if world > 1 and not distributed().size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if rank == 0:  # said before torch waits: a peer that never starts is otherwise silence
            print(f"waiting for the other {world - 1} process(es) at {os.environ['MASTER_ADDR']}:"
                  f"{os.environ['MASTER_PORT']} ($WORLD_SIZE={world}; torchrun starts them all)", flush=True)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if sync_bn and (device.type != "cuda" or distributed().size == 1):
        raise DataError("--sync-bn needs torchrun on GPUs (SyncBatchNorm has no CPU implementation)")
    if not distributed().main:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints
    return device


def barrier() -> None:
    """Wait until every process gets here (a no-op in one process)."""
    if distributed().size > 1:
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> None:
    """Sum t in place over all processes (a no-op in one process)."""
    if distributed().size > 1:
        on = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        total = t.to(on)
        torch.distributed.all_reduce(total)
        t.copy_(total)


class Objective(nn.Module):
    """Everything a run trains and its loss: forward(batch) -> named loss terms. One module,
    so that DistributedDataParallel can wrap all of it whatever the method."""

    def __init__(self, parts: list[nn.Module], loss_terms):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.loss_terms = loss_terms

    def forward(self, batch) -> dict[str, torch.Tensor]:
        return self.loss_terms(batch)


def data_parallel(objective: Objective, sync_bn=False, some_unused=False) -> nn.Module:
    """Under torchrun: DDP around the objective (SyncBatchNorm with sync_bn, GPUs only);
    alone: the objective itself. some_unused: parts may sit out a step (a U2MKD batch
    without images skips the image branch), which DDP must look for each step."""
    if distributed().size == 1:
        return objective
    if sync_bn:
        nn.SyncBatchNorm.convert_sync_batchnorm(objective)  # swaps the layers in place, same parameters
    return nn.parallel.DistributedDataParallel(objective, find_unused_parameters=some_unused)


def close_distributed() -> None:
    if distributed().size > 1:
        torch.distributed.destroy_process_group()


# =====================================================================================
# 5. The data of a run: the dataset's root, the loaders
# =====================================================================================

def training_root(args) -> Path:
    """The trainers' dataset root: --data, or without it the synthetic scenes of --dataset,
    written once (the main process writes them, the others wait). On SemanticKITTI, args'
    sequences become those the root has (missing ones are named and skipped)."""
    root = args.data
    if root is None:
        root = (synthnusc if args.dataset == "nuscenes" else synthkitti).embedded_dataset(args.seed, distributed().main)
        barrier()
        if args.dataset != "nuscenes":
            args.train_sequences = [s for s in args.train_sequences if s in synthkitti.DEFAULT_SEQUENCES]
    if args.dataset != "nuscenes":
        args.train_sequences = semantickitti.existing_sequences(root, args.train_sequences)
        args.val_sequences = semantickitti.existing_sequences(root, args.val_sequences)
    return root


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (the order drawn from (seed, epoch)) that can start an epoch part-way:
    a run resumed from a mid-epoch checkpoint skips the samples it had already trained on."""
    skip = 0

    def start(self, epoch: int, skip: int) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])


class TrainingLoader(torch.utils.data.DataLoader):
    """The training batches, with the one call the training loop makes before each epoch."""

    def start_epoch(self, epoch: int, batches_done: int = 0) -> None:
        """A new order and new augmentation for this epoch, drawn from (seed, epoch) so that a
        resumed run repeats them; a run resumed mid-epoch skips the batches it had done."""
        self.dataset.set_epoch(epoch)
        self.sampler.start(epoch, batches_done * self.batch_size)


def make_loaders(train_set, val_set, batch_size: int, val_batch_size: int, workers: int, seed: int,
                 collate_fn=collate, pin_memory=False):
    """Training batches, shuffled per epoch from (seed, epoch), and validation batches in order
    -> (train loader, val loader). Under torchrun each process reads its own share of the
    training scans (DistributedSampler) and every world-th validation scan."""
    world = distributed()
    sampler = ResumableSampler(train_set, num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed)
    train = TrainingLoader(
        train_set, batch_size=batch_size, sampler=sampler, drop_last=len(sampler) >= batch_size,
        num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory)
    val_share = torch.utils.data.Subset(val_set, range(world.rank, len(val_set), world.size))
    val = torch.utils.data.DataLoader(val_share, batch_size=val_batch_size, num_workers=workers, collate_fn=collate_fn)
    return train, val


# ---- U2MKD's instance database: cut once from the training scans, cached beside them ----

def instance_db_path(root, derived: Path | None = None) -> Path:
    """ROOT/u2mkd_instances.npz, or DERIVED/u2mkd_instances.npz (--derived-dir) when the dataset is read-only."""
    return Path(derived if derived is not None else root) / "u2mkd_instances.npz"


def load_instance_db(root, sequences, min_points=u2mkd.MIN_INSTANCE_POINTS, progress=True,
                     derived: Path | None = None) -> u2mkd.InstanceDB:
    """The cached database of these sequences, built (and written atomically) when missing, cut
    from other sequences, or older than the scans and labels it was cut from."""
    path = instance_db_path(root, derived)
    source = files_fingerprint(root, sequences)
    if path.is_file():
        check_expansion(path)
        try:
            with np.load(path) as f:
                db = u2mkd.InstanceDB(f["points"], f["offsets"], f["classes"], f["sequences"].tolist(), int(f["min_points"]))
                built_from = str(f["source"]) if "source" in f else None
        except Exception as e:
            raise DataError(f"{path}: cannot read the instance database ({type(e).__name__}: {e}); "
                                  "delete it to rebuild") from None
        o, points, classes = db.offsets, db.points, db.classes
        whole = (points.ndim == 2 and points.shape[1:] == (4,) and o.ndim == 1 and len(o) == len(classes) + 1
                 and len(o) > 0 and o[0] == 0 and o[-1] == len(points) and bool((np.diff(o) > 0).all())
                 and bool(np.isin(classes, np.arange(1, 20)).all()))
        if not whole:  # its own record may have been kept by a hand edit: the arrays are checked too
            raise DataError(f"{path}: the instance database's arrays do not fit together (offsets, points, classes); "
                            "delete it to rebuild")
        if db.sequences == sorted(sequences) and db.min_points == min_points and built_from == source:
            return db
    db = u2mkd.build_instance_db(root, sequences, min_points, progress)
    atomic_write(path, lambda f: np.savez(f, points=db.points, offsets=db.offsets, classes=db.classes,
                                                sequences=np.array(db.sequences), min_points=db.min_points,
                                                source=np.array(source)))
    return db


def files_fingerprint(root, sequences) -> str:
    """What a cache built from these sequences' scans and labels depends on: each file's name,
    size and status-change time (ctime, which any write moves and touch -r cannot set back),
    digested. A changed, added, removed or replaced file changes it."""
    import hashlib
    files = sorted(f for s in sequences for folder in ("velodyne", "labels")
                   for f in (Path(root) / "sequences" / s / folder).glob("*") if f.is_file() and f.stem.isdigit())
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.parent.parent.name}/{f.parent.name}/{f.name} {st.st_size} {st.st_ctime_ns}\n".encode())
    return f"{len(files)} files, sha256 of their names, sizes and change times {digest.hexdigest()[:16]}"


# =====================================================================================
# 6. The scripts: flags checked when parsed, the start-up summary, one-line errors
# =====================================================================================

class Stopped(Exception):
    """A run stopped by a signal: the message says where its last checkpoint is."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


SCRIPT_PID = [None]  # the process run_script started in: forked workers inherit the handler below


def stopped_by_sigterm(*_):
    if os.getpid() != SCRIPT_PID[0]:  # a DataLoader worker: it ends as it would without this handler
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Stopped("stopped by SIGTERM; every file written so far is whole (atomic writes); the same command "
                  "continues (a trainer with --resume once it has written last.pt)", 143)


def run_script(main, argv=None) -> None:
    """Every script's entry point: bad input (a DataError, also one raised in a DataLoader
    worker, which torch re-raises wrapped in the worker's traceback) ends the script with
    'error: FILE: what is wrong' and exit status 1, not a traceback; Ctrl-C and SIGTERM end
    it with one line that says where the last checkpoint is (exit status 130 / 143)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the scripts' start-up guard hands Ctrl-C back
    SCRIPT_PID[0] = os.getpid()
    signal.signal(signal.SIGTERM, stopped_by_sigterm)  # outside training's loop (which stops at a step's end)
    if elite_fast.FORM not in elite_fast.FORMS:  # every script builds a network somewhere: say it before any work
        sys.exit(f"error: $ELITE_FORMS={elite_fast.FORM!r}: expected one of {', '.join(elite_fast.FORMS)} (or unset it)")
    try:
        main(argv)
    except DataError as e:
        text = str(e).strip()
        if "\nOriginal Traceback" in text:  # from a worker: the original message is the last line
            text = text.splitlines()[-1].split("DataError: ", 1)[-1]
        sys.exit(f"error: {text}")
    except Stopped as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(e.code)
    except OSError as e:  # the file system said no where no check expected it (a name too long, ...)
        where = f"{e.filename}: " if e.filename else ""
        sys.exit(f"error: {where}{e.strerror or e}")
    except KeyboardInterrupt:  # outside training: every file is whole (atomic writes)
        print("interrupted (Ctrl-C); every file written so far is whole", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        release_run_folders()


def _flag_type(convert, test, wants: str):
    def check(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"expected {wants}, got '{text}'")
        return value
    check.__name__ = wants  # argparse names the type in its message
    return check


positive_int = _flag_type(int, lambda v: v > 0, "a positive integer")

count_int = _flag_type(int, lambda v: v >= 0, "an integer >= 0")

positive_float = _flag_type(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")

probability = _flag_type(float, lambda v: 0 <= v <= 1, "a probability between 0 and 1")

width_multiplier = _flag_type(int, lambda v: 1 <= v <= 16, "an integer width multiplier from 1 to 16")

image_side = _flag_type(int, lambda v: 32 <= v <= 4096, "an image side from 32 to 4096 pixels")

crop_side = _flag_type(int, lambda v: 16 <= v <= 1024, "a crop side from 16 to 1024 pixels (SAM's input is 1024)")

path_flag = _flag_type(lambda text: Path(text) if text.strip() else None, lambda v: v is not None,
                       "a path (an empty one would mean the current folder; give . for that)")

seed_int = _flag_type(int, lambda v: 0 <= v < 2**31, "a seed from 0 to 2147483647")

learning_rate = _flag_type(float, lambda v: math.isfinite(v) and 0 < v <= 10, "a learning rate above 0, at most 10")

adapter_rank = _flag_type(int, lambda v: 1 <= v <= 256, "an adapter rank from 1 to 256")

thread_count = _flag_type(int, lambda v: 1 <= v <= 256, "a thread count from 1 to 256")

loss_weight = _flag_type(float, lambda v: math.isfinite(v) and 0 < v <= 1000, "a loss weight above 0, at most 1000")

def device_flag(text: str) -> str:
    """--device: a torch device this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"'{text}': this machine has no CUDA device (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"'{text}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: their docstring as written, and every flag's default shown
    (flags whose default depends on the preset or another flag say so in their help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


def show(value) -> str:
    """A flag's value as the command line writes it (a list as its items)."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def add_recipe_flags(parser, batch_of: str) -> None:
    """The trainers' --epochs, --batch-size (of `batch_of`), --val-batch-size, --workers, --lr and
    --lr-schedule: the values a preset fills when they are not given (presets.py)."""
    parser.add_argument("--epochs", type=positive_int, help="number of epochs (preset)")
    parser.add_argument("--batch-size", type=positive_int, help=f"training batch size in {batch_of}, per process "
                                                                 "(preset)")
    parser.add_argument("--val-batch-size", type=positive_int, help="validation batch size (preset)")
    parser.add_argument("--workers", type=count_int, help="data-loading processes (preset)")
    parser.add_argument("--lr", type=learning_rate, help="peak learning rate (preset: 0.24 in the paper presets, "
                                                          "as upstream)")
    parser.add_argument("--lr-schedule", choices=("step", "epoch"), default=None,
                        help="step: cosine per iteration (with a linear warm-up over 1000 // processes steps under "
                             "torchrun); epoch: CosineAnnealingLR(T_max = epochs - 4, eta_min 1e-5) per epoch (preset)")


def add_data_flags(parser, holds: str) -> None:
    """The trainers' --data, --train-sequences and --val-sequences; `holds`: what each sequence folder needs."""
    parser.add_argument("--dataset", choices=("semantickitti", "nuscenes"), default="semantickitti",
                        help="semantickitti, or nuscenes (nuScenes-lidarseg: U2MKD's dataset; its splits are the "
                             "official scenes, --version picks the tables)")
    parser.add_argument("--data", type=path_flag, default=None,
                        help=f"SemanticKITTI root holding sequences/XX/{{{holds}}}, or the nuScenes root; default: "
                             f"synthetic scenes made once under {synthkitti.EMBEDDED_ROOT} ({synthnusc.EMBEDDED_ROOT} "
                             "for nuscenes)")
    parser.add_argument("--version", default="v1.0-trainval",
                        help="nuscenes: the tables, v1.0-trainval (train 700 scenes, val 150) or v1.0-mini")
    parser.add_argument("--train-sequences", nargs="+", default=None,
                        help="training sequences (preset: 00-07 09 10, with 08 for paper-test; missing ones are "
                             "skipped with a note)")
    parser.add_argument("--val-sequences", nargs="+", default=None,
                        help=f"validation sequences (default: {' '.join(SPLITS['val'])}, the official val split)")


def check_data_flags(parser, args) -> None:
    """The sequence flags are SemanticKITTI's: refused on nuScenes (its splits are the official
    scenes), not silently ignored. Then --val-sequences' default."""
    given = [f"--{k.replace('_', '-')}" for k in ("train_sequences", "val_sequences") if getattr(args, k) is not None]
    if args.dataset == "nuscenes" and given:
        parser.error(f"{' and '.join(given)}: SemanticKITTI's sequences; nuScenes' splits are the official scenes "
                     "(--version picks the tables)")
    args.val_sequences = args.val_sequences or list(SPLITS["val"])
    for flag in ("train_sequences", "val_sequences"):
        given = getattr(args, flag) or []
        twice = sorted({s for s in given if given.count(s) > 1})
        if twice:  # each scan would count twice, in training or in the scores
            parser.error(f"--{flag.replace('_', '-')}: {' '.join(twice)} given twice")


def add_run_flags(parser) -> None:
    """The trainers' --resume, --overwrite, --device, --seed, --save-every, --amp, --sync-bn, --conv and
    --deterministic."""
    parser.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/last.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a fresh run in an OUT that holds one: its last.pt, best.pt and metrics.csv "
                             "are deleted when training starts, once every input has passed its checks (without "
                             "it, such an OUT is refused); never replaces another kind of model")
    parser.add_argument("--device", type=device_flag, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed for weights, shuffling and augmentation")
    parser.add_argument("--save-every", type=count_int, default=500,
                        help="also write last.pt every this many steps inside an epoch, so that a killed run "
                             "resumes (--resume) from the next batch, not the epoch's start (0: epoch ends only)")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: bf16 autocast for the forward passes (losses stay float32); meant "
                             "for GPUs, a CPU without bf16 units runs it slower than float32")
    parser.add_argument("--sync-bn", action="store_true",
                        help="under torchrun on GPUs: BatchNorm statistics over all processes' batches "
                             "(default: each process normalises its own batch)")
    add_conv_flag(parser)


def add_conv_flag(parser) -> None:
    """--forms, --conv and --deterministic: which forms of the networks run, and how on a GPU."""
    parser.add_argument("--forms", choices=elite_fast.FORMS, default=elite_fast.FORM,
                        help="fast: the forms of elite_fast.py (packed keys, neighbour tables, merged adapters, "
                             "Triton); reference: elite.py's plain forms, the maths as the papers state it (slower, "
                             "the same results within float rounding; tests prove them equal). For the whole run "
                             "(default: $ELITE_FORMS, else fast)")
    parser.add_argument("--conv", choices=elite_fast.CONV_PATHS, default=elite_fast.CONV_PATH,
                        help="the sparse convolutions of the voxel networks: triton (elite_fast.py, Triton kernels on "
                             "CUDA), torch (elite.py's plain-torch definition), or auto: triton on CUDA when triton "
                             "imports, torch otherwise (default: $ELITE_CONV, else auto)")
    parser.add_argument("--deterministic", action="store_true",
                        help="on a GPU, bitwise-repeatable results: torch's deterministic algorithms (index_add_ "
                             "without float atomics; a little slower). The Triton convolution is deterministic "
                             "either way; a CPU is too")


def apply_conv_flag(parser, args) -> None:
    """Run the convolutions on the path --conv names (refusing one this machine cannot run),
    deterministically when asked."""
    if args.conv not in elite_fast.CONV_PATHS:  # only a bad $ELITE_CONV gets here: the flag's choices are checked
        parser.error(f"$ELITE_CONV={args.conv!r}: expected one of {', '.join(elite_fast.CONV_PATHS)} (or unset it)")
    if args.forms not in elite_fast.FORMS:  # only a bad $ELITE_FORMS gets here
        parser.error(f"$ELITE_FORMS={args.forms!r}: expected one of {', '.join(elite_fast.FORMS)} (or unset it)")
    elite_fast.set_forms(args.forms)
    elite_fast.set_conv_path(args.conv)
    try:
        elite_fast.conv_path(torch.device(args.device))
    except RuntimeError as e:
        parser.error(f"--conv {args.conv}: {e}")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's own condition for repeatable sums
        torch.use_deterministic_algorithms(True, warn_only=True)  # an op with no such form warns, not stops


def describe_conv(device: torch.device) -> str:
    """The summary's line for the path the student's convolutions take on this device."""
    if not elite_fast.enabled():
        return "reference: elite.submconv3d, a search per offset (--forms reference)"
    path = elite_fast.conv_path(device)
    what = "Triton kernels (elite_fast.py)" if path == "triton" else "plain torch (elite_fast.submconv3d)"
    repeatable = ", deterministic algorithms" if torch.are_deterministic_algorithms_enabled() else ""
    return f"{path}: {what}" + (" (--conv auto)" if elite_fast.CONV_PATH == "auto" else "") + repeatable


def config_of(args) -> dict:
    """A script's flags as a checkpoint stores them."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
            if k != "given" and not k.startswith("_")}


def given_flags(parser, args, argv=None) -> None:
    """args.given: the flags this command line set (before presets fill the rest), as typed: a flag
    given with its default value counts (--resume --seed 0 on a seed-3 run is a change, not a no-op).
    The command line is parsed again with every default suppressed, so only typed flags remain."""
    import copy
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    typed, _ = quiet.parse_known_args(sys.argv[1:] if argv is None else argv)
    args.given = set(vars(typed))
    args._parser = parser  # a resume checks the values it takes from a last.pt against the flags' own types


def recorded_value_error(parser, key: str, value) -> str | None:
    """Why a value a last.pt recorded for --key is not one the flag takes from a command line
    (its type, range, choices, one value or a list), or None. The recorded values skipped the
    parser's checks; a hand-edited one is named, never used."""
    action = next((a for a in parser._actions if a.dest == key), None)
    if action is None or value is None:
        return None
    if action.nargs == 0:  # --flag / --no-flag
        return None if isinstance(value, bool) else f"{value!r} is not true or false"
    many = action.nargs not in (None, "?")
    if many != isinstance(value, (list, tuple)):
        return f"{value!r} is {'not ' * many}a list"
    for item in value if many else [value]:
        if key in PATH_FLAGS and not isinstance(item, str):
            return f"{item!r} is not a path"
        try:
            converted = action.type(str(item)) if action.type is not None else str(item)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            return str(e)
        if not isinstance(item, (str, Path)) and type(converted) is not type(item):
            return f"{item!r} is a {type(item).__name__}, not what --{key.replace('_', '-')} takes"
        if action.choices is not None and converted not in action.choices:
            return f"{item!r} is not one of {', '.join(map(str, action.choices))}"
    return None


# Flags that only say how this process runs, not what the run is: a resume may change them freely,
# and one not given takes its default, not the recorded value.
HOW_IT_RUNS = ("resume", "overwrite", "out", "device", "workers", "val_batch_size", "save_every", "forms", "conv",
               "deterministic", "amp", "sync_bn", "threads", "plg_only", "vis", "vis_every", "shard")
PATH_FLAGS = ("data", "derived_dir", "sam_checkpoint", "plg_checkpoint", "init_3d", "image_weights")


def resume_settings(args, recorded: dict, keeps: tuple[str, ...], path) -> str:
    """--resume continues the run as it started: every flag not given now takes the run's recorded
    value (not the preset's). A flag given now that would change what defines the run (`keeps`:
    its method, teacher, image size, ...) is refused; any other given flag that differs changes
    the run from here on, and the returned line (for the start-up summary) says which."""
    now = config_of(args)
    for key in keeps:
        if key in args.given and key in recorded and now.get(key) != recorded[key]:
            raise DataError(f"{path}: --{key.replace('_', '-')} {now[key]}: the run being resumed keeps "
                            f"{recorded.get(key)!r}, as it started; give a new --out to change it")
    parser = getattr(args, "_parser", None)
    filled = set(getattr(args, "from_preset", []))  # by the preset this command line chose
    for key, value in recorded.items():
        if key in args.given or key == "from_preset" or not hasattr(args, key):
            continue
        if key in HOW_IT_RUNS and key not in filled:
            continue  # how this process runs: its own default, unless a preset filled it (the run's preset fills it)
        why = recorded_value_error(parser, key, value) if parser is not None else None
        if why:
            raise DataError(f"{path}: its recorded --{key.replace('_', '-')}: {why}; not a last.pt this project wrote "
                            f"(give --{key.replace('_', '-')} to set it, or resume from the run's own last.pt)")
        setattr(args, key, Path(value) if key in PATH_FLAGS and value is not None else value)
    args.from_preset = [k for k in recorded.get("from_preset", args.from_preset) if k not in args.given]
    changed = [f"--{k.replace('_', '-')} {show(now[k])} (was {show(recorded[k])})" for k in sorted(args.given)
               if k not in HOW_IT_RUNS and k in recorded and now[k] != recorded[k]]
    return "; changed from here on: " + ", ".join(changed) if changed else "; every setting as the run started"


def print_summary(title: str, rows: dict[str, str]) -> None:
    """The start-up summary every script prints: what runs, on which device and data, and
    where its outputs go."""
    width = max(map(len, rows))
    print(title + "\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows.items()), flush=True)


def describe_device(device: torch.device, amp: bool | None = None) -> str:
    """'cuda:0 (NVIDIA H100 ...)' or 'cpu (2 threads)', times the torchrun processes, and with
    amp given the precision."""
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    size = distributed().size
    text = f"{device} ({what})" + (f" x {size} processes" if size > 1 else "")
    return text if amp is None else text + (", bf16 autocast" if amp else ", float32")


def which_checkpoint(last_path: Path, best_path: Path, last_miou: float, best_miou: float, metric="val mIoU") -> str:
    """The end-of-run line: the last epoch is the model to score and to distil from, as upstream
    scores last.ckpt; best.pt was chosen on the validation split, so its figure there overstates."""
    best = (f"{best_path}: the epoch selected on the validation split ({metric} {100 * best_miou:.1f}, an "
            f"optimistic figure for that split)") if best_path.is_file() else f"{best_path}: not written"
    return (f"\nThe model of this run: {last_path} (the last epoch, as upstream scores it; {metric} "
            f"{100 * last_miou:.1f}). {best}")


def describe_outputs(out: Path, save_every: int) -> str:
    often = f"each epoch and every {save_every} steps" if save_every else "each epoch"
    return f"{out / 'last.pt'} ({often}), {out / 'best.pt'}, {out / 'metrics.csv'}"


def scaled_lr(args) -> tuple[float, str]:
    """The peak lr of this run: --lr, scaled by the linear scaling rule where the recipe names the
    global batch it is meant for (args.global_batch: U2MKD's runs) and this run's differs ->
    (lr, the summary's note)."""
    run_batch = args.batch_size * distributed().size
    meant = getattr(args, "global_batch", None)
    if meant is None or run_batch == meant:
        return args.lr, ""
    return args.lr * run_batch / meant, f" (= {args.lr:g} x {run_batch}/{meant}, scaled to the global batch)"


def describe_schedule(args, steps_per_epoch: int, schedule: LRSchedule, what: str, note="") -> str:
    """The start-up summary's schedule: epochs, steps, the global batch, the lr and its schedule."""
    world = distributed().size
    optimizer = f"{args.optimizer} " if getattr(args, "optimizer", None) else ""  # the SAM teacher's choice
    return (f"{args.epochs} epochs x {steps_per_epoch} steps; {args.batch_size} {what} per process x {world} "
            f"process(es) = global batch {args.batch_size * world}; {optimizer}lr {schedule.lr:g}{note}, "
            f"{schedule.describe()}")


def describe_validation(args) -> str:
    """Which points the training-time mIoU counts, and how infer.py's differs."""
    if getattr(args, "dataset", "semantickitti") == "nuscenes":
        return ("nuScenes-lidarseg mIoU of the in-range points of each keyframe (infer.py predicts every point, "
                "those beyond the range at its edge)")
    return ("mIoU of the in-range points of each scan (infer.py scores every point of the .bin: out-of-range points "
            "count as misses there)")


def new_confusion(dataset: str) -> scandata.ConfusionMatrix:
    """The validation metric of a dataset: SemanticKITTI's official rules, or nuScenes-lidarseg's."""
    return nusc.LidarsegConfusion() if dataset == "nuscenes" else semantickitti.SemanticKittiConfusion()


def val_name(args) -> str:
    """The validation split as the end-of-run table names it."""
    if getattr(args, "dataset", "semantickitti") == "nuscenes":
        return f"the val scenes of {args.version}"
    return ", ".join(args.val_sequences)


def describe_data(root, train_set, val_set, args) -> str:
    if getattr(args, "dataset", "semantickitti") == "nuscenes":
        return (f"{root} (nuScenes-lidarseg {args.version}): {len(train_set)} training keyframes (split train), "
                f"{len(val_set)} validation keyframes (split val)")
    return (f"{root}: {len(train_set)} training scans ({' '.join(args.train_sequences)}), "
            f"{len(val_set)} validation scans ({' '.join(args.val_sequences)})")


# =====================================================================================
# 7. The training loop: steps that never poison the model, checkpoints, signals, metrics
# =====================================================================================

def train_step(objective: nn.Module, batch, optimizer: torch.optim.Optimizer, amp_device: torch.device | None,
               after_backward=None) -> tuple[dict[str, torch.Tensor], str | None]:
    """One optimiser step: loss terms (under bf16 autocast on amp_device), backward (DDP
    averages the gradients over the processes here), clip at norm 1, after_backward()
    (AdaLoRA's allocator), step. -> (terms, None), or (terms, why) for a skipped step: a
    non-finite gradient, or a batch too small for BatchNorm. A skipped step leaves the model
    exactly as it was: the forward already moved BatchNorm's running statistics, which are
    put back."""
    buffers = list(objective.buffers())
    before = [b.clone() for b in buffers]  # running means, variances and batch counts
    optimizer.zero_grad(set_to_none=True)
    try:
        with autocast(amp_device or torch.device("cpu"), amp_device is not None):
            terms = objective(batch)
        loss = sum(t.float() for t in terms.values())
        loss.backward()
        why = None if clip_or_skip([p for g in optimizer.param_groups for p in g["params"]], max_norm=1.0) \
            else "non-finite loss or gradient"
    except TooFewVoxels as e:
        terms, why = {}, str(e)
    if why is not None:
        with torch.no_grad():
            for b, old in zip(buffers, before):
                b.copy_(old)
        return terms, why
    if after_backward is not None:
        after_backward()
    optimizer.step()
    return terms, None


@dataclass
class RunState:
    """Where a training run stands; checkpoints record it, --resume restores it. A checkpoint
    written mid-epoch (--save-every) also records how far into its epoch the run got."""
    epoch: int = 0          # the epoch in progress, or the next one to run
    batch: int = 0          # batches of that epoch already trained on
    step: int = 0           # optimiser steps taken (the cosine schedule's clock)
    best_miou: float = -1.0
    sums: dict = field(default_factory=dict)  # the epoch's loss-term sums so far (its metrics row)
    skipped: int = 0        # steps skipped for non-finite gradients
    batch_size: int = 0     # scans per step over all processes (a mid-epoch resume must keep it)
    skipped_in_row: int = 0  # skipped steps since the last step taken (not stored)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # ties a folder's files to one run
    train_scans: str = ""   # the training scans' identity (scans_identity): a mid-epoch resume must keep them
    seconds: float = 0.0    # training time so far (metrics.csv's 'seconds'), carried across resumes

    def record(self, miou: float | None) -> dict:
        """What a checkpoint stores of the run ('epoch' is the last finished one; miou None mid-epoch)."""
        return {"epoch": self.epoch - 1, "batch": self.batch, "step": self.step, "best_miou": self.best_miou,
                "miou": miou, "epoch_sums": dict(self.sums), "skipped": self.skipped,
                "batch_size": self.batch_size, "run_id": self.run_id, "train_scans": self.train_scans,
                "seconds": self.seconds}

    @classmethod
    def resumed(cls, ckpt: dict) -> "RunState":
        run = cls(ckpt["epoch"] + 1, ckpt.get("batch", 0), ckpt["step"], ckpt["best_miou"],
                  dict(ckpt.get("epoch_sums", {})), ckpt.get("skipped", 0), ckpt.get("batch_size", 0))
        run.run_id = ckpt.get("run_id") or run.run_id  # a checkpoint from before run ids keeps its new one
        run.train_scans = ckpt.get("train_scans", "")
        run.seconds = float(ckpt.get("seconds", 0.0))
        return run

    def where(self) -> str:
        return f"epoch {self.epoch + 1}" + (f", batch {self.batch}" if self.batch else "") + f", step {self.step}"

    def start(self, checkpoint: Path, resumed: bool, metric="mIoU", changes="") -> str:
        """The start-up summary's line: a fresh run, or where a resumed one goes on (and what
        changes, resume_settings)."""
        if not resumed:
            return "from scratch"
        best = f"best {metric} {100 * self.best_miou:.1f}" if self.best_miou >= 0 else "no epoch validated yet"
        return f"resumed from {checkpoint}: {self.where()}, {best}{changes}"


RUN_FILES = ("last.pt", "best.pt", "metrics.csv")

def claim_run_folder(out: Path, kind: str, resume: bool, overwrite: bool) -> None:
    """A run folder belongs to one run, checked before any work: a fresh run never lands on
    another run's files (unless --overwrite), a checkpoint of another kind of model is never
    replaced, and OUT must be a folder this process can write. Temporaries a run killed while
    saving left beside its intact files are removed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --out is an existing file, not a folder")
    if resume and overwrite:
        raise DataError(f"{out}: --resume continues the run there, --overwrite starts it over: pick one")
    for name in RUN_FILES:
        if (out / name).exists() and not (out / name).is_file():
            raise DataError(f"{out / name}: is not a regular file (a folder, a device?), so it is no run file; "
                            "move it away or give another --out")
    for name in ("last.pt", "best.pt"):
        if (out / name).is_file():
            check_expansion(out / name)
            try:
                found = torch.load(out / name, map_location="cpu", weights_only=True, mmap=True).get("kind")  # lazily
            except Exception:
                found = None  # unreadable: --resume names it; --overwrite never deletes it (below)
            if found is not None and found != kind:
                raise DataError(f"{out / name}: holds a '{found}' model and this run trains '{kind}': a run "
                                "never writes over another kind's checkpoint; choose another --out")
            if found is None and overwrite:  # a file is this project's only when it proves it
                raise DataError(f"{out / name}: not a checkpoint this project wrote (unreadable, or without its "
                                "'kind'), so --overwrite will not delete it; move it away or choose another --out")
    if overwrite and (out / "metrics.csv").is_file():
        read_metrics(out / "metrics.csv")  # another program's table is refused by name, never deleted
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if resume and (out / "metrics.csv").is_file():
        read_metrics(out / "metrics.csv")  # unreadable: said now, not after the first epoch's checkpoint
    if existing and not resume and not overwrite:
        raise DataError(f"{out}: already holds a run ({', '.join(existing)}); continue it with --resume, start "
                        "over in it with --overwrite, or give a new --out")
    if not distributed().main:
        return
    writable_folder(out, "give another --out")
    lock_run_folder(out)
    remove_partial_writes(out / name for name in RUN_FILES)  # left by a run killed while saving
    # With --overwrite the earlier run's files stay until fit() starts (start_over): every input
    # is checked by then, so a mistyped --data or --teacher costs nothing.


_RUN_LOCKS: dict = {}  # folder -> its lock file, held by this process until its script ends (run_script)


def lock_run_folder(out: Path) -> None:
    """One run owns a folder at a time: an exclusive lock (flock) on OUT/run.lock, which names its
    holder. The system drops the lock when the holding process ends, however it ends, so a lock
    left by a killed run is free again; run.lock itself stays, harmless."""
    import fcntl
    import socket
    if out.resolve() in _RUN_LOCKS:
        return  # this process holds it already (an earlier run of this process, e.g. run and resume)
    out.mkdir(parents=True, exist_ok=True)
    try:  # never through a link: the lock would write its holder's name into the file it points to
        fd = os.open(out / "run.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(0, "not a regular file")
        f = os.fdopen(fd, "a+")
    except OSError as e:
        raise DataError(f"{out / 'run.lock'}: cannot be used as this folder's lock ({e.strerror or e}: a link or "
                        "something other than a file?); remove it or give another --out") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its name yet"
        f.close()
        raise DataError(f"{out}: another run is using this folder ({holder}); wait for it to end, "
                        "or give another --out") from None
    except OSError as e:  # a file system without locks (some network mounts)
        f.close()
        raise DataError(f"{out / 'run.lock'}: cannot be locked ({e.strerror or e}); give an --out on a local "
                        "file system") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            f"{' '.join(sys.argv)}\n")
    f.flush()
    _RUN_LOCKS[out.resolve()] = f


def release_run_folders() -> None:
    while _RUN_LOCKS:
        _RUN_LOCKS.popitem()[1].close()  # closing the file drops its flock


def start_over(out: Path) -> None:
    """--overwrite, once every input is checked: the earlier run's files go (the fit starts)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.csv, also after a spreadsheet re-saved it with ';' or tab
    separators; a file without an integer 'epoch' column is refused by name."""
    import csv
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    text = text.removeprefix("\ufeff")  # a spreadsheet's byte-order mark
    header = text.splitlines()[0] if text.strip() else ""
    delimiter = max(",;\t", key=header.count)
    rows = [{k.strip(): v.strip() if isinstance(v, str) else v for k, v in r.items() if k is not None}
            for r in csv.DictReader(text.splitlines(), delimiter=delimiter)]  # "epoch " or " epoch" alike
    try:
        for r in rows:
            r["epoch"] = int(r["epoch"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: not the metrics table a run writes (a header with 'epoch' and an integer epoch "
                        f"on each row); put the run's own file back, or move this one away and the run starts a "
                        f"new one") from None
    return rows


def log_metrics(path: Path, row: dict) -> None:
    """Add one epoch's row to a CSV file, rewritten atomically. Rows of this epoch or later,
    left by a run that was killed after them and resumed from an earlier checkpoint, go."""
    import csv
    import io
    rows = [r for r in read_metrics(path) if r["epoch"] < row["epoch"]] if path.is_file() else []
    rows.append(row)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def tensorboard_writer(folder: Path):
    """A TensorBoard writer when the tensorboard package is installed (it is optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


MAX_SKIPS_IN_A_ROW = 20  # a run whose steps keep failing stops here, with an error saying where

class StopRequest:
    """SIGTERM (a cluster pre-empting the job) asks the loop to stop at the next step's end,
    after writing last.pt; the handler only raises a flag, so no step is cut in half."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = signal.signal(signal.SIGTERM, self.handle)
        return self

    def handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)


def scans_identity(scans) -> str:
    """The training scans by name (the last three parts of each path: a moved dataset is the same
    one): their count and a digest of their names in order."""
    import hashlib
    names = "\n".join("/".join(Path(p).parts[-3:]) for p in scans)
    return f"{len(scans)} scans, sha256 {hashlib.sha256(names.encode()).hexdigest()[:16]}"


def check_mid_epoch_resume(run: RunState, batch_size: int, processes: int, scans=None) -> None:
    """A run resumed in the middle of an epoch skips the batches it did: only with the same
    batches, so the same --batch-size, number of processes and training scans (issue 34)."""
    if run.batch and run.batch_size != batch_size * processes:
        raise DataError(f"the run stopped in the middle of epoch {run.epoch + 1} with {run.batch_size} scans per step; "
                        f"resume it with the same --batch-size and number of processes "
                        f"(now {batch_size} x {processes})")
    identity = scans_identity(scans) if scans is not None else ""
    if run.batch and run.train_scans and identity and run.train_scans != identity:
        raise DataError(f"the run stopped in the middle of epoch {run.epoch + 1} over other training scans "
                        f"({run.train_scans}; now {identity}): the batches it skips would not be the ones it "
                        "trained on; resume it with the same --data and --train-sequences, or from a checkpoint "
                        "at an epoch's end")
    run.batch_size = batch_size * processes
    run.train_scans = identity or run.train_scans


def count_step(run: RunState, terms: dict, skipped: str | None, paths, last_checkpoint: str | None) -> None:
    """A step taken into the run's counts: its loss terms into the epoch's sums, or, skipped, a
    warning naming its scans; MAX_SKIPS_IN_A_ROW skipped steps in a row stop the run."""
    run.step += 1
    run.batch += 1
    if not skipped:
        run.skipped_in_row = 0
        for name, value in terms.items():
            run.sums[name] = run.sums.get(name, 0.0) + value.item()
        return
    run.skipped += 1
    run.skipped_in_row += 1
    warnings.warn(f"step {run.step} skipped ({skipped}): {', '.join(map(str, paths))}")
    if run.skipped_in_row >= MAX_SKIPS_IN_A_ROW:
        raise DataError(f"training stopped at {run.where()}: the last {run.skipped_in_row} steps were all skipped "
                        f"({skipped}); the model is as it was before them. Check these scans and --lr. "
                        + (f"The last checkpoint is {last_checkpoint}." if last_checkpoint
                           else "No checkpoint was written."))


def epoch_row(run: RunState, conf, means: dict, lr: float, seconds: float) -> dict:
    """An epoch's row of metrics.csv: where the run stands, the mean loss terms, the validation."""
    present = conf.present()
    return {"epoch": run.epoch, "step": run.step, "lr": lr} | means | {
        "miou": 100 * conf.miou(), "miou_present": 100 * float(conf.iou()[present].mean()),
        "best_miou": 100 * run.best_miou, "seconds": round(seconds, 1), "run_id": run.run_id}


def print_epoch(row: dict, means: dict, conf, metric: str) -> None:
    """The two lines an epoch ends with: its mean loss terms, its validation."""
    present = conf.present()
    print(f"epoch {row['epoch']}: mean loss terms (rank 0): " + " ".join(f"{k} {v:.3f}" for k, v in means.items()))
    print(f"epoch {row['epoch']}: {metric} {row['miou']:.1f} ({conf.scored_by}) | {row['miou_present']:.1f} over the "
          f"{int(present.sum())} classes present | best {row['best_miou']:.1f} | {row['seconds']:.0f} s")


def fit(run: RunState, loader, optimizer: torch.optim.Optimizer, objective: nn.Module, schedule: LRSchedule,
        validate, save, after_backward=None, amp_device: torch.device | None = None, metric="val mIoU",
        metrics_csv: Path | None = None, save_every: int = 0, last_path: Path | None = None, overwrite=False):
    """The training loop every trainer shares. Per epoch: shuffling and augmentation drawn from
    (seed, epoch), so a resumed run repeats them; per step (a global step under torchrun): the
    schedule's lr and train_step(); every save_every steps on rank 0, a mid-epoch last.pt
    (save(run, None, False)) that --resume continues from the next batch; after each epoch,
    validate() and on rank 0 a row of metrics_csv (and TensorBoard when installed), then
    save(run, miou, improved). SIGTERM writes last.pt and stops; Ctrl-C stops naming the last
    checkpoint. overwrite: the earlier run's files go first, here, once every input is checked.
    Returns the last epoch's confusion matrix (None if nothing was left)."""
    from tqdm import tqdm
    world = distributed()
    board = tensorboard_writer(metrics_csv.parent / "tensorboard") if metrics_csv and world.main else None
    epochs = schedule.epochs
    conf, start, before = None, time.time(), run.seconds  # a resumed run's clock goes on from its checkpoint's

    def clock() -> float:
        run.seconds = before + time.time() - start
        return run.seconds

    check_mid_epoch_resume(run, loader.batch_size, world.size, getattr(loader.dataset, "scans", None))
    if overwrite and world.main and last_path is not None:
        start_over(last_path.parent)  # only now: the run's inputs all passed their checks
    saved = [run.where() if run.step else None]  # where the last checkpoint on disk stands

    def at_where(write):  # a write that fails says where the run stands
        try:
            write()
        except DataError as e:
            at = f"after epoch {run.epoch}, step {run.step}" if run.epoch and not run.batch else f"at {run.where()}"
            raise DataError(f"{e} ({at})") from None

    def checkpoint(miou, improved):
        clock()
        at_where(lambda: save(run, miou, improved))
        saved[0] = run.where()

    def sigterm_stop() -> Stopped:
        return Stopped(f"stopped by SIGTERM at {run.where()}: {last_path} written; continue with the same command "
                       "and --resume", 143)

    try:
        with StopRequest() as stop:
            for epoch in range(run.epoch, epochs):
                loader.start_epoch(epoch, run.batch)  # its order and augmentation; a resumed run skips what it did
                bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", initial=run.batch, total=len(loader),
                           dynamic_ncols=True, disable=not world.main)
                for batch in bar:
                    lr_now = schedule.at(run.step)
                    for group in optimizer.param_groups:
                        group["lr"] = lr_now
                    terms, skipped = train_step(objective, batch, optimizer, amp_device,
                                                partial(after_backward, run.step) if after_backward else None)
                    count_step(run, terms, skipped, batch.paths, f"{last_path} ({saved[0]})" if saved[0] else None)
                    if not skipped:
                        bar.set_postfix(loss=f"{sum(t.item() for t in terms.values()):.3f}", lr=f"{lr_now:.4f}")
                    if stop.signal is not None:
                        if world.main:
                            checkpoint(None, False)
                        raise sigterm_stop()
                    if save_every and run.step % save_every == 0 and run.batch < len(loader) and world.main:
                        checkpoint(None, False)
                with autocast(amp_device or torch.device("cpu"), amp_device is not None):
                    conf = validate()
                miou = conf.miou()
                improved = miou > run.best_miou
                means = {k: v / len(loader) for k, v in run.sums.items()}
                run.epoch, run.batch, run.sums, run.best_miou = epoch + 1, 0, {}, max(run.best_miou, miou)
                if world.main:
                    row = epoch_row(run, conf, means, schedule.at(run.step - 1), clock())
                    if metrics_csv is not None:  # before the checkpoint: a failed row leaves the epoch to redo, not lost
                        at_where(lambda: log_metrics(metrics_csv, row))
                    checkpoint(miou, improved)
                    if board is not None:
                        for key, value in row.items():
                            if not isinstance(value, str):  # the run's id is not a curve
                                board.add_scalar(key, value, epoch + 1)
                    print_epoch(row, means, conf, metric)
                if stop.signal is not None:  # arrived during validation: last.pt was just written
                    raise sigterm_stop()
    except KeyboardInterrupt:
        if saved[0] is None and last_path is not None and last_path.is_file():
            saved[0] = run.where()  # Ctrl-C came as the first save returned: it is this step's checkpoint
        hint = (f"the last checkpoint is {last_path} ({saved[0]}); continue with the same command and --resume"
                if saved[0] else "no checkpoint was written yet; start again (the same command)")
        raise Stopped(f"interrupted (Ctrl-C) at {run.where()}: {hint}", 130) from None
    if run.skipped and world.main:
        print(f"{run.skipped} steps skipped (non-finite gradients, or batches too small for BatchNorm)")
    return conf


@torch.no_grad()
def evaluate(model: nn.Module, loader, scores, conf: scandata.ConfusionMatrix | None = None) -> scandata.ConfusionMatrix:
    """One confusion matrix over a validation loader (SemanticKITTI's rules unless `conf` brings
    others), the model in eval mode meanwhile; scores(batch) -> (logits (N, C), labels (N,))."""
    from tqdm import tqdm
    model.eval()
    conf = conf if conf is not None else semantickitti.SemanticKittiConfusion()
    for batch in tqdm(loader, desc="  validate", leave=False, dynamic_ncols=True, disable=not distributed().main):
        logits, labels = scores(batch)
        conf.add(logits.argmax(1), labels)
    model.train()
    all_reduce_sum(conf.matrix)  # under torchrun: every process scored its share of the scans
    return conf


# =====================================================================================
# 8. SAM-PLG over every frame: SAM run with elite.py's rules, files written once, in shards
# =====================================================================================

def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n): worker i of n takes scans i, i + n, i + 2n, ..."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"shard '{text}': expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"shard '{text}': need 0 <= i < n")
    return i, n


class SamMaskSource:
    """SAM-PLG's stage 1 with SAM (elite.py section 6 holds its rules): a frame's prompts through
    SAM's predictor in batches, the stable masks bit-packed on the host, then box NMS.
    masks(frame) -> masks (M, H, W) bool, predicted IoU (M,), in descending predicted IoU (the
    NMS order upstream's voting reads backwards)."""

    def __init__(self, sam, points_per_batch=128, stability_thresh=0.9, stability_offset=1.0, nms_thresh=0.7,
                 name="sam", weights: Path | None = None):
        from segment_anything import SamPredictor
        self.name = self.record_name(name, stability_thresh, stability_offset, nms_thresh)
        self.weights = weights  # the record keeps the file's fingerprint (PLG_RECORD)
        self.predictor = SamPredictor(sam)
        self.points_per_batch = points_per_batch
        self.stability_thresh = stability_thresh
        self.stability_offset = stability_offset
        self.nms_thresh = nms_thresh

    @staticmethod
    def record_name(name: str, stability_thresh=0.9, stability_offset=1.0, nms_thresh=0.7) -> str:
        """What the pseudo-labels' record keeps (PLG_RECORD): the variant and its file, with the
        options that shape the masks."""
        return f"{name}, stability {stability_thresh} (offset {stability_offset}), box NMS {nms_thresh}"

    @torch.no_grad()
    def masks(self, frame: semantickitti.PlgFrame) -> tuple[np.ndarray, np.ndarray]:
        height, width = frame.image.shape[:2]
        prompts = elite.sam_prompts(frame.semantic, frame.instance, frame.pixel_rc, width)
        if len(prompts.points) == 0:
            return np.zeros((0, height, width), dtype=bool), np.zeros(0, dtype=np.float32)
        self.predictor.set_image(frame.image)  # the image encoder, once per image
        device = self.predictor.device
        packed, ious, boxes = [], [], []
        for start in range(0, len(prompts.points), self.points_per_batch):
            index = np.arange(start, min(start + self.points_per_batch, len(prompts.points)))
            logits, iou_preds, _ = self.predictor.predict_torch(
                point_coords=torch.as_tensor(prompts.points[index], device=device)[:, None],  # (B, 1, 2)
                point_labels=torch.ones(len(index), 1, dtype=torch.int, device=device),  # positive
                mask_input=torch.as_tensor(elite.mask_prompts(prompts, index), device=device),  # (B, 1, 256, 256)
                multimask_output=True, return_logits=True)  # (B, 3, H, W), (B, 3)
            masks, iou, box = elite.select_masks(logits.flatten(0, 1), iou_preds.flatten(0, 1),
                                                 self.predictor.model.mask_threshold,
                                                 self.stability_thresh, self.stability_offset)
            # Bit-packed on the CPU: thousands of full-size masks per image would not fit otherwise.
            packed.append(np.packbits(masks.cpu().numpy(), axis=-1))
            ious.append(iou)
            boxes.append(box)
        self.predictor.reset_image()
        iou = torch.cat(ious)
        keep = elite.nms_masks(torch.cat(boxes), iou, self.nms_thresh)  # (M,) highest predicted IoU first
        masks = np.unpackbits(np.concatenate(packed)[keep.cpu().numpy()], axis=-1, count=width).view(bool)
        return masks, iou[keep].float().cpu().numpy()


def generate_pseudo_labels(root, sequences, source, shard=(0, 1), progress=True,
                           derived: Path | None = None) -> dict[str, int]:
    """Write plg_path(scan, derived) for every labelled scan of this shard -> counts of files
    written, already there (skipped, so a stopped run resumes) and scans without labels. Each
    sequence's folder records the mask source (source.name) with its labels (PLG_RECORD); files
    made with other masks or from other labels are refused, not taken as these."""
    import json
    from tqdm import tqdm
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need 0 <= i < n")
    check_pseudo_labels(root, sequences, derived, source.name, getattr(source, "weights", None))
    scans = list_scans(root, sequences)[i::n]
    remove_partial_writes(plg_path(s, derived) for s in scans)  # left by a run killed mid-write
    counts = {"written": 0, "existing": 0, "unlabelled": 0}
    for scan in tqdm(scans, desc=f"SAM-PLG {i}/{n}", unit="scan", disable=not progress, dynamic_ncols=True):
        out = plg_path(scan, derived)
        if out.is_file():
            counts["existing"] += 1
            continue
        if not label_path(scan).is_file():
            counts["unlabelled"] += 1  # test sequences: no labels to spread
            continue
        pseudo = elite.pseudo_labels(load_plg_frame(scan, sequence_calib(scan.parent.parent)), source)
        record = out.parent / PLG_RECORD  # with the folder's first file (every shard writes the same)
        if not record.is_file():
            made = json.dumps(plg_record(scan.parent.parent, source, getattr(source, "weights", None))).encode()
            atomic_write(record, lambda f: f.write(made))
        atomic_write(out, lambda f: np.save(f, pseudo))  # a file object: np.save adds no suffix
        counts["written"] += 1
    if counts["unlabelled"]:
        warnings.warn(f"SAM-PLG: {counts['unlabelled']} scans have no labels and got no pseudo-labels")
    return counts


# =====================================================================================
# 9. Pictures: classes in the official colours, over the camera frame
# =====================================================================================
# infer.py --vis draws predictions with these; train_teacher.py --vis draws SAM-PLG's
# pseudo-labels over their image the same way.

def paint_dots(image: np.ndarray, rows_cols: np.ndarray, colours: np.ndarray) -> None:
    """Paint a 3x3 dot per pixel (K, 2) (row, col) in its colour (K, 3); later dots paint over earlier."""
    height, width = image.shape[:2]
    rc = rows_cols.astype(np.int64)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            image[np.clip(rc[:, 0] + dr, 0, height - 1), np.clip(rc[:, 1] + dc, 0, width - 1)] = colours


def camera_overlay(frame: np.ndarray, xyz: np.ndarray, colours: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """The camera frame, dimmed, with each point it sees as a dot; near points paint over far ones."""
    image = (frame.astype(np.float32) * 0.6).astype(np.uint8)
    keep, rows_cols = project_points(xyz, proj, *image.shape[:2])
    order = np.argsort(-xyz[keep, 0], kind="stable")  # far first
    paint_dots(image, rows_cols[order], colours[keep][order])
    return image


def label_overlay(frame: np.ndarray, label_map: np.ndarray, alpha=0.55) -> np.ndarray:
    """The camera frame, dimmed, with every labelled pixel (label_map (H, W) training ids,
    0 left alone) blended with its class's colour."""
    image = frame.astype(np.float32) * 0.6
    labelled = label_map != IGNORE
    image[labelled] = (1 - alpha) * frame[labelled] + alpha * CLASS_COLORS[label_map[labelled]]
    return image.astype(np.uint8)


def draw_legend(draw, classes, height: int) -> None:
    """A legend of these training ids (0 left out) up the left edge of a PIL ImageDraw's picture."""
    for k, c in enumerate(c for c in classes if c != IGNORE):
        y = height - 16 * (k + 1) - 4
        draw.rectangle((8, y, 18, y + 10), fill=tuple(int(v) for v in CLASS_COLORS[c]))
        draw.text((24, y - 1), CLASS_NAMES[c], fill=(255, 255, 255))


def plg_picture(scan_path: Path, calib: dict[str, np.ndarray], derived: Path | None = None) -> np.ndarray:
    """SAM-PLG's input above its output for one scan: the camera frame with the labelled
    points it sees (the sparse labels the masks spread), then with the dense pseudo-labels."""
    from PIL import Image, ImageDraw
    frame = load_plg_frame(scan_path, calib)
    h, w = frame.image.shape[:2]
    dense = read_pixel_labels(plg_path(scan_path, derived), h, w)[0]
    sparse = (frame.image.astype(np.float32) * 0.6).astype(np.uint8)
    labelled = frame.semantic != IGNORE
    paint_dots(sparse, frame.pixel_rc[labelled], CLASS_COLORS[frame.semantic[labelled]])
    picture = Image.fromarray(np.concatenate([sparse, label_overlay(frame.image, dense)], 0))
    draw = ImageDraw.Draw(picture)
    draw.text((8, 6), f"{scan_path}: labelled points", fill=(255, 255, 255))
    draw.text((8, h + 6), f"SAM-PLG pseudo-labels ({100 * float((dense != IGNORE).mean()):.0f}% of pixels)",
              fill=(255, 255, 255))
    draw_legend(draw, np.unique(np.concatenate([dense.ravel(), frame.semantic])), picture.height)
    return np.asarray(picture)


def write_png(path, picture: np.ndarray, root: Path) -> None:
    """An (H, W, 3) uint8 picture as a PNG under root (--vis), written atomically and never
    through a link: a linked folder or file there could lead into a dataset, whose camera frame
    the picture would replace."""
    from PIL import Image
    path, where = Path(path), Path(root)
    for part in path.relative_to(root).parts:
        where = where / part
        if where.is_symlink():
            raise DataError(f"{where}: is a link; pictures are written only into plain folders (a link could lead to "
                            "a dataset's own files); remove the link or give another --vis")
    atomic_write(path, lambda f: Image.fromarray(picture).save(f, format="PNG"))


