"""MoE layer vs a dense MLP of equal active parameters: forward + backward tokens/s.

The dense MLP (model/mlp.py's MLP, bias-free like the experts, as MoE's shared experts) is as wide as the
top_k experts a token uses together (top_k * expert_hidden), with the same activation, so both
layers do the same useful FLOPs per token; the ratio is the price of routing and dispatch. Called by scripts/bench.py when the config has CONFIG_MOE=y; run alone with
``python scripts/bench_moe.py [experts top_k n_embd expert_hidden tokens]`` (default 8 2 128 256 2048).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.mlp import MLP  # noqa: E402
from model.moe import MoE, MoEConfig  # noqa: E402


def tokens_per_s(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype | None, repeats: int = 20) -> float:
    """Median tokens/s of forward + backward over ``repeats`` timed calls after 3 warmup calls."""
    device = x.device

    def once() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = layer(x)
        out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        once()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return x.shape[0] * x.shape[1] / statistics.median(times)


def moe_vs_dense(moe: MoEConfig, n_embd: int, mlp: str, batch: int, seq: int, device: torch.device,
                 dtype: torch.dtype | None = None) -> dict:
    torch.manual_seed(0)
    moe_layer = MoE(n_embd, mlp, dataclasses.replace(moe, jitter=0.0)).to(device)
    dense = MLP(n_embd, moe.top_k * moe.expert_hidden, mlp, bias=False).to(device)  # one bias-free dense MLP
    x = torch.randn(batch, seq, n_embd, device=device, requires_grad=True)
    active_moe = sum(p.numel() for p in moe_layer.parameters()) - moe_layer.inactive_params()
    active_dense = sum(p.numel() for p in dense.parameters())
    moe_tps, dense_tps = tokens_per_s(moe_layer, x, dtype), tokens_per_s(dense, x, dtype)
    return {"experts": moe.n_experts, "top_k": moe.top_k, "n_embd": n_embd, "expert_hidden": moe.expert_hidden,
            "tokens": batch * seq, "active_params_moe": active_moe, "active_params_dense": active_dense,
            "grouped_mm": moe_layer._grouped(x.detach().reshape(-1, n_embd), moe_layer.w_in),
            "moe_tokens_per_s": moe_tps, "dense_tokens_per_s": dense_tps, "ratio": moe_tps / dense_tps}


def describe(r: dict) -> str:
    return (f"  MoE layer ({r['experts']} experts, top-{r['top_k']}, width {r['expert_hidden']}, "
            f"{'grouped GEMM' if r['grouped_mm'] else 'loop over experts'}): {r['moe_tokens_per_s']:,.0f} tokens/s "
            f"fwd+bwd vs dense MLP of equal active parameters ({r['active_params_dense']:,}): "
            f"{r['dense_tokens_per_s']:,.0f} tokens/s; ratio {r['ratio']:.2f}")


def main() -> int:
    experts, top_k, n_embd, hidden, tokens = (int(a) for a in (sys.argv[1:] or ["8", "2", "128", "256", "2048"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    r = moe_vs_dense(MoEConfig(n_experts=experts, top_k=top_k, expert_hidden=hidden), n_embd, "gelu",
                     1, tokens, device, dtype)
    print(describe(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
