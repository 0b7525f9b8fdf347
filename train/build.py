"""A run's model and optimizer, built in the one order its losses depend on.

The trainer and 'make check' (plan/check.py) both build through here: seed every generator (every
rank alike: the same initial weights), create the GPT (its parameters are drawn in module order)
on the device, let FP8 swap its layers, let a data-parallel wrapper take the model (FSDP2 shards
the parameters in place), then build the optimizer over the parameters as they now are.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Callable

import numpy as np
import torch

from model.gpt import GPT, ModelConfig
from optim.optimizers import OptimizerConfig, build_optimizer
from train.precision import Fp8Config, apply_fp8


def padded_vocab(n: int, multiple: int = 64) -> int:
    return multiple * math.ceil(n / multiple)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclasses.dataclass
class Built:
    model: GPT
    module: torch.nn.Module  # what the forward runs: the model, or the wrapper that took it
    optimizer: torch.optim.Optimizer
    fp8: dict  # apply_fp8's report: backend, converted, kept, fused


def build_model_and_optimizer(model_config: ModelConfig, optimizer_config: OptimizerConfig, fp8: Fp8Config,
                              seed: int, device: torch.device,
                              wrap: Callable[[GPT], torch.nn.Module] = lambda gpt: gpt) -> Built:
    """Seed, GPT on ``device``, FP8, ``wrap`` (DDP/FSDP2 under torchrun), optimizer: in that order."""
    seed_everything(seed)
    gpt = GPT(model_config).to(device)
    report = apply_fp8(gpt, fp8, device)  # before the optimizer and compile see the layers
    module = wrap(gpt)
    return Built(gpt, module, build_optimizer(gpt, optimizer_config, device), report)
