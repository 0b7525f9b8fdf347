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
  - Newton-Schulz runs in ``ns_dtype``: by default fp32 on CPU (bf16 matmuls are slow on CPUs
    without AMX) and bf16 on CUDA (as torch's does everywhere).

The step does per-matrix math with fewer, larger ops: momentum, Nesterov, weight decay and the update
are foreach ops over a group, and matrices of one shape (a tall one counts as its transpose) are
stacked so Newton-Schulz runs once per stack in batched matmuls (bmm / baddbmm into reused buffers).
The result equals the matrix-by-matrix loop it replaced to fp32 rounding (that loop is
scripts/bench_optim.py's LoopMuon, the oracle of tests/test_muon.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: steepest slope at 0
NS_STEPS = 5
ADJUST_LR_FNS = ("original", "match_rms_adamw")


def newton_schulz_(x: Tensor, steps: int = NS_STEPS, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                   eps: float = 1e-7) -> Tensor:
    """Orthogonalize each wide matrix of the stack ``x`` (n, s, l), s <= l; returns the result, which is
    ``x`` or a buffer of its shape (``x`` is overwritten either way).

    Dividing by the Frobenius norm puts every singular value in [0, 1]. Each step maps
    X -> a X + (b X X^T + c (X X^T)^2) X, i.e. every singular value s -> a s + b s^3 + c s^5 with the
    singular vectors unchanged; the polynomial pushes small values up fast and holds [0.7, 1.2].
    The Gram matrix X X^T (s x s) is over the smaller dim. One batched matmul per product for the
    whole stack, into buffers allocated once: the two X's swap roles each step.
    """
    a, b, c = coefficients
    x.div_(x.norm(dim=(-2, -1), keepdim=True).clamp_(min=eps))
    gram = x.new_empty(x.shape[0], x.shape[1], x.shape[1])
    poly, nxt = torch.empty_like(gram), torch.empty_like(x)
    for _ in range(steps):
        torch.bmm(x, x.mT, out=gram)
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=poly)  # b G + c G^2
        torch.baddbmm(x, poly, x, beta=a, out=nxt)  # a X + (b G + c G^2) X
        x, nxt = nxt, x
    return x


def orthogonalize(m: Tensor, steps: int = NS_STEPS, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> Tensor:
    """Approximately U V^T for each matrix M = U S V^T in the last two dims of ``m``, in ``dtype``
    (a new tensor; tall matrices are transposed so the Gram matrix is over the smaller dim)."""
    rows, cols = m.shape[-2:]
    x = m.reshape(-1, rows, cols)
    x = (x.mT if rows > cols else x).to(dtype, memory_format=torch.contiguous_format, copy=True)
    x = newton_schulz_(x, steps, coefficients, eps)
    return (x.mT if rows > cols else x).reshape(m.shape)


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
        """One step for every matrix with a gradient: the momentum, decay and update of a group in foreach
        ops; Newton-Schulz once per stack of same-shape matrices (see batches)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            momentum, lr = group["momentum"], group["lr"]
            grads = [p.grad for p in params]
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)  # buf <- momentum * buf + (1 - momentum) * grad
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])  # decoupled, at the group's LR
            for batch in batches(params, group):
                x = batch.stack(grads, bufs, momentum if group["nesterov"] else None)
                x = newton_schulz_(x, group["ns_steps"], group["ns_coefficients"], group["eps"])
                torch._foreach_add_(batch.params, batch.updates(x), alpha=-lr * batch.lr_ratio)
        return loss


# The most elements one stack holds (or one parameter, if larger), by device type (a test sets small ones).
# One stack per shape up to 2^22 elements (16 MiB in fp32): on a GPU each matmul is a kernel launch; on the
# 2-core development machine, idle, the quickstart model's Muon step took 10.3 ms at 2^22 against 13.0 ms at
# 2^17 (L2-sized stacks) with 2 threads, and 20.6 against 19.9 ms with 1 thread (make bench-optim).
STACK_ELEMENTS: dict[str, int] = {}
STACK_ELEMENTS_DEFAULT = 1 << 22


@dataclass
class Batch:
    """Matrices of one oriented shape (small, large), Newton-Schulz dtype and LR ratio, stacked for one
    batched Newton-Schulz: ``members`` are (index into the group's params, parameter, transposed)."""

    small: int
    large: int
    dtype: torch.dtype
    lr_ratio: float
    members: list[tuple[int, Tensor, bool]] = field(default_factory=list)
    count: int = 0  # matrices in the stack (a 3-D parameter brings its leading dims' product)

    @property
    def params(self) -> list[Tensor]:
        return [p for _, p, _ in self.members]

    def stack(self, grads: list[Tensor], bufs: list[Tensor], nesterov: float | None) -> Tensor:
        """The (count, small, large) stack of the members' updates, each written straight into its slot:
        the momentum ``bufs[i]``, or with ``nesterov`` (the momentum) ``grads[i].lerp(bufs[i], nesterov)``."""
        p0 = self.members[0][1]
        x = torch.empty(self.count, self.small, self.large, dtype=self.dtype, device=p0.device)
        for slot, (i, p, transposed) in zip(self.slots(x), self.members):
            slot = slot.mT if transposed else slot  # the parameter's own orientation
            buf = bufs[i].reshape(slot.shape)
            if nesterov is None:
                slot.copy_(buf)
            else:
                torch.lerp(grads[i].reshape(slot.shape), buf, nesterov, out=slot)
        return x

    def updates(self, x: Tensor) -> list[Tensor]:
        """Views of the orthogonalized stack in each parameter's shape and dtype."""
        x = x.to(self.members[0][1].dtype)
        return [(slot.mT if transposed else slot).reshape(p.shape)
                for slot, (_, p, transposed) in zip(self.slots(x), self.members)]

    def slots(self, x: Tensor) -> list[Tensor]:
        out, start = [], 0
        for _, p, _ in self.members:
            n = p.numel() // (self.small * self.large)
            out.append(x[start:start + n])
            start += n
        return out


def batches(params: list[Tensor], group: dict) -> list[Batch]:
    """The group's matrices by (smaller dim, larger dim, device, dtypes, LR ratio), in parameter order;
    a tall matrix joins the wide ones of its transposed shape. Each Batch holds at most STACK_ELEMENTS
    elements for the device (or one parameter, if that is larger)."""
    open_batches: dict[tuple, Batch] = {}
    done: list[Batch] = []
    for i, p in enumerate(params):
        rows, cols = p.shape[-2:]
        dtype = group["ns_dtype"] or (torch.float32 if p.device.type == "cpu" else torch.bfloat16)
        ratio = lr_ratio(group["adjust_lr_fn"], p.shape)
        key = (min(rows, cols), max(rows, cols), p.device, p.dtype, dtype, ratio)
        n = p.numel() // (rows * cols)
        batch = open_batches.get(key)
        limit = STACK_ELEMENTS.get(p.device.type, STACK_ELEMENTS_DEFAULT)
        if batch is not None and (batch.count + n) * rows * cols > limit:
            done.append(open_batches.pop(key))
            batch = None
        if batch is None:
            batch = open_batches[key] = Batch(min(rows, cols), max(rows, cols), dtype, ratio)
        batch.members.append((i, p, rows > cols))
        batch.count += n
    return sorted(done + list(open_batches.values()), key=lambda b: b.members[0][0])  # by first parameter
