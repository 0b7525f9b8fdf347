"""Learning-rate schedules: linear warmup, then cosine, WSD or constant."""

from __future__ import annotations

import math
from dataclasses import dataclass

SHAPES = ("cosine", "wsd", "constant")  # the values of CONFIG_LR_SCHEDULE


@dataclass(frozen=True)
class ScheduleConfig:
    """The LR schedule menu, and the run length it spans. The defaults are Kconfig's
    (tests/test_device.py holds them equal), for direct construction; a run builds it with from_config."""

    lr: float = 6e-4  # peak (CONFIG_LR)
    warmup_iters: int = 100
    max_iters: int = 1000
    shape: str = "cosine"  # after warmup: cosine | wsd | constant (CONFIG_LR_SCHEDULE)
    min_lr: float | None = 6e-5  # the floor of cosine and WSD; None for constant
    decay_iters: int | None = 0  # cosine: steps until MIN_LR, 0 = max_iters; None for the others
    wsd_decay_fraction: float | None = None  # WSD: the final fraction of max_iters that decays

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown LR schedule {self.shape!r}; expected one of {SHAPES} (CONFIG_LR_SCHEDULE)")
        if self.shape != "constant" and self.min_lr is None:
            raise ValueError(f"the {self.shape} schedule needs min_lr (CONFIG_MIN_LR)")
        if self.shape == "wsd" and self.wsd_decay_fraction is None:
            raise ValueError("the wsd schedule needs wsd_decay_fraction (CONFIG_WSD_DECAY_FRACTION)")

    @classmethod
    def from_config(cls, cfg) -> ScheduleConfig:
        return cls(lr=cfg.LR, warmup_iters=cfg.WARMUP_ITERS, max_iters=cfg.MAX_ITERS, shape=cfg.LR_SCHEDULE,
                   min_lr=cfg.MIN_LR, decay_iters=cfg.LR_DECAY_ITERS, wsd_decay_fraction=cfg.WSD_DECAY_FRACTION)


def lr_at(step: int, schedule: ScheduleConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    peak, warmup, iters = schedule.lr, schedule.warmup_iters, schedule.max_iters
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule.shape == "constant":
        return peak
    floor = schedule.min_lr
    if schedule.shape == "wsd":
        decay_start = iters - int(schedule.wsd_decay_fraction * iters)
        if step < decay_start:
            return peak
        frac = (step - decay_start) / max(1, iters - decay_start)
        return peak + (floor - peak) * min(1.0, frac)
    end = schedule.decay_iters or iters  # cosine
    if step >= end:
        return floor
    frac = (step - warmup) / max(1, end - warmup)
    return floor + 0.5 * (1.0 + math.cos(math.pi * frac)) * (peak - floor)
