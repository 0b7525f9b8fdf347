"""Training health: skip optimizer steps whose loss or gradient is not finite, stop when it persists."""

from __future__ import annotations

import math


class NonFiniteGuard:
    """Counts non-finite steps; ``should_stop`` after ``limit`` of them in a row."""

    def __init__(self, limit: int):
        self.limit = limit
        self.skipped = 0  # total over the run, reported in metrics
        self.in_a_row = 0

    def check(self, loss: float, grad_norm: float) -> bool:
        """True when the step is healthy and its update should be applied."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.in_a_row >= self.limit
