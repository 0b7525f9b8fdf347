"""RMSNorm with a hand-written backward, for QK-norm (model/gpt.py's make_qk_norm).

``rms_norm(x, weight, eps)`` is x / sqrt(mean(x^2) + eps) * weight over the last dim. On CPU torch's
RMSNorm is composite: autograd records about a dozen elementwise ops per call, each a pass over
the tensor (for QK-norm, a tensor as large as the queries). This one runs the forward in four
passes and the backward in five, with the same math in another order: outputs equal torch's within
rounding, gradients within 1e-6 relative (tests/test_attention.py). It keeps what torch's keeps for
fp32 inputs (the fp32 normalized tensor and 1/rms per row, as train/memory.py counts); a
low-precision input goes through torch's own RMSNorm, which also keeps an fp32 copy of it.

The block and final norms stay torch's nn.RMSNorm, so quickstart's numbers stay torch's to the
last digit; this one measured about 5% more tokens/s there too (scripts/bench_blocks.py's models).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class RMSNormFunction(torch.autograd.Function):
    """Keeps the normalized x and 1/rms (one value per row) for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        inv_rms = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
        normed = x * inv_rms
        ctx.save_for_backward(normed, inv_rms, weight)
        return normed * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, inv_rms, weight = ctx.saved_tensors
        grad_weight = (grad * normed).flatten(0, -2).sum(0)
        grad_normed = grad * weight
        # d/dx of x * inv_rms: inv_rms * (g - normed * mean(g * normed)) per row.
        dot = (grad_normed * normed).mean(dim=-1, keepdim=True)
        return torch.addcmul(grad_normed, normed, dot, value=-1.0).mul_(inv_rms), grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x over its last dim times weight (D,): RMSNormFunction for fp32 x and weight,
    torch's RMSNorm otherwise."""
    if x.dtype == weight.dtype == torch.float32:
        return RMSNormFunction.apply(x, weight, eps)
    return nn.functional.rms_norm(x, (x.size(-1),), weight, eps)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter, same state dict key) computed by rms_norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
