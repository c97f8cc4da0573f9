"""Tests: the Triton convolution against the plain-torch one over the same neighbour table (both in
elite_fast.py; test_fast.py holds that one equal to elite.submconv3d, the reference form).

Without a GPU they run in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1 before elite_fast.py is imported): float32 only, and slow, so the voxel sets are
a few hundred voxels. With a GPU the same tests run the compiled kernels."""
from __future__ import annotations

import copy

import pytest
import torch

import elite
import infer
import elite_fast
import semantickitti

# elite_fast.py imports without triton (the plain form then runs everywhere); these tests run its kernels.
pytest.importorskip("triton", reason="triton is not installed (torch's CUDA build brings it on Linux x86-64)")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = 1e-5 if DEVICE.type == "cuda" else 1e-6  # a GPU sums in another order than the CPU reference


def clustered_voxels(batch=2, size=9, density=0.3, seed=0) -> torch.Tensor:
    """Unique rows (N, 4) [batch, x, y, z]: dense clusters (many neighbours) in several scans."""
    g = torch.Generator().manual_seed(seed)
    return torch.nonzero(torch.rand(batch, size, size, size, generator=g) < density)


def one_layer(seed: int) -> torch.Tensor:
    """The clusters flattened onto z = 0."""
    coords = clustered_voxels(seed=seed)
    coords[:, 3] = 0
    return coords.unique(dim=0)


def plain_conv_and_grads(coords, feats, weight, upstream):
    """elite_fast's plain-torch convolution (equal to elite.submconv3d): its output and both gradients."""
    f, w = feats.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with infer.conv_path("torch"):
        out = elite_fast.submconv3d(f, elite_fast.neighbours_of(coords), w)
    (out * upstream).sum().backward()
    return out.detach(), f.grad, w.grad


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


CASES = {  # name: (coords, cin, cout, rows per tile)
    "the student's 64 channels, 3 scans": (clustered_voxels(batch=3, size=7, seed=1), 64, 64, 64),
    "the U2MKD LiDAR teacher's 128 channels": (clustered_voxels(seed=2)[:150], 128, 128, 64),
    "odd channel counts 5 -> 7, N not a multiple of the tile": (clustered_voxels(seed=3)[:301], 5, 7, 64),
    "one z layer: the 18 offsets with dz != 0 have no pairs": (one_layer(seed=4), 64, 32, 16),
    "a tile of isolated voxels: every offset but the centre skipped there": (
        torch.cat([torch.tensor([[0, 40 + 3 * k, 0, 0] for k in range(16)]), clustered_voxels(1, 6, seed=5)]),
        16, 16, 16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_forward_and_gradients_equal_the_plain_convolution(case):
    coords, cin, cout, block_n = CASES[case]
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(len(coords), cin, generator=g)
    weight = torch.randn(3, 3, 3, cin, cout, generator=g) * 0.1
    upstream = torch.randn(len(coords), cout, generator=g)
    out, grad_feats, grad_weight = plain_conv_and_grads(coords, feats, weight, upstream)
    nb = elite_fast.neighbours_of(coords).rows.to(DEVICE)
    w27 = weight.view(27, cin, cout).to(DEVICE)
    feats, upstream = feats.to(DEVICE), upstream.to(DEVICE)
    # The three kernels directly, with small tiles and several row chunks for the weight gradient.
    got = elite_fast.gather_conv(feats, w27, nb, block_n=block_n)
    got_feats = elite_fast.gather_conv(upstream, w27, nb, mirror=True, block_n=block_n)
    got_weight = elite_fast.weight_grad(feats, upstream, nb, block_n=block_n, rows_per_program=2 * block_n)
    assert relative_error(got.cpu(), out) < TOLERANCE
    assert relative_error(got_feats.cpu(), grad_feats) < TOLERANCE
    assert relative_error(got_weight.view_as(weight).cpu(), grad_weight) < TOLERANCE
    if "no pairs" in case:  # the offsets above and below the layer: no rows, so no weight gradient
        assert (got_weight.view(3, 3, 3, cin, cout)[:, :, [0, 2]] == 0).all()


def test_triton_path_through_autograd_equals_the_plain_path():
    coords = clustered_voxels(seed=8)
    g = torch.Generator().manual_seed(8)
    feats, weight = torch.randn(len(coords), 64, generator=g), torch.randn(3, 3, 3, 64, 64, generator=g) * 0.05
    upstream = torch.randn(len(coords), 64, generator=g)
    out, grad_feats, grad_weight = plain_conv_and_grads(coords, feats, weight, upstream)
    f, w = feats.to(DEVICE).requires_grad_(True), weight.to(DEVICE).requires_grad_(True)
    with infer.conv_path("triton"):
        got = elite_fast.submconv3d(f, elite_fast.neighbours_of(coords.to(DEVICE)), w)
    (got * upstream.to(DEVICE)).sum().backward()
    for ours, plain in ((got.detach(), out), (f.grad, grad_feats), (w.grad, grad_weight)):
        assert relative_error(ours.cpu(), plain) < TOLERANCE


def test_triton_runs_are_bitwise_equal():
    coords = clustered_voxels(seed=9)
    g = torch.Generator().manual_seed(9)
    feats = torch.randn(len(coords), 64, generator=g).to(DEVICE)
    weight = (torch.randn(3, 3, 3, 64, 64, generator=g) * 0.05).to(DEVICE)
    upstream = torch.randn(len(coords), 64, generator=g).to(DEVICE)
    neighbours = elite_fast.neighbours_of(coords.to(DEVICE))
    runs = []
    for _ in range(2):
        f, w = feats.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with infer.conv_path("triton"):
            out = elite_fast.submconv3d(f, neighbours, w)
        (out * upstream).sum().backward()
        runs.append((out.detach(), f.grad, w.grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


# ---- The whole student on the Triton path ----

def small_scene(n=300, seed=0) -> torch.Tensor:
    """One scan of n points in a 2.4 x 2.4 x 0.6 m box: a few hundred voxels with neighbours."""
    g = torch.Generator().manual_seed(seed)
    xyz = torch.rand(n, 3, generator=g) * torch.tensor([2.4, 2.4, 0.6]) + torch.tensor([3.0, -1.0, -1.5])
    return torch.cat([xyz, torch.rand(n, 1, generator=g)], 1)  # (n, 4) [x, y, z, remission]


@pytest.fixture(scope="module")
def student_on_both_paths():
    points, labels = small_scene(), torch.randint(1, semantickitti.NUM_CLASSES, (300,), generator=torch.Generator().manual_seed(1))
    batch_idx = torch.zeros(len(points), dtype=torch.long)
    torch.manual_seed(0)
    model = elite.Student()
    results = {}
    for path in ("torch", "triton"):
        device_model = copy.deepcopy(model).to(DEVICE)  # the same weights and BatchNorm statistics
        pts, idx, lab = points.to(DEVICE), batch_idx.to(DEVICE), labels.to(DEVICE)
        with infer.conv_path(path):
            device_model.eval()
            outputs = []
            with torch.no_grad():
                ops = infer.count_ops(lambda: outputs.append(device_model(pts, idx).logits))  # noqa: B023
            infer.student_training_step(device_model, pts, idx, lab, amp=False)
        results[path] = (ops, outputs[0].cpu(), {k: p.grad.cpu() for k, p in device_model.named_parameters()})
    return results


def test_triton_student_forward_and_training_step_equal_the_plain_path(student_on_both_paths):
    _, plain_logits, plain_grads = student_on_both_paths["torch"]
    _, logits, grads = student_on_both_paths["triton"]
    assert relative_error(logits, plain_logits) < 1e-5
    for name, grad in grads.items():
        assert relative_error(grad, plain_grads[name]) < 1e-5, name


def test_triton_student_forward_dispatches_few_operations(student_on_both_paths):
    ops = student_on_both_paths["triton"][0]
    assert sum(ops.aten.values()) <= 500, ops.aten
    assert sum(ops.data_dependent.values()) <= 8, ops.data_dependent
    assert ops.triton == {"gather_conv_kernel": 16}  # one launch per convolution, nothing per offset
    plain = student_on_both_paths["torch"][0]
    assert plain.triton == {} and sum(plain.aten.values()) > 1000  # the plain path: ~81 operations per convolution


# ---- Choosing the path ----

def test_triton_path_choice(monkeypatch):
    cpu = torch.device("cpu")
    with infer.conv_path("auto"):
        assert elite_fast.conv_path(cpu) == "torch"  # auto: Triton on CUDA only
    with infer.conv_path("torch"):
        assert elite_fast.conv_path(cpu) == "torch"
    with infer.conv_path("triton"):
        assert elite_fast.conv_path(cpu) == "triton"  # the interpreter runs it here (conftest.py)
        monkeypatch.setattr(elite_fast, "INTERPRET", False)
        with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
            elite_fast.conv_path(cpu)
    with pytest.raises(ValueError, match="expected one of auto, torch, triton"):
        elite_fast.set_conv_path("cuda")


def test_triton_first_use_check_falls_back_with_a_warning(monkeypatch):
    cpu = torch.device("cpu")
    elite_fast.triton_agrees.cache_clear()
    assert elite_fast.triton_agrees(cpu, torch.float32)  # the kernels agree with the plain form here

    def broken(*args):
        raise RuntimeError("PTX compile failed\nmore detail")
    monkeypatch.setattr(elite_fast.SubMConv3dTriton, "apply", broken)
    elite_fast.triton_agrees.cache_clear()
    with pytest.warns(UserWarning, match=r"does not work on cpu in torch.float32 \(RuntimeError: PTX compile failed\)"):
        assert not elite_fast.triton_agrees(cpu, torch.float32)
    elite_fast.triton_agrees.cache_clear()


def test_triton_products_in_float32_unless_torch_allows_tf32():
    assert elite_fast.precision(torch.float32) == "ieee"
    # Set and put back by hand: the flag is a dynamic attribute, which pytest >= 9.2's monkeypatch
    # takes for absent and then fails to delete.
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert elite_fast.precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the interpreter has no bf16)")
def test_triton_bf16_under_autocast_is_close_to_float32():
    coords = clustered_voxels(seed=10).cuda()
    feats, weight = torch.randn(len(coords), 64, device="cuda"), torch.randn(3, 3, 3, 64, 64, device="cuda") * 0.05
    neighbours = elite_fast.neighbours_of(coords)
    with infer.conv_path("triton"):
        full = elite_fast.submconv3d(feats, neighbours, weight)
        with torch.autocast("cuda", torch.bfloat16):
            low = elite_fast.submconv3d(feats, neighbours, weight)
    assert low.dtype == torch.bfloat16 and relative_error(low.float(), full) < 2e-2


def test_triton_flag_refused_where_it_cannot_run(monkeypatch, capsys):
    monkeypatch.setattr(elite_fast, "INTERPRET", False)  # as on a machine without the interpreter
    before = elite_fast.CONV_PATH
    try:
        with pytest.raises(SystemExit):
            infer.parse_args(["--benchmark", "--conv", "triton", "--device", "cpu"])
    finally:
        elite_fast.set_conv_path(before)
    assert "--conv triton: the Triton convolution runs on CUDA tensors; these are on cpu" in capsys.readouterr().err
