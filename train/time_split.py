"""Where an attempt's wall time goes: training steps, evaluation, checkpoints, logging, the end-of-run sample
and the rest (the loop's own bookkeeping, trackers' start).

Parts nest: a checkpoint written inside an evaluation (best.pt) counts as checkpoint time, not twice. Times are
host wall-clock seconds; on a GPU a step's queued kernels finish inside whatever next synchronizes (the log
line's ``.item()``, an evaluation), so the split is exact at the granularity of log intervals, not of one step.
"""

from __future__ import annotations

import contextlib
import time

PARTS = ("train", "eval", "checkpoint", "log", "sample")


class TimeSplit:
    """Seconds per part since ``start()``; ``summary()`` adds ``other`` so the parts sum to the total."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.start()

    def start(self) -> None:
        self.began = self.clock()
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._open: list[list[float]] = []  # per open part: [start, seconds of parts nested in it]

    @contextlib.contextmanager
    def part(self, name: str):
        if name not in self.seconds:
            raise ValueError(f"unknown time part {name!r}: one of {', '.join(PARTS)}")
        frame = [self.clock(), 0.0]
        self._open.append(frame)
        try:
            yield
        finally:
            self._open.pop()
            spent = self.clock() - frame[0]
            self.seconds[name] += spent - frame[1]
            if self._open:
                self._open[-1][1] += spent

    def summary(self) -> dict[str, float]:
        """{"total_s", "<part>_s" for each part, "other_s"}: seconds of this attempt."""
        total = self.clock() - self.began
        split = {f"{name}_s": seconds for name, seconds in self.seconds.items()}
        return {"total_s": total, **split, "other_s": max(0.0, total - sum(self.seconds.values()))}

    def describe(self) -> str:
        """One line: each part's share of the total, largest first after training."""
        split = self.summary()
        total = split.pop("total_s") or 1e-9
        parts = [(name[:-2], seconds) for name, seconds in split.items()]
        return "time: " + " | ".join(f"{name} {100 * seconds / total:.1f}% ({seconds:.1f}s)"
                                     for name, seconds in parts)
