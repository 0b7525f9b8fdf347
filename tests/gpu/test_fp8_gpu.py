"""torchao float8 training (CONFIG_FP8_TORCHAO, train/precision.py) against bf16: the tensorwise and
rowwise recipes each train the tier's model for its 50 steps to within a stated tolerance of bf16's losses.
On CUDA the real FP8 GEMMs run (torch._scaled_mm, compute capability 8.9+); under the CPU dry run torchao's
emulation (CONFIG_FP8_EMULATE: FP8 quantization, matmuls in higher precision) runs the same code."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from train.precision import MIN_CAPABILITY

from .conftest import build_trainer, logged_losses

pytestmark = pytest.mark.gpu


def fp8_skip_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (carry its wheel: pip install torchao)"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        cap = torch.cuda.get_device_capability(device)
        return (f"real float8 needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+; "
                f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")
    return None


def trained_losses(trainer) -> list[float]:
    summary = trainer.run()
    assert summary["status"] == "done", summary.get("error")
    losses = logged_losses(trainer.run_dir)
    return [losses[s] for s in sorted(losses)]


def mean(values) -> float:
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def bf16_losses(tmp_path_factory, device, shapes):
    """The bf16 reference curve, trained once for both recipes."""
    reason = fp8_skip_reason(device)
    if reason:
        pytest.skip(reason)
    return trained_losses(build_trainer(tmp_path_factory.mktemp("bf16"), device, shapes, "bf16", "DTYPE_BF16=y"))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_torchao_float8_trains_within_tolerance_of_bf16(trainer_of, device, shapes, bf16_losses, recipe):
    emulate = "y" if device.type == "cpu" else "n"
    t = trainer_of(f"fp8-{recipe}", f"DTYPE_BF16=y FP8_TORCHAO=y FP8_RECIPE_{recipe.upper()}=y FP8_EMULATE={emulate}")
    assert t.fp8["backend"] == "torchao" and t.fp8["converted"], t.fp8
    # Every block Linear is converted: the tier's dims are all multiples of 16; only the head stays.
    assert [k.partition(":")[0] for k in t.fp8["kept"]] == ["lm_head"]
    fp8 = trained_losses(t)
    assert len(fp8) == len(bf16_losses) == shapes.steps
    # The same seed, weights and batches: the curves differ only by FP8 rounding. e4m3 keeps 3 mantissa
    # bits (relative 2^-4) on inputs and weights and e5m2 2 bits on output gradients, with a dynamic scale
    # per tensor (tensorwise) or per row (rowwise) and accumulation in higher precision. Over 50 steps that
    # noise stays a few percent of the loss at these sizes (measured on the dry run's shapes, emulated: the
    # last 10 within 0.3% of bf16's, every step within 0.5%): the mean of the last 10 losses within 5% of
    # bf16's, and every step within 15% (single steps are noisier than the mean). A broken scale (a
    # missing amax, a wrong cast) diverges or stalls by far more.
    assert mean(fp8[-10:]) == pytest.approx(mean(bf16_losses[-10:]), rel=5e-2)
    assert all(a == pytest.approx(b, rel=0.15) for a, b in zip(fp8, bf16_losses))
    assert mean(fp8[-10:]) < 0.8 * fp8[0], "float8 training lowered the loss"
