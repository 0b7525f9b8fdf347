"""Device, dtype and autocast from the Training menu."""

from __future__ import annotations

import contextlib
import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(cfg, local_rank: int = 0) -> torch.device:
    """CPU, or the GPU of this process (its local rank under torchrun)."""
    if cfg.DEVICE_CUDA and not torch.cuda.is_available():
        raise RuntimeError("CONFIG_DEVICE_CUDA=y but torch sees no CUDA GPU on this machine; "
                           "select DEVICE_AUTO or DEVICE_CPU (make menuconfig, Training > Device)")
    if cfg.DEVICE_CPU or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def resolve_dtype(cfg, device: torch.device) -> str:
    """Name of the compute dtype: fp32, bf16 or fp16."""
    if cfg.DTYPE_FP32:
        return "fp32"
    if cfg.DTYPE_BF16:
        return "bf16"
    if cfg.DTYPE_FP16:
        if device.type != "cuda":
            raise RuntimeError("CONFIG_DTYPE_FP16=y needs a CUDA GPU (fp16 autocast with gradient scaling); "
                               "on CPU select DTYPE_BF16 or DTYPE_FP32")
        return "fp16"
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def setup_backend(cfg, device: torch.device, procs_on_node: int = 1) -> None:
    if device.type == "cpu":  # the node's processes share its cores
        torch.set_num_threads(max(1, (cfg.CPU_THREADS or os.cpu_count() or 1) // procs_on_node))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
