"""DPO losses and metrics on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from train.dpo import IGNORE, DPOConfig, dpo_loss, sequence_logps, token_kl


def test_sigmoid_loss_rewards_margin_and_accuracy_by_hand():
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -1.5])
    loss, m = dpo_loss(pc, pr, rc, rr, DPOConfig(beta=0.5))
    h = [(-1.0 + 1.5) - (-2.0 + 1.5), (-3.0 + 2.0) - (-1.0 + 1.5)]  # 1.0, -1.5
    expected = sum(math.log1p(math.exp(-0.5 * x)) for x in h) / 2  # -log sigmoid(beta h)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["dpo_chosen_reward"].item() == pytest.approx((0.25 - 0.5) / 2)
    assert m["dpo_rejected_reward"].item() == pytest.approx((-0.25 + 0.25) / 2)
    assert m["dpo_reward_margin"].item() == pytest.approx(0.5 * (1.0 - 1.5) / 2)
    assert m["dpo_accuracy"].item() == 0.5


def test_label_smoothing_and_ipo_by_hand():
    args = (torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-1.0]))  # h = 0 - (-1) = 1
    smooth, _ = dpo_loss(*args, DPOConfig(beta=1.0, label_smoothing=0.25))
    assert smooth.item() == pytest.approx(0.75 * math.log1p(math.exp(-1)) + 0.25 * math.log1p(math.e), rel=1e-6)
    ipo, _ = dpo_loss(*args, DPOConfig(loss="ipo", beta=0.25))
    assert ipo.item() == pytest.approx((1 - 2) ** 2)


def test_sequence_logps_sum_only_the_response_positions():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
    targets = torch.tensor([[IGNORE, 1, 2]])
    assert sequence_logps(logits, targets).item() == pytest.approx(math.log(0.8) + math.log(0.6), rel=1e-6)


def test_token_kl_is_zero_for_equal_models_and_exact_otherwise():
    p = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    q = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]))
    targets = torch.tensor([[IGNORE, 0]])
    assert token_kl(p, p, targets).item() == pytest.approx(0.0, abs=1e-7)
    assert token_kl(p, q, targets).item() == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), rel=1e-5)


def test_from_config_reads_the_menu(config):
    assert DPOConfig.from_config(config("OBJECTIVE_DPO=y", "DPO_LOSS_IPO=y", DPO_BETA=0.3)) == DPOConfig("ipo", 0.3, 0.0)
    assert DPOConfig.from_config(config("OBJECTIVE_DPO=y")) == DPOConfig()
