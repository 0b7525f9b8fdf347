"""Muon (Jordan et al. 2024): momentum whose update is orthogonalized, for hidden weight matrices.

For a momentum matrix M = U S V^T, the ideal update is U V^T: every singular value set to 1, so no
direction of the update dominates. Five steps of a quintic Newton-Schulz iteration approximate it
without an SVD; with the coefficients below every singular value lands in roughly [0.7, 1.2]
rather than exactly 1, which trains as well (see torch.optim.Muon's notes).

Same semantics as torch.optim.Muon (EMA momentum, Nesterov, decoupled weight decay at the group's
LR, the "match_rms_adamw" scale 0.2 * sqrt(max(rows, cols)) so it runs at AdamW's LR), and the
same state (one "momentum_buffer" per parameter). Two differences, on purpose:
  - any parameter with dim >= 2 is a stack of matrices over its leading dims (the last two are the
    matrix), so MoE expert weights (E, in, out) are orthogonalized per expert, in one batched matmul;
  - Newton-Schulz runs in ``ns_dtype``: by default fp32 on CPU (bf16 matmuls are slow there) and
    bf16 on CUDA (as torch's does everywhere).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: steepest slope at 0
NS_STEPS = 5
ADJUST_LR_FNS = ("original", "match_rms_adamw")


def orthogonalize(m: Tensor, steps: int = NS_STEPS, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> Tensor:
    """Approximately U V^T for each matrix M = U S V^T in the last two dims of ``m``, in ``dtype``.

    Dividing by the Frobenius norm puts every singular value in [0, 1]. Each step maps
    X -> a X + (b X X^T + c (X X^T)^2) X, i.e. every singular value s -> a s + b s^3 + c s^5 with the
    singular vectors unchanged; the polynomial pushes small values up fast and holds [0.7, 1.2].
    The Gram matrix X X^T is taken over the smaller dim (wide matrices; tall ones are transposed).
    """
    a, b, c = coefficients
    rows, cols = m.shape[-2:]
    x = m.reshape(-1, rows, cols).to(dtype)
    if rows > cols:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if rows > cols:
        x = x.mT
    return x.reshape(m.shape)


def lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The factor on the LR for one matrix of ``shape`` (rows, cols are its last two dims)."""
    rows, cols = shape[-2:]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))  # an orthogonal update's RMS is 1/sqrt(max): match AdamW's ~0.2
    return math.sqrt(max(1.0, rows / cols))  # "original" (or None), as torch's default


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = NS_STEPS, adjust_lr_fn: str | None = "match_rms_adamw",
                 ns_dtype: torch.dtype | None = None):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"Muon: invalid lr {lr}, weight_decay {weight_decay} or momentum {momentum}")
        if adjust_lr_fn is not None and adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"Muon: adjust_lr_fn {adjust_lr_fn!r} is not one of {ADJUST_LR_FNS}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                                      adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for i, p in enumerate(group["params"]):
            if p.dim() < 2:
                raise ValueError(f"Muon: parameter {i} of group {group.get('name', len(self.param_groups) - 1)!r} "
                                 f"has shape {tuple(p.shape)}; Muon orthogonalizes matrices (dim >= 2, the last "
                                 f"two dims the matrix). Give vectors and scalars to AdamW.")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, lr = group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - momentum)  # buf <- momentum * buf + (1 - momentum) * grad
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                dtype = group["ns_dtype"] or (torch.float32 if p.device.type == "cpu" else torch.bfloat16)
                update = orthogonalize(update, group["ns_steps"], group["ns_coefficients"], group["eps"], dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * lr_ratio(group["adjust_lr_fn"], p.shape))
        return loss
