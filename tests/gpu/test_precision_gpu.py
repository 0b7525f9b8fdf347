"""Mixed precision on the GPU: bf16 autocast against fp32, and fp16 with GradScaler (train/device.py's
dtype rule and autocast, train/trainer.py's scaler)."""

from __future__ import annotations

import math

import pytest

from kconfig.errors import ConfigError

pytestmark = pytest.mark.gpu


def first_step(trainer):
    """The loss, total grad norm and each parameter's grad norm of the trainer's first step (GRAD_CLIP=0:
    the norms the optimizer sees are the raw ones, unscaled)."""
    norms = {}
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        norms.update({name: p.grad.float().norm().item() for name, p in trainer.model.named_parameters()
                      if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    loss, grad_norm = trainer.train_step(0)
    return loss.item(), grad_norm.item(), norms


def test_a_bf16_autocast_step_agrees_with_fp32(trainer_of):
    fp32 = first_step(trainer_of("fp32", "DTYPE_FP32=y GRAD_CLIP=0"))
    bf16_trainer = trainer_of("bf16", "DTYPE_BF16=y GRAD_CLIP=0")
    assert bf16_trainer.dtype == "bf16"
    bf16 = first_step(bf16_trainer)
    # Same seed, same weights (fp32 in both: autocast casts per op), same batch. bf16 keeps 8 significant
    # bits (relative rounding 2^-8, 0.4%) of each matmul's inputs and accumulates in fp32; the loss, a mean
    # over every token, moves far less (measured on the dry run's shapes: 1e-6 relative). 1% leaves room for
    # the deeper CUDA model. On CUDA the fp32 run's matmuls are TF32 (setup_backend: 11 significant bits),
    # closer to fp32 than bf16 is, so the comparison still measures bf16's error.
    assert bf16[0] == pytest.approx(fp32[0], rel=1e-2)
    # Gradients pass through every layer's rounding twice (forward and backward): 5% on the total norm and
    # on each parameter's (measured on the dry run's shapes: 1e-4 and at most 7e-4), well below what a wrong
    # cast (fp16 overflow, a dropped scale, a weight kept in bf16) gives.
    assert bf16[1] == pytest.approx(fp32[1], rel=5e-2)
    assert bf16[2].keys() == fp32[2].keys() and len(fp32[2]) > 5
    for name, norm in fp32[2].items():
        assert bf16[2][name] == pytest.approx(norm, rel=5e-2, abs=1e-6), name


def test_fp16_with_grad_scaler_trains_without_inf_steps(trainer_of, device, shapes):
    if device.type != "cuda":
        # Kconfig hides fp16 with DEVICE_CPU; DEVICE_AUTO on a machine without a GPU is refused at setup.
        with pytest.raises(ConfigError, match=r"CONFIG_DTYPE_FP16=y: did not take: unmet dependency !DEVICE_CPU"):
            trainer_of("fp16", "DTYPE_FP16=y")
        with pytest.raises(RuntimeError, match=r"CONFIG_DTYPE_FP16=y needs a CUDA GPU \(fp16 autocast with "
                                               r"gradient scaling\); on CPU select DTYPE_BF16 or DTYPE_FP32"):
            trainer_of("fp16", "DEVICE_AUTO=y DTYPE_FP16=y")
        pytest.skip("fp16 needs CUDA: the project refuses it on CPU (both refusals asserted)")
    t = trainer_of("fp16", "DTYPE_FP16=y")
    assert t.dtype == "fp16" and t.scaler.is_enabled()
    start = t.scaler.get_scale()
    losses, scales = [], []
    for step in range(shapes.steps):
        loss, grad_norm = t.train_step(step)
        losses.append(loss.item())
        scales.append(t.scaler.get_scale())
        assert math.isfinite(losses[-1]) and math.isfinite(grad_norm.item()), f"step {step}"
    # GradScaler halves its scale on every step whose gradients hold an inf/NaN (and skips that update);
    # it grows only every 2000 clean steps, so over these steps the scale must not move at all.
    assert scales == [start] * shapes.steps, "a scale backoff: some step had inf/NaN gradients"
    assert t.guard.skipped == 0
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], "fp16 training lowered the loss"
