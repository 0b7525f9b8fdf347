"""Progress of a long pass: a tqdm bar on a terminal, a plain log line every 10 s otherwise."""

from __future__ import annotations

import sys
import time


def is_terminal(stream) -> bool:
    """Whether a progress bar belongs on ``stream``: an interactive terminal, not a pipe or file (CI)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def use_bar(stream, enabled: bool | None) -> bool:
    """enabled None: a bar only on a terminal; True: always (tests, forced); False: never."""
    return is_terminal(stream) if enabled is None else enabled


class Progress:
    """Bytes done of a pass. The bar goes to ``stream`` (default stderr); without one, ``log`` gets
    a line every ``interval`` seconds, so CI logs and files show progress without bar redraws."""

    def __init__(self, total_bytes: int, what: str, log, interval: float = 10.0, stream=None,
                 enabled: bool | None = None):
        self.total, self.what, self.log, self.interval = total_bytes, what, log, interval
        self.done, self.start, self.last = 0, time.time(), time.time()
        self.bar = None
        stream = stream if stream is not None else sys.stderr
        if use_bar(stream, enabled):
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes or None, desc=what, unit="B", unit_scale=True, leave=False,
                            file=stream)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.time() - self.last >= self.interval:
            self.last = time.time()
            rate = self.done / max(1e-9, self.last - self.start) / 1e6
            share = f" of {self.total / 1e6:,.0f} MB ({100 * self.done / self.total:.0f}%)" if self.total else ""
            self.log(f"data: {self.what}: {self.done / 1e6:,.0f} MB{share}, {rate:.0f} MB/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
