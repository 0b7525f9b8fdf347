"""Throughput, MFU and the metrics.jsonl writer."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
    """Appends one JSON object per line; flushed per line so a crash loses nothing logged."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, **record) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
