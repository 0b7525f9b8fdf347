"""The MoE layer's two dispatch paths (model/moe.py's expert_matmul): one torch._grouped_mm call, which
the layer picks by itself where grouped_mm_usable says it works (CUDA: bf16 on compute capability 9.0+;
CPU: torch 2.9+), and the loop over experts it falls back to elsewhere. Both must train alike."""

from __future__ import annotations

import pytest
import torch

from train.device import autocast

pytestmark = pytest.mark.gpu

MOE = "MOE=y MOE_EXPERTS=8 MOE_TOP_K=2 MLP_SWIGLU=y GRAD_CLIP=0"


def loss_and_grads(trainer, batch, grouped: bool | None):
    """Loss and every parameter's gradient of one forward and backward with the dispatch path forced
    (True: grouped, False: loop) or chosen by the layer (None)."""
    model = trainer.model
    for layer in model.moe_layers:
        layer.use_grouped_mm = grouped
    model.zero_grad(set_to_none=True)
    with autocast(trainer.device, trainer.dtype):
        loss, _ = trainer.batch_loss(batch)
    loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float(), grads


def test_grouped_gemm_dispatch_equals_the_loop_fallback(trainer_of, device, monkeypatch):
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip(f"the CUDA grouped-GEMM path needs compute capability 9.0+ (model/moe.py's grouped_mm_usable); "
                    f"{torch.cuda.get_device_name(device)} takes the loop only")
    # bf16 on CUDA: the grouped path exists there for bf16 only. fp32 on CPU, where torch has it too.
    dtype = "DTYPE_BF16=y" if device.type == "cuda" else "DTYPE_FP32=y"
    t = trainer_of("moe", f"{MOE} {dtype}")
    assert t.model.moe_layers, "the config has MoE blocks"
    batch = t.batches.next(t.loop.micro_batch, t.loop.block_size)

    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or grouped_mm(*a, **kw))
    chosen = loss_and_grads(t, batch, None)
    # Two expert matmuls per MoE layer in the forward: the layer chose the grouped path for both.
    assert len(calls) == 2 * len(t.model.moe_layers), "grouped_mm_usable refused this device and dtype"
    grouped = loss_and_grads(t, batch, True)
    loop = loss_and_grads(t, batch, False)
    # The same path twice: equal but for index_add_'s atomic summation order on CUDA.
    assert chosen[0].item() == pytest.approx(grouped[0].item(), rel=1e-6)

    # Compared as relative error of the whole tensor (norm of the difference over the norm), which rounding
    # noise on near-zero entries does not inflate. fp32 (CPU): the paths sum the same products in different
    # kernels, equal to rounding: 1e-5. bf16 (CUDA): each expert matmul rounds its output to bf16 (relative
    # 2^-8) whichever kernel ran, and the backward inherits one rounding of the forward: about 2^-8 on the
    # worst tensor, so 2e-2 (a wrong expert slice or a lost gate gives errors of order 1).
    rel = 1e-5 if t.dtype == "fp32" else 2e-2
    assert grouped[0].item() == pytest.approx(loop[0].item(), rel=rel)
    assert grouped[1].keys() == loop[1].keys()
    for name, g in grouped[1].items():
        reference = loop[1][name]
        assert (g - reference).norm() <= rel * reference.norm() + 1e-12, name
