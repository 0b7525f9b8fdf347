"""Reliability on the GPU: a stopped and resumed run reproduces the uninterrupted run's losses, and a CUDA
out-of-memory error inside a step leaves a checkpoint of the last good step (train/trainer.py's
out_of_memory) and a summary that says so and how to fit."""

from __future__ import annotations

import gc
import json
import signal

import pytest
import torch

from train import checkpoint
from train.trainer import write_summary

from .conftest import logged_losses

pytestmark = pytest.mark.gpu

STEPS, STOP_AFTER = 20, 10
RUN = f"DTYPE_BF16=y MAX_ITERS={STEPS} CHECKPOINT_INTERVAL=5 CHECKPOINT_KEEP=2"


def stop_after(trainer, steps: int) -> None:
    """Send this process SIGTERM once ``steps`` steps are done: the trainer's graceful stop (a preemption)."""
    train_step = trainer.train_step

    def step_then_stop(step):
        result = train_step(step)
        if step + 1 == steps:
            signal.raise_signal(signal.SIGTERM)
        return result

    trainer.train_step = step_then_stop


def test_resume_reproduces_the_uninterrupted_losses(trainer_of, device):
    whole = trainer_of("whole", RUN)
    assert whole.run()["status"] == "done"
    parts = trainer_of("parts", RUN)
    stop_after(parts, STOP_AFTER)
    stopped = parts.run()
    assert stopped["status"] == "interrupted" and stopped["steps"] == STOP_AFTER, stopped
    assert checkpoint.latest(parts.run_dir)[1]["step"] == STOP_AFTER
    resumed = trainer_of("parts", RUN)
    resumed.resume()
    assert resumed.start_step == STOP_AFTER and resumed.run()["status"] == "done"
    a, b = logged_losses(whole.run_dir), logged_losses(parts.run_dir)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    if device.type == "cpu":
        assert a == b, "CPU kernels are deterministic: every loss to the last bit"
    else:
        # The checkpoint restores weights, optimizer, data position and RNG exactly; what can differ is CUDA's
        # run-to-run reduction order (atomics in attention's and the embedding's backward), rounding at 1e-7
        # relative that ten more updates grow to well under 1e-3. A lost state (optimizer moments, the data
        # position, the LR schedule's step) moves the losses after the stop by percents.
        assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-3)


def fill_gpu_memory(device: torch.device) -> list[torch.Tensor]:
    """Take the GPU's memory, in blocks halving from 1 GiB down to 1 MiB, until a 1 MiB block no longer fits:
    what a too-large micro-batch's activations do, without depending on how the allocator places them."""
    blocks, size = [], 1 << 30
    while size >= 1 << 20:
        try:
            blocks.append(torch.empty(size, dtype=torch.uint8, device=device))
        except torch.OutOfMemoryError:
            size //= 2
    return blocks


def out_of_memory_at(trainer, step: int) -> None:
    """Make training step ``step`` (0-based) run out of device memory in its forward. On CUDA a real one:
    the GPU's memory is taken, then the step's own forward asks for more. On the CPU (dry run) CUDA's error
    is raised as it would be."""
    forward, steps = trainer.forward, {"now": 0}
    train_step = trainer.train_step

    def counted(s):
        steps["now"] = s
        return train_step(s)

    def exhausting(x, y):
        if trainer.model.training and steps["now"] == step:
            if trainer.device.type != "cuda":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated on the CPU)")
            taken = fill_gpu_memory(trainer.device)  # held until the forward fails
            forward(x, y)  # raises torch.OutOfMemoryError
            raise AssertionError(f"the step's forward fitted in a GPU full of {len(taken)} blocks")
        return forward(x, y)

    trainer.train_step, trainer.forward = counted, exhausting


def test_a_cuda_out_of_memory_error_leaves_a_checkpoint(trainer_of, device):
    t = trainer_of("oom", RUN)
    out_of_memory_at(t, 7)
    summary = t.run()
    write_summary(t.run_dir, summary)
    written = json.loads((t.run_dir / "summary.json").read_text())
    assert written["status"] == "failed" and written["out_of_memory"] is True and written["steps"] == 7
    for words in ("out of memory in step 8 on ", "CUDA out of memory. Tried to allocate",
                  "the state after step 7 is checkpointed", "CONFIG_MICRO_BATCH=", "CONFIG_ACT_CKPT=y",
                  "'make continue SET=\"MICRO_BATCH=...\"' resumes from the checkpoint"):
        assert words in written["error"], written["error"]
    assert checkpoint.latest(t.run_dir)[1]["step"] == 7
    if device.type == "cuda":
        # The failed step's tensors (here the blocks that filled the GPU) live on in the kept exception's
        # traceback, a reference cycle with the trainer's frame, until a garbage collection: collect, then
        # the GPU is free for the resumed run in this process.
        gc.collect()
        assert torch.cuda.memory_allocated(device) < torch.cuda.get_device_properties(device).total_memory // 2
    resumed = trainer_of("oom", RUN)
    resumed.resume()
    assert resumed.start_step == 7 and resumed.run()["status"] == "done"
