"""The GPU tier (tests/gpu/) on this CPU: under GPU_CHECK_DRY_RUN=1 every test's code runs at tiny shapes
(what 'scripts/gpu_check.py --dry-run' runs), and without it every test is skipped with the reason."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

# What runs on the CPU under the dry run, and what needs CUDA (skipped there with a named reason).
ON_CPU = ["test_a_bf16_autocast_step_agrees_with_fp32", "test_grouped_gemm_dispatch_equals_the_loop_fallback",
          "test_torchao_float8_trains_within_tolerance_of_bf16[tensorwise]",
          "test_torchao_float8_trains_within_tolerance_of_bf16[rowwise]",
          "test_compiled_losses_match_eager[default]", "test_resume_reproduces_the_uninterrupted_losses",
          "test_a_cuda_out_of_memory_error_leaves_a_checkpoint"]
CUDA_ONLY = ["test_fp16_with_grad_scaler_trains_without_inf_steps", "test_sdpa_runs_a_fused_kernel_not_math",
             "test_compiled_losses_match_eager[max_autotune]"]


def gpu_tier(dry_run: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_DRY_RUN"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # this suite is the CPU's, whatever the machine has
    if dry_run:
        env["GPU_CHECK_DRY_RUN"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-v", "-rs", "-p",
                           "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def outcomes(output: str) -> dict[str, str]:
    """test name (with parameters) -> PASSED | SKIPPED | FAILED | ERROR, from pytest -v's lines."""
    return {m[1]: m[2] for m in re.finditer(r"^tests/gpu/\S+::(\S+) (PASSED|SKIPPED|FAILED|ERROR)", output, re.M)}


@pytest.mark.slow
def test_the_dry_run_runs_the_gpu_tier_on_the_cpu():
    p = gpu_tier(dry_run=True)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    torchao = importlib.util.find_spec("torchao") is not None
    expected = {name: "PASSED" for name in ON_CPU} | {name: "SKIPPED" for name in CUDA_ONLY}
    if not torchao:  # the float8 tests need torchao even to emulate
        expected.update({name: "SKIPPED" for name in ON_CPU if "float8" in name})
    assert outcomes(p.stdout) == expected, p.stdout[-4000:]
    # Each CUDA-only test says what it needs, and what it checked on the CPU before skipping.
    assert "fp16 needs CUDA: the project refuses it on CPU (both refusals asserted)" in p.stdout
    assert "flash and memory-efficient SDPA are CUDA kernels: on CPU the CPU flash op was asserted" in p.stdout
    assert "the dry run compiles the default mode only" in p.stdout


@pytest.mark.slow
def test_without_cuda_or_the_dry_run_the_gpu_tier_is_skipped():
    p = gpu_tier(dry_run=False)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert set(outcomes(p.stdout).values()) == {"SKIPPED"} and len(outcomes(p.stdout)) == len(ON_CPU + CUDA_ONLY)
    assert "needs CUDA; GPU_CHECK_DRY_RUN=1 runs it on CPU with tiny shapes" in p.stdout
