"""Every fast form of elite_fast.py against the reference form of elite.py it names: outputs and
gradients, then a whole student step and a whole ELiTe step (student, teacher, PPMSKD, AdaLoRA's
budget, the optimiser) in both forms from the same weights."""
import copy

import numpy as np
import pytest
import torch

import elite
import elite_fast
import runs
import semantickitti
from test_elite import ppmskd_batch, randomize_


def random_points(n=4000, seed=0, scans=2):
    """Points over the grid and beyond it (augmentation moves points off the grid), in `scans` scans."""
    g = torch.Generator().manual_seed(seed)
    xyz = torch.rand(n, 3, generator=g) * torch.tensor([60.0, 60.0, 8.0]) - torch.tensor([30.0, 30.0, 5.0])
    points = torch.cat([xyz, torch.rand(n, 1, generator=g)], 1)  # (N, 4)
    return points, torch.randint(0, scans, (n,), generator=g).sort().values


def close(a: torch.Tensor, b: torch.Tensor, rel=1e-5, floor=1e-12):
    """Equal up to float rounding, relative to the larger magnitude of the pair or `floor` (sums in
    another order; a bias before a BatchNorm gets only rounding noise as its gradient)."""
    scale = max(a.abs().max().item(), b.abs().max().item(), floor)
    assert a.shape == b.shape and (a - b).abs().max().item() <= rel * scale, (a - b).abs().max().item() / scale


def run_both(fn):
    """fn() under each form: {'fast': ..., 'reference': ...}."""
    out = {}
    for form in elite_fast.FORMS:
        with elite_fast.forms(form):
            out[form] = fn()
    return out


# ---- the switch ----

def test_the_forms_switch_runs_each_form_and_refuses_others(monkeypatch):
    assert elite_fast.FORM == "fast" and elite_fast.enabled()  # the default
    with elite_fast.forms("reference"):
        assert not elite_fast.enabled()
    assert elite_fast.enabled()
    with pytest.raises(ValueError, match="expected one of fast, reference"):
        elite_fast.set_forms("slow")
    monkeypatch.setattr(elite_fast, "FORM", "REFERENCE")  # what $ELITE_FORMS gave
    with pytest.raises(ValueError, match="ELITE_FORMS='REFERENCE'"):
        elite_fast.enabled()


# ---- 1. voxels ----

def test_voxelize_scales_equals_voxelize_at_every_scale():
    points, batch_idx = random_points()
    scales = (1, 2, 4, 8, 16)
    sets = elite_fast.voxel_sets(points[:, :3], batch_idx, scales, semantickitti.RANGE_MIN,
                                      semantickitti.RANGE_MAX, semantickitti.GRID_SHAPE)
    for s, fast in zip(scales, sets.per_scale):
        ref = elite.voxelize(points[:, :3], batch_idx, s)
        assert torch.equal(fast.coords, ref.coords) and torch.equal(fast.inv, ref.inv)
        assert torch.equal(fast.count, ref.count)
    assert (sets.per_scale[0].coords[:, 1:] < 0).any()  # points off the grid kept, as upstream


def test_the_fast_forms_number_the_offsets_as_the_reference_does():
    assert elite_fast.OFFSETS == elite.OFFSETS


def test_stages_built_in_one_form_run_in_the_other():
    """The switch decides when a part runs: stages voxelised in the fast forms, run in the reference
    forms, give the reference's logits."""
    points, batch_idx = random_points(3000)
    torch.manual_seed(0)
    model = elite.Student().eval()
    with torch.no_grad():
        scales = elite.voxelize_scales(points[:, :3], batch_idx, model.cfg)  # fast: with neighbour tables
        assert scales.stages[0].fast is not None
        with elite_fast.forms("reference"):
            model.voxelize = lambda *_: scales  # the fast stages, run in the reference forms
            mixed = model(points, batch_idx).logits
            del model.voxelize
            reference = model(points, batch_idx).logits
    close(mixed, reference)


def test_fast_stages_equal_reference_stages():
    points, batch_idx = random_points()
    cfg = elite.StudentConfig()
    got = run_both(lambda: elite.voxelize_scales(points[:, :3], batch_idx, cfg))
    fast, ref = got["fast"], got["reference"]
    assert all(s.fast is not None for s in fast.stages) and all(s.fast is None for s in ref.stages)
    for a, b in zip(fast.stages, ref.stages):
        assert torch.equal(a.voxels.coords, b.voxels.coords) and torch.equal(a.next_voxels.inv, b.next_voxels.inv)
        assert torch.equal(a.pool_of, b.pool_of) and torch.equal(a.pool_count, b.pool_count)
        assert torch.equal(a.fast.neighbours.rows, elite_fast.neighbours_of(a.voxels.coords).rows)


# ---- 2. the convolution ----

def test_fast_convolution_equals_the_reference_outputs_and_gradients():
    points, batch_idx = random_points(3000)
    coords = elite.voxelize(points[:, :3], batch_idx, 2).coords  # two scans: no neighbour across them
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(len(coords), 16, generator=g, requires_grad=True)
    weight = torch.randn(3, 3, 3, 16, 8, generator=g, requires_grad=True)
    results = []
    for conv in (lambda: elite.submconv3d(feats, coords, weight),
                 lambda: elite_fast.submconv3d(feats, elite_fast.neighbours_of(coords), weight)):
        out = conv()
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (feats, weight))
        results.append((out, *grads))
    for a, b in zip(*results):
        close(a, b)


def test_reference_convolution_equals_a_dense_conv3d():
    from test_elite import dense_submconv, random_sparse
    coords, feats = random_sparse()
    weight = torch.randn(3, 3, 3, 5, 7, generator=torch.Generator().manual_seed(10))
    perm = torch.randperm(len(coords), generator=torch.Generator().manual_seed(0))
    shifted = coords[perm] + torch.tensor([0, -4, 3, -9])  # any integers, negative too, any order
    torch.testing.assert_close(elite.submconv3d(feats[perm], shifted, weight),
                               dense_submconv(coords, feats, weight, 8)[perm], rtol=1e-4, atol=1e-4)
    assert elite.submconv3d(feats[:0], coords[:0], weight).shape == (0, weight.shape[-1])  # no voxel at all


# ---- 3. the student's parts ----

@pytest.fixture(scope="module")
def student_and_stages():
    torch.manual_seed(0)
    points, batch_idx = random_points()
    model = elite.Student()
    stages = run_both(lambda: elite.voxelize_scales(points[:, :3], batch_idx, model.cfg))
    return model, points, stages


def part_both(fixture, fn, inputs):
    """fn(form's stages, *inputs) in each form -> (output, gradients of the inputs and the model)."""
    student, _, stages = fixture
    out = {}
    for form in elite_fast.FORMS:
        with elite_fast.forms(form):
            xs = [x.detach().clone().requires_grad_(True) for x in inputs]
            y = fn(stages[form], *xs)
            params = list(student.parameters())
            weight = torch.rand(y.shape, generator=torch.Generator().manual_seed(9))  # positive: sums without cancellation
            grads = torch.autograd.grad((y * weight).sum(), xs + params, allow_unused=True)
            out[form] = [y] + [g for g in grads if g is not None]
    return out


def test_fast_input_encoder_equals_the_mean_of_the_mlp(student_and_stages):
    model, points, _ = student_and_stages
    got = part_both(student_and_stages, lambda st, p: model.input_encoder(p, st.voxels[0]), [points])
    for a, b in zip(got["fast"], got["reference"]):
        close(a, b)


def test_fast_point_encoder_and_scale_link_equal_concat_mlp_and_scatter_mean(student_and_stages):
    model, _, stages = student_and_stages
    for k in (0, 2):
        feats = torch.randn(len(stages["fast"].stages[k].voxels), 64, generator=torch.Generator().manual_seed(k))
        got = part_both(student_and_stages, lambda st, f: elite.move_to_scale(  # noqa: B023
            model.blocks[k].point_enc(f, st.stages[k]), st.stages[k]), [feats])  # noqa: B023
        for a, b in zip(got["fast"], got["reference"]):
            close(a, b, rel=2e-5)


def test_fast_classifier_equals_classifying_every_point(student_and_stages):
    model, points, stages = student_and_stages
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(len(v), 64, generator=g) for v in stages["fast"].voxels[1:]]
    got = part_both(student_and_stages, lambda st, *f: model.classify(list(f), st.voxels), feats)
    for a, b in zip(got["fast"], got["reference"]):
        close(a, b)


def test_a_whole_student_training_step_agrees_between_the_forms():
    points, batch_idx = random_points(6000)
    labels = 1 + (points[:, 2] > -1).long() * 8 + (points[:, 3] > 0.5).long()  # three classes
    torch.manual_seed(0)
    start = elite.Student()
    after = {}
    for form in elite_fast.FORMS:
        with elite_fast.forms(form):
            model = copy.deepcopy(start)
            opt = runs.make_optimizer(model.parameters(), lr=0.1)
            out = model(points, batch_idx)
            loss = elite.seg_loss(out.logits, labels, elite.class_weights(), 0.1)
            loss.backward()
            opt.step()
            after[form] = (out.logits.detach(), loss.detach(), dict(model.named_parameters()),
                           dict(model.named_buffers()))
    (lf, sf, pf, bf), (lr, sr, pr, br) = after["fast"], after["reference"]
    close(lf, lr)
    close(sf, sr)
    for name in pf:
        close(pf[name].detach(), pr[name].detach(), rel=1e-3, floor=1e-2)  # float32 sums in another order, times lr
    for name in bf:  # BatchNorm's running statistics
        close(bf[name].float(), br[name].float())


# ---- 5. the teacher ----

def teacher_in(form: str, state: dict | None, peft="adalora") -> elite.Teacher:
    """A vit_tiny teacher built in this form (SAM's attention folded or not), with these weights."""
    with elite_fast.forms(form):
        torch.manual_seed(0)
        teacher = elite.Teacher(elite.TeacherConfig(variant="vit_tiny", peft=peft, crop_hw=(64, 128)))
    if state is not None:
        teacher.load_state_dict(state)
    return teacher


@pytest.mark.parametrize("peft", ["lora", "adalora"])
def test_merged_adapters_and_folded_attention_equal_lora_hooks_on_sams_own_attention(peft):
    state = randomize_(teacher_in("reference", None, peft), seed=4).state_dict()  # every factor non-zero
    images = torch.randn(2, 3, 64, 128, generator=torch.Generator().manual_seed(5))
    got = {}
    for form in elite_fast.FORMS:
        teacher = teacher_in("fast" if form == "reference" else "reference", state, peft)  # built in the other form:
        with elite_fast.forms(form):  # the form it runs in decides
            assert type(teacher.encoder.blocks[0].attn) is elite_fast.FoldedAttention
            maps = teacher(images)
            loss = sum((m * torch.linspace(-1, 1, m.numel()).view_as(m)).sum() for m in maps)
            loss.backward()
        got[form] = maps + [p.grad for p in teacher.trainable_parameters() if p.grad is not None]  # the heads: none
    assert len(got["fast"]) == len(got["reference"]) > 4 + 3 * 4  # the maps, every adapter and the patch decoders
    for a, b in zip(got["fast"], got["reference"]):
        close(a, b, rel=1e-4)


def test_the_fused_layer_norm_of_the_patch_decoder_equals_sams_layernorm2d():
    from segment_anything.modeling.common import LayerNorm2d as SamLayerNorm2d
    g = torch.Generator().manual_seed(8)
    ours, sams = elite.LayerNorm2d(24, eps=1e-6), SamLayerNorm2d(24, eps=1e-6)
    with torch.no_grad():
        for p in (ours.weight, ours.bias):
            p.copy_(torch.randn(p.shape, generator=g))
    sams.load_state_dict(ours.state_dict())  # the same keys
    x = torch.randn(2, 24, 5, 7, generator=g, requires_grad=True)
    weight = torch.rand(x.shape, generator=g)
    got = []
    for norm in (ours, sams):
        y = norm(x)
        got.append([y, *torch.autograd.grad((y * weight).sum(), [x, norm.weight])])
    for a, b in zip(*got):
        close(a, b, rel=1e-5)


def test_the_bf16_weight_cache_computes_what_autocast_computes():
    state = randomize_(teacher_in("reference", None), seed=4).state_dict()
    images = torch.randn(1, 3, 64, 128, generator=torch.Generator().manual_seed(6))
    got = {}
    for form in elite_fast.FORMS:
        teacher = teacher_in(form, state)
        with elite_fast.forms(form), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got[form] = [m.float() for m in teacher(images)]
    for a, b in zip(got["fast"], got["reference"]):
        close(a, b, rel=5e-2)  # bf16 products summed in another order


def test_fast_pixel_features_equal_upsampling_then_reading_outputs_and_gradients():
    g = torch.Generator().manual_seed(7)
    maps = [torch.randn(2, 8, 16, 32, generator=g) for _ in range(2)]
    pixels = [torch.tensor([[0, 0], [63, 127], [5, 9], [40, 77]]), torch.tensor([[1, 126], [62, 0]])]
    got = {}
    for form in elite_fast.FORMS:
        xs = [m.clone().requires_grad_(True) for m in maps]
        with elite_fast.forms(form):
            feats = elite.pixel_features(xs, pixels)
        grads = torch.autograd.grad(sum((f * torch.arange(f.numel()).view_as(f)).sum() for f in feats), xs)
        got[form] = feats + list(grads)
    for a, b in zip(got["fast"], got["reference"]):
        close(a, b)
    with elite_fast.forms("reference"):
        assert [f.shape for f in elite.pixel_features(maps, [pixels[0][:0], pixels[1][:0]])] == [(0, 8), (0, 8)]


# ---- a whole ELiTe step ----

def test_a_whole_elite_step_agrees_between_the_forms(synth_copy):
    """batch -> student -> teacher -> PPMSKD's losses -> backward -> AdaLoRA's budget -> the
    optimiser, in each form from the same weights: the same loss terms and the same weights after."""
    batch = ppmskd_batch(synth_copy, dense=False)
    torch.manual_seed(0)
    student, heads = elite.Student(), elite.heads_3d()
    state = teacher_in("reference", None).state_dict()
    with torch.no_grad():  # trained-looking adapters, so that every factor gets a gradient
        for name in state:
            if "lora_E" in name:
                state[name].normal_(0, 0.1)
    results = {}
    for form in elite_fast.FORMS:
        s, h, teacher = copy.deepcopy(student), copy.deepcopy(heads), teacher_in(form, state)
        params = list(s.parameters()) + list(h.parameters()) + teacher.trainable_parameters()
        optimizer = runs.make_optimizer(params, lr=0.1)
        allocator = elite.RankAllocator(teacher, total_steps=6, init_warmup=0, final_warmup=1, mask_interval=1)
        with elite_fast.forms(form):
            terms = elite.elite_losses(s(batch.points, batch.batch_idx), h, teacher, batch, elite.class_weights())
            sum(terms.values()).backward()
            budget = allocator.step(1)
            optimizer.step()
        results[form] = (terms, budget, {**{f"s.{k}": v for k, v in s.state_dict().items()},
                                         **{f"t.{k}": v for k, v in teacher.state_dict().items()}})
    (tf, bf, wf), (tr, br, wr) = results["fast"], results["reference"]
    assert list(tf) == list(tr) and bf == br
    for name in tf:
        close(tf[name].detach(), tr[name].detach(), rel=1e-4)
    for name in wf:
        close(wf[name].float(), wr[name].float(), rel=1e-3, floor=1e-2)
    assert bf < allocator.total_rank  # the budget pruned ranks (their E entries), the same in both forms


def test_a_model_built_in_one_form_loads_in_the_other():
    student = elite.Student()
    with elite_fast.forms("reference"):
        other = elite.Student()
    other.load_state_dict(student.state_dict(), strict=True)  # the same names and shapes, or it raises
    fast, reference = teacher_in("fast", None), teacher_in("reference", None)
    assert list(fast.state_dict()) == list(reference.state_dict())  # folding SAM's attention keeps its keys


# ---- the one-page steps ----

def test_python_elite_py_and_u2mkd_py_each_run_one_training_step_in_the_reference_forms():
    import u2mkd
    with elite_fast.forms("reference"):  # as python elite.py runs it
        elite_terms = elite.one_step_demo()
    assert elite_fast.enabled()  # the default again
    assert set(elite_terms) == {"seg3d_main", "seg2d_fused", "orth", *(f"{kind}_stage{k}" for k in (1, 2, 3, 4)
                                                                        for kind in ("seg2d", "seg3d", "kd"))}
    with elite_fast.forms("reference"):
        u2mkd_terms = u2mkd.one_step_demo()
    assert set(u2mkd_terms) == {"seg3d", "seg2d", "kd_logits", "kd_feature", *(f"impute_stage{k}" for k in range(1, 5))}
    assert all(np.isfinite(v) and v >= 0 for v in [*elite_terms.values(), *u2mkd_terms.values()])
    assert elite_terms["kd_stage1"] > 0 and u2mkd_terms["kd_logits"] > 0  # the distillation terms are live
