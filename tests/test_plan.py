"""Plans: fragments, ablation and matrix expansion, run naming, plan.json, the dry-run check."""

from __future__ import annotations

import json

import pytest

import plan.expand as expand_mod
from kconfig.errors import ConfigError
from kconfig.tree import ROOT, parse_file, parse_overrides, resolve
from kconfig.values import values
from plan.check import check_plan
from plan.expand import cell_pairs, expand
from plan.plan import Plan, run_name


def plan_for(*sources: str, set_: str = ""):
    layers = [parse_file(ROOT / "defconfigs" / s) for s in sources] + [parse_overrides(set_)]
    kconf, _ = resolve(*layers)
    return expand(layers, values(kconf))


def test_cumulative_ablation_builds_step_on_step():
    specs = plan_for("ablation-modern-gpt")
    assert [s.name for s in specs] == ["base", "rope", "rmsnorm", "swiglu", "qk-norm", "muon"]
    assert specs[0].baseline and specs[0].differences == {}
    assert specs[2].differences == {"POS_ROPE": True, "NORM_RMSNORM": True}
    last = specs[-1].cfg
    assert last.POS_ROPE and last.NORM_RMSNORM and last.MLP_SWIGLU and last.QK_NORM and last.OPT_MUON
    assert last.RUN_SINGLE and not last.RUN_ABLATION, "each run's own config is a single run"
    assert all(not s.rejected for s in specs)


def test_independent_ablation_and_multi_fragment_steps():
    specs = plan_for("ablation-modern-gpt", set_='ABLATION_INDEPENDENT=y ABLATION_BASELINE=n '
                                               'ABLATION_STEPS="rope llama=rmsnorm+swiglu+no-bias"')
    assert [s.name for s in specs] == ["rope", "llama"]
    assert specs[0].differences == {"POS_ROPE": True}
    assert specs[1].differences == {"NORM_RMSNORM": True, "MLP_SWIGLU": True, "BIAS": False}


def test_fragment_errors_name_file_line_symbol(tmp_path, monkeypatch):
    monkeypatch.setattr(expand_mod, "FRAGMENTS", tmp_path)
    (tmp_path / "bad").write_text("# a broken fragment\nCONFIG_QK_NORM=y\nCONFIG_NOPE=1\n")
    (tmp_path / "theta").write_text("# theta without rope\nCONFIG_ROPE_THETA=\"500000\"\n")
    specs = plan_for("ablation-modern-gpt", set_='ABLATION_STEPS="bad theta"')
    assert f"{tmp_path / 'bad'}:3: CONFIG_NOPE: unknown symbol" in specs[1].error
    assert f"{tmp_path / 'theta'}:2: CONFIG_ROPE_THETA=\"500000\": did not take: unmet dependency POS_ROPE" \
        in specs[2].error
    (tmp_path / "garbled").write_text("QK_NORM y\n")
    with pytest.raises(ConfigError, match=r"garbled:1: malformed line"):
        plan_for("ablation-modern-gpt", set_='ABLATION_STEPS="garbled"')
    with pytest.raises(ConfigError, match="no fragment 'missing'"):
        plan_for("ablation-modern-gpt", set_='ABLATION_STEPS="missing"')
    with pytest.raises(ConfigError, match="CONFIG_ABLATION_STEPS is empty"):
        plan_for("ablation-modern-gpt", set_='ABLATION_STEPS=""')


def test_matrix_is_the_cartesian_product_with_rejections():
    specs = plan_for("matrix-optimizers", set_="MATRIX_POS_ROPE=y MATRIX_POS_LEARNED=y MATRIX_DTYPE_FP32=y "
                                              "MATRIX_DTYPE_FP16=y")
    assert len(specs) == 3 * 2 * 2 * 2 * 2  # optimizer x pos x dtype x lr x seed
    names = [s.name for s in specs]
    assert names[0] == "adamw-learned-fp32-lr1e-3-seed1337" and len(set(names)) == len(names)
    assert names[-1] == "muon-rope-fp16-lr3e-3-seed1338"
    rejected = [s for s in specs if s.rejected]
    assert len(rejected) == 24 and all("-fp16-" in s.name for s in rejected)
    assert all("CONFIG_DTYPE_FP16=y: did not take: unmet dependency !DEVICE_CPU" in s.error for s in rejected)
    ok = next(s for s in specs if s.name == "adamw-rope-fp32-lr3e-3-seed1338")
    assert ok.differences == {"POS_ROPE": True, "LR": 3e-3, "SEED": 1338}
    assert ok.cfg.LR == 3e-3 and ok.cfg.SEED == 1338 and ok.cfg.POS_ROPE


def test_untouched_matrix_axes_keep_the_current_value():
    specs = plan_for("quickstart", set_="RUN_MATRIX=y")
    assert [(s.name, s.baseline, s.differences) for s in specs] == [("base", True, {})]
    specs = plan_for("quickstart", set_="RUN_MATRIX=y MATRIX_SEEDS=3")
    assert [s.name for s in specs] == ["seed1337", "seed1338", "seed1339"]
    assert specs[0].cfg.N_LAYER == 4 and specs[0].cfg.POS_ROPE, "every untouched option as in the base"


def test_matrix_lr_list_is_validated():
    with pytest.raises(ConfigError, match='CONFIG_MATRIX_LRS="1e-3,fast": not a number'):
        plan_for("matrix-optimizers", set_="MATRIX_LRS=1e-3,fast")
    with pytest.raises(ConfigError, match="out of range"):
        plan_for("matrix-optimizers", set_="MATRIX_LRS=1e-3,20")


def test_ablation_and_matrix_are_exclusive():
    with pytest.raises(ConfigError, match="choice conflict"):
        resolve(parse_overrides("RUN_ABLATION=y RUN_MATRIX=y"))


def test_names_are_stable_readable_and_safe():
    assert run_name([]) == "base"
    assert run_name([("", "adamw"), ("lr", 3e-4), ("seed", 1)]) == "adamw-lr3e-4-seed1"
    assert run_name([("lr", 2.5e-5)]) == "lr2.5e-5" and run_name([("lr", 0.5)]) == "lr0.5"
    assert run_name([("", "a b/c")]) == "a_b_c"
    assert [s.name for s in plan_for("matrix-optimizers")] == [s.name for s in plan_for("matrix-optimizers")]


def test_duplicate_step_names_are_refused():
    with pytest.raises(ConfigError, match="names two runs alike: rope"):
        plan_for("ablation-modern-gpt", set_='ABLATION_STEPS="rope rope"')


def test_plan_json_records_transitions_atomically(tmp_path):
    plan = Plan.create(tmp_path, "demo", "matrix", [{"name": "a"}, {"name": "b"}])
    assert [r["status"] for r in plan.runs] == ["pending", "pending"]
    plan.update("a", status="running", start="t0")
    plan.update("a", status="done", end="t1")
    plan.update("b", status="failed", error="boom")
    record = json.loads((plan.path / "plan.json").read_text())
    assert [(r["name"], r["status"], r["error"]) for r in record["runs"]] == [("a", "done", None), ("b", "failed", "boom")]
    assert record["runs"][0]["start"] == "t0" and record["runs"][0]["end"] == "t1"
    with pytest.raises(ValueError, match="unknown run status 'finished'"):
        plan.update("a", status="finished")
    with pytest.raises(ValueError, match="CONFIG_PLAN_NAME"):
        Plan.create(tmp_path, "bad name", "single", [])
    assert sorted(p.name for p in plan.path.iterdir()) == ["plan.json"], "no temporary files left"
    assert Plan.create(tmp_path, "demo", "single", []).path != plan.path


def check(capsys, *sources, set_=""):
    layers = [parse_file(ROOT / "defconfigs" / s) for s in sources] + [parse_overrides(set_)]
    kconf, _ = resolve(*layers)
    failures = check_plan(layers, values(kconf))
    return failures, capsys.readouterr().out


def test_check_passes_the_presets(capsys):
    failures, out = check(capsys, "ablation-modern-gpt")
    assert failures == 0, out
    assert "check passed" in out and "all equal to their savedefconfig output" in out
    for name in ("base", "rope", "rmsnorm", "swiglu", "qk-norm", "muon"):
        assert f"\n{name} " in out
    assert "full size" in out and "peak" in out


def test_check_catches_a_broken_config(capsys):
    failures, out = check(capsys, "quickstart", set_="MODEL_SIZE_CUSTOM=y N_EMBD=30 N_HEAD=4 N_LAYER=2")
    assert failures == 1
    assert "Traceback" not in out and "CONFIG_N_EMBD=30 is not divisible by CONFIG_N_HEAD=4" in out


def test_check_fails_a_run_predicted_not_to_fit(capsys):
    failures, out = check(capsys, "quickstart", set_="MODEL_SIZE_GPT2_MEDIUM=y BLOCK_SIZE=1024 MICRO_BATCH=64 "
                                                     "TARGET_DEVICE_MEMORY_GIB=16")
    assert failures == 1
    assert "reduced twin" in out and "exceeds TARGET_DEVICE_MEMORY_GIB=16" in out


def test_check_reports_drift(capsys, tmp_path, monkeypatch):
    import plan.check as check_mod

    (tmp_path / "stale").write_text("# pins a default\nCONFIG_SEED=1337\nCONFIG_MAX_ITERS=700\n")
    monkeypatch.setattr(check_mod, "presets", lambda: [tmp_path / "stale"])
    failures, out = check(capsys, "quickstart")
    assert failures == 1
    assert "stale: CONFIG_SEED=1337 equals the Kconfig default, so savedefconfig omits it" in out


def test_check_fails_a_rejected_ablation_step_but_not_a_rejected_matrix_cell(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(expand_mod, "FRAGMENTS", tmp_path)
    (tmp_path / "theta").write_text("# theta without rope\nCONFIG_ROPE_THETA=\"500000\"\n")
    failures, out = check(capsys, "ablation-modern-gpt", set_='ABLATION_STEPS="theta"')
    assert failures == 1 and "\ntheta  rejected " in out
    failures, out = check(capsys, "matrix-optimizers", set_="MATRIX_DTYPE_FP32=y MATRIX_DTYPE_FP16=y MATRIX_SEEDS=1 "
                                                           "MATRIX_OPT_LION=n MATRIX_OPT_MUON=n")
    assert failures == 0 and out.count(" rejected ") == 2


def test_toggled_fragments_make_on_off_axes_named_after_what_is_on():
    specs = plan_for("quickstart", set_='RUN_MATRIX=y MATRIX_FRAGMENTS="qk-norm llama=rmsnorm+swiglu" MATRIX_SEEDS=2')
    assert [s.name for s in specs] == ["seed1337", "seed1338", "llama-seed1337", "llama-seed1338",
                                       "qk-norm-seed1337", "qk-norm-seed1338", "qk-norm+llama-seed1337",
                                       "qk-norm+llama-seed1338"]
    assert specs[6].cfg.QK_NORM and specs[6].cfg.NORM_RMSNORM and not specs[0].cfg.QK_NORM
    with pytest.raises(ConfigError, match="CONFIG_MATRIX_FRAGMENTS: no fragment 'nope'"):
        plan_for("quickstart", set_='RUN_MATRIX=y MATRIX_FRAGMENTS="nope"')


@pytest.mark.slow
def test_pairwise_matrix_covers_every_pair_with_few_runs():
    full = plan_for("feature-pairs", set_="MATRIX_PAIRWISE=n")
    kept = plan_for("feature-pairs")
    assert len(full) == 2 ** 8 and not any(s.rejected for s in full)
    assert len(kept) <= 12, [s.name for s in kept]
    needed = set().union(*(cell_pairs(s) for s in full))
    assert len(needed) == 28 * 4  # 8 on/off axes: 28 axis pairs x 4 value pairs
    assert set().union(*(cell_pairs(s) for s in kept)) == needed
    assert kept[0].name == "base" and kept[0].baseline


def test_pairwise_lists_an_impossible_pair_with_kconfigs_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(expand_mod, "FRAGMENTS", tmp_path)
    (tmp_path / "rms").write_text("# rmsnorm\nCONFIG_NORM_RMSNORM=y\n")
    (tmp_path / "ln").write_text("# layernorm\nCONFIG_NORM_LAYERNORM=y\n")
    (tmp_path / "qk").write_text("# qk-norm\nCONFIG_QK_NORM=y\n")
    specs = plan_for("quickstart", set_='RUN_MATRIX=y MATRIX_PAIRWISE=y MATRIX_FRAGMENTS="rms ln qk"')
    rejected = [s for s in specs if s.rejected]
    assert [s.name for s in rejected] == ["rms+ln"], "one rejected run shows the one impossible pair"
    assert "NORM" in rejected[0].error
    possible = set().union(*(cell_pairs(s) for s in specs if not s.rejected))
    assert len(possible) == 3 * 4 - 1


def test_check_validates_data_parallel_layouts(capsys):
    failures, out = check(capsys, "quickstart-fsdp2", set_="NNODES=2 NODE_RANK=2")
    assert failures == 1 and "CONFIG_NODE_RANK=2 must be below CONFIG_NNODES=2" in out
    failures, out = check(capsys, "quickstart-deepspeed", set_='BATCH_WARMUP_FRACTION="0.2" GRAD_ACCUM=2')
    assert failures == 1 and "DeepSpeed accumulates a fixed GRAD_ACCUM" in out
    failures, out = check(capsys, "quickstart-ddp", set_="NNODES=2 NPROC_PER_NODE=4")
    assert failures == 0 and "world size 8 = 4 x 2 node(s), 64 sequences per step" in out
    with pytest.raises(ConfigError, match="PARALLEL_FSDP2=y: did not take: unmet dependency !OPT_MUON"):
        plan_for("muon-tiny", set_="PARALLEL_FSDP2=y")


def test_continue_overrides_rewrite_the_unfinished_runs_configs(tmp_path):
    from kconfig.tree import load
    from plan.runner import create_plan, prepare_to_continue

    specs = plan_for("quickstart-fsdp2", set_=f'RUNS_DIR="{tmp_path}"')
    base = resolve(parse_file(ROOT / "defconfigs" / "quickstart-fsdp2"), parse_overrides(f'RUNS_DIR="{tmp_path}"'))[0]
    plan = create_plan(values(base), specs)
    prepare_to_continue(plan, ["base"], "NPROC_PER_NODE=1 MICRO_BATCH=16")
    cfg = load(plan.run_dir("base") / ".config")[1]
    assert (cfg.NPROC_PER_NODE, cfg.MICRO_BATCH, cfg.PARALLEL) == (1, 16, "fsdp2")
    with pytest.raises(ConfigError, match="CONFIG_NPROC_PER_NODE"):
        prepare_to_continue(plan, ["base"], "NPROC_PER_NODE=-1")
    assert load(plan.run_dir("base") / ".config")[1].NPROC_PER_NODE == 1, "a bad override writes nothing"
    before = (plan.run_dir("base") / ".config").read_text()
    import torch

    if torch.cuda.is_available():
        return
    with pytest.raises(ConfigError, match=r"run base: CONFIG_DEVICE_CUDA=y but torch sees no CUDA GPU.*"
                                          r"\nnothing was continued"):
        prepare_to_continue(plan, ["base"], "DEVICE_CUDA=y")  # continuing on a machine that cannot run it
    assert (plan.run_dir("base") / ".config").read_text() == before


def test_runs_are_pinned_to_the_gpus_the_user_made_visible(monkeypatch):
    import torch

    from plan import runner

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert runner._device_slots() == ["2", "3"], "physical GPUs 2 and 3, not 0 and 1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert runner._device_slots() == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert runner._device_slots() == [None]
