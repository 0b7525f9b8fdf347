"""The compact Muon: Newton-Schulz against the SVD, near-orthogonal updates, per-matrix stacks,
parity with torch.optim.Muon, weight decay, LR scale, state round trip, and named errors."""

from __future__ import annotations

import io
import math

import pytest
import torch

from optim.muon import NS_COEFFICIENTS, Muon, orthogonalize

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
