"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

The update is the sign of an interpolation between the momentum and the gradient,
so every element moves by exactly lr (plus decoupled weight decay); the momentum
is then updated with a second, slower interpolation. One state tensor per
parameter (half of AdamW's). Typical LR is 3-10x smaller than AdamW's and weight
decay 3-10x larger.
"""

from __future__ import annotations

import torch


class Lion(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        if lr < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Lion: invalid lr {lr} or betas {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            grads = [p.grad for p in params]
            momenta = [self.state[p].setdefault("exp_avg", torch.zeros_like(p)) for p in params]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            update = torch._foreach_lerp(momenta, grads, 1 - beta1)  # beta1 * m + (1 - beta1) * g
            torch._foreach_sign_(update)
            torch._foreach_add_(params, update, alpha=-group["lr"])
            torch._foreach_lerp_(momenta, grads, 1 - beta2)  # m <- beta2 * m + (1 - beta2) * g
        return loss
