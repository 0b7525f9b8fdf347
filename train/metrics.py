"""Throughput, MFU and the metrics.jsonl writer."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

from kconfig.errors import NamedError

# Dense bf16 tensor-core peaks (FLOP/s) from vendor datasheets, matched by substring
# of torch.cuda.get_device_name(). MFU is reported against these.
GPU_PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
]


def peak_flops(device_name: str) -> float | None:
    for key, peak in GPU_PEAK_FLOPS:
        if key in device_name:
            return peak
    return None


def mfu(flops_per_token: int, tokens_per_s: float, device_name: str) -> float | None:
    """Model FLOPs utilization, or None where no peak is known (CPU, unlisted GPUs)."""
    peak = peak_flops(device_name)
    return None if peak is None else flops_per_token * tokens_per_s / peak


class MetricsLog:
    """Appends one JSON object per line, opening the file at the first; flushed per line so a crash
    loses nothing logged. With path None (ranks other than 0) it writes nothing."""

    def __init__(self, path: Path | None):
        self.path = None if path is None else Path(path)
        self.file = None

    def write(self, **record) -> None:
        if self.path is None:
            return
        if self.file is None:
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.write(json.dumps(_finite(record)) + "\n")
        self.file.flush()

    def resume_at(self, step: int, warn=print) -> None:
        """A run resumes after ``step`` (its checkpoint): drop what the interrupted attempt logged
        after it, and a torn last line (keep_until)."""
        if self.path is None or not self.path.exists():
            return
        self.close()  # keep_until replaces the file; records go on to the new one
        keep_until(self.path, step, warn=warn)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class MetricsError(NamedError):
    """metrics.jsonl is damaged somewhere other than its last line; the message names the line."""


def keep_until(path: Path, step: int, warn=print) -> int:
    """Resume: drop the records an interrupted attempt logged after ``step`` (its checkpoint), and a torn
    final line (a short write at a full disk or a kill), with a warning; rewrite the file atomically.
    A damaged line elsewhere is a MetricsError naming the file and line. Returns the records kept."""
    from kconfig.atomic import write_text_if_changed

    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for lineno, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            record_step = record["step"]
        except (ValueError, TypeError, KeyError):
            if lineno == len(lines):
                warn(f"warning: {path}:{lineno}: dropped a torn last line ({line[:60]!r}), as a crash "
                     f"mid-write leaves it")
                continue
            raise MetricsError(f"{path}:{lineno}: not a metrics record ({line[:60]!r}); the file was edited "
                               f"or damaged. Remove or repair that line, then 'make continue' again") from None
        if record_step <= step:
            kept.append(line)
    write_text_if_changed(Path(path), "".join(line + "\n" for line in kept))
    return len(kept)


def _finite(value):
    """NaN/Inf floats as null (strict JSON), inside dicts too (val_losses, data_share)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


class Throughput:
    """Tokens/s over logging intervals, not counting time spent in evaluation and checkpoints.

    Each step reports its own token count: a curriculum or batch warmup varies it.
    """

    def __init__(self):
        self.total_time, self.total_tokens = 0.0, 0
        self._restart()

    def _restart(self) -> None:
        self.start, self.paused, self.tokens = time.perf_counter(), 0.0, 0

    def step(self, tokens: int) -> None:
        self.tokens += tokens

    @contextlib.contextmanager
    def pause(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - t0

    def interval(self) -> float:
        """Tokens/s since the previous call (call it right after a host sync)."""
        elapsed = max(time.perf_counter() - self.start - self.paused, 1e-9)
        self.total_time += elapsed
        self.total_tokens += self.tokens
        tps = self.tokens / elapsed
        self._restart()
        return tps

    @property
    def average(self) -> float:
        return self.total_tokens / self.total_time if self.total_time else 0.0
