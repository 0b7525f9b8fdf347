"""SDPA's kernel choice on the GPU: the model's attention (CONFIG_ATTN_SDPA, model/attention.py) runs a
fused kernel, flash or memory-efficient, never the math fallback that materializes the T x T scores."""

from __future__ import annotations

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

pytestmark = pytest.mark.gpu

# The aten ops behind each SDPA backend, as the profiler names them. On CUDA torch may prefer cuDNN's fused
# attention on some GPUs: also fused, accepted for the default choice (FORCED asserts flash and
# memory-efficient each by name). CPU has one fused kernel (a flash algorithm); the dry run asserts it, by
# default and forced, so the test's code runs without a GPU.
FUSED = {
    "cuda": {"aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
             "aten::_scaled_dot_product_cudnn_attention"},
    "cpu": {"aten::_scaled_dot_product_flash_attention_for_cpu"},
}
FORCED = {
    "cuda": [(SDPBackend.FLASH_ATTENTION, "aten::_scaled_dot_product_flash_attention"),
             (SDPBackend.EFFICIENT_ATTENTION, "aten::_scaled_dot_product_efficient_attention")],
    "cpu": [(SDPBackend.FLASH_ATTENTION, "aten::_scaled_dot_product_flash_attention_for_cpu")],
}
MATH = "aten::_scaled_dot_product_attention_math"


def attention_ops(trainer) -> set[str]:
    """The SDPA ops of one forward and backward of the trainer's model, under its autocast."""
    from train.device import autocast

    batch = trainer.batches.next(trainer.loop.micro_batch, trainer.loop.block_size)
    # The aten ops are host-side events, on CUDA too: no CUPTI (GPU tracing) needed.
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with autocast(trainer.device, trainer.dtype):
            loss, _ = trainer.batch_loss(batch)
        loss.backward()
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


def test_sdpa_runs_a_fused_kernel_not_math(trainer_of, device):
    # bf16 on CUDA (flash takes fp16/bf16 only); on CPU the dry run checks the same code in fp32.
    t = trainer_of("sdpa", "ATTN_SDPA=y " + ("DTYPE_BF16=y" if device.type == "cuda" else "DTYPE_FP32=y"))
    ops = attention_ops(t)
    assert ops & FUSED[device.type], f"no fused SDPA kernel ran: {sorted(ops)}"
    assert MATH not in ops, f"SDPA fell back to its math kernel: {sorted(ops)}"
    # Each fused backend on its own must take the model's shapes (head dim, causal, dtype): a backend
    # that cannot raises 'No available kernel' here instead of falling back silently.
    for backend, op in FORCED[device.type]:
        with sdpa_kernel([backend]):
            ops = attention_ops(t)
        assert op in ops, f"{backend}: {sorted(ops)}"
    if device.type != "cuda":
        pytest.skip("flash and memory-efficient SDPA are CUDA kernels: on CPU the CPU flash op was asserted "
                    "(chosen by default and forced)")
