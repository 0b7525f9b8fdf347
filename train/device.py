"""Device, dtype, autocast and compile mode from the Training menu, FP8 from its precision menu."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from train.precision import Fp8Config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")  # the values of CONFIG_DEVICE


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """Where and in what precision a run computes. The defaults are Kconfig's (tests/test_device.py
    holds them equal), for direct construction; a run builds it with from_config."""

    device: str = "auto"  # auto | cpu | cuda (CONFIG_DEVICE)
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (CONFIG_DTYPE)
    cpu_threads: int = 0  # 0 = every core of the node, shared by its processes
    compile_mode: str | None = None  # torch.compile's mode (default | reduce-overhead | max-autotune); None: eager
    fp8: Fp8Config = Fp8Config()

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; expected one of {DEVICES} (CONFIG_DEVICE)")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected auto or one of {tuple(DTYPES)} (CONFIG_DTYPE)")

    @classmethod
    def from_config(cls, cfg) -> DeviceConfig:
        # CONFIG_COMPILE_MODE's values are torch's mode names with "_" for "-".
        return cls(device=cfg.DEVICE, dtype=cfg.DTYPE, cpu_threads=cfg.CPU_THREADS,
                   compile_mode=cfg.COMPILE_MODE.replace("_", "-") if cfg.COMPILE else None,
                   fp8=Fp8Config.from_config(cfg))


def resolve_device(config: DeviceConfig, local_rank: int = 0) -> torch.device:
    """CPU, or the GPU of this process (its local rank under torchrun)."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CONFIG_DEVICE_CUDA=y but torch sees no CUDA GPU on this machine; "
                           "select DEVICE_AUTO or DEVICE_CPU (make menuconfig, Training > Device)")
    if config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def compute_dtype(config: DeviceConfig, device_type: str, bf16_supported: bool) -> str:
    """The one dtype rule: fp32, bf16 or fp16 on a device of ``device_type`` ("cpu" or "cuda")."""
    if config.dtype == "fp16" and device_type != "cuda":
        raise RuntimeError("CONFIG_DTYPE_FP16=y needs a CUDA GPU (fp16 autocast with gradient scaling); "
                           "on CPU select DTYPE_BF16 or DTYPE_FP32")
    if config.dtype != "auto":
        return config.dtype
    return "bf16" if device_type == "cuda" and bf16_supported else "fp32"


def resolve_dtype(config: DeviceConfig, device: torch.device) -> str:
    """The compute dtype on ``device``, this machine's."""
    return compute_dtype(config, device.type, device.type == "cuda" and torch.cuda.is_bf16_supported())


def target_dtype(config: DeviceConfig) -> str:
    """The compute dtype on the run's target device, known without it: a GPU (with bf16) unless DEVICE
    is cpu. For 'make check' and the memory prediction, which may run on another machine."""
    return compute_dtype(config, "cpu" if config.device == "cpu" else "cuda", bf16_supported=True)


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def setup_backend(config: DeviceConfig, device: torch.device, procs_on_node: int = 1) -> None:
    if device.type == "cpu":  # the node's processes share its cores
        torch.set_num_threads(max(1, (config.cpu_threads or os.cpu_count() or 1) // procs_on_node))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def compile_model(module: torch.nn.Module, mode: str, shapes: int):
    """torch.compile with static shapes: one graph per batch shape (a curriculum stage) and mode,
    never a recompile per step. Eval and train mode count separately, hence the headroom."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * shapes + 2)
    return torch.compile(module, mode=mode, dynamic=False)
