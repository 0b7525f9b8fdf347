"""Device, dtype and compile mode (train/device.py): one dtype rule for this machine and for the
run's target device, read from the DEVICE and DTYPE choices; the typed configs' defaults are Kconfig's."""

from __future__ import annotations

import pytest
import torch

from conftest import config_of
from optim.optimizers import OptimizerConfig
from train.device import DeviceConfig, compute_dtype, resolve_device, resolve_dtype, target_dtype
from train.loop_config import LoopConfig


def device(text: str = "") -> DeviceConfig:
    return DeviceConfig.from_config(config_of(text))


@pytest.mark.parametrize("text, target", [
    ("", "bf16"),  # DEVICE_AUTO: a GPU with bf16 is assumed
    ("DEVICE_CPU=y", "fp32"),
    ("DEVICE_CPU=y DTYPE_BF16=y", "bf16"),
    ("DTYPE_FP32=y", "fp32"),
    ("DTYPE_FP16=y", "fp16"),
    ("DEVICE_CUDA=y", "bf16"),
])
def test_target_dtype_is_the_dtype_rule_on_the_target_device(text, target):
    config = device(text)
    assert target_dtype(config) == target
    target_type = "cpu" if config.device == "cpu" else "cuda"
    assert compute_dtype(config, target_type, bf16_supported=True) == target


def test_auto_dtype_follows_the_device_and_fp16_needs_a_gpu():
    assert compute_dtype(device(), "cuda", bf16_supported=False) == "fp32"  # a GPU without bf16
    assert compute_dtype(device(), "cpu", bf16_supported=True) == "fp32"
    assert resolve_dtype(device("DTYPE_BF16=y"), torch.device("cpu")) == "bf16"
    with pytest.raises(RuntimeError, match="CONFIG_DTYPE_FP16=y needs a CUDA GPU"):
        resolve_dtype(device("DTYPE_FP16=y"), torch.device("cpu"))  # DEVICE_AUTO on a machine without one


def test_device_follows_the_choice(monkeypatch):
    assert resolve_device(device("DEVICE_CPU=y")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(device()) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CONFIG_DEVICE_CUDA=y but torch sees no CUDA GPU"):
        resolve_device(device("DEVICE_CUDA=y"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(device(), local_rank=3) == torch.device("cuda", 3)


def test_compile_mode_is_torchs_name_for_the_choice():
    assert device().compile_mode is None
    assert device("COMPILE=y").compile_mode == "default"
    assert device("COMPILE=y COMPILE_MODE_REDUCE_OVERHEAD=y").compile_mode == "reduce-overhead"
    assert device("COMPILE=y COMPILE_MODE_MAX_AUTOTUNE=y").compile_mode == "max-autotune"


def test_typed_configs_default_to_the_kconfig_defaults():
    defaults = config_of()
    assert DeviceConfig.from_config(defaults) == DeviceConfig()  # Fp8Config's too
    assert OptimizerConfig.from_config(defaults) == OptimizerConfig()  # ScheduleConfig's too
    assert LoopConfig.from_config(defaults) == LoopConfig()  # SampleConfig's too
    with pytest.raises(ValueError, match=r"unknown dtype 'fp8'.*CONFIG_DTYPE"):
        DeviceConfig(dtype="fp8")
