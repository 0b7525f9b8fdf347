"""Learning-rate schedules."""

from __future__ import annotations

import pytest

from conftest import config_of
from kconfig.errors import ConfigError
from optim.schedule import ScheduleConfig, lr_at


def schedule(text, base="LR=1e-3 MIN_LR=1e-4 WARMUP_ITERS=10 MAX_ITERS=110") -> ScheduleConfig:
    return ScheduleConfig.from_config(config_of(base, text))


def test_cosine_warms_up_then_decays_to_min():
    c = schedule("")
    assert lr_at(0, c) == pytest.approx(1e-4)
    assert lr_at(9, c) == pytest.approx(1e-3)
    assert lr_at(60, c) == pytest.approx(5.5e-4)  # halfway through the cosine
    assert lr_at(110, c) == pytest.approx(1e-4)
    assert all(lr_at(s, c) >= lr_at(s + 1, c) for s in range(10, 120))


def test_cosine_decay_length():
    c = schedule("LR_DECAY_ITERS=60")
    assert lr_at(35, c) == pytest.approx(5.5e-4)
    assert lr_at(80, c) == pytest.approx(1e-4)


def test_wsd_is_flat_then_decays_linearly():
    c = schedule('LR_WSD=y WSD_DECAY_FRACTION="0.2"')
    assert lr_at(50, c) == lr_at(87, c) == pytest.approx(1e-3)
    assert lr_at(99, c) == pytest.approx(1e-3 + (1e-4 - 1e-3) * 11 / 22)
    assert lr_at(110, c) == pytest.approx(1e-4)


def test_constant():
    c = schedule("LR_CONSTANT=y", base="LR=1e-3 WARMUP_ITERS=10 MAX_ITERS=110")
    assert lr_at(5, c) == pytest.approx(6e-4) and lr_at(100, c) == pytest.approx(1e-3)


def test_min_lr_does_not_apply_to_a_constant_schedule():
    with pytest.raises(ConfigError, match="CONFIG_MIN_LR=1e-4: did not take: unmet dependency !LR_CONSTANT"):
        schedule("LR_CONSTANT=y")


def test_the_config_is_the_choice_and_its_settings_and_builds_without_kconfig():
    assert schedule('LR_WSD=y WSD_DECAY_FRACTION="0.2"') == ScheduleConfig(
        lr=1e-3, warmup_iters=10, max_iters=110, shape="wsd", min_lr=1e-4, decay_iters=None, wsd_decay_fraction=0.2)
    assert schedule("LR_CONSTANT=y", base="LR=1e-3 WARMUP_ITERS=10 MAX_ITERS=110").min_lr is None
    direct = ScheduleConfig(lr=1e-3, warmup_iters=10, max_iters=110, min_lr=1e-4)
    assert direct == schedule("") and lr_at(60, direct) == pytest.approx(5.5e-4)
    with pytest.raises(ValueError, match=r"unknown LR schedule 'linear'.*CONFIG_LR_SCHEDULE"):
        ScheduleConfig(shape="linear")
    with pytest.raises(ValueError, match=r"wsd schedule needs wsd_decay_fraction \(CONFIG_WSD_DECAY_FRACTION\)"):
        ScheduleConfig(shape="wsd")
