"""Golden loss curves (plan/golden.py): every preset run has one, a numeric change fails it, UPDATE_GOLDEN rewrites."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from kconfig.tree import parse_file, parse_overrides, resolve
from kconfig.values import values
from plan import golden
from plan.expand import expand

PRESETS = sorted(p.name for p in (ROOT / "defconfigs").iterdir() if p.is_file())


def plan(name: str, set_: str = ""):
    layers = [parse_file(ROOT / "defconfigs" / name), parse_overrides(set_)]
    cfg = values(resolve(*layers)[0])
    return expand(layers, cfg), cfg


@pytest.mark.slow
def test_every_preset_run_has_a_golden_curve_made_from_its_configuration():
    stray = {p.stem for p in golden.GOLDEN_DIR.glob("*.json")} - set(PRESETS)
    assert not stray, f"golden files without a preset: {stray}"
    for name in PRESETS:
        specs, cfg = plan(name)
        stored = json.loads(golden.golden_path(cfg.PLAN_NAME).read_text())["runs"]
        runs = {s.name: s for s in specs if not s.rejected and not golden.skip_reason(s.cfg)}
        assert set(stored) == set(runs), name
        for run, spec in runs.items():
            entry = stored[run]
            assert entry["config_sha256"] == golden.config_digest(spec.cfg), f"{name}/{run}: make check UPDATE_GOLDEN=1"
            assert len(entry["losses"]) == golden.GOLDEN_STEPS and entry["tolerance"] == golden.tolerance(spec.cfg)


def test_tolerance_is_tight_for_fp32_and_looser_where_values_round_to_bf16_or_fp8(config):
    assert golden.tolerance(config("DEVICE_CPU=y", "DTYPE_FP32=y")) == golden.FP32_RTOL == 1e-4
    assert golden.tolerance(config("DEVICE_CPU=y", "DTYPE_BF16=y")) == golden.LOW_PRECISION_RTOL
    assert golden.tolerance(config("DEVICE_CPU=y", "DTYPE_FP32=y", "FP8_TORCHAO=y")) == golden.LOW_PRECISION_RTOL


@pytest.mark.slow
def test_the_quickstart_matches_its_golden_curve_on_one_thread_restored_after(capsys):
    specs, cfg = plan("quickstart")
    threads = torch.get_num_threads()
    failures, lines = golden.check_golden(specs, cfg, update=False)
    assert torch.get_num_threads() == threads
    assert failures == 0 and len(lines) == 1
    assert re.fullmatch(r"golden base: ok, 16 steps within 1e-04 of golden/quickstart.json \(\d+\.\ds\)", lines[0]), lines[0]


@pytest.mark.slow
def test_a_numeric_change_to_the_model_fails_naming_the_run_and_step(monkeypatch):
    import model.mlp as mlp

    swiglu = mlp.ACTIVATIONS["swiglu"]  # SwiGLU's gate through GELU: the kind of slip a model edit makes
    monkeypatch.setitem(mlp.ACTIVATIONS, "swiglu", dataclasses.replace(swiglu, fn=F.gelu))
    specs, cfg = plan("quickstart")
    failures, lines = golden.check_golden(specs, cfg, update=False)
    assert failures == 1
    assert re.fullmatch(r"golden base: FAILED: step \d+: loss [\d.]+ vs golden [\d.]+ \(relative [\d.e+-]+ > 1e-04\); "
                        r"if the change is intended: make check UPDATE_GOLDEN=1", lines[0]), lines[0]


@pytest.mark.slow
def test_update_golden_writes_a_file_that_then_passes_and_a_changed_loss_fails(tmp_path):
    specs, cfg = plan("quickstart", 'PLAN_NAME="mine" SEED=7')
    failures, lines = golden.check_golden(specs, cfg, update=False, folder=tmp_path)
    assert failures == 0 and "no " in lines[0] and "UPDATE_GOLDEN=1" in lines[0]  # a plan of one's own
    failures, lines = golden.check_golden(specs, cfg, update=True, folder=tmp_path)
    assert failures == 0 and lines[-1].startswith("golden: wrote ") and (tmp_path / "mine.json").exists()
    assert not list(tmp_path.glob(".*.tmp")), "written atomically"
    assert golden.check_golden(specs, cfg, update=False, folder=tmp_path)[0] == 0
    document = json.loads((tmp_path / "mine.json").read_text())
    assert document["torch"] == torch.__version__ and document["runs"]["base"]["overrides"]["threads"] == 1
    document["runs"]["base"]["losses"][5] *= 1.001
    (tmp_path / "mine.json").write_text(json.dumps(document))
    failures, lines = golden.check_golden(specs, cfg, update=False, folder=tmp_path)
    assert failures == 1 and "golden base: FAILED: step 6: " in lines[0] and "relative 1.0e-03" in lines[0]
    document["torch"] = "2.0.0"
    (tmp_path / "mine.json").write_text(json.dumps(document))
    lines = golden.check_golden(specs, cfg, update=False, folder=tmp_path)[1]
    assert f"(the file was written with torch 2.0.0, this is {torch.__version__})" in lines[0]


def test_a_changed_configuration_or_check_golden_off_skips_with_the_reason():
    specs, cfg = plan("quickstart", 'LR="1e-3"')
    failures, lines = golden.check_golden(specs, cfg, update=False)
    assert failures == 0 and "skipped: its configuration differs from the file's" in lines[0]
    specs, cfg = plan("quickstart", "CHECK_GOLDEN=n")
    assert golden.check_golden(specs, cfg, update=False) == (0, ["golden: off (CONFIG_CHECK_GOLDEN=n)"])
    # where things go is not what a run computes: the comparison stays
    assert golden.config_digest(plan("quickstart", 'RUNS_DIR="elsewhere"')[1]) == golden.config_digest(plan("quickstart")[1])


def test_drift_names_the_first_step_and_nan_drifts():
    assert golden.first_drift([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 1e-4) is None
    assert golden.first_drift([1.0, 2.0, 3.0], [1.0, 2.01, 3.1], 1e-4).startswith("step 2: loss 2.010000 vs golden 2.000000")
    assert golden.first_drift([1.0], [float("nan")], 1e-4).startswith("step 1: loss nan")
    assert golden.first_drift([1.0], [1.0, 1.0], 1e-4) == "2 steps, the golden file has 1"


@pytest.mark.slow
def test_every_preset_matches_its_golden_curves():
    found = []
    for name in PRESETS:
        specs, cfg = plan(name)
        failures, lines = golden.check_golden(specs, cfg, update=False)
        found += [f"{name}: {line}" for line in lines if " ok, " not in line and "skipped" not in line]
    assert not found
