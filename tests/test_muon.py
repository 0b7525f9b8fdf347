"""The compact Muon: Newton-Schulz against the SVD, near-orthogonal updates, per-matrix stacks,
parity with torch.optim.Muon, weight decay, LR scale, state round trip, named errors, and the
batched step against the matrix-by-matrix loop it replaced (scripts/bench_optim.py's LoopMuon)."""

from __future__ import annotations

import io
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT

import optim.muon as muon_module
from optim.muon import NS_COEFFICIENTS, Muon, batches, lr_ratio, orthogonalize
from scripts.bench_optim import LoopMuon

HAS_TORCH_MUON = hasattr(torch.optim, "Muon")


def quintic(s: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """What Newton-Schulz does to each singular value (of the Frobenius-normalized matrix)."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_newton_schulz_maps_each_singular_value_and_keeps_the_vectors(shape):
    torch.manual_seed(0)
    m = torch.randn(shape, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    expected = u @ torch.diag(quintic(s / m.norm())) @ vh
    assert torch.allclose(orthogonalize(m, dtype=torch.float64), expected, atol=1e-10)


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 384)])
def test_update_is_nearly_orthogonal(shape):
    torch.manual_seed(0)
    o = orthogonalize(torch.randn(shape))
    sv = torch.linalg.svdvals(o)
    # A Gaussian matrix with aspect 1:4 has every singular value >= ~0.06 of its Frobenius norm;
    # from there five quintic steps land in the polynomial's band [0.6818, 1.1344] (the scalar map
    # above, evaluated on a grid from 0.01 to 1); fp32 rounding adds ~1e-6.
    assert sv.min() > 0.68 and sv.max() < 1.135, (sv.min(), sv.max())
    assert sv.min() < 0.70 and sv.max() > 1.10, "the band is used, not collapsed to 1"
    # On the smaller dim O O^T (wide) or O^T O (tall) is near I: eigenvalues sv^2 in [0.46, 1.29].
    small = o @ o.mT if shape[0] < shape[1] else o.mT @ o
    eig = torch.linalg.eigvalsh(small)
    assert eig.min() > 0.68**2 and eig.max() < 1.135**2


@pytest.mark.parametrize("shape", [(32, 96), (96, 32)])
def test_convergent_coefficients_give_the_polar_factor(shape):
    """With the classic cubic (1.5, -0.5, 0) the iteration converges: O = U V^T, O O^T = I on the small dim."""
    torch.manual_seed(0)
    m = torch.randn(shape)
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    o = orthogonalize(m, steps=30, coefficients=(1.5, -0.5, 0.0))
    assert torch.allclose(o, u @ vh, atol=1e-5)
    small = o @ o.mT if shape[0] < shape[1] else o.mT @ o
    assert torch.allclose(small, torch.eye(min(shape)), atol=1e-5)


def test_a_stack_is_orthogonalized_per_matrix():
    torch.manual_seed(0)
    experts = torch.randn(4, 32, 96)  # (n_experts, in, out), as an MoE layer's w_in
    stacked = orthogonalize(experts)
    per_slice = torch.stack([orthogonalize(e) for e in experts])
    assert torch.allclose(stacked, per_slice, atol=1e-6)
    # Each expert is normalized on its own: scaling one expert's momentum leaves the others' update alone.
    scaled = experts.clone()
    scaled[0] *= 1000
    assert torch.allclose(orthogonalize(scaled), stacked, atol=1e-5)


def test_a_3d_parameter_steps_like_its_matrices_one_by_one():
    torch.manual_seed(0)
    w = torch.randn(3, 16, 48)
    stack = w.clone().requires_grad_()
    slices = [w[i].clone().requires_grad_() for i in range(3)]
    opt_stack = Muon([stack], lr=0.02, weight_decay=0.1)
    opt_slices = Muon(slices, lr=0.02, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(3, 16, 48)
        stack.grad = g.clone()
        for i, p in enumerate(slices):
            p.grad = g[i].clone()
        opt_stack.step()
        opt_slices.step()
    assert torch.allclose(stack.detach(), torch.stack([p.detach() for p in slices]), atol=1e-6)


def step_both(shape, ns_dtype, steps=3):
    torch.manual_seed(1)
    w = torch.randn(shape)
    ours, theirs = w.clone().requires_grad_(), w.clone().requires_grad_()
    settings = dict(lr=0.01, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    opt_ours = Muon([ours], ns_dtype=ns_dtype, **settings)
    opt_theirs = torch.optim.Muon([theirs], **settings)
    for _ in range(steps):
        g = torch.randn(shape)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    return w, ours.detach(), theirs.detach()


@pytest.mark.skipif(not HAS_TORCH_MUON, reason="this torch has no torch.optim.Muon")
@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 48)])
def test_matches_torch_muon_exactly_in_bf16(shape):
    """Same math, same op order: with Newton-Schulz in bf16 (as torch's runs it) the steps are bit-identical."""
    _, ours, theirs = step_both(shape, torch.bfloat16)
    assert torch.equal(ours, theirs)


@pytest.mark.skipif(not HAS_TORCH_MUON, reason="this torch has no torch.optim.Muon")
@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 48)])
def test_matches_torch_muon_closely_in_fp32(shape):
    """fp32 Newton-Schulz differs from torch's bf16 by bf16's rounding: 8 significant bits (~0.4%)
    through 5 steps of 3 matmuls; measured 1.0-1.3% of the largest weight change over 3 steps."""
    w, ours, theirs = step_both(shape, torch.float32)
    moved = (theirs - w).abs().max()
    assert (ours - theirs).abs().max() < 0.03 * moved


def test_first_step_is_lr_times_rms_scale_times_orthogonalized_gradient():
    torch.manual_seed(0)
    w = torch.randn(32, 96)
    p = w.clone().requires_grad_()
    p.grad = torch.randn(32, 96)
    Muon([p], lr=0.01, weight_decay=0.0).step()
    # First step: the Nesterov update is a multiple of the gradient, which normalization removes.
    expected = w - 0.01 * 0.2 * math.sqrt(96) * orthogonalize(p.grad)
    assert torch.allclose(p.detach(), expected, atol=1e-6)
    # match_rms_adamw: the update's RMS is 0.2 * lr * sqrt(96) * RMS(O) ~ 0.2 * lr, as AdamW's.
    rms = (p.detach() - w).pow(2).mean().sqrt()
    assert 0.15 * 0.01 < rms < 0.21 * 0.01


def test_weight_decay_is_decoupled_at_the_group_lr():
    w = torch.randn(16, 48)
    p = w.clone().requires_grad_()
    p.grad = torch.zeros_like(p)  # a zero update isolates the decay
    Muon([p], lr=0.1, weight_decay=0.5).step()
    assert torch.allclose(p.detach(), w * (1 - 0.1 * 0.5), atol=1e-7)
    q = w.clone().requires_grad_()
    q.grad = torch.randn(16, 48)
    Muon([q], lr=0.1, weight_decay=0.5).step()
    r = w.clone().requires_grad_()
    r.grad = q.grad.clone()
    Muon([r], lr=0.1, weight_decay=0.0).step()
    assert torch.allclose(q.detach() - r.detach(), -0.05 * w, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    w = [torch.randn(16, 48), torch.randn(2, 8, 24)]
    grads = [[torch.randn_like(t) for t in w] for _ in range(4)]
    a = [t.clone().requires_grad_() for t in w]
    opt_a = Muon(a, lr=0.02)
    for gs in grads[:2]:
        for p, g in zip(a, gs):
            p.grad = g.clone()
        opt_a.step()
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)  # as the checkpoint does: loaded back with weights_only
    buffer.seek(0)
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_b = Muon(b, lr=0.5, ns_dtype=torch.bfloat16)  # overwritten by the loaded groups
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt_b.param_groups[0]["lr"] == 0.02 and opt_b.param_groups[0]["ns_dtype"] is None
    assert all(set(opt_b.state[p]) == {"momentum_buffer"} for p in b), "one state tensor per parameter"
    for gs in grads[2:]:
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_vectors_are_refused_with_a_named_error():
    with pytest.raises(ValueError, match=r"parameter 1 of group 0 has shape \(5,\); Muon orthogonalizes "
                                         r"matrices \(dim >= 2.*AdamW"):
        Muon([torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)])
    opt = Muon([torch.randn(3, 4, requires_grad=True)])
    with pytest.raises(ValueError, match="group 'gains' has shape"):
        opt.add_param_group({"name": "gains", "params": [torch.randn(4, requires_grad=True)]})
    with pytest.raises(ValueError, match="adjust_lr_fn 'rms'"):
        Muon([torch.randn(3, 4, requires_grad=True)], adjust_lr_fn="rms")


# -- the batched step against the matrix-by-matrix loop it replaced -------------------------------------
# The oracle is scripts/bench_optim.py's LoopMuon: optim/muon.py's step before batching, kept out of the
# product code and shared with the benchmark that times the two.

def assert_steps_match_the_loop(tensors, steps=3, **settings):
    """Both Muons from the same weights and gradients: the momentum buffers agree exactly and the weights
    to fp32 rounding after each step: within 1e-5 of the largest weight change (stacking changes only
    the matmuls' blocking, a few ulps per product) plus two ulps of the largest weight (the update is
    added to weights of that size)."""
    torch.manual_seed(2)
    grads = [[torch.randn_like(t) for t in tensors] for _ in range(steps)]
    ours = [t.clone().requires_grad_() for t in tensors]
    loop = [t.clone().requires_grad_() for t in tensors]
    opt_ours, opt_loop = Muon(ours, **settings), LoopMuon(loop, **settings)
    for gs in grads:
        for p, q, g in zip(ours, loop, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_loop.step()
        for p, q, w in zip(ours, loop, tensors):
            moved, ulp = (q - w).abs().max(), torch.finfo(torch.float32).eps * w.abs().max()
            assert (p - q).abs().max() <= 1e-5 * moved + 2 * ulp, (tuple(p.shape), (p - q).abs().max(), moved)
            assert torch.equal(opt_ours.state[p]["momentum_buffer"], opt_loop.state[q]["momentum_buffer"])
    return opt_ours


SHAPE_SETS = {
    "square": [(48, 48)],
    "tall": [(96, 32)],
    "wide": [(32, 96)],
    "single": [(40, 24)],
    # several same-shape groups, tall ones joining the wide of their transpose, a 3-D stack among them
    "groups": [(32, 96), (96, 32), (48, 48), (32, 96), (48, 48), (3, 32, 96), (96, 32), (16, 24)],
}


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=list(SHAPE_SETS))
def test_batched_step_equals_the_matrix_by_matrix_loop(shapes, weight_decay, nesterov):
    torch.manual_seed(0)
    tensors = [0.02 * torch.randn(s) for s in SHAPE_SETS[shapes]]  # the model's init scale
    assert_steps_match_the_loop(tensors, lr=0.02, weight_decay=weight_decay, momentum=0.9, nesterov=nesterov)


def test_batched_step_equals_the_loop_with_torchs_default_lr_scale_and_other_coefficients():
    """adjust_lr_fn="original" scales tall and wide matrices differently, so they stack apart."""
    torch.manual_seed(0)
    tensors = [0.02 * torch.randn(s) for s in [(96, 32), (32, 96), (96, 32)]]
    assert_steps_match_the_loop(tensors, lr=0.02, adjust_lr_fn="original", ns_steps=3,
                                ns_coefficients=(3.0, -3.2, 1.2))
    assert lr_ratio("original", (96, 32)) != lr_ratio("original", (32, 96))


def test_parameters_without_gradients_are_left_alone():
    torch.manual_seed(0)
    w = [torch.randn(32, 96), torch.randn(32, 96)]
    ps = [t.clone().requires_grad_() for t in w]
    opt = Muon(ps, lr=0.02)
    ps[0].grad = torch.randn(32, 96)
    opt.step()
    assert torch.equal(ps[1].detach(), w[1]) and set(opt.state) == {ps[0]}
    assert not torch.equal(ps[0].detach(), w[0])


def test_stacks_group_by_oriented_shape_and_split_at_the_devices_element_bound(monkeypatch):
    params = [torch.zeros(s) for s in [(384, 128), (128, 128), (128, 384), (768, 128), (2, 128, 384)]]
    group = Muon(params).param_groups[0]
    monkeypatch.setitem(muon_module.STACK_ELEMENTS, "cpu", 4 * 128 * 384)
    found = [(b.small, b.large, b.count, [i for i, _, _ in b.members], [t for _, _, t in b.members])
             for b in batches(params, group)]
    assert found == [(128, 384, 4, [0, 2, 4], [True, False, False]), (128, 128, 1, [1], [False]),
                     (128, 768, 1, [3], [True])]
    monkeypatch.setitem(muon_module.STACK_ELEMENTS, "cpu", 2 * 128 * 384)  # two matrices a stack at most
    found = [(b.small, b.large, b.count, [i for i, _, _ in b.members]) for b in batches(params, group)]
    assert found == [(128, 384, 2, [0, 2]), (128, 128, 1, [1]), (128, 768, 1, [3]), (128, 384, 2, [4])]
    monkeypatch.setitem(muon_module.STACK_ELEMENTS, "cpu", 1)  # below one matrix: one parameter a stack
    assert [b.count for b in batches(params, group)] == [1, 1, 1, 1, 2]


def test_split_stacks_step_as_one_stack(monkeypatch):
    torch.manual_seed(0)
    tensors = [0.02 * torch.randn(s) for s in SHAPE_SETS["groups"]]
    monkeypatch.setitem(muon_module.STACK_ELEMENTS, "cpu", 2 * 32 * 96)
    assert_steps_match_the_loop(tensors, lr=0.02)


def quickstart(*sets: str):
    from kconfig.tree import parse_file, parse_overrides, resolve
    from kconfig.values import values

    return values(resolve(parse_file(ROOT / "defconfigs" / "quickstart"), *(parse_overrides(s) for s in sets))[0])


@pytest.mark.slow
@pytest.mark.parametrize("stack_elements", [None, 1 << 22], ids=["cpu-bound", "one-stack-a-shape"])
def test_the_quickstart_models_matrices_step_as_in_the_loop(stack_elements, monkeypatch):
    """The model the quickstart preset builds (with OPT_MUON=y), through the trainer's builders: the
    compact Muon's params (4 shapes, tall and wide) step as the loop steps them, in stacks of CPU's
    size and in one stack per oriented shape (3), as on a GPU."""
    from model.gpt import ModelConfig
    from optim.optimizers import Composite, OptimizerConfig
    from train.build import build_model_and_optimizer, padded_vocab
    from train.device import DeviceConfig

    cfg = quickstart("OPT_MUON=y")
    built = build_model_and_optimizer(ModelConfig.from_config(cfg, padded_vocab(97)), OptimizerConfig.from_config(cfg),
                                      DeviceConfig.from_config(cfg).fp8, 0, torch.device("cpu"))
    assert isinstance(built.optimizer, Composite) and isinstance(built.optimizer.optimizers[0], Muon)
    group = built.optimizer.optimizers[0].param_groups[0]
    tensors = [p.detach() for p in group["params"]]
    if stack_elements:
        monkeypatch.setitem(muon_module.STACK_ELEMENTS, "cpu", stack_elements)
        assert len(batches(tensors, group)) == 3
    assert len({tuple(t.shape) for t in tensors}) == 4
    settings = {k: group[k] for k in ("lr", "weight_decay", "momentum", "nesterov", "adjust_lr_fn", "ns_dtype")}
    assert_steps_match_the_loop(tensors, steps=2, **settings)


@pytest.mark.slow
def test_the_muon_tiny_preset_trains(tmp_path):
    """defconfigs/muon-tiny's model and optimizer (compact Muon on CPU) fit a fixed batch: 12 steps at its LR
    halve the loss from about the uniform guess's log(vocab)."""
    from kconfig.tree import parse_file, resolve
    from kconfig.values import values
    from model.gpt import ModelConfig
    from optim.optimizers import OptimizerConfig, implementation, set_lr
    from train.build import build_model_and_optimizer, padded_vocab
    from train.device import DeviceConfig

    cfg = values(resolve(parse_file(ROOT / "defconfigs" / "muon-tiny"))[0])
    built = build_model_and_optimizer(ModelConfig.from_config(cfg, padded_vocab(97)), OptimizerConfig.from_config(cfg),
                                      DeviceConfig.from_config(cfg).fp8, 0, torch.device("cpu"))
    assert implementation(built.optimizer.optimizers[0]).startswith("compact Muon")
    set_lr(built.optimizer, cfg.LR)
    torch.manual_seed(0)
    idx = torch.randint(0, 97, (4, 33))
    losses = []
    for _ in range(12):
        _, loss = built.model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
        loss.backward()
        built.optimizer.step()
        built.optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] > math.log(97) - 0.5 and losses[-1] < 0.5 * losses[0], losses[::4]


def test_newton_schulz_flops_count_each_matrix_on_its_smaller_side():
    from scripts.bench_optim import newton_schulz_flops

    muon = Muon([torch.zeros(32, 96), torch.zeros(96, 32), torch.zeros(2, 16, 48)])
    per_32x96 = 4 * 32 * 32 * 96 + 2 * 32**3  # X X^T, the Gram matrix squared, the product with X
    per_16x48 = 4 * 16 * 16 * 48 + 2 * 16**3
    assert newton_schulz_flops(muon) == 5 * (2 * per_32x96 + 2 * per_16x48) == 5_160_960


@pytest.mark.slow
def test_bench_optim_times_adamw_muon_and_the_loop_on_the_quickstart_model(tmp_path, monkeypatch, capsys):
    from scripts import bench_optim

    # the embedded corpus's character vocabulary, without tokenizing it here
    monkeypatch.setattr(bench_optim, "prepare", lambda cfg, root: SimpleNamespace(tokenizer=SimpleNamespace(
        vocab_size=97)))
    monkeypatch.setattr(sys, "argv", ["bench_optim.py"])
    monkeypatch.setenv("BENCH_OPTIM_REPEATS", "1")
    monkeypatch.setenv("BENCH_JSON", str(tmp_path / "optim.json"))
    monkeypatch.setenv("SET", "MICRO_BATCH=2")
    assert bench_optim.main() == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "optim.json").read_text())
    assert result["defconfig"] == "quickstart" and result["params"] == 869_504 and result["repeats"] == 1
    amx = {"muon_bf16"} if bench_optim.cpu_has_amx_bf16() else set()  # MUON_CPU_BF16 is timed where it applies
    assert set(result["step_s"]) == {"adamw", "muon", "loop"} | amx
    assert set(result["train_step_s"]) == {"adamw", "muon"} | amx
    assert ("muon_bf16_over_adamw" in result) == bool(amx) and result["ns_dtype"] == "float32"
    assert result["newton_schulz_flops"] == 2_516_582_400 and result["muon_over_adamw"] > 0
    assert "bench_optim quickstart: 869,504 params, cpu" in out and "ratio Muon/AdamW" in out
    assert "training step (forward, backward, step; 2 x 128 tokens)" in out
