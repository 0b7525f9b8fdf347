"""Every OptimizerConfig field reaches the torch optimizer that uses it: each Optimizer-menu value,
set away from its default, is what the built optimizer's parameter groups hold (tests/
test_menus_reach_configs.py holds the symbols to the config fields; this holds the fields to their
consumer). A builder that drops a field (AdamW without ``eps``, Lion without ``betas``) leaves the
optimizer at its own default and training still converges."""

from __future__ import annotations

import pytest
import torch

from conftest import config_of
from model.gpt import GPT, ModelConfig
from optim.optimizers import OptimizerConfig, build_optimizer, set_lr

# Every shared value off its default (and off every optimizer's own default).
SHARED = ('LR="2e-3" WEIGHT_DECAY="0.07" BETA1="0.81" BETA2="0.97" ADAM_EPS="3e-7" EMBEDDING_LR_SCALE="1.5" '
          'HEAD_LR_SCALE="2.5" ')
SCALES = {"matrices": 1.0, "embeddings": 1.5, "head": 2.5, "vectors": 1.0}
DECAY = {"matrices": 0.07, "embeddings": 0.07, "head": 0.07, "vectors": 0.0}


def built(text: str):
    config = OptimizerConfig.from_config(config_of(SHARED + text))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                            tie_embeddings=False))
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    set_lr(optimizer, config.lr)
    return optimizer, {g["name"]: g for g in optimizer.param_groups}


def test_adamw_takes_betas_eps_decay_and_each_groups_lr_scale():
    optimizer, groups = built("OPT_ADAMW=y")
    assert isinstance(optimizer, torch.optim.AdamW) and set(groups) == set(SCALES)
    for name, g in groups.items():
        assert (g["betas"], g["eps"], g["weight_decay"]) == ((0.81, 0.97), 3e-7, DECAY[name]), name
        assert g["lr"] == pytest.approx(2e-3 * SCALES[name]), name


def test_lion_takes_betas_decay_and_its_lr_scale():
    optimizer, groups = built('OPT_LION=y LION_LR_SCALE="0.4"')
    for name, g in groups.items():
        assert (g["betas"], g["weight_decay"]) == ((0.81, 0.97), DECAY[name]), name
        assert g["lr"] == pytest.approx(2e-3 * 0.4 * SCALES[name]), name


@pytest.mark.parametrize("momentum", ["0.6", "0"])
def test_sgd_takes_momentum_nesterov_decay_and_its_lr_scale(momentum):
    optimizer, groups = built(f'OPT_SGD=y SGD_LR_SCALE="30" SGD_MOMENTUM="{momentum}"')
    for name, g in groups.items():
        assert (g["momentum"], g["nesterov"], g["weight_decay"]) == (float(momentum), momentum != "0", DECAY[name])
        assert g["lr"] == pytest.approx(2e-3 * 30 * SCALES[name]), name


@pytest.mark.parametrize("impl", ["MUON_IMPL_TORCH=y", "MUON_IMPL_COMPACT=y"])
def test_muon_takes_its_momentum_and_lr_scale_and_adamw_the_rest(impl):
    optimizer, groups = built(f'OPT_MUON=y {impl} MUON_LR_SCALE="0.7" MUON_MOMENTUM="0.9"')
    muon = groups["matrices"]
    assert (muon["momentum"], muon["weight_decay"], muon["nesterov"]) == (0.9, 0.07, True)
    assert muon["lr"] == pytest.approx(2e-3 * 0.7)
    for name in ("embeddings", "head", "vectors"):  # AdamW's part
        g = groups[name]
        assert (g["betas"], g["eps"], g["weight_decay"]) == ((0.81, 0.97), 3e-7, DECAY[name]), name
        assert g["lr"] == pytest.approx(2e-3 * SCALES[name]), name
