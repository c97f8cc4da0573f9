"""Pretrain a small SAM-style ViT on synthetic streets: a stand-in for SAM's own weights.

    python pretrain_sam.py                      # writes weights/sam_vit_tiny_synth.pth (a few CPU minutes)
    python train_teacher.py --sam-checkpoint weights/sam_vit_tiny_synth.pth

Why. ELiTe adapts a *pretrained* SAM with LoRA/AdaLoRA: the frozen encoder already groups
pixels into regions, and the adapters only steer it. The embedded preset has no SAM (a CPU
cannot run ViT-B, and no weights exist for vit_tiny), so its teacher adapts a random frozen
ViT, which groups nothing. This script makes the missing pretrained model, here, in the format
of SAM's official files (`image_encoder.<key>` tensors, no neck), so the teacher loads it exactly
as it loads sam_vit_b_01ec64.pth (runs.load_sam_checkpoint).

Data. A world of its own, rendered in memory with synthkitti's renderer: world seed WORLD_SEED
and sequences FIRST_SEQUENCE.. (the scenes the teacher trains and is scored on are seed 0,
sequences 00-03 and 08), FRAMES_PER_SEQUENCE camera frames per street. Frames are rendered
when a step first needs them, so the first steps never depend on how many frames the run has.
Each frame gives CROPS_PER_FRAME crops as the teacher sees them: the bottom 160 x 512 rows of
the frame at a random column offset, colour-jittered and flipped at random, normalised with
SAM's pixel mean and std (semantickitti.color_jitter and normalize_image, the teacher's own).

Objective: class-agnostic masks, as SAM's. SAM is trained on masks without class names; what
its encoder learns is which pixels belong together (colour, texture, object extent). Here a
region is a distinct (class, instance) pair of the renderer's ground truth; the class id is
never a target, only "same region or not". The tokens after the encoder's four global-attention
blocks (the four token sets the teacher's four patch decoders read) are concatenated, and a small
decoder shaped like elite.patch_decoder (two 2x transposed convolutions) turns that 1/16 grid
into EMBED_DIM-dimensional pixel embeddings at 1/4 resolution, read at pixels with
elite.pixel_features (the teacher's own bilinear read); --decoder each puts one decoder and
loss on each global block instead, which did worse (Measured, below). Per crop SAMPLES pixels
are drawn, each region with weight proportional to the square root of its area (so poles,
people and signs are drawn as well as the road), and every pair of them is scored:

    logit_ij = SCALE (cos(e_i, e_j) - MARGIN),   target_ij = [region_i == region_j]
    loss = mean over positive pairs of BCE + mean over negative pairs of BCE, halved

i.e. a pairwise mask-affinity loss: it is lowest when each region is one direction and
different regions are orthogonal, it needs no number of classes, and balancing positives and
negatives keeps the large road region from dominating. Only pairs within one crop are scored
(a region is a mask of one image, as SAM's). Since all of the pixel's information must pass
through the 1/16 tokens and the decoder is tiny, the tokens themselves must encode where region
boundaries fall inside each 16 x 16 patch, which is what the teacher's transposed-convolution
patch decoders then read.

The encoder is the teacher's own, elite.build_sam_encoder: all of it trains (patch embedding,
positions, blocks) except the relative-position tables, which SAM initialises to zero and the
teacher's folded attention reads as constants; they stay zero. Only the top-left positions that
the 160 x 512 crop reaches get gradients; the others stay at SAM's zero init (no weight decay on
positions), so they cost almost nothing compressed.

File. A dict {"image_encoder.<key>": float16 tensor} plus "made_with" (plain types: seeds,
steps, world, thread count, the loss at a few steps, and the sha256 of the fp32 encoder weights
after CHECK_STEP steps); torch.save's zip is re-packed with DEFLATE (torch.load reads it), so
the file stays under MAX_BYTES. Loading copies the float16 values into the fp32 encoder.

Measured (2026-12-06, 2-core CPU, torch 2.14.1; synthkitti world version 2). The default
command: 2 min 51-58 s with the machine to itself (rendering 100 frames 44-48 s, 300 steps), a
1,835,481-byte file, bitwise the same on a second run. The embedded teacher
(`train_teacher.py --preset embedded`) on the synthetic scenes, validation 2D mIoU (official
19 classes; 10 occur in the validation scans): random frozen encoder 10.8; this file 14.2 (car 40.8, road 94.6, parking 15.1, sidewalk 38.6,
terrain 80.0; bicycle, person, vegetation, trunk, pole 0). Variants tried, one teacher run each:
--lr 2e-3: 10.5; two with SAM's unfolded attention, which also trained the relative positions
(not bitwise repeatable, so dropped): the default otherwise 14.7 (its frames possibly rendered by
the world before version 2), --decoder each 6.7. The 40 hoped for is far:
the teacher's 128 adapter steps never learn the small classes on any of these encoders.

Reproducible: fixed seeds and a fixed thread count (--threads, recorded): the same command on
the same machine writes a bitwise-identical file. `--stop-after N` runs the first N steps and
prints the encoder's digest, which is how a test checks the shipped file's recorded digest.
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
import hashlib
import io
import math
import signal
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import elite
import elite_fast
import scandata
import semantickitti
import synthkitti

WORLD_SEED = 1000003       # the pretraining world; the teacher's scenes use seed 0 (synthkitti's and the trainers' default)
FIRST_SEQUENCE = 40        # sequences 40, 41, ...; the teacher's scenes are 00-03 (train) and 08 (validation)
FRAMES_PER_SEQUENCE = 8    # camera frames along each street (3-5 m apart), then the next street
CROP_HW = (160, 512)       # the embedded teacher's crop (--crop 160 512): its 10 x 32 token grid
FRAMES_PER_STEP = 2        # frames a step reads ...
CROPS_PER_FRAME = 4        # ... and crops of each: a batch of 8
SAMPLES = 256              # pixels drawn per crop; all their pairs are scored
EMBED_DIM = 32             # pixel embedding width
SCALE, MARGIN = 10.0, 0.5  # logit = SCALE (cos - MARGIN)
JITTER = 0.4               # the teacher's colour jitter (ColorJitter(0.4, 0.4, 0.4))
WARMUP = 20                # linear warm-up steps, then cosine decay; CHECK_STEP <= WARMUP, so the
CHECK_STEP = 5             # first steps (and the recorded digest) do not depend on --steps
THREADS = 2                # torch.set_num_threads: part of what makes the file bitwise reproducible
MAX_BYTES = 2_000_000      # the shipped file's size limit
DEFAULT_OUT = Path("weights/sam_vit_tiny_synth.pth")
LOSS_LOG_STEPS = (1, CHECK_STEP, 50, 100, 200, 400, 800, 1600)  # made_with records the loss at these (those run)


class Usage(Exception):
    """A bad flag or an output that is there already: one line, exit status 2."""


# ---- the pretraining world: frames rendered on first use ----

class SyntheticFrames:
    """Frame k is frame k % FRAMES_PER_SEQUENCE of sequence FIRST_SEQUENCE + k // FRAMES_PER_SEQUENCE
    of world `seed`; each street is built for its FRAMES_PER_SEQUENCE frames, so frame k is the
    same whatever the number of frames. Kept: the bottom crop rows of the image, (H, W, 3) uint8,
    and a region key per pixel, (H, W) int64 = class << 16 | instance."""

    def __init__(self, seed: int, rows: int):
        self.seed, self.rows = seed, rows
        self.frames: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._street = (None, None)  # (sequence, (street, scene, track)): the last street built
        self.render_seconds = 0.0

    def street(self, seq: int):
        if self._street[0] != seq:
            xs = synthkitti.ego_track(self.seed, seq, FRAMES_PER_SEQUENCE)
            st, scene = synthkitti.build_street(self.seed, seq, xs[0] - synthkitti.MARGIN, xs[-1] + synthkitti.MARGIN)
            self._street = (seq, (st, scene, xs))
        return self._street[1]

    def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self.frames:
            start = time.perf_counter()
            seq, i = FIRST_SEQUENCE + k // FRAMES_PER_SEQUENCE, k % FRAMES_PER_SEQUENCE
            st, scene, xs = self.street(seq)
            world, sensor = synthkitti.frame_world(self.seed, seq, st, scene, i, xs[i])
            image, gt = synthkitti.render_camera(world, st, sensor)
            gt = gt[:, -self.rows:].astype(np.int64)
            self.frames[k] = (np.ascontiguousarray(image[-self.rows:]), gt[0] << 16 | gt[1])
            self.render_seconds += time.perf_counter() - start
        return self.frames[k]


def make_crop(image: np.ndarray, key: np.ndarray, width: int, samples: int, rng: np.random.Generator):
    """One training crop: a random window of `width` columns (the rows are the bottom ones
    already), colour jitter, a flip with p = 0.5 -> (normalised (3, H, W) float32,
    (samples, 2) pixel (row, col) int64, (samples,) region index int64)."""
    left = int(rng.integers(0, image.shape[1] - width + 1))
    crop, key = image[:, left:left + width], key[:, left:left + width]
    crop = semantickitti.color_jitter(np.ascontiguousarray(crop), rng, JITTER)
    if rng.random() < 0.5:
        crop, key = crop[:, ::-1], key[:, ::-1]
    _, region, area = np.unique(key.ravel(), return_inverse=True, return_counts=True)
    weight = area[region] ** -0.5  # a region is drawn with probability proportional to sqrt(its area)
    chosen = rng.choice(region.size, size=samples, replace=True, p=weight / weight.sum())
    pixels = np.stack([chosen // width, chosen % width], 1)
    return semantickitti.normalize_image(crop), torch.from_numpy(pixels), torch.from_numpy(region[chosen])


def step_batch(frames: SyntheticFrames, n_frames: int, step: int, seed: int, samples: int):
    """The batch of step `step` (0-based): frames step*FRAMES_PER_STEP.. (mod n_frames), each
    cropped CROPS_PER_FRAME times with its own random stream (seed, step, frame slot, crop)."""
    images, pixels, regions = [], [], []
    for j in range(FRAMES_PER_STEP):
        image, key = frames[(step * FRAMES_PER_STEP + j) % n_frames]
        for c in range(CROPS_PER_FRAME):
            rng = np.random.default_rng([seed, step, j, c])
            x, p, r = make_crop(image, key, CROP_HW[1], samples, rng)
            images.append(x)
            pixels.append(p)
            regions.append(r)
    return torch.stack(images), pixels, torch.stack(regions)


# ---- the network: SAM's encoder as SAM runs it, a small pixel-embedding decoder ----

def build_encoder(variant: str) -> nn.Module:
    """The teacher's encoder, elite.build_sam_encoder(variant): segment-anything's ImageEncoderViT
    without the neck, its attention folded (elite_fast.FoldedAttention, SAM's maths), all of it
    trained except the relative-position tables, which the folded attention reads as constants:
    they stay at SAM's zero init (positions come from pos_embed). SAM's unfolded attention would
    train them, but the backward of its table resize (F.interpolate) is not bitwise repeatable
    on several CPU threads, and the teacher never adapts them either."""
    if variant not in elite.SAM_VARIANTS:
        raise Usage(f"unknown --variant {variant!r}; choose from {sorted(elite.SAM_VARIANTS)}")
    encoder = elite.build_sam_encoder(variant)
    for name, p in encoder.named_parameters():
        if "rel_pos" in name:
            p.requires_grad_(False)
    return encoder


class PixelEmbedder(nn.Module):
    """Pixel embeddings from the encoder's tokens after its global blocks, (B, D, 4h, 4w) each:
    decoder "concat" (default): one decoder on the four token sets concatenated; "each": one
    decoder per global block, as the teacher has one patch decoder per block (each token set
    is then pushed to group on its own). A decoder: 1x1 conv to C, elite.patch_decoder's two 2x
    transposed convolutions, 1x1 conv to EMBED_DIM."""

    def __init__(self, variant: str, decoder: str = "concat"):
        super().__init__()
        self.encoder = build_encoder(variant)
        self.stage_blocks = elite.SAM_VARIANTS[variant].global_attn_indexes
        self.concat = decoder == "concat"
        c = elite.SAM_VARIANTS[variant].embed_dim
        cin = len(self.stage_blocks) * c if self.concat else c
        self.decoders = nn.ModuleList([
            nn.Sequential(nn.Conv2d(cin, c, 1), elite.LayerNorm2d(c, eps=1e-6), nn.GELU(),
                          elite.patch_decoder(c), nn.Conv2d(c // 8, EMBED_DIM, 1))
            for _ in range(1 if self.concat else len(self.stage_blocks))])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """As elite.Teacher.encode: patch embedding plus the top-left positions, then the blocks."""
        height, width = images.shape[-2:]
        h, w = math.ceil(height / elite.SAM_PATCH), math.ceil(width / elite.SAM_PATCH)
        x = F.pad(images, (0, w * elite.SAM_PATCH - width, 0, h * elite.SAM_PATCH - height))
        x = self.encoder.patch_embed(x) + self.encoder.pos_embed[:, :h, :w]
        tokens = []
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)
            if i in self.stage_blocks:
                tokens.append(x.permute(0, 3, 1, 2))
        if self.concat:
            tokens = [torch.cat(tokens, 1)]
        return [decoder(t) for decoder, t in zip(self.decoders, tokens)]


def affinity_loss(emb: torch.Tensor, regions: torch.Tensor, scale=SCALE, margin=MARGIN) -> torch.Tensor:
    """Pairwise mask affinity. emb (B, K, D) pixel embeddings, regions (B, K) region index of each
    pixel within its crop. Per crop: BCE of scale (cos - margin) against "same region", over all
    pairs i != j, positives and negatives each averaged and weighed 1/2; then the mean over crops."""
    z = F.normalize(emb, dim=-1)
    logits = scale * (z @ z.transpose(1, 2) - margin)  # (B, K, K)
    same = (regions[:, :, None] == regions[:, None, :])
    off_diagonal = ~torch.eye(regions.shape[1], dtype=torch.bool, device=regions.device)
    pos, neg = (same & off_diagonal).to(z.dtype), (~same).to(z.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, same.to(z.dtype), reduction="none")
    per_crop = 0.5 * ((bce * pos).sum((1, 2)) / pos.sum((1, 2)).clamp_min(1)
                      + (bce * neg).sum((1, 2)) / neg.sum((1, 2)).clamp_min(1))
    return per_crop.mean()


def encoder_digest(encoder: nn.Module) -> str:
    """sha256 over the encoder's tensors (names, shapes, fp32 bytes) in name order."""
    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def learning_rate(step: int, steps: int, lr: float) -> float:
    """Step `step` (1-based): linear warm-up over WARMUP steps, then cosine to 0 at `steps`."""
    if step <= WARMUP:
        return lr * step / WARMUP
    return lr * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on positions (absolute and relative), norms and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "pos" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


# ---- the file ----

def checkpoint_bytes(encoder: nn.Module, made_with: dict) -> bytes:
    """torch.save of {"image_encoder.<key>": float16 tensor, "made_with": {...}}, re-packed as a
    DEFLATE zip with fixed timestamps (torch.load reads it; the same weights, the same bytes)."""
    state = {f"image_encoder.{k}": v.detach().to(torch.float16).clone() for k, v in encoder.state_dict().items()}
    state["made_with"] = made_with
    raw = io.BytesIO()
    torch.save(state, raw)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw.getvalue())) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            entry = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(entry, zin.read(info), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return out.getvalue()


def check_readable(data: bytes, encoder: nn.Module) -> None:
    """The bytes load as SAM's files are loaded (torch.load, weights_only) into an encoder of the
    same variant, and give back these weights to float16 precision; else a RuntimeError."""
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    weights = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    mine = encoder.state_dict()
    if set(weights) != set(mine) or any(not torch.equal(weights[k], mine[k].to(torch.float16)) for k in mine):
        raise RuntimeError("the packed file does not read back as the trained weights; nothing written")


# ---- the command ----

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Pretrain a SAM-style ViT encoder on synthetic streets (class-agnostic region masks, as "
                    "SAM learns) and write it as a SAM checkpoint for train_teacher.py --sam-checkpoint. "
                    "Renders its own world in memory (world seed %d, sequences %d..), never the teacher's "
                    "scenes (seed 0, sequences 00-03, 08)." % (WORLD_SEED, FIRST_SEQUENCE),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="the weights file to write (SAM's format: image_encoder.* tensors, float16, DEFLATE zip)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists (else: refuse)")
    ap.add_argument("--variant", default="vit_tiny", choices=("vit_tiny",),
                    help="SAM encoder variant: vit_tiny, the embedded teacher's; the larger ones are SAM's own "
                         "weights' job (vit_h pretraining here takes some 20 GB and minutes a step on a CPU)")
    ap.add_argument("--decoder", choices=("each", "concat"), default="concat",
                    help="each: a pixel decoder (and the loss) on each global block's tokens, as the teacher reads "
                         "them; concat: one decoder on the global blocks' tokens concatenated")
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps (batch of %d crops)"
                    % (FRAMES_PER_STEP * CROPS_PER_FRAME))
    ap.add_argument("--frames", type=int, default=100,
                    help="distinct camera frames rendered (~0.4 s each), %d per street; the steps cycle through them"
                    % FRAMES_PER_SEQUENCE)
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW's peak learning rate (warm-up %d steps, cosine)"
                    % WARMUP)
    ap.add_argument("--weight-decay", type=float, default=0.05, help="AdamW's weight decay (not on positions, norms, biases)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the crops' random streams")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="torch.set_num_threads; recorded in the file (another count may change the last bits)")
    ap.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="run only the first N steps, print the sha256 of the encoder's weights, write nothing "
                         "(the shipped file records it after %d steps: made_with['check_digest'])" % CHECK_STEP)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    for flag in ("steps", "frames", "threads"):
        if getattr(args, flag) < 1:
            raise Usage(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not 0 <= args.seed < 2**31:
        raise Usage(f"--seed must be from 0 to 2147483647, got {args.seed}")
    if args.threads > 256:
        raise Usage(f"--threads must be at most 256, got {args.threads}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise Usage(f"--lr must be a positive number, got {args.lr}")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        raise Usage(f"--weight-decay must be a non-negative number, got {args.weight_decay}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.steps:
        raise Usage(f"--stop-after must be between 1 and --steps ({args.steps}), got {args.stop_after}")
    if args.stop_after is None and args.steps < CHECK_STEP:
        raise Usage(f"--steps must be at least {CHECK_STEP} (the file records the digest after step {CHECK_STEP})")
    if args.out.is_dir():  # said now, not after minutes of training
        raise Usage(f"--out {args.out}: a folder; give the path of the weights file to write")
    if args.stop_after is None and args.out.exists() and not args.overwrite:
        raise Usage(f"{args.out} exists; pass --overwrite to replace it, or --out elsewhere")
    return args


def pretrain(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """Train; the encoder, what the file records (made_with) and how long it took."""
    from tqdm import tqdm
    torch.set_num_threads(args.threads)
    if elite_fast.FORM != "fast":  # the folded attention computes in another order: the digest is the fast form's
        print(f"note: $ELITE_FORMS={elite_fast.FORM!r} ignored: pretrain_sam.py runs the fast forms, whose digest its "
              "file records", file=sys.stderr)
        elite_fast.set_forms("fast")
    torch.manual_seed(args.seed)
    model = PixelEmbedder(args.variant, args.decoder)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    frames = SyntheticFrames(WORLD_SEED, CROP_HW[0])
    last = args.stop_after or args.steps
    losses, digest, start = {}, None, time.perf_counter()
    bar = tqdm(range(1, last + 1), desc="pretrain", unit="step", disable=args.quiet, file=sys.stderr)
    for step in bar:
        images, pixels, regions = step_batch(frames, args.frames, step - 1, args.seed, SAMPLES)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        maps = model(images)
        emb = torch.stack(elite.pixel_features(maps, pixels)).view(len(maps) * len(pixels), SAMPLES, -1)
        loss = affinity_loss(emb, regions.repeat(len(maps), 1))  # the mean over the decoders' maps
        if not torch.isfinite(loss):
            raise RuntimeError(f"step {step}: the loss is {loss.item()}; try a lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step in LOSS_LOG_STEPS or step == last:
            losses[step] = round(loss.item(), 6)
        if step == CHECK_STEP:
            digest = encoder_digest(model.encoder)
        bar.set_postfix(loss=f"{loss.item():.4f}", frames=len(frames.frames))
    bar.close()
    made_with = {
        "script": "pretrain_sam.py", "variant": args.variant, "seed": args.seed, "steps": args.steps,
        "lr": args.lr, "weight_decay": args.weight_decay, "threads": args.threads,
        "decoder": args.decoder, "batch": FRAMES_PER_STEP * CROPS_PER_FRAME, "crop_hw": list(CROP_HW), "samples_per_crop": SAMPLES,
        "world": {"generator": "synthkitti", "seed": WORLD_SEED, "first_sequence": FIRST_SEQUENCE,
                  "frames_per_sequence": FRAMES_PER_SEQUENCE, "frames": args.frames},
        "objective": "class-agnostic pairwise region affinity (BCE on scaled cosine)",
        "loss": {str(k): v for k, v in sorted(losses.items())},
        "check_step": CHECK_STEP, "check_digest": digest,
        "torch": str(torch.__version__),  # a plain str: weights_only reads no TorchVersion
    }  # no run times in it: the same command must write the same bytes
    timing = {"seconds": time.perf_counter() - start, "render_seconds": frames.render_seconds}
    return model.encoder, made_with, timing


def main(argv=None) -> str:
    """Run the command; returns the digest (--stop-after) or the path written."""
    args = parse_args(argv)
    encoder, made_with, timing = pretrain(args)
    if args.stop_after is not None:
        digest = encoder_digest(encoder)
        print(f"encoder sha256 after step {args.stop_after}: {digest}")
        return digest
    data = checkpoint_bytes(encoder, made_with)
    if len(data) > MAX_BYTES and args.variant == "vit_tiny":
        raise RuntimeError(f"the file would be {len(data):,} bytes, over the {MAX_BYTES:,} limit; nothing written")
    check_readable(data, encoder)
    scandata.atomic_write(args.out, lambda f: f.write(data))
    print(f"wrote {args.out} ({len(data):,} bytes; {timing['seconds']:.0f} s, of which rendering "
          f"{timing['render_seconds']:.0f} s; loss {made_with['loss']}); "
          f"use: python train_teacher.py --sam-checkpoint {args.out}")
    return str(args.out)


def cli(argv=None) -> int:
    try:
        main(argv)
    except Usage as e:
        print(f"pretrain_sam.py: error: {e}", file=sys.stderr)
        return 2
    except (scandata.DataError, RuntimeError, OSError) as e:
        print(f"pretrain_sam.py: error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pretrain_sam.py: interrupted; nothing written", file=sys.stderr)
        return 130
    except Terminated:
        print("pretrain_sam.py: stopped by SIGTERM; nothing written", file=sys.stderr)
        return 143
    return 0


class Terminated(Exception):
    """SIGTERM, raised where the script stands: the file is written atomically, so nothing half-made remains."""


def raise_terminated(*_):
    raise Terminated


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the start-up guard hands Ctrl-C back
    signal.signal(signal.SIGTERM, raise_terminated)
    sys.exit(cli())
