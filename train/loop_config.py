"""LoopConfig: the training loop's settings (steps, batch, intervals, checkpoints, time limit, seed)."""

from __future__ import annotations

import dataclasses

from train.sample import SampleConfig


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The Training menu as the loop reads it. The defaults are Kconfig's (tests/test_device.py
    holds them equal), for direct construction; a run builds it with from_config."""

    max_iters: int = 1000  # optimizer steps
    micro_batch: int = 16  # sequences per micro-batch at full length
    grad_accum: int = 1  # micro-batches per step once any batch warmup is over
    block_size: int = 256  # tokens per full-length sequence (CONFIG_BLOCK_SIZE)
    max_time: int = 0  # seconds per attempt, 0 = no limit
    log_interval: int = 10  # steps
    eval_interval: int = 250  # steps
    eval_batches: int = 20  # micro-batches per evaluated split
    checkpoint_interval: int = 0  # steps, 0 = only at the end
    checkpoint_minutes: int = 5  # also every N minutes, 0 = off
    checkpoint_keep: int = 2  # step checkpoints kept
    skip_nonfinite: bool = True  # skip updates whose loss or gradient norm is NaN/Inf
    max_bad_steps: int | None = 10  # stop after that many skipped in a row; None while skip_nonfinite is off
    seed: int = 1337
    sample: SampleConfig = SampleConfig()  # the end-of-run sample
    init_from: str = ""  # warm start: a run directory, checkpoint file or HF folder; "" = a fresh model
    init_from_checkpoint: str | None = None  # "best" or "latest" of an INIT_FROM run directory
    init_from_optimizer: bool = False  # carry the parent's optimizer state too

    @classmethod
    def from_config(cls, cfg) -> LoopConfig:
        return cls(max_iters=cfg.MAX_ITERS, micro_batch=cfg.MICRO_BATCH, grad_accum=cfg.GRAD_ACCUM,
                   block_size=cfg.BLOCK_SIZE, max_time=cfg.MAX_TIME, log_interval=cfg.LOG_INTERVAL,
                   eval_interval=cfg.EVAL_INTERVAL, eval_batches=cfg.EVAL_BATCHES,
                   checkpoint_interval=cfg.CHECKPOINT_INTERVAL, checkpoint_minutes=cfg.CHECKPOINT_MINUTES,
                   checkpoint_keep=cfg.CHECKPOINT_KEEP, skip_nonfinite=cfg.SKIP_NONFINITE,
                   max_bad_steps=cfg.MAX_BAD_STEPS, seed=cfg.SEED, sample=SampleConfig.from_config(cfg),
                   init_from=cfg.INIT_FROM, init_from_checkpoint=cfg.INIT_FROM_CHECKPOINT,
                   init_from_optimizer=cfg.INIT_FROM_OPTIMIZER)
