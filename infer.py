"""Run a trained student: SemanticKITTI submission files, scores, and speed benchmarks.

    python infer.py --checkpoint runs/student/last.pt                      # embedded data, validation split
    python infer.py --checkpoint last.pt --data KITTI --split test --votes 12 --out submission
    python infer.py --checkpoint last.pt --sequence KITTI/sequences/08
    python infer.py --benchmark                                             # speed and size

Predictions are written as sequences/XX/predictions/NNNNNN.label: one uint32 raw label id
per point of the .bin (via LEARNING_MAP_INV). Points outside the voxel range get no
prediction and are written as 0 ("unlabeled"), as the official code does. When labels exist,
IoU is computed with the official evaluator's rules over every point of every scan (training's
validation counts the in-range points only, so its figure is a little higher), and, where
the scans have images and calibration, on the points camera 2 sees and on the others.

A U2MKD fusion student (train_student.py --method u2mkd) also reads each scan's image. It is
scored twice, with the images and with none (every point's image feature imputed), on all
points, on the points the camera sees and on the others; --no-images writes the files of the
run without images.
"""
from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while the imports below load (seconds, for torch): one line, no traceback
    import os
    import signal

    def stop_while_starting(*_):  # at once: an exception could be swallowed by an import's own handler
        os.write(2, b"interrupted (Ctrl-C) while starting; nothing was written\n")
        os._exit(130)
    signal.signal(signal.SIGINT, stop_while_starting)

import argparse
import contextlib
import json
import statistics
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import elite
import elite_fast
import nusc
import runs
import scandata
import semantickitti
import synthkitti
import synthnusc
import u2mkd

REALDATA = Path(__file__).resolve().parent.parent / "shared" / "realdata" / "semantickitti"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runs.HelpFormatter)
    p.add_argument("--checkpoint", type=runs.path_flag, default=Path("runs/student/last.pt"),
                   help="student checkpoint written by train_student.py: last.pt, the last epoch, as upstream "
                        "scores last.ckpt; best.pt is the epoch selected on the validation split, so its score on "
                        "that split is optimistic")
    p.add_argument("--dataset", choices=("semantickitti", "nuscenes"), default="semantickitti",
                   help="semantickitti, or nuscenes: nuScenes-lidarseg keyframes, scored with the devkit's rules and "
                        "written in the official submission format")
    p.add_argument("--data", type=runs.path_flag, default=None,
                   help="SemanticKITTI root holding sequences/, or the nuScenes root (default: the embedded synthetic "
                        f"scenes, {synthkitti.EMBEDDED_ROOT} or {synthnusc.EMBEDDED_ROOT})")
    p.add_argument("--version", default="v1.0-trainval",
                   help="nuscenes: the tables (v1.0-trainval for train and val, v1.0-test, v1.0-mini)")
    p.add_argument("--split", choices=sorted(semantickitti.SPLITS), default="val",
                   help="which official split of --data to predict")
    p.add_argument("--sequence", type=runs.path_flag, default=None,
                   help="predict one sequence folder (…/sequences/XX) instead of a split (default: the split)")
    p.add_argument("--out", type=runs.path_flag, default=Path("predictions"),
                   help="where sequences/XX/predictions/*.label are written (nuscenes: lidarseg/SPLIT/"
                        "<lidar_token>_lidarseg.bin and SPLIT/submission.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the predictions --out already holds for what this run predicts (the sequences, or "
                        "the nuScenes split's submission), once every input is checked, and redraw the pictures "
                        "--vis holds; without it such a --out or --vis is refused")
    p.add_argument("--votes", type=runs.positive_int, default=1,
                   help="test-time augmentation: logits summed over this many copies (copy 0 as is, "
                        "the others rotated and translated at random; official test uses 12)")
    p.add_argument("--device", type=runs.device_flag, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when present, else cpu)")
    p.add_argument("--seed", type=runs.seed_int, default=0, help="seed of the test-time augmentation")
    p.add_argument("--no-images", action="store_true",
                   help="u2mkd fusion student: write the predictions made without images (default: with images)")
    p.add_argument("--vis", type=runs.path_flag, default=None,
                   help="also draw each frame to VIS/sequences/XX/NNNNNN.png: the camera image with the points in "
                        "their predicted colours, a top view of the prediction and one of its errors (default: "
                        "no pictures)")
    p.add_argument("--vis-every", type=runs.positive_int, default=1, help="with --vis, draw every k-th frame only")
    p.add_argument("--benchmark", action="store_true",
                   help="print parameter count, voxels per scale, the sparse convolution per scale, the student's "
                        "forward and training step (ms, peak memory, bitwise repeatability), on --device alone; "
                        "with --conv auto on CUDA both convolution paths side by side")
    p.add_argument("--threads", type=runs.thread_count, default=None,
                   help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--repeats", type=runs.positive_int, default=10, help="--benchmark: timed repetitions per figure")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast for prediction; with --benchmark, also time bf16 on the CPU (always on GPUs)")
    p.add_argument("--teacher-variant", default="vit_b", choices=["none"] + sorted(elite.SAM_VARIANTS),
                   help="--benchmark: SAM encoder of the timed teacher training step ('none' skips it)")
    p.add_argument("--teacher-batch", type=runs.positive_int, default=None,
                   help="--benchmark: crops (320x1024) in the timed teacher and joint steps (default: the paper's "
                        "4 on a GPU, which also gives the paper preset's hours; 1 on a CPU, where 4 take minutes)")
    p.add_argument("--batch", type=runs.positive_int, default=4,
                   help="--benchmark: scans in the timed student training step (the scan turned by multiples of "
                        "90 degrees; the paper's batch is 4)")
    runs.add_conv_flag(p)
    args = p.parse_args(argv)
    runs.given_flags(p, args, argv)
    runs.apply_conv_flag(p, args)
    ignored = [f"--{k.replace('_', '-')}" for k in ("checkpoint", "dataset", "data", "version", "split", "sequence",
                                                    "out", "overwrite", "votes", "seed", "vis", "vis_every",
                                                    "no_images") if k in args.given]
    if args.benchmark and ignored:
        p.error(f"--benchmark times a student of random weights on one scan (the real frame when ../shared/realdata "
                f"holds it) and writes nothing: {', '.join(ignored)} would be ignored; drop them")
    if args.dataset == "nuscenes" and (args.vis is not None or args.sequence is not None):
        p.error("--dataset nuscenes: --vis and --sequence are for SemanticKITTI")
    args.data = args.data or (synthnusc if args.dataset == "nuscenes" else synthkitti).EMBEDDED_ROOT
    return args


# ------------------------------------------------------------------------------------
# Prediction with test-time votes
# ------------------------------------------------------------------------------------

@torch.no_grad()
def vote_copies(points: np.ndarray, keep: np.ndarray, votes: int, rng: np.random.Generator, device):
    """Test-time votes: copy 0 of the kept points as they are, the others rotated and
    translated at random (pixels stay with their points) -> (xyzi (votes * n, 4), batch_idx,
    index (votes * n,): each row's point in the raw scan)."""
    copies = []
    for v in range(votes):
        pts = points[keep].copy()
        if v > 0:
            pts[:, :3] = scandata.augment_xyz(pts[:, :3], rng, flip_scale=False)
        copies.append(pts)
    xyzi = torch.from_numpy(np.concatenate(copies)).to(device)  # (votes * n, 4)
    batch_idx = torch.arange(votes, device=device).repeat_interleave(len(keep))
    return xyzi, batch_idx, torch.from_numpy(keep).to(device).repeat(votes)


def summed_votes(out: torch.Tensor, index: torch.Tensor, num_points: int) -> np.ndarray:
    """Raw logits summed over the votes, as upstream -> training ids (N,) of every raw point
    (a point no copy holds gets 0)."""
    logits = torch.zeros(num_points, out.shape[1], device=out.device).index_add_(0, index, out.float())
    return logits.argmax(1).cpu().numpy()


@torch.no_grad()
def predict_scan(model, points: np.ndarray, votes: int, rng: np.random.Generator, device,
                 path="scan") -> np.ndarray:
    """Training ids (N,) for every raw point; out-of-range or non-finite points get 0."""
    keep = scandata.usable_rows(points, path, semantickitti.RANGE_MIN, semantickitti.RANGE_MAX)
    if len(keep) == 0:
        return np.zeros(len(points), dtype=np.int64)
    xyzi, batch_idx, index = vote_copies(points, keep, votes, rng, device)
    return summed_votes(model(xyzi, batch_idx).logits, index, len(points))


@torch.no_grad()
def predict_fusion_scan(model, points: np.ndarray, frame: np.ndarray | None, proj: np.ndarray, image_hw,
                        votes: int, rng: np.random.Generator, device, path="scan") -> np.ndarray:
    """The fusion student's training ids (N,) for every raw point, with the camera frame or
    without (frame None: every point imputed). Each vote is a copy with its own image row."""
    keep = scandata.usable_rows(points, path, semantickitti.RANGE_MIN, semantickitti.RANGE_MAX)
    if len(keep) == 0:
        return np.zeros(len(points), dtype=np.int64)
    n = len(keep)
    uv, fov = np.zeros((n, 2), np.float32), np.zeros(n, bool)
    images = None
    if frame is not None:
        uv, fov = u2mkd.camera_uv(points[keep, :3], proj, *frame.shape[:2])  # on the raw coordinates
        image = torch.from_numpy(u2mkd.prepare_full_image(frame, image_hw)).to(device)
        images = image.expand(votes, -1, -1, -1)  # (votes, 3, H, W)
    xyzi, batch_idx, index = vote_copies(points, keep, votes, rng, device)
    image_of_point = torch.from_numpy(np.where(fov, 0, -1)).to(device).repeat(votes)
    image_of_point = torch.where(image_of_point >= 0, batch_idx, image_of_point)  # copy v sees image row v
    uv_t = torch.from_numpy(uv).to(device).repeat(votes, 1)
    return summed_votes(model(xyzi, batch_idx, images, image_of_point, uv_t).logits, index, len(points))


def view_table(confs: dict[str, scandata.ConfusionMatrix], class_names=semantickitti.CLASS_NAMES) -> str:
    """Per-class IoU, one column per confusion matrix (each with its dataset's rules; nan: a
    class with neither points nor predictions, which nuScenes' mIoU leaves out)."""
    names = list(confs)
    width = max(10, *(len(n) for n in names))
    lines = [f"{'class':<20} " + " ".join(f"{n:>{width}}" for n in names)]
    for c in range(1, len(class_names)):
        lines.append(f"{class_names[c]:<20} " + " ".join(f"{100 * float(m.iou()[c - 1]):>{width}.1f}"
                                                         for m in confs.values()))
    lines.append(f"{'mIoU':<20} " + " ".join(f"{100 * m.miou():>{width}.1f}" for m in confs.values()))
    lines.append(f"{'mIoU present':<20} " + " ".join(f"{100 * float(m.iou()[m.present()].mean()):>{width}.1f}"
                                                     for m in confs.values()))
    if all(hasattr(m, "fw_iou") for m in confs.values()):  # nuScenes: the devkit reports it beside mIoU
        lines.append(f"{'fwIoU':<20} " + " ".join(f"{100 * m.fw_iou():>{width}.1f}" for m in confs.values()))
    lines.append(f"{'points':<20} " + " ".join(f"{int(m.matrix[:, 1:].sum()):>{width},}" for m in confs.values()))
    return "\n".join(lines)


def write_label_file(path: Path, train_ids: np.ndarray):
    """Raw ids as uint32, written atomically."""
    scandata.atomic_write(path, lambda f: semantickitti.TRAIN_TO_RAW[train_ids].astype(np.uint32).tofile(f))


def scans_to_predict(args) -> list[Path]:
    if args.sequence is not None:
        folder = args.sequence.resolve()
        if folder.parent.name != "sequences" or not (folder / "velodyne").is_dir():
            raise scandata.DataError(f"--sequence {args.sequence}: expected a sequence folder ROOT/sequences/XX with "
                                     "velodyne/ in it (a dataset's root goes to --data)")
        root, sequences = folder.parent.parent, [folder.name]
    else:
        root, sequences = args.data, semantickitti.SPLITS[args.split]
        sequences = [s for s in sequences if (root / "sequences" / s).is_dir()]
    scans = semantickitti.list_scans(root, sequences)
    semantickitti.check_scan_files(scans)
    return scans


def print_summary(args, scans: list[Path], device: torch.device, model: str) -> None:
    sequences = sorted({s.parent.parent.name for s in scans})
    outputs = f"{args.out}/sequences/XX/predictions/NNNNNN.label"
    if args.vis is not None:
        often = "every frame" if args.vis_every == 1 else f"every {args.vis_every}th frame"
        outputs += f"; pictures {args.vis}/sequences/XX/NNNNNN.png ({often})"
    runs.print_summary("infer.py: predictions", {
        "device": runs.describe_device(device, args.amp),
        "convolutions": runs.describe_conv(device),
        "data": f"{len(scans)} scans of sequences {' '.join(sequences)} "
                f"({args.sequence if args.sequence else f'{args.data}, split {args.split}'}), {args.votes} vote(s)",
        "model": model,
        "outputs": outputs})


def which_epoch(ckpt: dict) -> str:
    """Where the weights come from: best.pt was selected on the validation split; last.pt (it holds the
    optimiser) is where its run stopped: after its last epoch, or inside an epoch, of all it asked for or not."""
    done = ckpt.get("epoch", -1) + 1  # epochs finished
    if "optimizer" not in ckpt:
        return f"epoch {done}, selected on the validation split (best.pt)"
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    asked = config.get("epochs")
    of = f" of the {asked} its run asked for: the run has not finished" \
        if type(asked) is int and (asked > done or ckpt.get("batch")) else ""
    if ckpt.get("batch"):
        return f"after epoch {done} and {ckpt['batch']} batches of epoch {done + 1}, written mid-epoch{of}"
    return f"epoch {done}, the last{of}"


def read_train_ids(scan: Path, num_points: int) -> torch.Tensor | None:
    if not semantickitti.label_path(scan).is_file():
        return None
    raw, _ = semantickitti.read_labels(semantickitti.label_path(scan), num_points)
    return torch.from_numpy(semantickitti.to_train_ids(raw, semantickitti.label_path(scan)))


def check_outputs(args) -> None:
    """--out and --vis can be written, checked before any scan is read."""
    runs.writable_folder(args.out, "give another --out")
    if args.vis is not None:
        runs.writable_folder(args.vis, "give another --vis")


def existing_predictions(args, sequences: list[str]) -> list[Path]:
    """The prediction files already in --out that this run would write: the sequences' .label
    files, or the nuScenes split's _lidarseg.bin files and submission.json."""
    if args.dataset == "nuscenes":
        meta = args.out / args.split / "submission.json"
        return sorted(p for p in (args.out / "lidarseg" / args.split).glob("*_lidarseg.bin") if p.is_file()) + \
            ([meta] if meta.is_file() else [])
    return [p for s in sequences for p in sorted((args.out / "sequences" / s / "predictions").glob("*.label"))
            if p.is_file()]  # a folder named *.label is no prediction: never touched


def claim_predictions(args, sequences: list[str]) -> None:
    """Another run's predictions in --out are never mixed with or silently replaced by these:
    refused, or with --overwrite removed (only now, every input checked), so that a replaced
    submission holds exactly the new files."""
    folders = [args.out / "lidarseg" / args.split, args.out / args.split] if args.dataset == "nuscenes" else \
        [args.out / "sequences" / s / "predictions" for s in sequences]
    if args.vis is not None and args.dataset != "nuscenes":
        folders += [args.vis / "sequences" / s for s in sequences]
    for folder in folders:  # a link there could point at a dataset's labels: never written through
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise scandata.DataError(f"{folder}: is a link or not a folder; predictions and pictures are written only "
                                     "into plain folders (a link could lead to a dataset's own files); give another "
                                     f"{'--vis' if args.vis is not None and args.vis in folder.parents else '--out'}")
    found = existing_predictions(args, sequences)
    if found and not args.overwrite:
        files = f"{len(found)} file{'s' * (len(found) != 1)}"
        raise scandata.DataError(f"{args.out}: already holds predictions ({files}, e.g. {found[0]}); give another "
                                 "--out, or --overwrite to replace them")
    pictures = [p for s in sequences for p in sorted((args.vis / "sequences" / s).glob("*.png"))
                if p.is_file()] if args.vis is not None else []
    if pictures and not args.overwrite:  # another run's pictures are not redrawn without being asked
        raise scandata.DataError(f"{args.vis}: already holds pictures ({len(pictures)}, e.g. {pictures[0]}); give "
                                 "another --vis, or --overwrite to redraw them")
    for path in found:
        path.unlink()


def predict(args):
    if args.dataset == "nuscenes":
        return predict_nuscenes(args)
    kind = runs.load_checkpoint(args.checkpoint, None)["kind"]
    if kind == runs.FUSION_KIND:
        return predict_fusion(args)
    if args.no_images:
        raise scandata.DataError(f"{args.checkpoint}: --no-images is for a U2MKD fusion student; this checkpoint "
                                 f"holds a '{kind}' model, which never sees images")
    check_outputs(args)
    device = torch.device(args.device)
    model, ckpt = runs.load_student(args.checkpoint, map_location=device)
    runs.check_dataset(model.cfg, args.dataset, args.checkpoint)
    model.to(device).eval()
    scans = scans_to_predict(args)
    claim_predictions(args, sorted({s.parent.parent.name for s in scans}))
    print_summary(args, scans, device, f"ELiTe Student, {runs.count_parameters(model):,} parameters, from "
                  f"{args.checkpoint} ({which_epoch(ckpt)})")
    rng = np.random.default_rng(args.seed)
    conf, scored = semantickitti.SemanticKittiConfusion(), 0
    by_view = {part: semantickitti.SemanticKittiConfusion() for part in ("seen", "unseen")}  # when images exist
    for k, scan in enumerate(tqdm(scans, desc="predict", dynamic_ncols=True)):
        points = semantickitti.read_scan(scan)
        pred = torch.from_numpy(predict_scan(model, points, args.votes, rng, device, scan))
        seq = scan.parent.parent.name
        write_label_file(args.out / "sequences" / seq / "predictions" / (scan.stem + ".label"), pred.numpy())
        labels = read_train_ids(scan, len(points))
        draw = args.vis is not None and k % args.vis_every == 0
        frame, proj = read_camera(scan) if labels is not None or draw else (None, None)
        if draw:
            draw_scan(args, scan, points, pred.numpy(), labels, frame, proj)
        if labels is not None:
            conf.add(pred, labels)
            scored += 1
            if frame is None:
                by_view = None
            elif by_view is not None:
                seen = seen_mask(points, proj, *frame.shape[:2])
                by_view["seen"].add(pred[seen], labels[seen])
                by_view["unseen"].add(pred[~seen], labels[~seen])
    if scored:
        print(f"\nScores over {scored} labelled scans (official evaluator rules, every point of each .bin; "
              f"training's validation counts in-range points only):\n{conf.table()}")
        if by_view is not None:
            print(f"\nThe same on the points the camera sees and on the others:\n"
                  f"{view_table({'all': conf} | by_view)}")
        return {"all": conf} | (by_view or {})
    print("No labels found: predictions written, nothing scored.")
    return {}


def read_camera(scan: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The scan's camera frame (H, W, 3) and projection (3, 4), or (None, None) without both files."""
    if not (semantickitti.image_path(scan).is_file() and semantickitti.calib_path(scan).is_file()):
        return None, None
    calib = semantickitti.sequence_calib(scan.parent.parent)
    return semantickitti.read_frame(scan, calib), calib["proj"]


def seen_mask(points: np.ndarray, proj: np.ndarray, height: int, width: int) -> torch.Tensor:
    finite = np.isfinite(points).all(1)
    seen = np.zeros(len(points), bool)
    seen[finite] = u2mkd.camera_uv(points[finite, :3], proj, height, width)[1]
    return torch.from_numpy(seen)


def predict_fusion(args):
    """The fusion student with and without images; scores on all, seen and unseen points."""
    check_outputs(args)
    device = torch.device(args.device)
    model, ckpt = runs.load_fusion_student(args.checkpoint, map_location=device)
    runs.check_dataset(model.cfg, args.dataset, args.checkpoint)
    model.to(device).eval()
    image_hw = tuple(ckpt["image_hw"])
    scans = scans_to_predict(args)
    claim_predictions(args, sorted({s.parent.parent.name for s in scans}))
    print_summary(args, scans, device, f"U2MKD FusionStudent, {runs.count_parameters(model):,} parameters, from "
                  f"{args.checkpoint} ({which_epoch(ckpt)}); images resized to "
                  f"{image_hw[0]}x{image_hw[1]}; files written {'without' if args.no_images else 'with'} images")
    rng = np.random.default_rng(args.seed)
    confs = {f"{mode} {part}": semantickitti.SemanticKittiConfusion() for mode in ("images", "no images")
             for part in ("all", "seen", "unseen")}
    scored = 0
    for k, scan in enumerate(tqdm(scans, desc="predict", dynamic_ncols=True)):
        points = semantickitti.read_scan(scan)
        labels = read_train_ids(scan, len(points))
        calib = semantickitti.sequence_calib(scan.parent.parent)
        frame, proj = semantickitti.read_frame(scan, calib), calib["proj"]
        seen = seen_mask(points, proj, *frame.shape[:2]) if labels is not None else None
        modes = {"images": frame, "no images": None}
        if labels is None:  # nothing to score: run the mode whose files are asked for
            modes = {"no images": None} if args.no_images else {"images": frame}
        for mode, image in modes.items():
            pred = predict_fusion_scan(model, points, image, proj, image_hw, args.votes, rng, device, scan)
            if (mode == "no images") == args.no_images:
                seq = scan.parent.parent.name
                write_label_file(args.out / "sequences" / seq / "predictions" / (scan.stem + ".label"), pred)
                if args.vis is not None and k % args.vis_every == 0:
                    draw_scan(args, scan, points, pred, labels, frame, proj)
            if labels is not None:
                pred_t = torch.from_numpy(pred)
                confs[f"{mode} all"].add(pred_t, labels)
                confs[f"{mode} seen"].add(pred_t[seen], labels[seen])
                confs[f"{mode} unseen"].add(pred_t[~seen], labels[~seen])
        scored += labels is not None
    if scored:
        print(f"\nScores over {scored} labelled scans (official evaluator rules, every point of each .bin; "
              f"'seen': the points the camera sees, 'no images': every image feature imputed):\n{view_table(confs)}")
        return confs
    print("No labels found: predictions written, nothing scored.")
    return {}


# ------------------------------------------------------------------------------------
# nuScenes-lidarseg: every keyframe point predicted, the devkit's rules, the submission files
# ------------------------------------------------------------------------------------
# A submission needs a class 1..16 for every point of the keyframe's file, and nuScenes'
# LiDAR reaches beyond the 2DPASS range: such points are predicted where they are pushed onto
# the range's edge, and class 0 (ignore) is never predicted.

def nusc_points(points: np.ndarray, path) -> np.ndarray:
    """(N, 5) keyframe -> (N, 4) x, y, z, intensity with every point inside the voxel range:
    non-finite values become 0 (named in a warning: those points still need a class in the
    submission, but it is a guess), coordinates beyond the range are clamped onto its edge."""
    bad = ~np.isfinite(points[:, :4]).all(1)
    if bad.any():
        warnings.warn(f"{path}: {int(bad.sum())} points with NaN or Inf values; the submission needs a class for "
                      "each, so they are predicted where their finite values put them (a guess) and scored")
    pts = np.nan_to_num(points[:, :4], nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
    eps = 1e-3
    pts[:, :3] = np.clip(pts[:, :3], np.array(nusc.RANGE_MIN) + eps, np.array(nusc.RANGE_MAX) - eps)
    return pts


@torch.no_grad()
def predict_nusc_frame(model, points: np.ndarray, images: np.ndarray | None, sightings: nusc.Sightings | None,
                       votes: int, rng: np.random.Generator, device, path="keyframe") -> np.ndarray:
    """Classes 1..16 (N,) for every point of a keyframe; images (K, 3, H, W) and the points'
    sightings for a fusion student (images None: a LiDAR-only student, or every point imputed).
    The points beyond the voxel range (and non-finite ones) are predicted apart, pushed onto the
    range's edge: voxelised with the others they would change genuine edge voxels' features, and
    no in-range prediction may depend on them (upstream predicts every point, without a range)."""
    pts = nusc_points(points, path)  # (N, 4), inside the range
    inside = np.isfinite(points[:, :4]).all(1) & scandata.in_range(np.nan_to_num(points[:, :3]), nusc.RANGE_MIN,
                                                                   nusc.RANGE_MAX)
    logits = torch.zeros(len(points), nusc.NUM_CLASSES, device=device)
    for rows in (np.flatnonzero(inside), np.flatnonzero(~inside)):
        if len(rows):
            part = rows_logits(model, pts, rows, images, sightings, votes, rng, device)  # (len(rows), 17)
            logits.index_add_(0, torch.from_numpy(rows).to(device), part)
    logits[:, nusc.IGNORE] = -1e9  # a submission holds classes 1..16 only
    return logits.argmax(1).cpu().numpy()


def rows_logits(model, pts: np.ndarray, rows: np.ndarray, images: np.ndarray | None,
                sightings: nusc.Sightings | None, votes: int, rng: np.random.Generator, device) -> torch.Tensor:
    """The logits (len(rows), C) of these rows of a keyframe, summed over the votes, with the
    images and sightings of these rows only."""
    xyzi, batch_idx, _ = vote_copies(pts, rows, votes, rng, device)
    local = torch.arange(len(rows), device=device).repeat(votes)  # each copy's row in `rows`
    if not isinstance(model, u2mkd.FusionStudent):
        out = model(xyzi, batch_idx).logits
    elif images is None or not len(images):
        out = model(xyzi, batch_idx, None, torch.full((len(xyzi),), -1, device=device), torch.zeros(len(xyzi), 2,
                    device=device)).logits
    else:
        row_of = np.full(len(pts), -1)
        row_of[rows] = np.arange(len(rows))
        held = row_of[sightings.point] >= 0  # the sightings of these rows, renumbered
        mine = nusc.Sightings(row_of[sightings.point[held]], sightings.camera[held], sightings.uv[held])
        camera, uv = nusc.last_sighting(mine, len(rows))
        k, p = len(images), len(mine.point)
        copy = torch.arange(votes, device=device).repeat_interleave(p)  # copy v reads its own K images
        t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        splat = u2mkd.Splat(t(mine.point).repeat(votes) + len(rows) * copy, t(mine.camera).repeat(votes) + k * copy,
                            t(mine.uv).repeat(votes, 1))
        cam = t(camera).repeat(votes)
        image_of_point = torch.where(cam >= 0, cam + k * batch_idx, cam)
        out = model(xyzi, batch_idx, t(images).repeat(votes, 1, 1, 1), image_of_point, t(uv).repeat(votes, 1),
                    splat).logits
    return torch.zeros(len(rows), out.shape[1], device=device).index_add_(0, local, out.float())


def predict_nuscenes(args):
    """Predict the keyframes of a nuScenes split, write the submission files, score with the
    devkit's rules on all points, on the points a camera sees and on the others; a fusion
    student with its images and without."""
    check_outputs(args)
    device = torch.device(args.device)
    kind = runs.load_checkpoint(args.checkpoint, None)["kind"]
    if kind == runs.FUSION_KIND:
        model, ckpt = runs.load_fusion_student(args.checkpoint, map_location=device)
        image_hw = tuple(ckpt["image_hw"])
    else:
        if args.no_images:
            raise scandata.DataError(f"{args.checkpoint}: --no-images is for a U2MKD fusion student; this checkpoint "
                                     f"holds a '{kind}' model, which never sees images")
        model, ckpt = runs.load_student(args.checkpoint, map_location=device)
        image_hw = None
    runs.check_dataset(model.cfg, args.dataset, args.checkpoint)
    model.to(device).eval()
    tables = nusc.read_tables(args.data, args.version)
    lut = nusc.fine_to_coarse(tables)
    frames = nusc.keyframes(tables, args.data, nusc.split_scenes(tables, args.split), labelled=args.split != "test")
    fusion = image_hw is not None
    nusc.check_files(tables, args.data, frames, cameras=fusion)  # every file, before the first prediction
    claim_predictions(args, [])
    runs.print_summary("infer.py: nuScenes-lidarseg predictions", {
        "device": runs.describe_device(device, args.amp),
        "convolutions": runs.describe_conv(device),
        "data": f"{args.data} ({args.version}), split {args.split}: {len(frames)} keyframes, {args.votes} vote(s)",
        "model": f"{type(model).__name__}, {runs.count_parameters(model):,} parameters, from {args.checkpoint} "
                 f"({which_epoch(ckpt)})" + (f"; images resized to {image_hw[0]}x{image_hw[1]}, all six cameras"
                                             if fusion else ""),
        "outputs": f"{args.out}/lidarseg/{args.split}/<lidar_token>_lidarseg.bin, {args.out}/{args.split}/"
                   f"submission.json" + (f" (made {'without' if args.no_images else 'with'} images)" if fusion else "")})
    rng = np.random.default_rng(args.seed)
    modes = ("images", "no images") if fusion else ("lidar",)
    written = "no images" if args.no_images else modes[0]
    confs = {f"{m} {part}": nusc.LidarsegConfusion() for m in modes for part in ("all", "seen", "unseen")}
    for frame in tqdm(frames, desc="predict", dynamic_ncols=True):
        points = nusc.read_points(frame.points)
        labels = torch.from_numpy(nusc.read_labels(frame.labels, len(points), lut)) if frame.labels else None
        sightings = nusc.camera_sightings(tables, frame, points[:, :3])  # raw coordinates, all six cameras
        seen = torch.from_numpy(nusc.last_sighting(sightings, len(points))[0] >= 0)
        images = np.stack([u2mkd.prepare_full_image(nusc.read_camera_image(c), image_hw) for c in frame.cameras]) \
            if fusion else None
        for mode in modes:
            pred = predict_nusc_frame(model, points, images if mode == "images" else None, sightings, args.votes,
                                      rng, device, frame.points)
            if mode == written:  # the files of the mode asked for
                write_bytes(args.out / "lidarseg" / args.split / f"{frame.lidar_token}_lidarseg.bin",
                            nusc.submission_labels(pred).tobytes())
            if labels is not None:
                pred_t = torch.from_numpy(pred)
                confs[f"{mode} all"].add(pred_t, labels)
                confs[f"{mode} seen"].add(pred_t[seen], labels[seen])
                confs[f"{mode} unseen"].add(pred_t[~seen], labels[~seen])
    use_camera = fusion and not args.no_images
    write_bytes(args.out / args.split / "submission.json", json.dumps(nusc.submission_meta(use_camera), indent=2).encode())
    if frames and frames[0].labels is not None:
        print(f"\nScores over {len(frames)} keyframes (nuScenes-lidarseg rules, every point of each keyframe; 'seen': "
              f"the points a camera sees{', no images: every image feature imputed' if fusion else ''}):\n"
              f"{view_table(confs, nusc.CLASS_NAMES)}")
    else:
        print("No labels (the test split): submission files written, nothing scored.")


def write_bytes(path: Path, data: bytes) -> None:
    scandata.atomic_write(path, lambda f: f.write(data))


# ------------------------------------------------------------------------------------
# Pictures (--vis)
# ------------------------------------------------------------------------------------
# One PNG per frame, on a light background so that dark class colours (sidewalk) show: a
# caption with the file and the frame's scores; the camera image with the projected points
# in their predicted class's colour (when the scan has an image); two top views, x (forward)
# up, zoomed so the scan fills them: the predicted classes and, when labels exist, the errors
# (red) against the ground truth; a legend of the classes drawn.

BACKGROUND, INK = (248, 248, 248), (20, 20, 20)
CORRECT, WRONG, UNLABELLED = (60, 170, 60), (230, 30, 30), (175, 175, 175)
CAPTION = 30  # pixels of the caption band


def top_view(xyz: np.ndarray, colours: np.ndarray, size=600) -> np.ndarray:
    """(size, size, 3) uint8: the points seen from above, the sensor in the centre, x up and
    y left, zoomed so 99% of the points lie inside; each point a 3x3 dot, and where points
    share a pixel the highest one shows."""
    image = np.full((size, size, 3), BACKGROUND, np.uint8)
    if len(xyz) == 0:
        return image
    xyz = xyz.astype(np.float64)  # metres: float32 overflows on far-off points' arithmetic
    near = np.isfinite(xyz).all(1) & (np.abs(xyz[:, :2]) < 1000).all(1)  # the zoom ignores points a km away or more
    if not near.any():
        return image
    extent = max(5.0, 1.05 * float(np.percentile(np.abs(xyz[near, :2]).max(1), 99)))  # metres, centre to edge
    row = (extent - xyz[:, 0]) / (2 * extent) * size
    col = (extent - xyz[:, 1]) / (2 * extent) * size
    inside = near & (row >= 0) & (row < size) & (col >= 0) & (col < size)
    order = np.argsort(xyz[inside, 2], kind="stable")  # low first, so higher points paint over
    runs.paint_dots(image, np.stack([row, col], 1)[inside][order], colours[inside][order])
    return image


def frame_scores(pred: np.ndarray, labels: np.ndarray | None) -> str:
    """This frame's accuracy and mIoU over the classes it contains (official rules otherwise)."""
    if labels is None:
        return "no labels"
    conf = semantickitti.SemanticKittiConfusion()
    conf.add(torch.from_numpy(pred), torch.from_numpy(labels))
    present = conf.present()
    labelled = labels != semantickitti.IGNORE
    return (f"mIoU {100 * float(conf.iou()[present].mean()):.1f} over its {int(present.sum())} classes, "
            f"accuracy {100 * float((pred[labelled] == labels[labelled]).mean()):.1f}%")


def legend_band(classes, width: int):
    """A light band naming these training ids (0 left out) next to their colour swatches."""
    from PIL import Image, ImageDraw
    classes = [int(c) for c in classes if c != semantickitti.IGNORE]
    per_row = max(1, width // 150)
    band = Image.new("RGB", (width, 8 + 18 * -(-len(classes) // per_row)), BACKGROUND)
    draw = ImageDraw.Draw(band)
    for k, c in enumerate(classes):
        x, y = 10 + 150 * (k % per_row), 6 + 18 * (k // per_row)
        draw.rectangle((x, y, x + 12, y + 12), fill=tuple(int(v) for v in semantickitti.CLASS_COLORS[c]), outline=INK)
        draw.text((x + 18, y), semantickitti.CLASS_NAMES[c], fill=INK)
    return np.asarray(band)


def frame_picture(points: np.ndarray, pred: np.ndarray, labels: np.ndarray | None,
                  frame: np.ndarray | None, proj: np.ndarray | None, caption="") -> np.ndarray:
    """The figure of one scan: pred, labels (N,) training ids, frame (H, W, 3) RGB or None."""
    from PIL import Image, ImageDraw
    finite = np.isfinite(points).all(1)
    xyz, pred = points[finite, :3], pred[finite]
    views = [("prediction (top view, x forward up)", top_view(xyz, semantickitti.CLASS_COLORS[pred]))]
    if labels is not None:
        labels = labels[finite]
        errors = np.where((pred == labels)[:, None], CORRECT, WRONG).astype(np.uint8)
        errors[labels == semantickitti.IGNORE] = UNLABELLED
        views.append(("errors vs ground truth: green right, red wrong, grey unlabelled", top_view(xyz, errors)))
    bottom = np.concatenate([v for _, v in views], 1)
    w = bottom.shape[1]
    rows = [np.full((CAPTION, w, 3), BACKGROUND, np.uint8)]
    if frame is not None:
        overlay = Image.fromarray(runs.camera_overlay(frame, xyz, semantickitti.CLASS_COLORS[pred], proj))
        rows.append(np.asarray(overlay.resize((w, round(overlay.height * w / overlay.width)))))
    top = sum(len(r) for r in rows)
    rows += [bottom, legend_band(np.unique(pred), w)]
    picture = Image.fromarray(np.concatenate(rows, 0))
    draw = ImageDraw.Draw(picture)
    draw.text((8, 9), caption, fill=INK)
    for k, (title, view) in enumerate(views):
        draw.text((k * view.shape[1] + 8, top + 6), title, fill=INK)
        draw.rectangle((k * view.shape[1], top, (k + 1) * view.shape[1] - 1, top + view.shape[0] - 1), outline=INK)
    return np.asarray(picture)


def draw_scan(args, scan: Path, points: np.ndarray, pred: np.ndarray, labels: torch.Tensor | None,
              frame: np.ndarray | None, proj: np.ndarray | None):
    """--vis: write DIR/sequences/XX/NNNNNN.png for this scan (frame, proj: its camera, if any)."""
    labels = None if labels is None else labels.numpy()
    caption = f"{scan}: {len(points):,} points; {frame_scores(pred, labels)}"
    picture = frame_picture(points, pred, labels, frame, proj, caption)
    runs.write_png(args.vis / "sequences" / scan.parent.parent.name / (scan.stem + ".png"), picture,
                       args.vis)


# ------------------------------------------------------------------------------------
# Benchmark
# ------------------------------------------------------------------------------------

def median_ms(fn, repeats: int, sync=lambda: None) -> float:
    for _ in range(2):  # warm-up
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def alternating_median_ms(fns: list, rounds: int, sync=lambda: None) -> list[float]:
    """Median time of each fn, timed in turn round after round: on shared cloud cores whose
    speed drifts, every fn sees the same drift, so ratios between them stay meaningful. Each
    timed call follows an untimed one of the same fn, so it finds the caches as in a loop."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, times):
            fn()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            t.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def products_only(feats: torch.Tensor, weight: torch.Tensor, neighbours: elite_fast.Neighbours) -> torch.Tensor:
    """The plain convolution's matrix products on rows already in place, without the gathers and
    scatter-adds around them: the floor of its cost at this matmul speed."""
    out = feats @ weight[1, 1, 1]
    product = torch.empty_like(out)
    for (i, _), (dx, dy, dz) in zip(neighbours.pairs(), elite.OFFSETS[14:]):
        for w in (weight[1 + dx, 1 + dy, 1 + dz], weight[1 - dx, 1 - dy, 1 - dz]):
            torch.mm(feats[:len(i)], w, out=product[:len(i)])
    return out


def benchmark_scan() -> tuple[np.ndarray, np.ndarray, str]:
    """(points (N, 4), training labels (N,), where they come from)."""
    frame = REALDATA / "sequences" / "00" / "velodyne" / "000000.bin"
    if frame.is_file():
        points, labels = semantickitti.load_scan(frame)
        return points, labels, f"real SemanticKITTI frame {frame}"
    points, raw = synthkitti.make_scan(seed=0, columns=2048)
    return points, semantickitti.to_train_ids(raw & 0xFFFF), "synthetic scan (../shared/realdata not found)"


def peak_memory_mib(fn, device: torch.device) -> float:
    """Memory fn() needs above what was in use before it, in MiB: the CUDA allocator's peak,
    or on a CPU the peak resident set of this process (Linux /proc)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20

    def status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand memory freed by earlier work back to the system
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the kernel's peak-RSS counter (VmHWM) to the current RSS
    before = status_kib("VmRSS")
    fn()
    return (status_kib("VmHWM") - before) / 1024


def student_training_step(model: elite.Student, points: torch.Tensor, batch_idx: torch.Tensor,
                          labels: torch.Tensor, amp: bool):
    """Forward, the student's loss (CE_w + 0.1 Lovasz) and backward; the gradients stay in the
    parameters (until the next step sets them anew)."""
    model.train()
    model.zero_grad(set_to_none=True)
    with runs.autocast(points.device, amp):
        logits = model(points, batch_idx).logits
    elite.seg_loss(logits, labels, elite.class_weights().to(points.device), elite.LAMBDA_LOVASZ).backward()


def teacher_training_step(teacher: elite.Teacher, batch: int, amp: bool, device: torch.device,
                          weight: torch.Tensor | None = None):
    """One step of the SAM teacher's 2D losses on random crops with 4,000 labelled pixels each;
    weight: the class weights, made once per run by the trainer (here if not given)."""
    weight = elite.class_weights().to(device) if weight is None else weight
    h, w = teacher.cfg.crop_hw
    g = torch.Generator().manual_seed(0)
    pixels = [torch.stack([torch.randint(0, h, (4000,), generator=g), torch.randint(0, w, (4000,), generator=g)], 1)
              for _ in range(batch)]
    crops = scandata.CameraCrops(torch.randn(batch, 3, h, w, generator=g), pixels,
                                 torch.randint(1, semantickitti.NUM_CLASSES, (4000 * batch,), generator=g), None).to(device)
    with runs.autocast(device, amp):
        terms, _ = elite.teacher_losses(teacher, teacher(crops.images), crops, weight)
        terms["orth"] = elite.orth_regularizer(teacher, elite.ORTH_WEIGHT)
    sum(t.float() for t in terms.values()).backward()
    teacher.zero_grad(set_to_none=True)


# aten operations whose output size depends on the values of their input: on a GPU the host
# must wait for the device before it can allocate their output (a host sync), and item()
# (_local_scalar_dense) is one by itself.
DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
                  "unique_consecutive", "unique_dim_consecutive", "bincount", "_local_scalar_dense"}


@dataclass
class OpCount:
    """What a call dispatched: aten operations by name (views left out: no kernel, no new
    memory) and Triton kernel launches by kernel."""
    aten: dict[str, int]
    triton: dict[str, int]

    @property
    def data_dependent(self) -> dict[str, int]:
        """The operations after which a GPU's host waits for the device: a data-dependent output
        size, an item(), a copy to the host (elite_fast.read_to_host), marked '*' where the name alone
        does not tell."""
        return {k: v for k, v in self.aten.items() if k in DATA_DEPENDENT or k.endswith("*")}


def count_ops(fn) -> OpCount:
    """Run fn() and count what it dispatches. Boolean-mask indexing, repeat_interleave without
    output_size and copies to the host are counted under their names with a '*' suffix:
    data-dependent too. Triton launches are counted by elite_fast.launch (the interpreter's own
    copies to and from numpy are hidden from this count: a GPU makes none)."""
    from collections import Counter
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            if name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1]):
                name = "index*"  # a boolean mask: as many rows as it holds True
            if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) == 1:
                name = "repeat_interleave*"
            if name == "_to_copy" and kwargs.get("device") == torch.device("cpu"):
                name = "to_host*"  # elite_fast.read_to_host: on a GPU, a wait for the device
            if not func.is_view:
                self.ops[name] += 1
            return func(*args, **kwargs)

    before = Counter(elite_fast.LAUNCHES)
    with Count() as mode:
        fn()
    launched = Counter(elite_fast.LAUNCHES) - before
    return OpCount(dict(mode.ops), dict(launched))


def benchmark_paths(device: torch.device, conv: str) -> list[str]:
    """The convolution paths timed side by side: both where the device runs Triton (CUDA), the
    plain one elsewhere, or the one --conv names."""
    if conv != "auto":
        return [conv]
    return ["torch", "triton"] if device.type == "cuda" and elite_fast.triton is not None else ["torch"]


@contextlib.contextmanager
def conv_path(path: str):
    """Run the convolutions on this path inside the block, as before it after."""
    before = elite_fast.CONV_PATH
    elite_fast.set_conv_path(path)
    try:
        yield
    finally:
        elite_fast.set_conv_path(before)


def on_path(path: str, amp: bool, device: torch.device, fn):
    """fn run on a convolution path and precision, without gradients: a thunk for the timers."""
    def run():
        with torch.no_grad(), conv_path(path), runs.autocast(device, amp):
            return fn()
    return run


def rotated_copies(points: torch.Tensor, labels: torch.Tensor, copies: int):
    """A batch of `copies` scans: the scan turned by 0, 90, 180, 270 degrees about z, and so on."""
    turned = []
    for k in range(copies):
        c, s = [(1, 0), (0, 1), (-1, 0), (0, -1)][k % 4]
        x, y = points[:, 0], points[:, 1]
        turned.append(torch.stack([c * x - s * y, s * x + c * y, points[:, 2], points[:, 3]], 1))
    batch_idx = torch.arange(copies, device=points.device).repeat_interleave(len(points))
    return torch.cat(turned), batch_idx, labels.repeat(copies)


def print_row(name: str, cells: list[str], width=14):
    print(f"    {name:<34}" + "".join(f"{c:>{width}}" for c in cells))


def benchmark_device(points: torch.Tensor, labels: torch.Tensor, device: torch.device, args):
    points, labels = points.to(device), labels.to(device)
    paths = benchmark_paths(device, args.conv)
    # bf16 runs on GPUs always; on a CPU only when asked (most CPUs have no bf16 units).
    precisions = (False, True) if device.type == "cuda" or args.amp else (False,)
    columns = [(path, amp) for amp in precisions for path in paths]  # timed side by side
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"\n[{device}{threads}] convolution paths: " + ", ".join(
        {"torch": "torch (plain torch, elite_fast.py)", "triton": "triton (Triton kernels, elite_fast.py)"}[p] for p in paths)
        + (", deterministic algorithms" if torch.are_deterministic_algorithms_enabled() else ""))
    torch.manual_seed(0)
    model = elite.Student().to(device).eval()
    benchmark_convolutions(model, points, columns, args.repeats)
    benchmark_forward(model, points, columns, args.repeats)
    benchmark_training_step(model, points, labels, columns, args)
    if args.teacher_variant != "none":
        benchmark_teacher(points, labels, device, args)


def column_names(columns: list[tuple[str, bool]]) -> list[str]:
    return [f"{path} {'bf16' if amp else 'fp32'}" for path, amp in columns]


def device_sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def benchmark_convolutions(model: elite.Student, points: torch.Tensor, columns, repeats: int):
    """One 64->64 convolution on the scan's voxels at each convolved scale, on each path and
    precision; its neighbour table built already, as in a forward."""
    device, sync = points.device, device_sync(points.device)
    batch_idx = torch.zeros(len(points), dtype=torch.long, device=device)
    scales = elite_fast.voxelize_scales(points[:, :3], batch_idx, model.cfg)
    weight = torch.randn(3, 3, 3, 64, 64, device=device) * 0.05
    print("  one 3x3x3 SubM convolution 64->64, ms (median; the paths timed in turn, round after round)")
    print_row("scale: voxels, neighbour pairs", ["table", "+ pairs"] + column_names(columns))
    scale_one = None
    for scale, stage in zip((1, 2, 4, 8), scales.stages):
        coords = stage.voxels.coords
        keys = elite_fast.pack_keys(coords[:, 0], coords[:, 1:])  # sorted, as the voxels are
        t_table = median_ms(lambda: elite_fast.neighbour_table(keys), repeats, sync)  # noqa: B023
        neighbours = elite_fast.Neighbours(elite_fast.neighbour_table(keys))
        t_pairs = median_ms(lambda: elite_fast.Neighbours(neighbours.rows).pairs(), repeats, sync)  # noqa: B023
        neighbours.pairs()  # the plain path reads them; made once per voxel set, as in a forward
        feats = torch.randn(len(coords), 64, device=device)
        times = alternating_median_ms([on_path(p, amp, device, partial(elite_fast.submconv3d, feats, neighbours, weight))
                                       for p, amp in columns], max(1, repeats // 2), sync)
        print_row(f"{scale}: {len(coords):,}, {neighbours.num_pairs:,}", [f"{t_table:.2f}", f"{t_pairs:.2f}"] +
                  [f"{t:.3f}" for t in times])
        scale_one = scale_one or (feats, neighbours, times)
    feats, neighbours, times = scale_one
    flops = neighbours.num_pairs * 64 * 64 * 2
    dense = torch.randn(4096, 4096, device=device)
    t_products, t_dense = alternating_median_ms([lambda: products_only(feats, weight, neighbours), lambda: dense @ dense],
                                                max(1, repeats // 2), sync)
    print("  scale 1: " + ", ".join(f"{n} {flops / t / 1e6:.1f} GFLOP/s" for n, t in zip(column_names(columns), times))
          + f"; the plain convolution's products alone {t_products:.2f} ms ({flops / t_products / 1e6:.1f} GFLOP/s); "
          f"a dense 4096x4096 float32 matmul {2 * 4096 ** 3 / t_dense / 1e6:.1f} GFLOP/s")
    t_scales = median_ms(lambda: elite_fast.voxelize_scales(points[:, :3], batch_idx, model.cfg), repeats, sync)
    print(f"  the voxels of all five scales and every block's indices (elite_fast.voxelize_scales): {t_scales:.1f} ms")


def benchmark_forward(model: elite.Student, points: torch.Tensor, columns, repeats: int):
    """The student's forward on the scan: time, repeatability and operations, each path and precision."""
    device = points.device
    batch_idx = torch.zeros(len(points), dtype=torch.long, device=device)
    print("  student forward on the scan")
    forwards = [on_path(p, amp, device, lambda: model(points, batch_idx).logits) for p, amp in columns]
    t_forward = alternating_median_ms(forwards, repeats, device_sync(device))
    print_row("", column_names(columns))
    print_row("ms", [f"{t:.1f}" for t in t_forward])
    print_row("Hz", [f"{1000 / t:.1f}" for t in t_forward])
    print_row("two forwards bitwise equal", [str(torch.equal(f(), f())) for f in forwards])
    for path in dict.fromkeys(p for p, _ in columns):
        with torch.no_grad(), conv_path(path):
            ops = count_ops(lambda: model(points, batch_idx))
        waits = ops.data_dependent
        print(f"    {path} path, float32: {sum(ops.aten.values()):,} aten operations dispatched, "
              f"{sum(waits.values())} of them waits on the data (" +
              ", ".join(f"{k} {v}" for k, v in sorted(waits.items(), key=lambda kv: -kv[1])) + "), "
              f"{sum(ops.triton.values())} Triton launches")
    fast, reference = forms_forwards(model, points, batch_idx)
    t_fast, t_reference = alternating_median_ms([fast, reference], max(1, repeats // 2), device_sync(device))
    agree = float((fast() - reference()).abs().max())
    print(f"    elite.py's reference forms (--forms reference): {t_reference:.1f} ms, {t_reference / t_fast:.2f}x the "
          f"fast forms' {t_fast:.1f} ms timed in turn (plain-torch convolution); logits within {agree:.1e} of them")


def forms_forwards(model: elite.Student, points: torch.Tensor, batch_idx: torch.Tensor):
    """The student's forward in the fast forms (plain-torch convolution) and in the reference forms."""
    def run(form):
        def forward():
            with torch.no_grad(), conv_path("torch"), elite_fast.forms(form):
                return model(points, batch_idx).logits
        return forward
    return run("fast"), run("reference")


def benchmark_training_step(model: elite.Student, points: torch.Tensor, labels: torch.Tensor, columns, args):
    """One training step on a batch of the scan's rotated copies: time, memory, repeatability."""
    device = points.device
    batch_points, batch_index, batch_labels = rotated_copies(points, labels, args.batch)
    print(f"  student training step, batch of {args.batch} (the scan turned by multiples of 90 degrees): forward, "
          "CE + 0.1 Lovasz, backward")
    print_row("", column_names(columns))
    step_ms, step_mib, step_equal = [], [], []
    for path, amp in columns:
        with conv_path(path):
            def step():
                student_training_step(model, batch_points, batch_index, batch_labels, amp)
            step()  # warm-up
            step_ms.append(median_ms(step, max(1, args.repeats // 3), device_sync(device)))
            step_mib.append(peak_memory_mib(step, device))
            grads = [p.grad.clone() for p in model.parameters()]
            step()
            step_equal.append(all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters())))
    model.zero_grad(set_to_none=True)
    model.eval()
    print_row("ms", [f"{t:.1f}" for t in step_ms])
    print_row("peak memory, MiB above the start", [f"+{m:,.0f}" for m in step_mib])
    print_row("two steps' gradients bitwise equal", [str(e) for e in step_equal])


PAPER_STEPS_PER_EPOCH = 4_782  # the official training split at batch 4, as the loader counts it
PAPER_EPOCHS = 64  # both stages of ELiTe's paper preset


def joint_batch(points: torch.Tensor, labels: torch.Tensor, copies: int, crop: tuple[int, int],
                device: torch.device) -> scandata.Batch:
    """Stage 2's input: `copies` turned copies of the scan, each with a random camera crop and
    4,000 of its points at random pixels of it (the points' true projection does not change the cost)."""
    g = torch.Generator().manual_seed(0)
    pts, batch_idx, lab = rotated_copies(points.cpu(), labels.cpu(), copies)
    per_scan = len(points)
    rows = torch.cat([b * per_scan + torch.randperm(per_scan, generator=g)[:4000] for b in range(copies)])
    pixels = [torch.stack([torch.randint(0, crop[0], (4000,), generator=g), torch.randint(0, crop[1], (4000,), generator=g)],
                          1) for _ in range(copies)]
    crops = scandata.CameraCrops(torch.randn(copies, 3, *crop, generator=g), pixels, lab[rows], None)
    return scandata.Batch(pts, batch_idx, lab, torch.arange(len(pts)), [per_scan] * copies, [Path("benchmark")] * copies,
                          crops, rows).to(device)


def joint_training_step(student: elite.Student, heads: nn.Module, teacher: elite.Teacher, batch: scandata.Batch,
                        amp: bool, weight: torch.Tensor):
    """One step of ELiTe's stage 2 (the paper's joint mode): the student's loss, the teacher's 2D
    terms, PPMSKD and AdaLoRA's orthogonality term, and backward through both; weight: the
    class weights."""
    student.train()
    with runs.autocast(batch.points.device, amp):
        out = student(batch.points, batch.batch_idx)
        terms = elite.elite_losses(out, heads, teacher, batch, weight)
    sum(t.float() for t in terms.values()).backward()
    for model in (student, heads, teacher):
        model.zero_grad(set_to_none=True)


def benchmark_teacher(points: torch.Tensor, labels: torch.Tensor, device: torch.device, args):
    """ELiTe's two stages: the SAM teacher's step (stage 1) and the joint step (stage 2), each
    precision, with the hours the paper preset's 64 epochs would take at that speed."""
    crop, batch = (320, 1024), args.teacher_batch or (4 if device.type == "cuda" else 1)
    sync, repeats = device_sync(device), max(1, args.repeats // 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random SAM weights: the cost is the same
        teacher = runs.build_teacher(elite.TeacherConfig(variant=args.teacher_variant, crop_hw=crop)).to(device)
    torch.manual_seed(0)
    student, heads = elite.Student().to(device), elite.heads_3d().to(device)
    stage2 = joint_batch(points, labels, batch, crop, device)
    weight = elite.class_weights().to(device)  # made once, as the trainers do
    print(f"  ELiTe's two stages, SAM {args.teacher_variant} + AdaLoRA, batch {batch} ({crop[0]}x{crop[1]} crops, "
          f"4,000 labelled pixels each): ms a step (median of {repeats}), peak memory"
          + ("" if batch == 4 else "; hours for the paper preset need --teacher-batch 4"))
    for amp in (False, True) if device.type == "cuda" or args.amp else (False,):
        for stage, step in (("stage 1: teacher step", lambda: teacher_training_step(teacher, batch, amp, device, weight)),
                            ("stage 2: joint step", lambda: joint_training_step(student, heads, teacher, stage2, amp, weight))):
            ms = median_ms(step, repeats, sync)
            mib = peak_memory_mib(step, device)
            hours = (f", {PAPER_EPOCHS} paper epochs of {PAPER_STEPS_PER_EPOCH:,} steps: "
                     f"{ms * PAPER_STEPS_PER_EPOCH * PAPER_EPOCHS / 3.6e6:.1f} h" if batch == 4 else "")
            print(f"    {stage + (', bf16 autocast' if amp else ', float32'):<40}{ms:10.1f} ms, "
                  f"peak memory +{mib:,.0f} MiB{hours}")
    ops = count_ops(lambda: teacher_training_step(teacher, 1, False, device, weight))
    print(f"    one teacher step on one crop, float32: {sum(ops.aten.values()):,} aten operations dispatched")


def benchmark(args):
    points, labels, source = benchmark_scan()
    inside = scandata.in_range(np.nan_to_num(points[:, :3]), semantickitti.RANGE_MIN, semantickitti.RANGE_MAX)
    keep = np.isfinite(points).all(1) & inside
    pts, labels = torch.from_numpy(points[keep]), torch.from_numpy(labels[keep])
    devices = [torch.device(args.device)]  # one device a run: a GPU's figures are not held up by the CPU's
    batch_idx = torch.zeros(len(pts), dtype=torch.long)
    voxels = [elite.voxelize(pts[:, :3], batch_idx, s) for s in (1, 2, 4, 8, 16)]
    runs.print_summary("infer.py --benchmark: the student's size, speed and memory", {
        "devices": ", ".join(runs.describe_device(d) for d in devices),
        "convolution paths": ", ".join(benchmark_paths(devices[0], args.conv)),
        "student": f"Student, {runs.count_parameters(elite.Student()):,} parameters",
        "input": f"{source}: {len(points):,} points, {len(pts):,} in range",
        "teacher": (f"ELiTe's two stages' steps with SAM {args.teacher_variant} + AdaLoRA"
                    if args.teacher_variant != "none" else "not timed (--teacher-variant none)"),
        "outputs": "this printout (no files)"})
    print("Voxels per scale: " + " / ".join(f"{len(v):,} (scale {s})" for v, s in zip(voxels, (1, 2, 4, 8, 16))))
    pairs = sum(elite_fast.neighbours_of(v.coords).num_pairs for v in voxels[:4])
    print(f"Sparse-conv work of one forward: 4 convolutions 64->64 at each of scales 1/2/4/8, whose neighbour "
          f"pairs add up to {pairs:,}: {4 * pairs * 64 * 64 * 2 / 1e9:.1f} GFLOP")
    for device in devices:
        benchmark_device(pts, labels, device, args)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.benchmark:
        benchmark(args)
    else:
        with runs.autocast(torch.device(args.device), args.amp):
            predict(args)


if __name__ == "__main__":
    runs.run_script(main)
