"""Learning-rate schedules: linear warmup, then cosine, WSD or constant."""

from __future__ import annotations

import math


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    peak, warmup = cfg.LR, cfg.WARMUP_ITERS
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.LR_CONSTANT:
        return peak
    floor = cfg.MIN_LR
    if cfg.LR_WSD:
        decay_start = cfg.MAX_ITERS - int(cfg.WSD_DECAY_FRACTION * cfg.MAX_ITERS)
        if step < decay_start:
            return peak
        frac = (step - decay_start) / max(1, cfg.MAX_ITERS - decay_start)
        return peak + (floor - peak) * min(1.0, frac)
    end = cfg.LR_DECAY_ITERS or cfg.MAX_ITERS  # cosine
    if step >= end:
        return floor
    frac = (step - warmup) / max(1, end - warmup)
    return floor + 0.5 * (1.0 + math.cos(math.pi * frac)) * (peak - floor)
