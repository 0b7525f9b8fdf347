"""Optimizer construction. New optimizers add a Kconfig choice option and a branch here."""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings (2-D+); none on biases and norm gains."""
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) tensors are yielded once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.WEIGHT_DECAY)
    if cfg.OPT_ADAMW:
        # The fused kernel exists for CUDA (and CPU in recent torch); fall back to foreach elsewhere.
        fused = device.type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=cfg.LR, betas=(cfg.BETA1, cfg.BETA2), eps=cfg.ADAM_EPS,
                                 fused=fused)
    raise ValueError("no optimizer selected in the Optimizer menu")


def describe(optimizer: torch.optim.Optimizer) -> str:
    """One line per parameter group: name, tensors, parameters, weight decay."""
    lines = [f"optimizer: {type(optimizer).__name__}"]
    for g in optimizer.param_groups:
        n = sum(p.numel() for p in g["params"])
        lines.append(f"  group {g.get('name', '?')}: {len(g['params'])} tensors, {n:,} params, "
                     f"weight_decay={g['weight_decay']}")
    return "\n".join(lines)
