"""Train the ELiTe/2DPASS LiDAR student (1.9M parameters) on SemanticKITTI.

    python train_student.py                       # embedded default: synthetic scenes, CPU, a few minutes
    python train_student.py --data /path/to/SemanticKITTI/dataset   # the paper's recipe (64 epochs, batch 4)

Without --data, synthetic scenes are written once in the real SemanticKITTI layout under
./data/synthkitti and read back through the same loader as the real dataset.

Recipe (official ELiTe config): SGD + Nesterov, lr 0.24, momentum 0.9, weight decay 1e-4,
cosine decay per iteration, global gradient norm clipped at 1, steps with non-finite
gradients skipped; loss = class-weighted CE + 0.1 Lovasz-softmax; validation mIoU each epoch.
This is the "baseline" (no teacher) row of every ELiTe ablation.
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
    "embedded": dict(epochs=20, batch_size=2, val_batch_size=4, workers=0),
}
SYNTH_ROOT = Path("data/synthkitti")
SYNTH_COLUMNS = 512  # LiDAR azimuth steps of the embedded scenes (~25k points a scan)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help="SemanticKITTI root holding sequences/XX/{velodyne,labels}; "
                        f"default: synthetic scenes made once under {SYNTH_ROOT}")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="'paper' (64 epochs, batch 4) is the default with --data, "
                        "'embedded' (20 epochs, batch 2) without")
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


def make_loaders(args, root: Path):
    train_set = elite.SemanticKITTI(root, elite.existing_sequences(root, args.train_sequences), train=True, seed=args.seed)
    val_set = elite.SemanticKITTI(root, elite.existing_sequences(root, args.val_sequences), train=False)
    if not all(train_set.has_labels):
        raise elite.DataError(f"{root}: some training scans have no labels/*.label file")
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
    train_loader, val_loader, shuffle_gen = make_loaders(args, root)

    model = elite.Student().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = elite.make_optimizer(params, lr=args.lr)
    total_steps = args.epochs * len(train_loader)
    weight = elite.class_weights().to(device)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    start_epoch, best_miou, step = 0, -1.0, 0

    last_path, best_path = args.out / "last.pt", args.out / "best.pt"
    if args.resume:
        ckpt = elite.load_checkpoint(last_path, elite.STUDENT_KIND, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best_miou, step = ckpt["epoch"] + 1, ckpt["best_miou"], ckpt["step"]
        print(f"Resumed from {last_path}: epoch {start_epoch}, best mIoU {100 * best_miou:.1f}")

    print(f"Student: {elite.count_parameters(model):,} parameters | device {device} | preset {args.preset} | "
          f"{len(train_loader.dataset)} training scans, {len(val_loader.dataset)} validation scans | "
          f"{args.epochs} epochs x {len(train_loader)} steps | checkpoints in {args.out}")
    start = time.time()
    conf = None
    skipped = 0
    for epoch in range(start_epoch, args.epochs):
        train_loader.dataset.epoch = epoch  # new augmentation each epoch, reproducible on resume
        shuffle_gen.manual_seed(args.seed * 1000 + epoch)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True)
        for batch in bar:
            batch = batch.to(device)
            lr = args.lr * elite.cosine_factor(step, total_steps)  # cosine decay per iteration
            for group in optimizer.param_groups:
                group["lr"] = lr
            out = model(batch.points, batch.batch_idx)
            loss = elite.seg_loss(out.logits, batch.labels, weight, lovasz_weight=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if elite.clip_or_skip(params, max_norm=1.0):
                optimizer.step()
            else:
                skipped += 1
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4f}")
        conf = validate(model, val_loader, device)
        miou = conf.miou()
        state = elite.student_state(model) | {
            "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "best_miou": max(best_miou, miou), "miou": miou, "config": config}
        elite.atomic_save(state, last_path)
        if miou > best_miou:
            best_miou = miou
            elite.atomic_save(state, best_path)
        present = conf.present()
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
