"""Train the ELiTe/2DPASS LiDAR student (1.9M parameters) on SemanticKITTI, with or without
the SAM teacher (stage 2 of ELiTe: PPMSKD).

    python train_student.py                       # embedded default: synthetic scenes, CPU, a few minutes
    python train_student.py --data /path/to/SemanticKITTI/dataset   # the paper's recipe (64 epochs, batch 4)

Without --data, synthetic scenes are written once in the real SemanticKITTI layout under
./data/synthkitti and read back through the same loader as the real dataset.

Teacher (--teacher): the checkpoint train_teacher.py wrote (default runs/teacher/best.pt when
it exists; 'none' trains the baseline). Each step the teacher sees the scans' camera crops and
PPMSKD distils it into the student at four stages (elite.elite_losses):
  --teacher-mode joint   the paper: the teacher's adapters, patch decoders and 2D heads keep
                         learning from their 2D losses (and AdaLoRA's orthogonality term),
                         in the same optimiser as the student;
  --teacher-mode frozen  the teacher is fixed and only hands over its (detached) predictions.
Whatever the mode, best.pt holds only the 1.9M student, so infer.py reads it as any student.

Recipe (official ELiTe config): SGD + Nesterov, lr 0.24, momentum 0.9, weight decay 1e-4,
cosine decay per iteration, global gradient norm clipped at 1, steps with non-finite
gradients skipped; student loss = class-weighted CE + 0.1 Lovasz-softmax, plus the PPMSKD
terms with a teacher; validation mIoU of the student each epoch.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import elite

# Two named presets. "paper" is the official setting; "embedded" is a small setting that
# finishes on a laptop CPU and is NOT comparable with published numbers.
PRESETS = {
    "paper": dict(epochs=64, batch_size=4, val_batch_size=8, workers=8),
    "embedded": dict(epochs=12, batch_size=2, val_batch_size=4, workers=0),
}
SYNTH_ROOT = Path("data/synthkitti")
SYNTH_COLUMNS = 512  # LiDAR azimuth steps of the embedded scenes (~25k points a scan)
DEFAULT_TEACHER = Path("runs/teacher/best.pt")  # what train_teacher.py writes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help="SemanticKITTI root holding sequences/XX/{velodyne,labels}; "
                        f"default: synthetic scenes made once under {SYNTH_ROOT}")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="'paper' (64 epochs, batch 4) is the default with --data, "
                        "'embedded' (12 epochs, batch 2) without")
    p.add_argument("--teacher", default=None,
                   help="teacher checkpoint from train_teacher.py, or 'none' for the student alone (the "
                        f"baseline); default: {DEFAULT_TEACHER} when it exists, else none")
    p.add_argument("--teacher-mode", choices=("joint", "frozen"), default="joint",
                   help="joint (the paper): the teacher's adapters, patch decoders and 2D heads train on with "
                        "their 2D losses; frozen: the teacher is fixed (cheaper)")
    p.add_argument("--labels", choices=("plg", "sparse"), default=None,
                   help="2D labels of the teacher's losses: plg (dense SAM-PLG pseudo-labels) or sparse "
                        "(projected point labels); default: those the teacher was trained with")
    p.add_argument("--sam-checkpoint", type=Path, default=None,
                   help="SAM file for the teacher's frozen encoder, if it moved since train_teacher.py "
                        "(the teacher checkpoint records the path)")
    p.add_argument("--epochs", type=int, help="override the preset's number of epochs")
    p.add_argument("--batch-size", type=int, help="override the preset's training batch size (scans)")
    p.add_argument("--val-batch-size", type=int, help="override the preset's validation batch size")
    p.add_argument("--workers", type=int, help="data-loading processes (preset: 8 paper, 0 embedded)")
    p.add_argument("--lr", type=float, default=0.24, help="peak learning rate (official: 0.24)")
    p.add_argument("--train-sequences", nargs="+", default=elite.SPLITS["train"],
                   help="training sequences (official: 00-07 09 10; missing ones are skipped with a warning)")
    p.add_argument("--val-sequences", nargs="+", default=elite.SPLITS["val"],
                   help="validation sequences (official: 08)")
    p.add_argument("--out", type=Path, default=Path("runs/student"),
                   help="folder for last.pt and best.pt (checkpoints with the config inside)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when present, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, shuffling and augmentation")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset or ("paper" if args.data else "embedded")]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.preset = args.preset or ("paper" if args.data else "embedded")
    return args


def make_loaders(args, root: Path, teacher: elite.Teacher | None):
    """With a teacher, each training scan also brings its camera crop and the points in it."""
    camera = dict(camera=True, crop_hw=teacher.cfg.crop_hw, dense=args.labels == "plg") if teacher else {}
    train_set = elite.SemanticKITTI(root, elite.existing_sequences(root, args.train_sequences), train=True,
                                    seed=args.seed, **camera)
    val_set = elite.SemanticKITTI(root, elite.existing_sequences(root, args.val_sequences), train=False)
    if not all(train_set.has_labels):
        raise elite.DataError(f"{root}: some training scans have no labels/*.label file")
    if camera.get("dense") and elite.missing_pseudo_labels(root, args.train_sequences):
        raise elite.DataError(f"{root}: {elite.missing_pseudo_labels(root, args.train_sequences)} training scans "
                              "have no SAM-PLG pseudo-labels (sequences/XX/image_2_plg/); train_teacher.py makes "
                              "them, or pass --labels sparse")
    shuffle_gen = torch.Generator()
    train = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, drop_last=len(train_set) >= args.batch_size,
        num_workers=args.workers, collate_fn=elite.collate, generator=shuffle_gen,
        persistent_workers=False, pin_memory=args.device.startswith("cuda"))
    val = torch.utils.data.DataLoader(
        val_set, batch_size=args.val_batch_size, shuffle=False, num_workers=args.workers,
        collate_fn=elite.collate)
    return train, val, shuffle_gen


@torch.no_grad()
def validate(model, loader, device) -> elite.ConfusionMatrix:
    """Argmax over the in-range points of each validation scan, one confusion matrix."""
    model.eval()
    conf = elite.ConfusionMatrix()
    for batch in tqdm(loader, desc="  validate", leave=False, dynamic_ncols=True):
        batch = batch.to(device)
        conf.add(model(batch.points, batch.batch_idx).logits.argmax(1), batch.labels)
    model.train()
    return conf


def load_teacher(args, device, resumed: dict | None):
    """The teacher for this run, or None for the baseline. A resumed run takes the teacher,
    mode and labels it was started with (its last.pt holds the teacher's trained tensors)."""
    if resumed is not None:
        for key in ("teacher", "teacher_mode", "labels", "target_rank"):
            setattr(args, key, resumed["config"].get(key))
        if resumed.get("teacher") is None:
            return None, None
        return elite.load_teacher_state(resumed["teacher"], args.sam_checkpoint).to(device), resumed.get("rank_allocator")
    if args.teacher is None:
        args.teacher = str(DEFAULT_TEACHER) if DEFAULT_TEACHER.is_file() else "none"
    if args.teacher == "none":
        return None, None
    teacher, ckpt = elite.load_teacher(args.teacher, args.sam_checkpoint, map_location=device)
    args.labels = args.labels or ckpt["config"]["labels"]
    args.target_rank = ckpt["config"].get("target_rank", 8)
    return teacher.to(device), ckpt.get("rank_allocator")


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    root = args.data
    if root is None:
        import synthkitti
        root = SYNTH_ROOT
        print(f"No --data given: using synthetic scenes in {root} (embedded preset; "
              "pass --data for SemanticKITTI)")
        synthkitti.make_dataset(root, columns=SYNTH_COLUMNS, seed=args.seed)
        args.train_sequences = [s for s in args.train_sequences if s in synthkitti.DEFAULT_SEQUENCES]

    last_path, best_path = args.out / "last.pt", args.out / "best.pt"
    resumed = elite.load_checkpoint(last_path, elite.STUDENT_KIND, map_location=device) if args.resume else None
    teacher, allocator_state = load_teacher(args, device, resumed)
    joint = teacher is not None and args.teacher_mode == "joint"
    train_loader, val_loader, shuffle_gen = make_loaders(args, root, teacher)

    model = elite.Student().to(device)
    heads = elite.heads_3d().to(device) if teacher else None  # PPMSKD's 3D heads, training only
    params = [p for p in model.parameters() if p.requires_grad]
    if teacher is not None:
        params += list(heads.parameters())
        if joint:
            params += teacher.trainable_parameters()  # one optimiser for both, as upstream
        else:
            teacher.eval()  # frozen: its tensors stay out of the optimiser; it runs without gradients
    optimizer = elite.make_optimizer(params, lr=args.lr)
    total_steps = args.epochs * len(train_loader)
    allocator = None
    if joint and teacher.cfg.peft == "adalora":
        if allocator_state is None:
            print("note: the teacher checkpoint has no AdaLoRA rank scores; its ranks are not pruned further")
        else:
            # The teacher's rank budget was spent in train_teacher.py: keep its pruned ranks pruned
            # (AdaLoRA's final phase: mask to the target rank each step with the scores it learnt).
            allocator = elite.RankAllocator(teacher, total_steps, args.target_rank, init_warmup=0,
                                            final_warmup=total_steps)
            allocator.load_state_dict(allocator_state)
    weight = elite.class_weights().to(device)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    start_epoch, best_miou, step = 0, -1.0, 0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        if heads is not None:
            heads.load_state_dict(resumed["heads_3d"])
        optimizer.load_state_dict(resumed["optimizer"])
        start_epoch, best_miou, step = resumed["epoch"] + 1, resumed["best_miou"], resumed["step"]
        print(f"Resumed from {last_path}: epoch {start_epoch}, best mIoU {100 * best_miou:.1f}")

    if teacher is None:
        kd = "no teacher (baseline)"
    else:
        kd = (f"teacher {args.teacher} (SAM {teacher.cfg.variant}, {args.teacher_mode}, {args.labels} 2D labels, "
              f"crop {teacher.cfg.crop_hw[0]}x{teacher.cfg.crop_hw[1]})")
    print(f"Student: {elite.count_parameters(model):,} parameters | {kd} | device {device} | preset {args.preset} | "
          f"{len(train_loader.dataset)} training scans, {len(val_loader.dataset)} validation scans | "
          f"{args.epochs} epochs x {len(train_loader)} steps | checkpoints in {args.out}")
    start = time.time()
    conf = None
    skipped = 0
    for epoch in range(start_epoch, args.epochs):
        train_loader.dataset.epoch = epoch  # new augmentation each epoch, reproducible on resume
        shuffle_gen.manual_seed(args.seed * 1000 + epoch)
        sums: dict[str, float] = {}
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True)
        for batch in bar:
            batch = batch.to(device)
            lr = args.lr * elite.cosine_factor(step, total_steps)  # cosine decay per iteration
            for group in optimizer.param_groups:
                group["lr"] = lr
            out = model(batch.points, batch.batch_idx)
            if teacher is None:
                terms = {"seg3d_main": elite.seg_loss(out.logits, batch.labels, weight, lovasz_weight=0.1)}
            else:
                terms = elite.elite_losses(out, heads, teacher, batch, weight, joint=joint)
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if elite.clip_or_skip(params, max_norm=1.0):
                if allocator is not None:
                    allocator.step(step)  # after backward, before the optimiser step (official order)
                optimizer.step()
            else:
                skipped += 1
            step += 1
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.item()
            postfix = {"loss": f"{loss.item():.3f}", "main": f"{terms['seg3d_main'].item():.3f}"}
            if teacher is not None:
                postfix["kd"] = f"{sum(v.item() for k, v in terms.items() if k.startswith('xm')):.4f}"
            bar.set_postfix(postfix | {"lr": f"{lr:.4f}"})
        conf = validate(model, val_loader, device)
        miou = conf.miou()
        best_miou_now = max(best_miou, miou)
        progress = {"step": step, "epoch": epoch, "best_miou": best_miou_now, "miou": miou, "config": config}
        # last.pt can resume: the optimiser, and with a teacher its 3D heads and trained tensors.
        resume = {"optimizer": optimizer.state_dict(),
                  "heads_3d": heads.state_dict() if heads is not None else None,
                  "teacher": elite.teacher_state(teacher) if teacher is not None else None,
                  "rank_allocator": allocator.state_dict() if allocator is not None else allocator_state}
        elite.atomic_save(elite.student_state(model) | progress | resume, last_path)
        if miou > best_miou:
            best_miou = miou
            elite.atomic_save(elite.student_state(model) | progress, best_path)  # the 1.9M student only
        present = conf.present()
        means = " ".join(f"{k} {v / len(train_loader):.3f}" for k, v in sums.items())
        print(f"epoch {epoch + 1}: mean loss terms: {means}")
        print(f"epoch {epoch + 1}: val mIoU {100 * miou:.1f} (official, 19 classes) | "
              f"{100 * float(conf.iou()[present].mean()):.1f} over the {int(present.sum())} classes present | "
              f"best {100 * best_miou:.1f} | {time.time() - start:.0f} s")
    if skipped:
        print(f"{skipped} steps skipped for non-finite gradients")
    if conf is None:
        print(f"Nothing to train: {last_path} already finished {args.epochs} epochs")
        return
    print(f"\nValidation after the last epoch ({', '.join(args.val_sequences)}):\n{conf.table()}")
    print(f"\nBest checkpoint: {best_path} (val mIoU {100 * best_miou:.1f})")


if __name__ == "__main__":
    try:
        main()
    except elite.DataError as e:
        sys.exit(f"error: {e}")
