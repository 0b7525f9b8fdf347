"""Training curriculum: sequence-length stages and batch-size warmup, as pure functions of the step.

Two independent features, both off by default:

- Sequence-length stages (CONFIG_CURRICULUM): stage i uses sequences of ``seq_len`` tokens from
  optimizer step floor(START_FRACTION x MAX_ITERS) on. With CURRICULUM_KEEP "tokens" its micro-batch
  is MICRO_BATCH x BLOCK_SIZE / seq_len sequences (same tokens per step); with "batch" it is
  MICRO_BATCH (fewer tokens per step in short stages).
- Batch-size warmup (CONFIG_BATCH_WARMUP_FRACTION): over the first W = floor(FRACTION x MAX_ITERS)
  steps the number of micro-batches per step climbs in equal stairs,
  a0 + (GRAD_ACCUM - a0) * step // W with a0 = ceil(BATCH_WARMUP_START x GRAD_ACCUM), reaching
  GRAD_ACCUM at step W. Tensor shapes never change for it.

The LR rule multiplies the scheduled LR by (tokens this step / full-step tokens) ** p, p in {0, 0.5, 1}.
Everything is a function of the step alone, so resuming needs only the step.
Fractions are multiplied as the decimals written (0.29 x 100 = 29, not 28.999...).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from fractions import Fraction

from kconfig.errors import NamedError

LR_POWERS = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}  # p by the value of CONFIG_CURRICULUM_LR


class CurriculumError(NamedError, ValueError):
    """A curriculum setting that cannot work; the message names the CONFIG_ symbols and a fix."""


@dataclass(frozen=True)
class Stage:
    index: int        # 1-based position in CONFIG_CURRICULUM_STAGES (1 when the curriculum is off)
    seq_len: int      # tokens per sequence
    micro_batch: int  # sequences per micro-batch
    start_step: int   # first optimizer step (0-based) of this stage


def parse_stages(text: str, block_size: int) -> list[tuple[int, float]]:
    """``"64:0 128:0.25 256:0.5"`` -> [(64, 0.0), (128, 0.25), (256, 0.5)], checked against ``block_size``."""
    name = "CONFIG_CURRICULUM_STAGES"
    items = text.split()
    if not items:
        raise CurriculumError(f"{name} is empty; list SEQ_LEN:START_FRACTION pairs such as "
                              f"'64:0 128:0.25 256:0.5', or set CURRICULUM=n")
    stages: list[tuple[int, float]] = []
    for n, item in enumerate(items, 1):
        where = f"{name}: stage {n} '{item}'"
        length_text, sep, fraction_text = item.partition(":")
        try:
            length, fraction = int(length_text), float(fraction_text)
        except ValueError:
            length, fraction = 0, float("nan")
        if not sep or not math.isfinite(fraction) or length < 1:
            raise CurriculumError(f"{where} is not SEQ_LEN:START_FRACTION (a positive integer, a colon and "
                                  f"a fraction, e.g. '128:0.25'); separate stages with spaces")
        if not 0 <= fraction < 1:
            raise CurriculumError(f"{where} starts at {fraction:g}; start fractions must be in [0, 1) "
                                  f"(a fraction of CONFIG_MAX_ITERS)")
        if n == 1 and fraction != 0:
            raise CurriculumError(f"{where} starts at {fraction:g}; the first stage must start at 0, "
                                  f"e.g. '{length}:0'")
        if length > block_size:
            raise CurriculumError(f"{where} is longer than CONFIG_BLOCK_SIZE={block_size}; shorten the "
                                  f"stage or raise BLOCK_SIZE")
        if stages:
            previous = f"stage {n - 1} '{items[n - 2]}'"
            if fraction <= stages[-1][1]:
                raise CurriculumError(f"{where} starts before or with {previous}; start fractions must "
                                      f"strictly increase")
            if length <= stages[-1][0]:
                raise CurriculumError(f"{where} is not longer than {previous}; sequence lengths must "
                                      f"strictly increase")
        stages.append((length, fraction))
    return stages


def _floor_times(fraction: float, n: int) -> int:
    """floor(fraction x n) on the decimal as written, free of binary rounding."""
    return math.floor(Fraction(repr(fraction)) * n)


class Curriculum:
    """Batch shape, micro-batches, tokens and LR multiplier of every optimizer step."""

    def __init__(self, stages, *, micro_batch: int, block_size: int, grad_accum: int,
                 warmup_steps: int = 0, warmup_start: int | None = None, lr_power: float = 0.0,
                 skipped: tuple[Stage, ...] = ()):
        self.stages: tuple[Stage, ...] = tuple(stages)
        if not self.stages or self.stages[0].start_step != 0:
            raise ValueError("the first stage must start at step 0")
        self.micro_batch, self.block_size, self.grad_accum = micro_batch, block_size, grad_accum
        self.warmup_start = grad_accum if warmup_start is None else warmup_start
        if not 1 <= self.warmup_start <= grad_accum:
            raise ValueError(f"warmup_start {self.warmup_start} not in [1, {grad_accum}]")
        self.warmup_steps = warmup_steps if self.warmup_start < grad_accum else 0
        self.lr_power, self.skipped = lr_power, tuple(skipped)
        self.full_tokens = micro_batch * block_size * grad_accum
        self._stage_starts = [s.start_step for s in self.stages]
        # Piecewise-constant segments (start step, tokens per step) for a closed-form tokens_before.
        rise, w = self.grad_accum - self.warmup_start, self.warmup_steps
        # Micro-batches reach warmup_start + k at step ceil(k x w / rise), and GRAD_ACCUM at step w.
        changes = ({-(-k * w // rise) for k in range(1, rise)} | {w}) if w else set()
        self._seg_starts = sorted(set(self._stage_starts) | changes)
        self._seg_tokens = [self.tokens_at(s) for s in self._seg_starts]
        self._seg_before = [0]
        for i in range(1, len(self._seg_starts)):
            span = self._seg_starts[i] - self._seg_starts[i - 1]
            self._seg_before.append(self._seg_before[-1] + span * self._seg_tokens[i - 1])

    @classmethod
    def from_config(cls, cfg) -> Curriculum:
        """Build from resolved symbols (CONFIG_ prefix dropped); raises CurriculumError with a fix."""
        mb, block, accum, iters = cfg.MICRO_BATCH, cfg.BLOCK_SIZE, cfg.GRAD_ACCUM, cfg.MAX_ITERS
        if cfg.CURRICULUM:
            pairs = parse_stages(cfg.CURRICULUM_STAGES, block)
            keep_tokens = cfg.CURRICULUM_KEEP == "tokens"
        else:
            pairs, keep_tokens = [(block, 0.0)], False
        planned = []
        for n, (length, fraction) in enumerate(pairs, 1):
            micro = mb
            if keep_tokens:
                if (mb * block) % length:
                    raise CurriculumError(
                        f"CONFIG_CURRICULUM_STAGES: stage {n} '{length}:{fraction:g}' with "
                        f"CONFIG_CURRICULUM_KEEP_TOKENS needs MICRO_BATCH x BLOCK_SIZE ({mb} x {block} = "
                        f"{mb * block}) to be divisible by {length}; use a length that divides {mb * block} "
                        f"(a power of two usually does), or choose CURRICULUM_KEEP_BATCH")
                micro = mb * block // length
            planned.append(Stage(n, length, micro, _floor_times(fraction, iters)))
        # A stage whose start rounds to the next stage's start gets no steps: skip it.
        running = [s for s, after in zip(planned, planned[1:] + [None])
                   if after is None or s.start_step < after.start_step]
        skipped = tuple(s for s in planned if s not in running)

        fraction = cfg.BATCH_WARMUP_FRACTION
        warmup_steps, start = 0, accum
        if fraction > 0:
            if accum < 2:
                raise CurriculumError(
                    f"CONFIG_BATCH_WARMUP_FRACTION={fraction:g} ramps the micro-batches per step, but "
                    f"CONFIG_GRAD_ACCUM={accum} leaves nothing to ramp; raise GRAD_ACCUM to at least 2 "
                    f"(lowering MICRO_BATCH to keep tokens per step) or set BATCH_WARMUP_FRACTION=0")
            start = min(accum, max(1, math.ceil(Fraction(repr(cfg.BATCH_WARMUP_START)) * accum)))
            warmup_steps = _floor_times(fraction, iters)
        return cls(running, micro_batch=mb, block_size=block, grad_accum=accum, warmup_steps=warmup_steps,
                   warmup_start=start, lr_power=LR_POWERS[cfg.CURRICULUM_LR], skipped=skipped)

    def stage_at(self, step: int) -> Stage:
        """The stage optimizer step ``step`` (0-based) belongs to; steps past the end stay in the last."""
        return self.stages[bisect.bisect_right(self._stage_starts, _check(step)) - 1]

    def grad_accum_at(self, step: int) -> int:
        """Micro-batches summed into optimizer step ``step``."""
        if _check(step) >= self.warmup_steps:
            return self.grad_accum
        return self.warmup_start + (self.grad_accum - self.warmup_start) * step // self.warmup_steps

    def tokens_at(self, step: int) -> int:
        """Tokens processed by optimizer step ``step``."""
        stage = self.stage_at(step)
        return stage.micro_batch * stage.seq_len * self.grad_accum_at(step)

    def tokens_before(self, step: int) -> int:
        """Total tokens of steps 0..step-1 (so tokens_before(MAX_ITERS) is the run's total)."""
        if _check(step) == 0:
            return 0
        i = bisect.bisect_right(self._seg_starts, step - 1) - 1
        return self._seg_before[i] + (step - self._seg_starts[i]) * self._seg_tokens[i]

    def lr_scale_at(self, step: int) -> float:
        """Multiplier for the scheduled LR: (tokens this step / full-step tokens) ** lr_power."""
        if self.lr_power == 0:
            return 1.0
        return (self.tokens_at(step) / self.full_tokens) ** self.lr_power

    def shapes(self) -> set[tuple[int, int]]:
        """Distinct (micro_batch, seq_len) batch shapes of the run: at most one per stage."""
        return {(s.micro_batch, s.seq_len) for s in self.stages}

    @property
    def active(self) -> bool:
        """True unless every step is the plain MICRO_BATCH x BLOCK_SIZE x GRAD_ACCUM step."""
        plain = (Stage(1, self.block_size, self.micro_batch, 0),)
        return self.stages != plain or self.warmup_steps > 0

    def describe(self) -> str:
        """One line per stage (and one for batch warmup, skipped stages, the LR rule) for the log."""
        lines = [f"stage {s.index}: seq {s.seq_len} x micro-batch {s.micro_batch} from step {s.start_step} "
                 f"({self.tokens_before(s.start_step):,} tokens)" for s in self.stages]
        if self.skipped:
            lines.append("skipped (no steps at this MAX_ITERS): "
                         + ", ".join(f"stage {s.index} (seq {s.seq_len})" for s in self.skipped))
        if self.warmup_steps:
            lines.append(f"batch warmup: {self.warmup_start} -> {self.grad_accum} micro-batches per step "
                         f"over steps 0-{self.warmup_steps - 1}")
        if self.lr_power and self.active:
            lines.append(f"LR x (tokens per step / {self.full_tokens:,}) ** {self.lr_power:g}")
        return "\n".join(lines)


def _check(step: int) -> int:
    if step < 0:
        raise ValueError(f"step {step} is negative; optimizer steps count from 0")
    return step
