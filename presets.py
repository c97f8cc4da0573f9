"""Every recipe of every trainer on one page: the presets of train_teacher.py and
train_student.py, each value with its source (the official config's key, or why it differs).
`--help` lists them from here, the start-up summary names them, README points here.

    RECIPES[(trainer, model, dataset)][preset name] -> Preset
        ("teacher", "sam", "semantickitti")    ELiTe's SAM image teacher
        ("teacher", "lidar", ...)              U2MKD's LiDAR teacher, on SemanticKITTI or nuScenes
        ("student", "elite", ...)              ELiTe's student; on nuScenes the LiDAR-only baseline
        ("student", "u2mkd", ...)              U2MKD's camera+LiDAR fusion student

"paper" is the official config (the default with --data); "paper-test" ELiTe's benchmark-submission
config; "embedded" a small setting that finishes on a laptop CPU on the synthetic scenes, NOT
comparable with published numbers (the default without --data). A flag given on the command line
wins over its preset's value.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import u2mkd
from semantickitti import SPLITS
from runs import show

TRAIN = SPLITS["train"]
STANDIN = Path("weights/sam_vit_tiny_synth.pth")  # the pretrained stand-in for SAM that pretrain_sam.py writes


@dataclass(frozen=True)
class Preset:
    """A named recipe: the value of each flag it sets and where that value comes from (the
    official config's key, or why it differs). A flag given on the command line wins."""
    about: str                                 # which config it is, and which results it reproduces
    values: dict[str, tuple[object, str]]     # flag (dest) -> (value, source)


# What both of ELiTe's stages take from each official config (the scripts add their own values).
ELITE_CONFIGS = {
    "paper": {  # ELiTe-semantickitti.yaml
        "train_sequences": (SPLITS["train"], "the train split"),
        "epochs": (64, "max_num_epochs: 64"),
        "batch_size": (4, "train_data_loader.batch_size: 4"),
        "workers": (8, "num_workers: 8"),
        "lr": (0.24, "learning_rate: 0.24"),
        "lr_schedule": ("step", "lr_scheduler: CosineAnnealingWarmRestarts, a per-iteration cosine")},
    "paper-test": {  # ELiTe-test-semantickitti.yaml
        "train_sequences": (SPLITS["train"] + SPLITS["val"], "trainval: True"),
        "epochs": (128, "max_num_epochs: 128"),
        "batch_size": (2, "train_data_loader.batch_size: 2"),
        "workers": (8, "num_workers: 8"),
        "lr": (0.24, "learning_rate: 0.24"),
        "lr_schedule": ("epoch", "lr_scheduler: CosineAnnealingLR, T_max 128 - 4, eta_min 1e-5, per epoch")},
}


# Named presets, each value with its source. Upstream trains the teacher jointly with the
# student; here it is trained first (stage 1) with the same config, then the student's joint run
# continues it (docs/differences.md). "embedded" is a small random ViT
# on small crops of the synthetic scenes, trained with AdamW because SGD at lr 0.24 moves a random
# encoder's heads too slowly for a few-minute run: it shows the pipeline runs and learns, and is
# NOT comparable with published numbers.
SAM_TEACHER_PAPER = {  # what both official configs set for the image teacher
    "variant": ("vit_b", "backbone_2d: vit_b"),
    "crop": ((320, 1024), "bottom_crop: [1024, 320]"),
    "val_batch_size": (4, "4 crops of ViT-B at a time"),
    "optimizer": ("sgd", "SGD, Nesterov, momentum 0.9, weight decay 1e-4")}
SAM_TEACHER = {
    "paper": Preset(
        "ELiTe-semantickitti.yaml, the official default config (the paper's validation results): sparse point "
        "labels, no SAM-PLG", ELITE_CONFIGS["paper"] | SAM_TEACHER_PAPER | {
            "labels": ("sparse", "pseudo_label: False"),
            "mask_source": ("sam", "SAM-PLG with SAM ViT-H, used only with --labels plg")}),
    "paper-test": Preset(
        "ELiTe-test-semantickitti.yaml, the benchmark-submission config (the paper's test-server results): "
        "SAM-PLG pseudo-labels, train + val", ELITE_CONFIGS["paper-test"] | SAM_TEACHER_PAPER | {
            "labels": ("plg", "pseudo_label: True"),
            "mask_source": ("sam", "SAM-PLG with SAM ViT-H (SAMPLG-semantickitti.yaml)")}),
    "embedded": Preset(
        "a small SAM-style ViT pretrained here on other synthetic streets, on the synthetic scenes, NOT comparable "
        "with published numbers", {
            "train_sequences": (TRAIN, "the train split; the synthetic scenes hold 00-03 of it"),
            "labels": ("plg", "shows SAM-PLG at work"),
            "variant": ("vit_tiny", "a small SAM-style ViT for CPU runs"),
            "sam_checkpoint": (STANDIN, "the pretrained stand-in for SAM (pretrain_sam.py; --sam-checkpoint none: "
                                        "random weights)"),
            "crop": ((160, 512), "half the paper's crop"),
            "mask_source": ("ideal", "the synthetic scenes' rendered regions stand in for SAM"),
            "epochs": (16, "a few CPU minutes"),
            "batch_size": (2, "small batches for a CPU"),
            "val_batch_size": (4, "small batches for a CPU"),
            "workers": (0, "data loading in the main process"),
            "optimizer": ("adamw", "SGD at 0.24 moves a random encoder's heads too slowly for a short run"),
            "lr": (0.01, "AdamW's rate"),
            "lr_schedule": ("step", "the paper's per-iteration cosine")}),
}
# U2MKD's LiDAR teacher. Its SemanticKITTI recipe is not released: "paper" takes the voxel
# student's (64 epochs, batch 4, lr 0.24); "embedded" is a few CPU minutes.
LIDAR_TEACHER = {
    "paper": Preset("the voxel student's recipe (U2MKD releases no SemanticKITTI teacher config)", {
        "train_sequences": (TRAIN, "the train split"),
        "epochs": (64, "ELiTe's max_num_epochs"),
        "batch_size": (4, "ELiTe's batch size"),
        "val_batch_size": (8, "ELiTe's val batch size"),
        "workers": (8, "num_workers: 8"),
        "lr": (0.24, "lr: 0.24"),
        "global_batch": (4, "ELiTe's batch on one GPU: the lr is scaled only for another global batch"),
        "lr_schedule": ("step", "cosine_warmup, per iteration")}),
    "embedded": Preset("a few CPU minutes on the synthetic scenes, NOT comparable with published numbers", {
        "train_sequences": (TRAIN, "the train split; the synthetic scenes hold 00-03 of it"),
        "epochs": (4, "a few CPU minutes"),
        "batch_size": (2, "small batches for a CPU"),
        "val_batch_size": (4, "small batches for a CPU"),
        "workers": (0, "data loading in the main process"),
        "lr": (0.24, "the paper's rate"),
        "global_batch": (2, "one process; the lr is not scaled"),
        "lr_schedule": ("step", "the paper's per-iteration cosine")}),
}

# U2MKD's LiDAR teacher on nuScenes (configs/nuscenes/train/spformer.yaml).
NUSC_LIDAR_TEACHER = {
    "paper": Preset("U2MKD's nuScenes teacher config (spformer.yaml: 25 epochs, batch 3 per GPU on 4 GPUs)", {
        "epochs": (25, "num_epochs: 25"),
        "batch_size": (3, "batch_size: 3 per GPU"),
        "val_batch_size": (8, "the ELiTe value"),
        "workers": (8, "num_workers: 8"),
        "lr": (0.24, "lr: 0.24"),
        "global_batch": (12, "3 per GPU x 4 GPUs (README: torchpack dist-run -np 4); the lr scales with the "
                             "global batch run, as the fusion student's"),
        "lr_schedule": ("step", "cosine_warmup, per iteration"),
        "sweeps": (4, "num_sweeps: 2, only_past: False: 2 past + 2 future")}),
    "embedded": Preset("a few CPU minutes on the synthetic nuScenes scenes, NOT comparable with published numbers", {
        "epochs": (4, "a few CPU minutes"),
        "batch_size": (2, "small batches for a CPU"),
        "val_batch_size": (2, "small batches for a CPU"),
        "workers": (0, "data loading in the main process"),
        "lr": (0.24, "the paper's rate"),
        "global_batch": (2, "one process; the lr is not scaled"),
        "lr_schedule": ("step", "the paper's per-iteration cosine"),
        "sweeps": (4, "as the paper preset")}),
}


# Named presets, each one official config (the source of every value beside it). "embedded"
# is a small setting that finishes on a laptop CPU and is NOT comparable with published numbers.
STUDENT = {  # ELiTe's student
    "paper": Preset(
        "ELiTe-semantickitti.yaml, the official default config: the paper's SemanticKITTI validation results "
        "(train on 00-07 09 10, score 08); the teacher's labels are its preset's (paper: sparse point labels)",
        ELITE_CONFIGS["paper"] | {
            "val_batch_size": (8, "val_data_loader.batch_size: 8"),
            "cutmix": (False, "no cutmix")}),
    "paper-test": Preset(
        "ELiTe-test-semantickitti.yaml, the benchmark-submission config: the paper's SemanticKITTI test-server "
        "results (08 is trained on too, so its score here is no validation figure); pass --init-3d with a 2DPASS "
        "checkpoint (pretrained3d: True) and a teacher trained with train_teacher.py --preset paper-test",
        ELITE_CONFIGS["paper-test"] | {
            "val_batch_size": (8, "val_data_loader.batch_size: 8"),
            "cutmix": (True, "cutmix: True, instance CutMix")}),
    "embedded": Preset(
        "a small CPU setting on the synthetic scenes, NOT comparable with published numbers", {
            "train_sequences": (TRAIN, "the train split; the synthetic scenes hold 00-03 of it"),
            "epochs": (12, "a few CPU minutes"),
            "batch_size": (2, "small batches for a CPU"),
            "val_batch_size": (4, "small batches for a CPU"),
            "workers": (0, "data loading in the main process"),
            "lr": (0.24, "the paper's rate"),
            "lr_schedule": ("step", "the paper's per-iteration cosine"),
            "cutmix": (False, "as the paper preset")}),
}
U2MKD_STUDENT_PAPER = {  # spformer_tsd_full_ours_star.yaml, U2MKD's student config (nuScenes)
    "epochs": (50, "num_epochs: 50"),
    "batch_size": (4, "batch_size: 4 per GPU"),
    "global_batch": (16, "4 per GPU x 4 GPUs (README: torchpack dist-run -np 4)"),
    "val_batch_size": (8, "the ELiTe value"),
    "workers": (8, "the ELiTe value"),
    "lr": (0.24, "lr: 0.24 for the global batch of 16"),
    "lr_schedule": ("step", "cosine_warmup, per iteration")}
FUSION_STUDENT = {  # U2MKD's fusion student (its SemanticKITTI recipe is not released: the nuScenes one)
    "paper": Preset(
        "U2MKD's student config (spformer_tsd_full_ours_star.yaml: 50 epochs, batch 4 per GPU on 4 GPUs); with "
        "another global batch the lr scales with it (linear scaling rule)", {
            "train_sequences": (TRAIN, "the train split")} | U2MKD_STUDENT_PAPER | {
            "image_size": ((376, 1241), "KITTI's full frame (nuScenes: 0.4 x 1600 x 900)")}),
    "embedded": Preset(
        "a small CPU setting on the synthetic scenes, NOT comparable with published numbers", {
            "train_sequences": (TRAIN, "the train split; the synthetic scenes hold 00-03 of it"),
            "epochs": (6, "a few CPU minutes"),
            "batch_size": (2, "small batches for a CPU"),
            "global_batch": (2, "one process; the lr is not scaled"),
            "val_batch_size": (4, "small batches for a CPU"),
            "workers": (0, "data loading in the main process"),
            "lr": (0.24, "the paper's rate"),
            "lr_schedule": ("step", "the paper's per-iteration cosine"),
            "image_size": ((188, 620), "half the KITTI frame")}),
}
NUSC_EMBEDDED_ABOUT = "a few CPU minutes on the synthetic nuScenes scenes, NOT comparable with published numbers"
NUSC_EMBEDDED = {  # what the baseline's and U2MKD's embedded presets share
    "epochs": (6, "a few CPU minutes"),
    "batch_size": (2, "small batches for a CPU"),
    "val_batch_size": (2, "small batches for a CPU"),
    "workers": (0, "data loading in the main process"),
    "lr": (0.24, "the paper's rate"),
    "lr_schedule": ("step", "the paper's per-iteration cosine")}
NUSC_BASELINE = {  # nuScenes-lidarseg: the LiDAR-only baseline (--method elite --teacher none)
    "paper": Preset(
        "2DPASS-nuscenes.yaml's recipe for this 4-scale 64-channel student (2DPASS's own nuScenes model is 6-scale "
        "256-channel)", {
            "epochs": (80, "max_num_epochs: 80"),
            "batch_size": (8, "train_data_loader.batch_size: 8"),
            "val_batch_size": (8, "val_data_loader.batch_size: 8"),
            "workers": (8, "num_workers: 8"),
            "lr": (0.24, "learning_rate: 0.24"),
            "lr_schedule": ("epoch", "lr_scheduler: CosineAnnealingLR, T_max 80 - 4, eta_min 1e-5, per epoch")}),
    "embedded": Preset(NUSC_EMBEDDED_ABOUT, NUSC_EMBEDDED),
}
NUSC_FUSION_STUDENT = {  # nuScenes-lidarseg: U2MKD's fusion student
    "paper": Preset(
        "U2MKD's student config (spformer_tsd_full_ours_star.yaml): 50 epochs, batch 4 per GPU on 4 GPUs, lr 0.24 "
        "for that global batch of 16 (scaled to the global batch run), images at 0.4, 3 of 6 cameras dropped",
        U2MKD_STUDENT_PAPER | {
            "image_size": (u2mkd.NUSC_IMAGE_HW, "im_cr: 0.4 of 1600 x 900"),
            "camera_drop": (u2mkd.CAMERA_DROP, "im_drop: 3")}),
    "embedded": Preset(NUSC_EMBEDDED_ABOUT, NUSC_EMBEDDED | {
        "global_batch": (2, "one process; the lr is not scaled"),
        "image_size": ((90, 160), "small images for a CPU"),
        "camera_drop": (u2mkd.CAMERA_DROP, "as the paper preset")}),
}

RECIPES = {
    ("teacher", "sam", "semantickitti"): SAM_TEACHER,
    ("teacher", "lidar", "semantickitti"): LIDAR_TEACHER,
    ("teacher", "lidar", "nuscenes"): NUSC_LIDAR_TEACHER,
    ("student", "elite", "semantickitti"): STUDENT,
    ("student", "u2mkd", "semantickitti"): FUSION_STUDENT,
    ("student", "elite", "nuscenes"): NUSC_BASELINE,
    ("student", "u2mkd", "nuscenes"): NUSC_FUSION_STUDENT,
}
NAMES = ("paper", "paper-test", "embedded")  # every preset name any recipe has (--preset's choices)


def apply_preset(args, preset: Preset) -> None:
    """Fill every flag the command line left unset (None) from the preset; args.from_preset
    lists them (a checkpoint's config keeps it)."""
    args.from_preset = []
    for key, (value, _) in preset.values.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
            args.from_preset.append(key)


def describe_preset(name: str, preset: Preset, args=None) -> str:
    """The preset's values, each with its source; with args, a flag given on the command line says so."""
    rows = []
    for key, (value, source) in preset.values.items():
        flag = "--" + key.replace("_", "-")
        if args is None or key in args.from_preset:
            rows.append(f"{flag} {show(value)}  ({source})")
        else:
            rows.append(f"{flag} {show(getattr(args, key))}  (given; the preset's is {show(value)}: {source})")
    return f"{name}: {preset.about}\n      " + "\n      ".join(rows)


def presets_epilog(presets: dict[str, Preset]) -> str:
    """--help's list of the presets, every value with its source."""
    return "presets (--preset), every value with where it comes from:\n" + "\n".join(
        "  " + describe_preset(name, preset).replace("\n      ", "\n    ") for name, preset in presets.items())
