"""Learning-rate schedules."""

from __future__ import annotations

import pytest

from kconfig.errors import ConfigError

from kconfig.tree import parse_overrides, resolve

from kconfig.values import values
from optim.schedule import lr_at


def cfg(text, base="LR=1e-3 MIN_LR=1e-4 WARMUP_ITERS=10 MAX_ITERS=110"):
    kconf, _ = resolve([], parse_overrides(base), parse_overrides(text))
    return values(kconf)


def test_cosine_warms_up_then_decays_to_min():
    c = cfg("")
    assert lr_at(0, c) == pytest.approx(1e-4)
    assert lr_at(9, c) == pytest.approx(1e-3)
    assert lr_at(60, c) == pytest.approx(5.5e-4)  # halfway through the cosine
    assert lr_at(110, c) == pytest.approx(1e-4)
    assert all(lr_at(s, c) >= lr_at(s + 1, c) for s in range(10, 120))


def test_cosine_decay_length():
    c = cfg("LR_DECAY_ITERS=60")
    assert lr_at(35, c) == pytest.approx(5.5e-4)
    assert lr_at(80, c) == pytest.approx(1e-4)


def test_wsd_is_flat_then_decays_linearly():
    c = cfg('LR_WSD=y WSD_DECAY_FRACTION="0.2"')
    assert lr_at(50, c) == lr_at(87, c) == pytest.approx(1e-3)
    assert lr_at(99, c) == pytest.approx(1e-3 + (1e-4 - 1e-3) * 11 / 22)
    assert lr_at(110, c) == pytest.approx(1e-4)


def test_constant():
    c = cfg("LR_CONSTANT=y", base="LR=1e-3 WARMUP_ITERS=10 MAX_ITERS=110")
    assert lr_at(5, c) == pytest.approx(6e-4) and lr_at(100, c) == pytest.approx(1e-3)


def test_min_lr_does_not_apply_to_a_constant_schedule():
    with pytest.raises(ConfigError, match="CONFIG_MIN_LR=1e-4: did not take: unmet dependency !LR_CONSTANT"):
        cfg("LR_CONSTANT=y")
