"""Train a student on SemanticKITTI: ELiTe's 1.9M LiDAR student (PPMSKD from the SAM teacher,
or alone) or U2MKD's camera+LiDAR fusion student (distilled from a LiDAR-only teacher).

    python train_student.py                       # embedded default: synthetic scenes, CPU, a few minutes
    python train_student.py --data /path/to/SemanticKITTI/dataset   # preset paper: the official default config
    python train_student.py --data DATASET --preset paper-test --init-3d 2DPASS.ckpt   # the benchmark config
    python train_student.py --method u2mkd        # U2MKD's fusion student (after train_teacher.py --teacher lidar)

Without --data, synthetic scenes are written once in the real SemanticKITTI layout under
./data/synthkitti and read back through the same loader as the real dataset.

--method elite (default). Teacher (--teacher): the checkpoint train_teacher.py wrote (default
runs/teacher/last.pt, its last epoch, when it exists; 'none' trains the baseline). Each step the teacher sees
the scans' camera crops and PPMSKD distils it into the student at four stages
(elite.elite_losses):
  --teacher-mode joint   the paper: the teacher's adapters, patch decoders and 2D heads keep
                         learning from their 2D losses (and AdaLoRA's orthogonality term),
                         in the same optimiser as the student;
  --teacher-mode frozen  the teacher is fixed and only hands over its (detached) predictions.
Loss: class-weighted CE + 0.1 Lovasz-softmax, plus the PPMSKD terms with a teacher.

--method u2mkd. The fusion student (u2mkd.FusionStudent) sees the whole camera image; the
LiDAR teacher (default runs/lidar_teacher/last.pt when it exists, from train_teacher.py
--teacher lidar; 'none' trains the fusion student without KD) sees its own augmentation of the
same scan. Loss (u2mkd.u2mkd_losses): CE + Lovasz in 3D and on the seen points in 2D, the
imputation MSE at four stages, KL and feature KD from the teacher.

Several GPUs: torchrun --nproc_per_node N train_student.py ... (one process per GPU, --batch-size
per process; docs/training.md, "Several GPUs"). --amp: bf16 autocast.

Both: SGD + Nesterov, lr 0.24, momentum 0.9, weight decay 1e-4, the preset's cosine schedule
(per iteration, or per epoch for paper-test), gradient norm clipped at 1, non-finite steps
skipped; validation mIoU (in-range points) each epoch. last.pt, the last epoch, is the model to
score (infer.py's default) and holds what --resume needs; best.pt holds only the student of the
epoch selected on the validation split. The presets and the source of each value are listed at
the end of --help.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import elite
import nusc
import presets
import runs
import scandata
import semantickitti
import u2mkd

HELP_PRESETS = (("elite", "elite", "semantickitti"), ("u2mkd", "u2mkd", "semantickitti"),
                ("--dataset nuscenes, the baseline:", "elite", "nuscenes"), ("--dataset nuscenes, u2mkd:", "u2mkd", "nuscenes"))
# The teacher each method distils by default, as upstream: ELiTe's and U2MKD's SemanticKITTI
# teacher from its last epoch; U2MKD's nuScenes config the best-validation one (max-iou-val-vox.pt).
DEFAULT_TEACHER = {"elite": Path("runs/teacher/last.pt"), "u2mkd": Path("runs/lidar_teacher/last.pt"),
                   "u2mkd nuscenes": Path("runs/lidar_teacher_nusc/best.pt")}


def make_parser() -> argparse.ArgumentParser:
    """Every flag of train_student.py, the presets listed at the end of --help."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runs.HelpFormatter,
                                epilog="\n\n".join(f"{label} " + presets.presets_epilog(presets_of(method, dataset))
                                                     for label, method, dataset in HELP_PRESETS))
    runs.add_data_flags(p, "velodyne,labels; image_2,calib.txt with a teacher or u2mkd")
    p.add_argument("--method", choices=("elite", "u2mkd"), default="elite",
                   help="elite: the 1.9M LiDAR student, PPMSKD from the SAM teacher; u2mkd: the camera+LiDAR "
                        "fusion student, KD from the LiDAR teacher")
    p.add_argument("--preset", choices=presets.NAMES, default=None,
                   help="a recipe (its values and their sources are listed at the end): 'paper' is the default "
                        "with --data, 'embedded' without; 'paper-test' (elite) is the benchmark-submission config")
    add_elite_flags(p)
    add_u2mkd_flags(p)
    runs.add_recipe_flags(p, "scans")
    p.add_argument("--out", type=runs.path_flag, default=None,
                   help="the run's folder: last.pt, best.pt, metrics.csv (default: runs/student, "
                        "runs/fusion_student for u2mkd; with _nusc on nuscenes); one run per folder")
    runs.add_run_flags(p)
    return p


def add_elite_flags(p) -> None:
    """ELiTe's: the teacher and its labels, the 2DPASS start, CutMix, where the pseudo-labels are."""
    p.add_argument("--teacher", default=None,
                   help="teacher checkpoint from train_teacher.py, or 'none' for the student alone; default: "
                        f"{DEFAULT_TEACHER['elite']} (elite), {DEFAULT_TEACHER['u2mkd']} (u2mkd; "
                        f"{DEFAULT_TEACHER['u2mkd nuscenes']} on nuscenes: the checkpoint upstream distils, the "
                        "last epoch, or on nuscenes the best on the validation split) when it exists, else none")
    p.add_argument("--teacher-mode", choices=("joint", "frozen"), default="joint",
                   help="elite: joint (the paper): the teacher's adapters, patch decoders and 2D heads train on "
                        "with their 2D losses; frozen: the teacher is fixed (cheaper). u2mkd's teacher is always frozen")
    p.add_argument("--labels", choices=("plg", "sparse"), default=None,
                   help="elite: 2D labels of the teacher's losses: plg (dense SAM-PLG pseudo-labels) or sparse "
                        "(projected point labels); default: those the teacher was trained with")
    p.add_argument("--sam-checkpoint", type=runs.path_flag, default=None,
                   help="elite: SAM file for the teacher's frozen encoder, if it moved since train_teacher.py "
                        "(default: the path the teacher checkpoint records)")
    p.add_argument("--init-3d", type=runs.path_flag, default=None,
                   help="elite: start the student from an official 2DPASS SemanticKITTI checkpoint (.ckpt; its "
                        "model_3d tensors), as paper-test does upstream (pretrained3d: True); default: none, random weights")
    p.add_argument("--cutmix", action=argparse.BooleanOptionalAction, default=None,
                   help="elite: instance CutMix: the instance points of another training scan, augmented on their "
                        "own, stacked after each training scan's, without pixels (preset)")
    p.add_argument("--heads-3d", action="store_true", default=None,
                   help="elite, --teacher none: train the student with PPMSKD's four 3D heads and their losses but "
                        "no teacher (deep supervision without KD: the ablation's control for what KD itself adds)")
    p.add_argument("--kd-weight", type=runs.loss_weight, default=None,
                   help=f"elite: lambda_xm, the weight of PPMSKD's KL terms (each stage's KL weighs lambda_xm / 4; "
                        f"default: the paper's {elite.LAMBDA_XM})")
    p.add_argument("--derived-dir", type=runs.path_flag, default=None,
                   help="elite: where the SAM-PLG pseudo-labels were written, if not inside --data (default: "
                        "inside --data; train_teacher.py --derived-dir for a read-only dataset)")


def add_u2mkd_flags(p) -> None:
    """U2MKD's: the camera images, their dropout, the ImageNet start, the global batch of the lr."""
    p.add_argument("--image-size", type=runs.image_side, nargs=2, metavar=("H", "W"),
                   help="u2mkd: the camera image is resized to H x W (preset: 376 1241 paper, 188 620 embedded)")
    p.add_argument("--camera-drop", type=runs.count_int, default=None,
                   help="u2mkd, nuscenes: cameras of the six dropped at random per training keyframe (preset: 3, "
                        "upstream's im_drop)")
    p.add_argument("--image-drop", type=runs.probability, default=None,
                   help="u2mkd, semantickitti: probability that a training scan comes without its image, so that "
                        "every point is imputed (the single-camera stand-in for upstream's camera dropout; default: "
                        "0.25)")
    p.add_argument("--image-weights", type=runs.path_flag, default=None,
                   help="u2mkd: torchvision's ImageNet ResNet-18 file (resnet18-f37072fd.pth) for the image "
                        "branch (default: none, the branch starts random)")
    p.add_argument("--global-batch", type=runs.positive_int,
                   help="u2mkd: the global batch the preset's lr is meant for; with another batch x processes "
                        "the lr scales in proportion (preset: 16, upstream's 4 GPUs x 4)")


def parse_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    runs.given_flags(p, args, argv)
    runs.apply_conv_flag(p, args)
    refuse_flags_that_do_not_apply(p, args)
    if args.method == "u2mkd" and args.dataset == "semantickitti" and args.image_drop is None:
        args.image_drop = 0.25
    args.preset = args.preset or ("paper" if args.data else "embedded")
    runs.check_data_flags(p, args)
    recipes = presets_of(args.method, args.dataset)
    if args.preset not in recipes:
        p.error(f"--preset {args.preset} is ELiTe's benchmark-submission config; --method {args.method}"
                f"{' on nuscenes' if args.dataset == 'nuscenes' else ''} has {', '.join(recipes)}")
    presets.apply_preset(args, recipes[args.preset])
    if args.camera_drop is not None and args.camera_drop > len(nusc.CAMERAS):
        p.error(f"argument --camera-drop: {args.camera_drop} of the {len(nusc.CAMERAS)} cameras cannot be dropped")
    args.image_size = tuple(args.image_size) if args.image_size else None
    folder = "runs/student" if args.method == "elite" else "runs/fusion_student"
    args.out = args.out or Path(folder + ("_nusc" if args.dataset == "nuscenes" else ""))
    return args


def refuse_flags_that_do_not_apply(p, args) -> None:
    """A flag of the other method or dataset is refused, never silently ignored."""
    other_method = {"elite": ("image_size", "image_weights", "global_batch", "camera_drop", "image_drop"),
                    "u2mkd": ("labels", "sam_checkpoint", "derived_dir", "init_3d", "cutmix", "heads_3d",
                              "kd_weight")}[args.method]
    # Camera dropout has two forms: of nuScenes' six cameras, or of SemanticKITTI's one image.
    other_method += ("labels", "sam_checkpoint", "derived_dir", "init_3d", "cutmix", "image_drop") \
        if args.dataset == "nuscenes" else ("camera_drop",)
    other_method += ("heads_3d",) if args.dataset == "nuscenes" else ()
    other_method = tuple(dict.fromkeys(other_method))
    given = [f"--{k.replace('_', '-')}" for k in other_method if getattr(args, k) is not None]
    if given:
        p.error(f"{' and '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --method {args.method}"
                f" on --dataset {args.dataset}")
    if args.teacher == "none" and args.labels is not None:
        p.error("--labels: the 2D labels of the teacher's losses; --teacher none trains without a teacher")
    if args.heads_3d and args.teacher != "none":
        p.error("--heads-3d: the 3D heads without a teacher; with one, PPMSKD trains them anyway: add --teacher none")
    if args.kd_weight is not None and args.teacher == "none":
        p.error("--kd-weight: the weight of the KD from a teacher; --teacher none has none")
    if args.dataset == "nuscenes":
        if args.method == "elite" and args.teacher not in (None, "none"):
            p.error("--dataset nuscenes --method elite trains the LiDAR-only baseline (--teacher none); ELiTe's SAM "
                    "teacher reads SemanticKITTI")


# What a resumed run keeps as it started: a flag that would change one of these is refused.
RESUME_KEEPS = ("method", "dataset", "version", "preset", "teacher", "teacher_mode", "labels", "image_size",
                "image_drop", "camera_drop", "cutmix", "init_3d", "image_weights", "global_batch", "seed", "heads_3d")


def presets_of(method: str, dataset: str) -> dict[str, presets.Preset]:
    """The presets of a method on a dataset (presets.py)."""
    return presets.RECIPES[("student", method, dataset)]


def teacher_path(args, resumed: dict | None) -> str:
    """The teacher of this run: from a resumed run's config, the flag, or the default file."""
    if resumed is not None:
        return resumed["config"]["teacher"]
    if args.teacher is not None:
        return args.teacher
    if args.dataset == "nuscenes" and args.method == "elite":
        return "none"  # the LiDAR-only baseline
    default = DEFAULT_TEACHER[args.method + (" nuscenes" if args.dataset == "nuscenes" else "")]
    return str(default) if default.is_file() else "none"


@dataclass
class Setup:
    """What fit() needs from a method, plus the student and a line that describes the run."""
    model: torch.nn.Module
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    parts: list  # every module that trains (DDP wraps them together)
    loss_terms: Callable
    validate: Callable
    checkpoints: Callable  # (run, miou) -> (last.pt state, best.pt state)
    after_backward: Callable | None
    describe: str  # the teacher, for the start-up summary
    val_set: torch.utils.data.Dataset  # for the start-up summary


# ---- ELiTe: the 1.9M student, with PPMSKD from the SAM teacher ----

def elite_teacher(args, config: dict, device, resumed: dict | None) -> tuple:
    """The SAM teacher a run distils (None for --teacher none) and its AdaLoRA rank scores: from
    the teacher checkpoint, or on --resume the trained tensors as they were. `config` takes what
    the teacher brings: its labels and AdaLoRA budget (or, resumed, what the run started with)."""
    if resumed is not None:
        config |= {key: resumed["config"].get(key) for key in ("teacher_mode", "labels", "target_rank")}
        if resumed.get("teacher") is None:
            return None, None
        teacher = runs.load_teacher_state(resumed["teacher"], args.sam_checkpoint, args.out / "last.pt")
        return teacher.to(device), resumed.get("rank_allocator")
    if config["teacher"] == "none":
        return None, None
    teacher, ckpt = runs.load_teacher(config["teacher"], args.sam_checkpoint, map_location=device)
    config |= {"labels": args.labels or ckpt["config"]["labels"], "target_rank": ckpt["config"].get("target_rank", 8)}
    return teacher.to(device), ckpt.get("rank_allocator")


def continued_rank_allocator(teacher, scores: dict | None, total_steps: int, target_rank: int):
    """The teacher's rank budget was spent in train_teacher.py; here every step is in AdaLoRA's
    final phase (final_warmup = total_steps): the scores learnt there stay frozen, and each step
    masks E to the target rank with them, so its pruned ranks stay pruned."""
    if scores is None:
        print("note: the teacher checkpoint has no AdaLoRA rank scores; its ranks are not pruned further")
        return None
    allocator = elite.RankAllocator(teacher, total_steps, target_rank, init_warmup=0, final_warmup=total_steps)
    allocator.load_state_dict(scores)
    return allocator


def setup_elite(args, root: Path, device, resumed: dict | None) -> Setup:
    # The run's config as its checkpoints record it: the flags, with what the teacher brings
    # (its labels, its AdaLoRA budget) or, on --resume, what the run started with.
    config = runs.config_of(args) | {"teacher": teacher_path(args, resumed)}
    teacher, allocator_state = elite_teacher(args, config, device, resumed)
    joint = teacher is not None and config["teacher_mode"] == "joint"

    # With a teacher, each training scan also brings its camera crop and the points in it.
    camera = dict(camera=True, crop_hw=teacher.cfg.crop_hw, dense=config["labels"] == "plg",
                  derived=args.derived_dir) if teacher else {}
    missing = semantickitti.missing_pseudo_labels(root, args.train_sequences, args.derived_dir) if camera.get("dense") else 0
    if missing:
        raise scandata.DataError(f"{args.derived_dir or root}: {missing} training scans have no SAM-PLG pseudo-labels "
                                 "(sequences/XX/image_2_plg/); train_teacher.py makes them, or pass --labels sparse")
    train_set = semantickitti.SemanticKITTI(root, args.train_sequences, train=True, seed=args.seed, cutmix=args.cutmix,
                                            **camera)
    val_set = semantickitti.SemanticKITTI(root, args.val_sequences, train=False)
    semantickitti.check_datasets(train_set, val_set)
    loader, val_loader = runs.make_loaders(train_set, val_set, args.batch_size, args.val_batch_size, args.workers,
                                            args.seed, pin_memory=device.type == "cuda")

    torch.manual_seed(args.seed)  # the student's initial weights never depend on what was built before it (a teacher)
    model = elite.Student()
    if args.init_3d is not None and resumed is None:
        runs.load_2dpass_student(model, args.init_3d)
    model.to(device)
    # PPMSKD's 3D heads, training only; without a teacher with --heads-3d (deep supervision, no KD)
    heads = elite.heads_3d().to(device) if teacher or config.get("heads_3d") else None
    parts = [model] + ([heads] if heads is not None else [])
    if teacher is not None:
        if joint:
            parts.append(teacher)  # one optimiser for both, as upstream: its adapters, decoders and heads
        else:
            teacher.eval()  # frozen: its tensors stay out of the optimiser; it runs without gradients
    optimizer = runs.make_optimizer([p for part in parts for p in part.parameters() if p.requires_grad], lr=args.lr)
    allocator = continued_rank_allocator(teacher, allocator_state, args.epochs * len(loader), config["target_rank"]) \
        if joint and teacher.cfg.peft == "adalora" else None
    if resumed is not None:
        runs.load_state(model, resumed["model"], args.out / "last.pt")
        if heads is not None:
            runs.load_state(heads, resumed["heads_3d"], args.out / "last.pt")
        runs.load_optimizer_state(optimizer, resumed, args.out / "last.pt")
    weight = elite.class_weights().to(device)
    kd_weight = config.get("kd_weight") or elite.LAMBDA_XM  # a run from before the flag: the paper's

    def loss_terms(batch):
        batch = batch.to(device)
        out = model(batch.points, batch.batch_idx)
        if teacher is not None:
            return elite.elite_losses(out, heads, teacher, batch, weight, joint=joint, lambda_xm=kd_weight)
        terms = {"seg3d_main": elite.seg_loss(out.logits, batch.labels, weight, elite.LAMBDA_LOVASZ)}
        if heads is not None:  # --heads-3d: PPMSKD's 3D heads and their losses, no KD
            terms |= elite.deep_supervision_losses(out, [h(f) for h, f in zip(heads, out.stage_feats)], batch, weight)
        return terms

    def scores(batch):  # validation: the in-range points of each scan
        batch = batch.to(device)
        return model(batch.points, batch.batch_idx).logits, batch.labels

    def checkpoints(run: runs.RunState, miou: float) -> tuple[dict, dict]:
        best = runs.student_state(model) | run.record(miou) | {"config": config}  # the 1.9M student only
        # last.pt can resume: the optimiser, and with a teacher its 3D heads and trained tensors.
        return best | {"optimizer": optimizer.state_dict(),
                       "heads_3d": heads.state_dict() if heads is not None else None,
                       "teacher": runs.teacher_state(teacher) if teacher is not None else None,
                       "rank_allocator": allocator.state_dict() if allocator is not None else allocator_state}, best

    if teacher is None:
        describe = "none (the baseline: the student alone" + (", with PPMSKD's 3D heads, no KD)" if heads else ")")
    else:
        describe = (f"{config['teacher']} (SAM {teacher.cfg.variant}, {config['teacher_mode']}, {config['labels']} 2D "
                    f"labels, crop {teacher.cfg.crop_hw[0]}x{teacher.cfg.crop_hw[1]}; KD weight lambda_xm {kd_weight})")
    return Setup(model, loader, optimizer, parts, loss_terms, lambda: runs.evaluate(model, val_loader, scores),
                 checkpoints, allocator.step if allocator is not None else None, describe, val_set)


# ---- The LiDAR-only baseline on nuScenes ----

def setup_nusc_baseline(args, root: Path, device, resumed: dict | None) -> Setup:
    """The voxel student with nuScenes' range, grid and 17 classes, CE + Lovasz unweighted
    (2DPASS-nuscenes.yaml has no class weights and lambda_lovasz 1): U2MKD's comparison."""
    config = runs.config_of(args) | {"teacher": "none"}
    train_set = nusc.NuScenesScans(root, args.version, "train", train=True, seed=args.seed)
    val_set = nusc.NuScenesScans(root, args.version, "val")
    loader, val_loader = runs.make_loaders(train_set, val_set, args.batch_size, args.val_batch_size, args.workers,
                                            args.seed, pin_memory=device.type == "cuda")
    model = elite.Student(elite.student_config("nuscenes")).to(device)
    optimizer = runs.make_optimizer(model.parameters(), lr=args.lr)
    if resumed is not None:
        runs.load_state(model, resumed["model"], args.out / "last.pt")
        runs.load_optimizer_state(optimizer, resumed, args.out / "last.pt")

    def loss_terms(batch):
        batch = batch.to(device)
        return {"seg3d_main": elite.seg_loss(model(batch.points, batch.batch_idx).logits, batch.labels, None, 1.0)}

    def scores(batch):  # validation: the in-range points of each keyframe
        batch = batch.to(device)
        return model(batch.points, batch.batch_idx).logits, batch.labels

    def checkpoints(run: runs.RunState, miou: float) -> tuple[dict, dict]:
        best = runs.student_state(model) | run.record(miou) | {"config": config}
        return best | {"optimizer": optimizer.state_dict()}, best

    return Setup(model, loader, optimizer, [model], loss_terms,
                 lambda: runs.evaluate(model, val_loader, scores, runs.new_confusion("nuscenes")), checkpoints, None,
                 "none (the LiDAR-only baseline)", val_set)


# ---- U2MKD: the fusion student, with KD from the LiDAR teacher ----

def u2mkd_data(args, root: Path, config: dict, teacher_sweeps: int | None):
    """(training set, validation set, student config) of the fusion student."""
    image_size, with_teacher = config["image_size"], teacher_sweeps is not None
    if args.dataset == "nuscenes":
        train_set = u2mkd.NuScenesPairData(root, args.version, "train", train=True, seed=args.seed, image_hw=image_size,
                                           camera_drop=config["camera_drop"], teacher_view=with_teacher,
                                           sweeps=teacher_sweeps or 0)
        val_set = u2mkd.NuScenesPairData(root, args.version, "val", image_hw=image_size)
        return train_set, val_set, elite.student_config("nuscenes")
    train_set = u2mkd.PairData(root, args.train_sequences, train=True, seed=args.seed, image_hw=image_size,
                               image_drop=config["image_drop"], teacher_view=with_teacher)
    val_set = u2mkd.PairData(root, args.val_sequences, train=False, image_hw=image_size)
    semantickitti.check_datasets(train_set, val_set)
    return train_set, val_set, elite.student_config("semantickitti")


def setup_u2mkd(args, root: Path, device, resumed: dict | None) -> Setup:
    config = runs.config_of(args) | {"teacher": teacher_path(args, resumed)}
    if resumed is not None:  # the run continues as it started
        config |= {"image_size": tuple(resumed["image_hw"])} | {
            key: resumed["config"].get(key) for key in ("image_drop", "camera_drop")}
    image_size = config["image_size"]
    teacher, teacher_sweeps = None, None
    if config["teacher"] != "none":
        teacher, teacher_ckpt = runs.load_lidar_teacher(config["teacher"], map_location=device)
        teacher.to(device).eval().requires_grad_(False)  # frozen, in eval mode, as upstream
        teacher_sweeps = teacher_ckpt.get("config", {}).get("sweeps") or 0  # what it was trained on
    train_set, val_set, cfg = u2mkd_data(args, root, config, teacher_sweeps)
    if teacher is not None and teacher.cfg.num_classes != cfg.num_classes:
        raise scandata.DataError(f"{config['teacher']}: a LiDAR teacher of {teacher.cfg.num_classes} classes, but "
                                 f"--dataset {args.dataset} has {cfg.num_classes}: train the teacher on this dataset")
    loader, val_loader = runs.make_loaders(train_set, val_set, args.batch_size, args.val_batch_size, args.workers,
                                            args.seed, u2mkd.collate_pairs, device.type == "cuda")
    torch.manual_seed(args.seed)  # the student's initial weights never depend on what was built before it (a teacher)
    model = u2mkd.FusionStudent(cfg).to(device)
    if args.image_weights is not None and resumed is None:
        runs.load_imagenet_weights(model.image, args.image_weights)
    adapter = u2mkd.kd_adapter(model.cfg.hidden, teacher.cfg.hidden).to(device) if teacher else None
    parts = [model] + ([adapter] if adapter is not None else [])
    params = [p for part in parts for p in part.parameters()]
    optimizer = runs.make_optimizer(params, lr=runs.scaled_lr(args)[0])  # one lr, the schedule's peak, as upstream
    if resumed is not None:
        runs.load_state(model, resumed["model"], args.out / "last.pt")
        if adapter is not None:
            runs.load_state(adapter, resumed["kd_adapter"], args.out / "last.pt")
        runs.load_optimizer_state(optimizer, resumed, args.out / "last.pt")

    def loss_terms(batch):
        b = batch.to(device)
        out = model(b.lidar.points, b.lidar.batch_idx, b.images, b.image_of_point, b.uv, b.splat)
        targets = u2mkd.teacher_targets(teacher, b) if teacher is not None else None
        return u2mkd.u2mkd_losses(out, b, targets, adapter)

    def scores(batch):  # validation: the 3D prediction with the images, in-range points
        b = batch.to(device)
        return model(b.lidar.points, b.lidar.batch_idx, b.images, b.image_of_point, b.uv, b.splat).logits, \
            b.lidar.labels

    def checkpoints(run: runs.RunState, miou: float) -> tuple[dict, dict]:
        best = runs.fusion_state(model, image_size) | run.record(miou) | {"config": config}
        return best | {"optimizer": optimizer.state_dict(),
                       "kd_adapter": adapter.state_dict() if adapter is not None else None}, best

    describe = (f"LiDAR teacher {config['teacher']} ({runs.count_parameters(teacher):,} parameters, frozen)"
                if teacher else "none (the fusion student without KD)")
    drop = (f"{config['camera_drop']} of the 6 cameras dropped per training keyframe" if args.dataset == "nuscenes"
            else f"dropped with p {config['image_drop']}")
    describe += f"; camera images resized to {image_size[0]}x{image_size[1]}, {drop}"
    if teacher is not None and teacher_sweeps:
        describe += f"; the teacher sees {teacher_sweeps} sweeps around each keyframe, as it was trained"
    return Setup(model, loader, optimizer, parts, loss_terms, lambda: runs.evaluate(model, val_loader, scores, runs.new_confusion(args.dataset)),
                 checkpoints, None, describe, val_set)



def main(argv=None):
    args = parse_args(argv)
    device = runs.init_distributed(args.device, args.sync_bn)
    world = runs.distributed()
    kind = runs.STUDENT_KIND if args.method == "elite" else runs.FUSION_KIND
    runs.claim_run_folder(args.out, kind, args.resume, args.overwrite)
    last_path, best_path = args.out / "last.pt", args.out / "best.pt"
    resumed = runs.load_last(last_path, kind, map_location=device) if args.resume else None
    changes = runs.resume_settings(args, resumed["config"], RESUME_KEEPS, last_path) if resumed else ""
    torch.manual_seed(args.seed)  # the same initial weights in every process
    root = runs.training_root(args)
    setup = (setup_u2mkd if args.method == "u2mkd" else
             setup_nusc_baseline if args.dataset == "nuscenes" else setup_elite)(args, root, device, resumed)
    run = runs.RunState.resumed(resumed) if resumed is not None else runs.RunState()
    lr, scaled = runs.scaled_lr(args)  # U2MKD's recipes name the global batch their lr is meant for
    schedule = runs.lr_schedule(args.lr_schedule, lr, args.epochs, len(setup.loader), world.size)
    title = ("the U2MKD fusion student" if args.method == "u2mkd" else
             "the LiDAR-only baseline" if args.dataset == "nuscenes" else "the ELiTe student")
    runs.print_summary(f"train_student.py: {title}" + (" on nuScenes" if args.dataset == "nuscenes" else ""), {
        "device": runs.describe_device(device, args.amp),
        "convolutions": runs.describe_conv(device),
        "data": runs.describe_data(root, setup.loader.dataset, setup.val_set, args),
        "student": f"{type(setup.model).__name__}, {runs.count_parameters(setup.model):,} parameters"
                   + (f", initialised from {args.init_3d} (2DPASS)" if args.init_3d else ""),
        "teacher": setup.describe,
        "preset": presets.describe_preset(args.preset, presets_of(args.method, args.dataset)[args.preset], args),
        "schedule": runs.describe_schedule(args, len(setup.loader), schedule, "scans", scaled),
        "validation": runs.describe_validation(args),
        "outputs": runs.describe_outputs(args.out, args.save_every),
        "start": run.start(last_path, resumed is not None, changes=changes)})
    torch.manual_seed(args.seed + world.rank)  # from here on, each process draws its own numbers
    objective = runs.data_parallel(runs.Objective(setup.parts, setup.loss_terms), args.sync_bn,
                                    some_unused=args.method == "u2mkd")  # scans without images

    def save(run, miou, improved):
        last, best = setup.checkpoints(run, miou)
        if improved:  # best.pt first: a failed write leaves last.pt at the epoch before, which a resume redoes
            runs.atomic_save(best, best_path)
        runs.atomic_save(last, last_path)

    conf = runs.fit(run, setup.loader, setup.optimizer, objective, schedule, setup.validate, save,
                    setup.after_backward, amp_device=device if args.amp else None,
                    metrics_csv=args.out / "metrics.csv", save_every=args.save_every, last_path=last_path,
                    overwrite=args.overwrite)
    runs.close_distributed()
    if conf is None:
        print(f"Nothing to train: {last_path} has trained {run.epoch} epochs, --epochs asks for {args.epochs}")
        return
    print(f"\nValidation after the last epoch ({runs.val_name(args)}, in-range points):\n{conf.table()}")
    print(runs.which_checkpoint(last_path, best_path, conf.miou(), run.best_miou))


if __name__ == "__main__":
    runs.run_script(main)
