"""Memory and utilization of the training process, sampled into the metrics at each log line.

GPU: memory allocated by tensors, reserved by the caching allocator and the peak allocated since
the start (GiB), and utilization (%) where NVML is available (torch.cuda.utilization needs the
nvidia-ml-py package; without it the key is left out). Every device: the process's resident host
memory (cpu_rss_gib), the number to watch on CPU runs and for host-side leaks on GPU runs.
"""

from __future__ import annotations

import os
import sys

import torch

GIB = 1024 ** 3
_nvml_broken: set[int] = set()  # devices whose utilization query failed once: not asked again


def cpu_rss_bytes() -> int | None:
    """Resident set size of this process now (Linux /proc), else its peak (resource), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def sample_system(device: torch.device) -> dict:
    out = {}
    rss = cpu_rss_bytes()
    if rss is not None:
        out["cpu_rss_gib"] = rss / GIB
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        out["gpu_mem_allocated_gib"] = torch.cuda.memory_allocated(index) / GIB
        out["gpu_mem_reserved_gib"] = torch.cuda.memory_reserved(index) / GIB
        out["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(index) / GIB
        if index not in _nvml_broken:
            try:
                out["gpu_util_pct"] = float(torch.cuda.utilization(index))
            except Exception:  # no pynvml (nvidia-ml-py), or NVML unusable in this container
                _nvml_broken.add(index)
    return out
