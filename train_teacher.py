"""Stage 1 of ELiTe: make SAM-PLG pseudo-labels, then fine-tune the SAM image teacher.

    python train_teacher.py                     # embedded default: synthetic scenes, vit_tiny, CPU, a few minutes
    python train_teacher.py --data DATASET --sam-checkpoint sam_vit_b_01ec64.pth   # preset paper, on a GPU
    python train_teacher.py --data DATASET --preset paper-test --sam-checkpoint sam_vit_b_01ec64.pth \\
        --plg-checkpoint sam_vit_h_4b8939.pth   # the benchmark config: SAM-PLG pseudo-labels

The teacher is SAM's ViT image encoder, frozen, with AdaLoRA adapters on every linear layer
and four patch decoders that turn the token grid after each global-attention block into a
feature map at a quarter of the crop's resolution (upsampled bilinearly to the pixels a loss
reads); per-stage 2D heads and a fused head classify pixels. Only the
adapters, the patch decoders and the heads train.

Labels (--labels):
  plg     dense pseudo-labels from SAM-PLG (the benchmark config, paper-test). Missing files are generated
          first, under sequences/XX/image_2_plg/, with SAM (--mask-source sam, a GPU job) or,
          on the synthetic scenes, with the rendered regions as ideal masks (--mask-source ideal).
  sparse  the labels of the LiDAR points that project into the crop (the official default config, paper).

Loss: sum over the 4 stages of (lambda_seg2d / 4) (CE_w + Lovasz), plus (CE_w + Lovasz) of the
fused head, plus AdaLoRA's orthogonality term (0.1); optimiser as the student's (SGD + Nesterov,
lr 0.24, the preset's cosine schedule, clip 1, non-finite steps skipped; the embedded preset uses
AdamW, lr 0.01); AdaLoRA's rank allocator
prunes 12 -> 8 ranks per layer over the run. Validation: 2D mIoU of the fused head on the
projected points of the validation crops (official rules).

U2MKD's LiDAR-only teacher (--teacher lidar): the voxel student at twice the width (--width),
trained on points alone with strong augmentation: instance paste (--paste instances per scan,
cut once from the training scans into DATASET/u2mkd_instances.npz), then flip, rotation,
scaling and translation. Loss CE + Lovasz (as upstream's teacher); checkpoints in
runs/lidar_teacher; train_student.py --method u2mkd finds them.

    python train_teacher.py --teacher lidar     # embedded default
    python train_teacher.py --teacher lidar --data DATASET

Several GPUs, one process each (SAM-PLG and training both split by rank; --batch-size per process):
    torchrun --nproc_per_node 4 train_teacher.py --data DATASET --sam-checkpoint ... --plg-checkpoint ...
Pseudo-labels only, as separate jobs without torchrun:
    python train_teacher.py --data DATASET --plg-only --shard 0/4 --plg-checkpoint sam_vit_h_4b8939.pth
--amp: bf16 autocast for the forward passes.
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
import os
from dataclasses import asdict
from pathlib import Path

import torch

import elite
import nusc
import presets
import runs
import scandata
import semantickitti
import synthkitti


HELP_PRESETS = (("--teacher sam", ("teacher", "sam", "semantickitti")),
                ("--teacher lidar", ("teacher", "lidar", "semantickitti")),
                ("--teacher lidar --dataset nuscenes", ("teacher", "lidar", "nuscenes")))


def recipes_of(args) -> dict[str, presets.Preset]:
    """The presets of the teacher and dataset asked for (presets.py)."""
    return presets.RECIPES[("teacher", args.teacher, args.dataset)]


def make_parser() -> argparse.ArgumentParser:
    """Every flag of train_teacher.py, the presets listed at the end of --help."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runs.HelpFormatter,
                                epilog="\n\n".join(f"{label} " + presets.presets_epilog(presets.RECIPES[key])
                                                     for label, key in HELP_PRESETS))
    runs.add_data_flags(p, "velodyne,labels,image_2,calib.txt")
    p.add_argument("--teacher", choices=("sam", "lidar"), default="sam",
                   help="sam: ELiTe's image teacher (SAM-PLG, then SAM's ViT with adapters); lidar: U2MKD's "
                        "LiDAR-only teacher (the voxel student at twice the width, instance paste)")
    p.add_argument("--preset", choices=presets.NAMES, default=None,
                   help="a recipe (its values and their sources are listed at the end): 'paper' is the default "
                        "with --data, 'embedded' without; 'paper-test' (sam) is the benchmark-submission config")
    add_lidar_flags(p)
    add_sam_flags(p)
    runs.add_recipe_flags(p, "images or scans")
    p.add_argument("--out", type=runs.path_flag, default=None,
                   help="the run's folder: last.pt, best.pt, metrics.csv (default: runs/teacher, or runs/lidar_teacher "
                        "with --teacher lidar, runs/lidar_teacher_nusc on nuscenes); one run per folder; the SAM "
                        "teacher's hold only "
                        "the trained tensors + the SAM variant and path")
    p.add_argument("--derived-dir", type=runs.path_flag, default=None,
                   help="where files made from the dataset are written and read: SAM-PLG pseudo-labels "
                        "(DIR/sequences/XX/image_2_plg/) and the lidar teacher's instance database "
                        "(DIR/u2mkd_instances.npz); for a read-only dataset (default: inside --data)")
    runs.add_run_flags(p)
    return p


def add_lidar_flags(p) -> None:
    """The flags of U2MKD's LiDAR teacher."""
    p.add_argument("--paste", type=runs.count_int, default=None,
                   help="lidar, semantickitti: instances pasted into each training scan (0: no instance paste); "
                        "default: 5")
    p.add_argument("--sweeps", type=runs.count_int, default=None,
                   help="lidar, nuscenes: unlabelled LiDAR sweeps added around each training keyframe, half before "
                        "and half after (preset: 4, upstream's 2 past + 2 future)")
    p.add_argument("--width", type=runs.width_multiplier, default=2,
                   help="lidar: width multiplier of the voxel student (U2MKD: 2)")
    p.add_argument("--global-batch", type=runs.positive_int,
                   help="lidar: the global batch the preset's lr is meant for; with another batch x processes the "
                        "lr scales in proportion (preset: 12 on nuscenes, upstream's 4 GPUs x 3)")


def add_sam_flags(p) -> None:
    """The flags of ELiTe's SAM teacher and its SAM-PLG pseudo-labels."""
    p.add_argument("--variant", choices=sorted(elite.SAM_VARIANTS),
                   help="sam: SAM encoder (preset; vit_tiny is a small random ViT for CPU runs and tests, there "
                        "are no weights for it)")
    p.add_argument("--sam-checkpoint", type=runs.path_flag, default=None,
                   help="sam: official SAM file for --variant, e.g. sam_vit_b_01ec64.pth; 'none': a random encoder "
                        "(fine for the pipeline, useless for results); preset (embedded: the pretrained stand-in "
                        f"{presets.STANDIN}, paper: none)")
    p.add_argument("--peft", choices=elite.PEFT_CHOICES, default="adalora",
                   help="sam: adapters on every linear layer of every block: adalora (the paper), lora, or none")
    p.add_argument("--rank", type=runs.adapter_rank, default=12, help="sam: adapter rank (AdaLoRA starts at 12)")
    p.add_argument("--target-rank", type=runs.adapter_rank, default=8,
                   help="sam: AdaLoRA's final average rank per layer")
    p.add_argument("--labels", choices=("plg", "sparse"), default=None,
                   help="sam: 2D labels. plg: dense SAM-PLG pseudo-labels (paper-test, embedded); sparse: projected "
                        "point labels (paper, the official default config)")
    p.add_argument("--mask-source", choices=("sam", "ideal"), default=None,
                   help="sam: masks for SAM-PLG: sam (ViT-H, a GPU job) or ideal (the synthetic scenes' "
                        "rendered regions, image_2_gt/); preset")
    p.add_argument("--plg-variant", choices=("vit_b", "vit_l", "vit_h"), default="vit_h",
                   help="sam: SAM used for pseudo-labels (official: vit_h)")
    p.add_argument("--plg-checkpoint", type=runs.path_flag, default=None,
                   help="sam: official SAM file for --plg-variant, e.g. sam_vit_h_4b8939.pth (default: none; "
                        "needed with --mask-source sam)")
    p.add_argument("--plg-only", action="store_true", help="sam: generate the pseudo-labels and stop")
    p.add_argument("--vis", type=runs.path_flag, default=None,
                   help="sam: draw the pseudo-labels (making missing ones first) to VIS/sequences/XX/NNNNNN.png and "
                        "stop, without training: the camera frame with the labelled points, and with the dense "
                        "pseudo-labels blended in (official colours); default: no pictures")
    p.add_argument("--vis-every", type=runs.positive_int, default=1, help="with --vis, draw every k-th scan only")
    p.add_argument("--shard", default=None,
                   help="sam: i/n: this process makes pseudo-labels for scans i, i+n, ... (default 0/1; under "
                        "torchrun each process takes its rank's share by itself)")
    p.add_argument("--crop", type=runs.crop_side, nargs=2, metavar=("H", "W"),
                   help="sam: bottom crop of the camera frame (preset)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"),
                   help="sam: sgd, the student's recipe (Nesterov, momentum 0.9, weight decay 1e-4); adamw, weight "
                        "decay 1e-4 (preset)")


def parse_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    runs.given_flags(p, args, argv)
    runs.apply_conv_flag(p, args)
    refuse_flags_that_do_not_apply(p, args)
    runs.check_data_flags(p, args)
    args.paste = (5 if args.dataset == "semantickitti" else 0) if args.paste is None else args.paste
    args.preset = args.preset or ("paper" if args.data else "embedded")
    recipes = recipes_of(args)
    if args.preset not in recipes:
        p.error(f"--preset {args.preset} is ELiTe's benchmark-submission config; --teacher lidar has "
                f"{', '.join(recipes)}")
    if (args.plg_only or args.vis is not None) and args.labels is None:
        args.labels = "plg"  # they make pseudo-labels whatever the preset trains with
    presets.apply_preset(args, recipes[args.preset])
    if args.sam_checkpoint == Path("none"):
        args.sam_checkpoint = None  # a random encoder, asked for by name
    if args.plg_only and args.labels == "sparse":
        p.error("--plg-only makes pseudo-labels, --labels sparse trains without them: pick one")
    if args.vis is not None and args.labels == "sparse":
        p.error("--vis draws the pseudo-labels, --labels sparse makes none")
    if args.vis_every < 1:
        p.error("--vis-every must be at least 1")
    args.out = args.out or Path("runs/teacher" if args.teacher == "sam" else
                                "runs/lidar_teacher_nusc" if args.dataset == "nuscenes" else "runs/lidar_teacher")
    if args.teacher == "sam":
        finish_sam_args(p, args)
    return args


def refuse_flags_that_do_not_apply(p, args) -> None:
    """A flag of the other teacher or dataset is refused, never silently ignored."""
    sam_only = ("variant", "sam_checkpoint", "mask_source", "plg_checkpoint", "shard", "crop", "optimizer", "vis",
                "labels")
    if args.teacher == "sam" and args.global_batch is not None:
        p.error("--global-batch: for the LiDAR teacher (--teacher lidar); the SAM teacher's lr is not scaled")
    if args.vis is not None and args.resume:
        p.error("--vis draws the pseudo-labels and stops; it trains nothing to --resume")
    given = [f"--{k.replace('_', '-')}" for k in sam_only if getattr(args, k) is not None] + (["--plg-only"] * args.plg_only)
    if args.teacher == "lidar" and given:
        p.error(f"{', '.join(given)}: for the SAM teacher, not --teacher lidar")
    if args.dataset == "nuscenes" and args.teacher == "sam":
        p.error("--dataset nuscenes: the LiDAR teacher only (--teacher lidar); ELiTe's SAM teacher reads SemanticKITTI")
    if args.dataset == "nuscenes" and args.paste:
        p.error("--paste: instance paste is for SemanticKITTI (upstream's nuScenes teacher has inst_aug: False)")
    if args.dataset != "nuscenes" and args.sweeps is not None:
        p.error("--sweeps: nuScenes sweeps (--dataset nuscenes); SemanticKITTI's teacher reads one scan")


def finish_sam_args(p, args) -> None:
    """The SAM teacher's crop, its process's SAM-PLG shard and the flags that go together."""
    args.crop = tuple(args.crop)
    try:
        world, rank, _ = runs.launch_env()
    except scandata.DataError as e:
        p.error(str(e))
    if args.shard is not None and world > 1:
        p.error("--shard and torchrun both split SAM-PLG: under torchrun each process takes its rank's share")
    try:
        args.shard = runs.parse_shard(args.shard or f"{rank}/{world}")
    except ValueError as e:
        p.error(str(e))
    if args.mask_source == "sam" and args.labels == "plg" and args.plg_checkpoint is None:
        p.error("--mask-source sam needs --plg-checkpoint (e.g. sam_vit_h_4b8939.pth); "
                "on synthetic scenes --mask-source ideal needs none")
    if args.peft != "adalora" and args.target_rank != 8:
        p.error("--target-rank applies to --peft adalora only")
    if args.peft == "adalora" and args.target_rank > args.rank:
        p.error(f"--target-rank {args.target_rank} is above --rank {args.rank}: AdaLoRA prunes each adapter from "
                "its starting rank down to the target budget, never up; give a target at most the rank")


# ---- SAM-PLG: the dense labels the teacher learns from ----

def mask_name(args) -> str:
    """The mask source as the pseudo-labels' record keeps it (semantickitti.PLG_RECORD): ideal, or the SAM
    variant, its file's name and the mask options."""
    if args.mask_source == "ideal":
        return "ideal"
    return runs.SamMaskSource.record_name(f"sam {args.plg_variant} {Path(args.plg_checkpoint).name}")


def mask_weights(args) -> Path | None:
    """SAM's weights file the pseudo-labels are made with (its fingerprint is recorded), if any."""
    return Path(args.plg_checkpoint) if args.mask_source == "sam" else None


def make_pseudo_labels(args, root: Path, sequences: list[str], device: torch.device) -> None:
    if args.mask_source == "ideal":
        source, masks = synthkitti.IdealMaskSource(), "ideal: the synthetic scenes' rendered regions (image_2_gt/)"
    else:
        sam = runs.load_sam(args.plg_checkpoint, args.plg_variant, device=device)
        source = runs.SamMaskSource(sam, name=f"sam {args.plg_variant} {Path(args.plg_checkpoint).name}",
                                    weights=mask_weights(args))
        masks = f"SAM {args.plg_variant} ({args.plg_checkpoint})"
    scans = semantickitti.list_scans(root, sequences)
    i, n = args.shard
    check_writable(semantickitti.plg_path(scans[0], args.derived_dir).parent.parent.parent)
    runs.print_summary("train_teacher.py: SAM-PLG pseudo-labels", {
        "device": runs.describe_device(device),
        "data": f"{root}: {len(scans)} scans ({' '.join(sequences)}); this process makes shard {i}/{n}: "
                f"{len(scans[i::n])} scans, {semantickitti.missing_pseudo_labels(root, sequences, args.derived_dir)} of all "
                "still missing",
        "masks": masks,
        "outputs": f"{args.derived_dir or root}/sequences/XX/image_2_plg/NNNNNN.npy (written atomically; existing "
                   "files are kept)"})
    counts = runs.generate_pseudo_labels(root, sequences, source, shard=args.shard,
                                         progress=runs.distributed().main, derived=args.derived_dir)
    print(f"SAM-PLG ({args.mask_source} masks, shard {args.shard[0]}/{args.shard[1]}): "
          f"{counts['written']} written, {counts['existing']} already there")
    runs.barrier()  # under torchrun: every process's share is written


def draw_pseudo_labels(args, root: Path, sequences: list[str]) -> None:
    """--vis: this process's share of the scans, every k-th, drawn with their pseudo-labels."""
    from tqdm import tqdm
    i, n = args.shard
    scans = [s for s in semantickitti.list_scans(root, sequences)[i::n][::args.vis_every]
             if semantickitti.plg_path(s, args.derived_dir).is_file()]
    for scan in tqdm(scans, desc="drawing pseudo-labels", disable=not runs.distributed().main, dynamic_ncols=True):
        picture = runs.plg_picture(scan, semantickitti.sequence_calib(scan.parent.parent), args.derived_dir)
        runs.write_png(args.vis / "sequences" / scan.parent.parent.name / (scan.stem + ".png"), picture,
                       args.vis)
    print(f"Pseudo-labels of {len(scans)} scans drawn to {args.vis}/sequences/XX/NNNNNN.png")


def check_writable(folder: Path) -> None:
    """Files made from the dataset go inside it unless --derived-dir says elsewhere: on a
    read-only dataset, say so before any work rather than at the first file."""
    runs.writable_folder(folder, "for a read-only dataset pass --derived-dir DIR to write these files to DIR instead")


# ---- Training the SAM teacher ----

def make_optimizer(params, name: str, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return runs.make_optimizer(params, lr=lr)  # the student's recipe, as upstream
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)


def pseudo_labels_first(args, root: Path, device) -> bool:
    """SAM-PLG's part of a run: the missing pseudo-labels made (all of this shard's with
    --plg-only), or drawn with --vis -> whether the teacher's training follows."""
    missing = semantickitti.missing_pseudo_labels(root, args.train_sequences, args.derived_dir, mask_name(args),
                                                  mask_weights(args)) if args.labels == "plg" else 0
    if args.plg_only or missing:
        make_pseudo_labels(args, root, args.train_sequences, device)
    if args.vis is not None:  # pictures only: no training
        draw_pseudo_labels(args, root, args.train_sequences)
        return False
    if args.plg_only:
        return False
    if args.labels == "plg" and args.shard != (0, 1) and \
            semantickitti.missing_pseudo_labels(root, args.train_sequences, args.derived_dir):
        raise scandata.DataError(f"{root}: pseudo-labels of other shards are still missing; "
                                 "run the other shards (or drop --shard) before training")
    return True


def sam_teacher(args, ckpt: dict | None, last_path: Path) -> elite.Teacher:
    """A new teacher on the SAM file, or on --resume the same SAM file (the recorded one unless
    --sam-checkpoint says otherwise) with its trained tensors."""
    cfg = elite.TeacherConfig(variant=args.variant, peft=args.peft, rank=args.rank, crop_hw=args.crop)
    if ckpt is None:
        return runs.build_teacher(cfg, args.sam_checkpoint)
    if ckpt["teacher_config"] != asdict(cfg):
        raise scandata.DataError(f"{last_path}: holds a {ckpt['teacher_config']} teacher, the flags ask for {asdict(cfg)}")
    return runs.load_teacher_state(ckpt, args.sam_checkpoint, last_path)


def train_sam_teacher(args, root: Path, device, last_path: Path, best_path: Path, ckpt: dict | None, changes: str):
    """SAM-PLG (when the pseudo-labels are missing), then the SAM teacher's training; ckpt: the
    resumed run's last.pt, changes: what the resume changes (runs.resume_settings)."""
    if not pseudo_labels_first(args, root, device):
        return None
    # The student's dataset with its camera crops on: per scan, the crop and the points in it.
    train_set = semantickitti.SemanticKITTI(root, args.train_sequences, train=True, seed=args.seed, camera=True,
                                            crop_hw=args.crop, dense=args.labels == "plg", derived=args.derived_dir)
    val_set = semantickitti.SemanticKITTI(root, args.val_sequences, train=False, camera=True, crop_hw=args.crop)
    semantickitti.check_datasets(train_set, val_set)
    loader, val_loader = runs.make_loaders(train_set, val_set, args.batch_size, args.val_batch_size, args.workers,
                                            args.seed, pin_memory=device.type == "cuda")
    teacher = sam_teacher(args, ckpt, last_path).to(device)
    params = teacher.trainable_parameters()  # the adapters, patch decoders and heads
    optimizer = make_optimizer(params, args.optimizer, args.lr)
    allocator = (elite.RankAllocator(teacher, args.epochs * len(loader), args.target_rank)
                 if args.peft == "adalora" else None)
    weight = elite.class_weights().to(device)
    run = runs.RunState()
    if ckpt is not None:
        runs.load_optimizer_state(optimizer, ckpt, last_path)
        if allocator is not None:
            allocator.load_state_dict(ckpt["rank_allocator"])
        run = runs.RunState.resumed(ckpt)

    def loss_terms(batch):
        crops = batch.crops.to(device)
        terms, _ = elite.teacher_losses(teacher, teacher(crops.images), crops, weight, elite.LAMBDA_SEG2D)
        if args.peft == "adalora":
            terms["orth"] = elite.orth_regularizer(teacher, elite.ORTH_WEIGHT)
        return terms

    def scores(batch):  # validation: the fused head at the projected points of each crop
        crops = batch.crops.to(device)
        _, fused = teacher.classify(elite.pixel_features(teacher(crops.images), crops.pixels))  # (K, 20)
        return fused, crops.labels

    def save(run, miou, improved):
        state = runs.teacher_state(teacher) | run.record(miou) | {
            "optimizer": optimizer.state_dict(), "config": runs.config_of(args),
            "rank_allocator": allocator.state_dict() if allocator is not None else None}
        if improved:  # best.pt first: a failed write leaves last.pt at the epoch before, which a resume redoes
            runs.atomic_save(state, best_path)
        runs.atomic_save(state, last_path)

    trainable = sum(p.numel() for p in params)
    schedule = runs.lr_schedule(args.lr_schedule, args.lr, args.epochs, len(loader), runs.distributed().size)
    runs.print_summary("train_teacher.py: ELiTe's SAM image teacher", {
        "device": runs.describe_device(device, args.amp),
        "data": runs.describe_data(root, train_set, val_set, args)
                + f"; {args.labels} 2D labels, crops {args.crop[0]}x{args.crop[1]}",
        "teacher": f"SAM {args.variant} ({args.sam_checkpoint or 'random weights'}) with {args.peft} r={args.rank}: "
                   f"{trainable:,} trainable of {runs.count_parameters(teacher):,} parameters",
        "preset": presets.describe_preset(args.preset, recipes_of(args)[args.preset], args),
        "schedule": runs.describe_schedule(args, len(loader), schedule, "images"),
        "outputs": runs.describe_outputs(args.out, args.save_every),
        "start": run.start(last_path, args.resume, "2D mIoU", changes)})
    torch.manual_seed(args.seed + runs.distributed().rank)  # from here on, each process draws its own numbers
    objective = runs.data_parallel(runs.Objective([teacher], loss_terms), args.sync_bn)
    conf = runs.fit(run, loader, optimizer, objective, schedule, lambda: runs.evaluate(teacher, val_loader, scores), save,
                    allocator.step if allocator is not None else None, amp_device=device if args.amp else None,
                    metric="val 2D mIoU", metrics_csv=args.out / "metrics.csv", save_every=args.save_every,
                    last_path=last_path, overwrite=args.overwrite)
    if conf is None:
        print(f"Nothing to train: {last_path} has trained {run.epoch} epochs, --epochs asks for {args.epochs}")
    else:
        print(f"\n2D validation after the last epoch, projected points ({', '.join(args.val_sequences)}):\n"
              f"{conf.table()}")
    return run, conf


# ---- Training U2MKD's LiDAR teacher ----

def lidar_teacher_data(args, root: Path):
    """(training set, validation set, student config, what the teacher sees) of
    the LiDAR teacher. SemanticKITTI: instance paste, then flip, rotation, scaling, translation.
    nuScenes: the keyframe with --sweeps sweeps around it, then the same 3D augmentation."""
    import u2mkd
    if args.dataset == "nuscenes":
        train_set = nusc.NuScenesScans(root, args.version, "train", train=True, seed=args.seed, sweeps=args.sweeps)
        val_set = nusc.NuScenesScans(root, args.version, "val", sweeps=args.sweeps)  # as upstream validates
        return train_set, val_set, elite.student_config("nuscenes"), (
            f"the keyframe and {args.sweeps} sweeps around it, then flip, rotation, scaling, translation; "
            f"validation also reads the sweeps (their points are label 0: only the keyframe's are scored)")
    db_path = runs.instance_db_path(root, args.derived_dir)
    if args.paste > 0 and runs.distributed().main:  # one process cuts the database, the others wait
        if not db_path.is_file():
            check_writable(db_path.parent)
        runs.load_instance_db(root, args.train_sequences, derived=args.derived_dir)
    runs.barrier()
    db = runs.load_instance_db(root, args.train_sequences, derived=args.derived_dir) if args.paste > 0 else None
    train_set = u2mkd.LidarTeacherData(root, args.train_sequences, db, seed=args.seed, add_num=args.paste)
    val_set = semantickitti.SemanticKITTI(root, args.val_sequences, train=False)
    semantickitti.check_datasets(train_set, val_set)
    sees = (f"{args.paste} instances pasted per scan from {db_path} ({len(db)} instances), then flip, rotation, "
            "scaling, translation" if db is not None else "flip, rotation, scaling, translation (no instance paste)")
    return train_set, val_set, elite.student_config("semantickitti"), sees


def train_lidar_teacher(args, root: Path, device, last_path: Path, best_path: Path, ckpt: dict | None, changes: str):
    """U2MKD's LiDAR teacher (its arguments as train_sam_teacher's)."""
    import u2mkd
    train_set, val_set, cfg, sees = lidar_teacher_data(args, root)
    loader, val_loader = runs.make_loaders(train_set, val_set, args.batch_size, args.val_batch_size, args.workers,
                                            args.seed, pin_memory=device.type == "cuda")
    model = u2mkd.lidar_teacher(args.width, cfg).to(device)
    optimizer = runs.make_optimizer(model.parameters(), lr=runs.scaled_lr(args)[0])
    run = runs.RunState()
    if ckpt is not None:
        runs.load_state(model, ckpt["model"], last_path)
        runs.load_optimizer_state(optimizer, ckpt, last_path)
        run = runs.RunState.resumed(ckpt)

    def loss_terms(batch):
        batch = batch.to(device)
        logits = model(batch.points, batch.batch_idx).logits
        return {"seg3d": elite.seg_loss(logits, batch.labels, None, lovasz_weight=1.0)}  # CE + Lovasz, as upstream

    def scores(batch):  # validation: the in-range points of each scan
        batch = batch.to(device)
        return model(batch.points, batch.batch_idx).logits, batch.labels

    def save(run, miou, improved):
        best = runs.lidar_teacher_state(model) | run.record(miou) | {"config": runs.config_of(args)}
        if improved:  # best.pt first: a failed write leaves last.pt at the epoch before, which a resume redoes
            runs.atomic_save(best, best_path)
        runs.atomic_save(best | {"optimizer": optimizer.state_dict()}, last_path)

    lr, scaled = runs.scaled_lr(args)  # as the fusion student's: upstream's lr is for 4 GPUs x 3
    schedule = runs.lr_schedule(args.lr_schedule, lr, args.epochs, len(loader), runs.distributed().size)
    runs.print_summary("train_teacher.py --teacher lidar: U2MKD's LiDAR-only teacher", {
        "device": runs.describe_device(device, args.amp),
        "convolutions": runs.describe_conv(device),
        "data": runs.describe_data(root, train_set, val_set, args),
        "teacher": f"the voxel student at width x{args.width}, {runs.count_parameters(model):,} parameters",
        "augmentation": sees,
        "preset": presets.describe_preset(args.preset, recipes_of(args)[args.preset], args),
        "schedule": runs.describe_schedule(args, len(loader), schedule, "scans", scaled),
        "validation": runs.describe_validation(args),
        "outputs": runs.describe_outputs(args.out, args.save_every),
        "start": run.start(last_path, args.resume, changes=changes)})
    torch.manual_seed(args.seed + runs.distributed().rank)  # from here on, each process draws its own numbers
    objective = runs.data_parallel(runs.Objective([model], loss_terms), args.sync_bn)
    conf = runs.fit(run, loader, optimizer, objective, schedule, lambda: runs.evaluate(model, val_loader, scores, runs.new_confusion(args.dataset)), save,
                    amp_device=device if args.amp else None,
                    metrics_csv=args.out / "metrics.csv", save_every=args.save_every, last_path=last_path,
                    overwrite=args.overwrite)
    if conf is None:
        print(f"Nothing to train: {last_path} has trained {run.epoch} epochs, --epochs asks for {args.epochs}")
    else:
        print(f"\nValidation after the last epoch ({runs.val_name(args)}, in-range points):\n{conf.table()}")
    return run, conf



# What a resumed run keeps as it started: a flag that would change one of these is refused.
RESUME_KEEPS = ("teacher", "dataset", "version", "preset", "variant", "peft", "rank", "target_rank", "labels",
                "crop", "paste", "sweeps", "width", "optimizer", "global_batch", "seed")


def main(argv=None):
    args = parse_args(argv)
    device = runs.init_distributed(args.device, args.sync_bn)
    if args.vis is not None:
        runs.writable_folder(args.vis, "give another --vis")
    kind = runs.TEACHER_KIND if args.teacher == "sam" else runs.LIDAR_TEACHER_KIND
    if args.vis is None and not args.plg_only:  # a training run: OUT is its folder
        runs.claim_run_folder(args.out, kind, args.resume, args.overwrite)
    last_path, best_path = args.out / "last.pt", args.out / "best.pt"
    ckpt, changes = None, ""
    if args.resume and not args.plg_only:
        ckpt = runs.load_last(last_path, kind, map_location=device)
        changes = runs.resume_settings(args, ckpt["config"], RESUME_KEEPS, last_path)
    torch.manual_seed(args.seed)  # the same initial weights in every process
    root = runs.training_root(args)
    train = train_sam_teacher if args.teacher == "sam" else train_lidar_teacher
    result = train(args, root, device, last_path, best_path, ckpt, changes)
    runs.close_distributed()
    if result is not None and result[1] is not None:
        run, conf = result
        print(runs.which_checkpoint(last_path, best_path, conf.miou(), run.best_miou,
                                    "val 2D mIoU" if args.teacher == "sam" else "val mIoU"))


if __name__ == "__main__":
    runs.run_script(main)
