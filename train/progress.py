"""A tqdm bar over optimizer steps, drawn only on a terminal.

When the output is not a terminal (CI logs, files, a pipe) there is no bar and nothing extra is
printed: the trainer's own log line every LOG_INTERVAL steps is the progress report there, and a
second kind of periodic line would only repeat it. On a terminal the bar goes to stderr while log
lines go to stdout; route the log through ``wrap_log`` so a line never lands in the middle of the bar.
"""

from __future__ import annotations

import sys

from data.progress import use_bar


class TrainProgress:
    def __init__(self, total: int, stream=None, enabled: bool | None = None):
        """enabled None: a bar when ``stream`` (default stderr) is a terminal; True: always; False: never.
        The bar appears at the first ``update``, starting at that step (a resumed run's first)."""
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.wanted = use_bar(self.stream, enabled)
        self.bar = None

    @classmethod
    def from_config(cls, cfg, total: int, stream=None) -> "TrainProgress":
        """CONFIG_PROGRESS_BAR=y: a bar on a terminal; n: never."""
        return cls(total, stream, enabled=None if cfg.PROGRESS_BAR else False)

    @property
    def enabled(self) -> bool:
        """A bar is shown, or will be at the next update."""
        return self.wanted

    def update(self, step: int, **postfix) -> None:
        """Move the bar to ``step`` (optimizer steps done); postfix values (loss=..., lr=...) are shown
        after it. Cheap: tqdm redraws at most ~10 times a second."""
        if not self.wanted:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=step, desc="train", unit="step", file=self.stream,
                            dynamic_ncols=True, leave=True)
        if postfix:
            self.bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
        self.bar.update(step - self.bar.n)

    def wrap_log(self, log):
        """``log`` with the bar (while one is shown) cleared before each line and redrawn after it."""
        if not self.wanted:
            return log

        def logged(message: str) -> None:
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
