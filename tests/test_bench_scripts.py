"""scripts/bench.py's side-by-side figures: the configuration it reads (KCONFIG_CONFIG), the block
comparison's models and figures, and compile vs eager's plumbing. No timing is asserted."""

from __future__ import annotations

import pytest
import torch

from kconfig.tree import parse_overrides, resolve, write_outputs


@pytest.mark.slow
def test_bench_reads_the_configuration_kconfig_config_names(tmp_path, monkeypatch):
    from scripts import bench

    for name, plan in ((".config", "default-file"), ("other.config", "other-file")):
        kconf, _ = resolve([], parse_overrides(f'DEVICE_CPU=y PLAN_NAME="{plan}"'))
        write_outputs(kconf, tmp_path / name, tmp_path / "config.py")
    seen = []
    monkeypatch.setattr(bench, "bench", lambda cfg, data: seen.append(cfg.PLAN_NAME) or {"status": "done"})
    monkeypatch.setattr(bench, "prepare", lambda cfg, root: None)
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.delenv("SET", raising=False)
    monkeypatch.delenv("BENCH_JSON", raising=False)
    monkeypatch.delenv("KCONFIG_CONFIG", raising=False)
    assert bench.main() == 0
    monkeypatch.setenv("KCONFIG_CONFIG", "other.config")  # relative: from the repository root, as make runs
    assert bench.main() == 0
    monkeypatch.setenv("KCONFIG_CONFIG", str(tmp_path / ".config"))
    assert bench.main() == 0
    assert seen == ["default-file", "other-file", "default-file"]


def test_the_llama_block_is_compared_at_the_nearest_parameter_count():
    from scripts.bench_blocks import GPT2, LLAMA, llama_config, param_count
    from model.gpt import ModelConfig

    target = param_count(GPT2)
    chosen = llama_config(target)
    assert chosen.norm == "rmsnorm" and chosen.pos == "rope" and chosen.mlp == "swiglu" and chosen.qk_norm
    assert (chosen.n_layer, chosen.n_embd, chosen.n_head, chosen.block_size) == (4, 128, 4, 64)
    gap = abs(param_count(chosen) - target)
    for neighbour in (chosen.mlp_ratio - 0.25, chosen.mlp_ratio + 0.25):  # hidden width moves in steps of 64
        assert abs(param_count(ModelConfig(**LLAMA, mlp_ratio=neighbour)) - target) >= gap
    assert gap / target < 0.06


@pytest.mark.slow
def test_compare_blocks_reports_both_models_and_their_ratio():
    from scripts.bench_blocks import compare_blocks, describe

    torch.manual_seed(0)
    result = compare_blocks(rounds=1, per_round=1, warmup=0)
    assert result["ratio"] == pytest.approx(result["llama_tokens_per_s"] / result["gpt2_tokens_per_s"])
    assert result["gpt2_params"] == 812_160 and result["llama_params"] == 771_456
    line = describe(result)
    assert "GPT-2" in line and "LLaMA-style" in line and f"ratio {result['ratio']:.2f}" in line


def test_compile_vs_eager_times_two_copies_and_reports_the_compile_time_apart(monkeypatch):
    from scripts import bench_compile
    from model.gpt import ModelConfig

    compiled = []
    monkeypatch.setattr(bench_compile, "compile_model", lambda m, mode, shapes: compiled.append(mode) or m)
    config = ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)
    result = bench_compile.compile_vs_eager(config, 2, 8, torch.device("cpu"), None, "max-autotune", 1, 1)
    assert compiled == ["max-autotune"]
    assert result["ratio"] == pytest.approx(result["compiled_tokens_per_s"] / result["eager_tokens_per_s"])
    assert result["compile_s"] >= 0
    assert "compile (max-autotune) vs eager" in bench_compile.describe(result)
