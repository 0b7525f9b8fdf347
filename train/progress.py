"""Training progress that tells the time: a tqdm bar on a terminal, timed step lines everywhere.

The trainer logs a step line every LOG_INTERVAL steps; routed through ``wrap_log`` it gains this
attempt's wall time and an ETA, which is what a piped log (Slurm, CI, a file) shows as progress:

    step    100/5000 | loss 3.2100 | lr 6.00e-04 | grad norm 0.512 | 12,345 tok/s | elapsed 0:01:23 | eta 1:08:01

(``STEP_LINE`` reads one back). On a terminal a bar also goes to stderr, its postfix showing the last
step line's loss, tokens/s and ETA; log lines go to stdout, and ``wrap_log`` clears the bar before each
line so a line never lands in the middle of it. Off a terminal there is no bar and nothing else.

elapsed and ETA count wall time (evaluations and checkpoints included) since this attempt's first
step, so a resumed run's rate is not diluted by its earlier attempts: ETA = elapsed / steps done this
attempt * steps left to MAX_ITERS. With MAX_TIME the run stops at the time limit if that comes first;
the ETA is then the time left to the limit and the line says ``eta 0:20:00 (time limit)``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time

from data.progress import use_bar

# A trainer step line (train/trainer.py's log_step), with or without the timing this module appends.
STEP_LINE = re.compile(r"^step +(?P<step>\d+)/(?P<total>\d+) \| loss (?P<loss>\S+) \|.*? \| (?P<tokens_per_s>[\d,]+) "
                       r"tok/s(?:.*? \| elapsed (?P<elapsed>\d+:\d\d:\d\d) \| eta (?P<eta>\d+:\d\d:\d\d|\?)"
                       r"(?P<limit> \(time limit\))?)?")


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall time of this attempt and the estimate of what is left (None: no step done yet)."""

    elapsed: float
    eta: float | None
    time_limited: bool  # the MAX_TIME limit comes before MAX_ITERS

    def text(self) -> str:
        eta = "?" if self.eta is None else hms(self.eta)
        return f"elapsed {hms(self.elapsed)} | eta {eta}" + (" (time limit)" if self.time_limited else "")


def estimate(steps_done: int, elapsed: float, steps_left: int, max_time: float = 0) -> Timing:
    """ETA from this attempt's rate (``elapsed`` seconds for ``steps_done`` steps) over ``steps_left``
    steps; with ``max_time`` (seconds per attempt, 0 = none) no later than the time limit."""
    eta = elapsed / steps_done * steps_left if steps_done > 0 else None
    if max_time:
        to_limit = max(0.0, max_time - elapsed)
        if eta is None or to_limit < eta:
            return Timing(elapsed, to_limit, True)
    return Timing(elapsed, eta, False)


def hms(seconds: float) -> str:
    """Seconds as h:mm:ss (hours unbounded: 50:00:00), rounded to the second."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class TrainProgress:
    def __init__(self, total: int, stream=None, enabled: bool | None = None, max_time: float = 0,
                 clock=time.monotonic):
        """total: MAX_ITERS. enabled None: a bar when ``stream`` (default stderr) is a terminal; True:
        always; False: never. max_time: MAX_TIME (seconds per attempt, 0 = none). The bar appears, and
        the clock starts, at the first ``update``: the step this attempt starts from."""
        self.total, self.max_time, self.clock = total, max_time, clock
        self.stream = stream if stream is not None else sys.stderr
        self.wanted = use_bar(self.stream, enabled)
        self.bar = None
        self.first_step = self.first_time = None

    @classmethod
    def from_config(cls, cfg, total: int, stream=None) -> "TrainProgress":
        """CONFIG_PROGRESS_BAR=y: a bar on a terminal; n: never. CONFIG_MAX_TIME bounds the ETA."""
        return cls(total, stream, enabled=None if cfg.PROGRESS_BAR else False, max_time=cfg.MAX_TIME)

    @property
    def enabled(self) -> bool:
        """A bar is shown, or will be at the next update."""
        return self.wanted

    def update(self, step: int, **postfix) -> None:
        """Move to ``step`` (optimizer steps done); postfix values (loss=..., lr=...) are shown after
        the bar. Cheap: tqdm redraws at most ~10 times a second."""
        if self.first_step is None:
            self.first_step, self.first_time = step, self.clock()
        if not self.wanted:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=step, desc="train", unit="step", file=self.stream,
                            dynamic_ncols=True, leave=True)
        if postfix:
            self.bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
        self.bar.update(step - self.bar.n)

    def timing(self, step: int) -> Timing:
        """elapsed and ETA at ``step``, from this attempt's first update (none yet: nothing elapsed)."""
        if self.first_step is None:
            return estimate(0, 0.0, self.total - step, self.max_time)
        return estimate(step - self.first_step, self.clock() - self.first_time, self.total - step, self.max_time)

    def timed(self, message: str) -> str:
        """A step line with elapsed and ETA appended (and the bar's postfix set from it); any other
        message unchanged."""
        found = STEP_LINE.match(message)
        if found is None or found["elapsed"]:
            return message
        timing = self.timing(int(found["step"]))
        if self.bar is not None:
            eta = "?" if timing.eta is None else hms(timing.eta) + (" (limit)" if timing.time_limited else "")
            self.bar.set_postfix({"loss": found["loss"], "tok/s": found["tokens_per_s"], "eta": eta}, refresh=False)
        return f"{message} | {timing.text()}"

    def wrap_log(self, log):
        """``log`` with step lines timed (``timed``) and, while a bar is shown, the bar cleared before
        each line and redrawn after it."""

        def logged(message: str) -> None:
            message = self.timed(message)
            if self.bar is None:
                log(message)
                return
            with self.bar.external_write_mode(file=self.stream):
                log(message)

        return logged

    def close(self) -> None:
        """Finish the bar; later updates draw none."""
        self.wanted = False
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else value
