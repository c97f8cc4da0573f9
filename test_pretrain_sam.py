"""pretrain_sam.py and the file it ships (weights/sam_vit_tiny_synth.pth): the file loads as SAM's
files load, fits its size limit and says how it was made; the command reproduces the file's
recorded digest bitwise; the class-agnostic affinity loss prefers grouped embeddings."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import elite
import pretrain_sam
import runs

ROOT = Path(__file__).resolve().parent
SHIPPED = ROOT / pretrain_sam.DEFAULT_OUT


def made_with() -> dict:
    return torch.load(SHIPPED, map_location="cpu", weights_only=True)["made_with"]


def test_shipped_file_loads_as_a_sam_checkpoint():
    assert SHIPPED.stat().st_size <= pretrain_sam.MAX_BYTES == 2_000_000
    teacher = elite.Teacher(elite.TeacherConfig(variant="vit_tiny"))
    before = {k: v.clone() for k, v in teacher.encoder.state_dict().items()}
    runs.load_sam_checkpoint(teacher.encoder, SHIPPED, "vit_tiny")  # SAM's loader: every tensor, right shapes
    after = teacher.encoder.state_dict()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in after.values())
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert "patch_embed.proj.weight" in changed and "blocks.7.mlp.lin2.weight" in changed
    # A pretrained encoder: the crop's positions learnt, the positions no crop reaches still SAM's zeros.
    h, w = (c // elite.SAM_PATCH for c in pretrain_sam.CROP_HW)
    pos = after["pos_embed"][0]
    assert pos[:h, :w].abs().sum() > 0 and pos[h:].abs().sum() == 0 and pos[:, w:].abs().sum() == 0
    # The teacher runs with it.
    with torch.no_grad():
        maps = teacher(torch.randn(1, 3, *pretrain_sam.CROP_HW))
    assert len(maps) == 4 and all(torch.isfinite(m).all() for m in maps)


def test_shipped_file_records_how_it_was_made():
    m = made_with()
    assert m["script"] == "pretrain_sam.py" and m["variant"] == "vit_tiny"
    assert m["world"]["generator"] == "synthkitti" and m["world"]["seed"] == pretrain_sam.WORLD_SEED != 0
    assert m["world"]["first_sequence"] == pretrain_sam.FIRST_SEQUENCE >= 10  # never the teacher's 00-03, 08
    assert m["threads"] == pretrain_sam.THREADS and m["steps"] >= pretrain_sam.CHECK_STEP
    assert m["check_step"] == pretrain_sam.CHECK_STEP and len(m["check_digest"]) == 64
    losses = {int(k): v for k, v in m["loss"].items()}
    assert 1 in losses and m["steps"] in losses and losses[m["steps"]] < 0.5 * losses[1]  # it learnt
    assert m["crop_hw"] == list(pretrain_sam.CROP_HW)


def test_command_reproduces_the_recorded_digest():
    """The first CHECK_STEP steps of the default command, on the thread count the file records,
    give the digest the file records, bit for bit. Bitwise equality holds on the machine (CPU
    kind, torch build) that made the file; synthkitti's renderer drawing another world also
    changes it: then run `python pretrain_sam.py --overwrite` again and ship the new file."""
    m = made_with()
    out = subprocess.run([sys.executable, "pretrain_sam.py", "--stop-after", str(m["check_step"]), "--quiet",
                          "--threads", str(m["threads"])], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == m["check_digest"], (
        f"digest {out.stdout.split()[-1]} != recorded {m['check_digest']} (made with torch {m['torch']})")


def test_affinity_loss_prefers_grouped_embeddings():
    torch.manual_seed(0)
    k, d = 64, 16
    regions = torch.arange(4).repeat_interleave(k // 4)[None]  # (1, K): 4 regions of 16 pixels
    grouped = torch.eye(d)[regions]  # identical within a region, orthogonal across
    random = torch.randn(1, k, d)
    collapsed = torch.ones(1, k, d)  # every pixel the same: no grouping
    l_grouped, l_random, l_collapsed = (pretrain_sam.affinity_loss(e, regions).item()
                                        for e in (grouped, random, collapsed))
    assert l_grouped < 0.01 < l_random and l_grouped < l_collapsed
    # Only "same region or not" counts: renumbering the regions changes nothing (class-agnostic).
    assert pretrain_sam.affinity_loss(random, 3 - regions).item() == pytest.approx(l_random)
    # One region only (no negative pair) stays finite.
    assert torch.isfinite(pretrain_sam.affinity_loss(random, torch.zeros_like(regions)))


def test_bad_flags_are_one_line_errors(tmp_path):
    existing = tmp_path / "w.pth"
    existing.write_bytes(b"x")
    for argv, expect in ((["--out", str(existing)], "exists; pass --overwrite"),
                         (["--steps", "0"], "--steps must be at least 1"),
                         (["--stop-after", "9", "--steps", "5"], "--stop-after must be between 1"),
                         (["--out", str(tmp_path)], "a folder; give the path of the weights file"),  # issue 34
                         (["--seed", "99999999999999999999"], "--seed must be from 0 to 2147483647")):
        out = subprocess.run([sys.executable, "pretrain_sam.py", *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2 and expect in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert existing.read_bytes() == b"x"
