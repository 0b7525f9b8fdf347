"""The menus' help screens say a float symbol's type and range (kconfig/menus.py)."""

from __future__ import annotations

import re

import menuconfig
import pytest

from kconfig.menus import annotate_float_help, float_help, main
from kconfig.tree import ROOT, new_kconfig
from kconfig.values import FloatSpec, float_spec


@pytest.fixture
def kconf():
    kconf = new_kconfig()
    annotate_float_help(kconf)
    return kconf


def test_every_float_symbol_help_states_its_type_and_range(kconf):
    floats = [sym for sym in kconf.unique_defined_syms if float_spec(sym) is not None]
    assert len(floats) > 20, "the tree has its float symbols (LR, dropout, betas, ...)"
    for sym in floats:
        spec = float_spec(sym)
        helps = [node.help for node in sym.nodes if node.prompt]
        assert helps and all(float_help(spec) in text for text in helps), sym.name
        flat = " ".join(helps[0].split())
        kind = "comma-separated floats, each within" if spec.is_list else "float within"
        assert f"Type: {kind} [{spec.lo:g}, {spec.hi:g}]" in flat, sym.name


def test_the_help_keeps_its_own_text_and_is_added_once(kconf):
    lr = kconf.syms["LR"].nodes[0].help
    assert lr.startswith("Learning rate reached at the end of warmup")
    assert annotate_float_help(kconf) > 20 and kconf.syms["LR"].nodes[0].help == lr, "idempotent"
    assert "Type: float" not in (kconf.syms["N_LAYER"].nodes[0].help or ""), "ints are left alone"


def test_menuconfigs_help_screen_shows_the_range(kconf, monkeypatch):
    monkeypatch.setattr(menuconfig, "_kconf", kconf, raising=False)  # what menuconfig.menuconfig() sets
    info = " ".join(menuconfig._info_str(kconf.syms["LR"].nodes[0]).split())
    assert "Prompt: Peak learning rate (float 0..10)" in info
    assert "Type: float within [0, 10] (a Kconfig string: type a number such as 3e-4)" in info
    info = " ".join(menuconfig._info_str(kconf.syms["MATRIX_LRS"].nodes[0]).split())
    assert "Type: comma-separated floats, each within [0, 10]" in info


def test_float_help_wording():
    assert float_help(FloatSpec(False, 0.0, 1.0)) == "Type: float within [0, 1] (a Kconfig string: type a number such as\n3e-4)"
    assert float_help(FloatSpec(False, float("-inf"), float("inf"))).startswith("Type: float (any finite value)")
    assert all(len(line) <= 68 for line in float_help(FloatSpec(True, 1e-9, 1e9)).splitlines())


def test_the_menus_run_through_kconfig_menus_and_it_names_its_usage(capsys):
    mk = (ROOT / "scripts" / "config.mk").read_text()
    assert re.findall(r"-m kconfig\.menus (\w+) Kconfig", mk) == ["menuconfig", "menuconfig", "guiconfig"]
    assert "-m menuconfig" not in mk and "-m guiconfig" not in mk
    assert main(["xconfig"]) == 2 and "usage: python -m kconfig.menus {menuconfig|guiconfig}" in capsys.readouterr().err
