"""GPT-2 block vs LLaMA-style block: training tokens/s at (nearly) equal parameters, eager, on CPU.

The GPT-2 model is nanoGPT's CPU recipe of the Shakespeare char model (4 layers, 128 wide, 4 heads,
block 64, batch 12, no biases, LayerNorm, learned positions, GELU); the LLaMA-style one has the same
depth, width and heads with RMSNorm, RoPE, SwiGLU and QK-norm. SwiGLU's hidden width comes in steps
of 64 (model/mlp.py's hidden_width), so the LLaMA model's MLP_RATIO is the one whose parameter count
is nearest the GPT-2 model's; both counts are printed. A training step is forward, backward and a
fused AdamW step on random tokens of a 128-id vocabulary (the char vocabulary padded).

Timing is interleaved in one process (A, B, A, B, ...) and each model's figure is the median of
its rounds, so a machine shared with other work slows both alike: report the ratio, not the
absolute figures. Called by scripts/bench.py; run alone with ``python scripts/bench_blocks.py
[rounds steps threads]`` (default 10 rounds of 5 steps, torch's thread count).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.gpt import GPT, ModelConfig  # noqa: E402

VOCAB, BLOCK, BATCH = 128, 64, 12
SHAPE = dict(vocab_size=VOCAB, block_size=BLOCK, n_layer=4, n_head=4, n_kv_head=4, n_embd=128, bias=False)
GPT2 = ModelConfig(**SHAPE)
LLAMA = dict(SHAPE, norm="rmsnorm", pos="rope", mlp="swiglu", qk_norm=True)


def param_count(config: ModelConfig) -> int:
    with torch.device("meta"):
        return GPT(config).num_params(non_embedding=False)


def llama_config(target: int) -> ModelConfig:
    """The LLaMA-style model whose parameter count is nearest ``target`` over MLP_RATIO 2..6 in
    quarter steps (SwiGLU's hidden width moves in steps of 64)."""
    candidates = [ModelConfig(**LLAMA, mlp_ratio=r / 4) for r in range(8, 25)]
    return min(candidates, key=lambda c: (abs(param_count(c) - target), c.mlp_ratio))


def training_step(model: torch.nn.Module, batch: int = BATCH, block: int = BLOCK, vocab: int = VOCAB,
                  dtype: torch.dtype | None = None) -> Callable[[], None]:
    """A closure running one forward (under autocast to ``dtype``, None: the parameters' dtype),
    backward and fused AdamW step on fixed random tokens, on the model's device."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, block), generator=g).to(device)
    y = torch.randint(0, vocab, (batch, block), generator=g).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def interleaved(steps: dict[str, Callable[[], None]], tokens_per_step: int, rounds: int = 10,
                per_round: int = 5, warmup: int = 3) -> dict[str, float]:
    """Median tokens/s of each step function, timed in alternating rounds of ``per_round`` steps
    after ``warmup`` untimed steps each."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))  # neither always goes first
        for name in order:
            t0 = time.perf_counter()
            for _ in range(per_round):
                steps[name]()
            times[name].append(per_round * tokens_per_step / (time.perf_counter() - t0))
    return {name: statistics.median(t) for name, t in times.items()}


def compare_blocks(rounds: int = 10, per_round: int = 5, warmup: int = 3) -> dict:
    """Both models' tokens/s, parameter counts and the LLaMA / GPT-2 ratio."""
    gpt2_params = param_count(GPT2)
    llama = llama_config(gpt2_params)
    torch.manual_seed(0)
    models = {"gpt2": GPT(GPT2), "llama": GPT(llama)}
    speeds = interleaved({name: training_step(m) for name, m in models.items()}, BATCH * BLOCK, rounds, per_round,
                         warmup)
    return {"gpt2_tokens_per_s": speeds["gpt2"], "llama_tokens_per_s": speeds["llama"],
            "ratio": speeds["llama"] / speeds["gpt2"], "gpt2_params": gpt2_params,
            "llama_params": param_count(llama), "llama_mlp_ratio": llama.mlp_ratio,
            "threads": torch.get_num_threads(), "rounds": rounds, "steps_per_round": per_round}


def describe(result: dict) -> str:
    r = result
    return (f"  blocks (4x128, block {BLOCK}, batch {BATCH}, eager, {r['threads']} threads): "
            f"GPT-2 {r['gpt2_tokens_per_s']:,.0f} tokens/s ({r['gpt2_params']:,} params), "
            f"LLaMA-style (RMSNorm, RoPE, SwiGLU at MLP_RATIO {r['llama_mlp_ratio']:g}, QK-norm) "
            f"{r['llama_tokens_per_s']:,.0f} tokens/s ({r['llama_params']:,} params): "
            f"ratio {r['ratio']:.2f} (median of {r['rounds']} interleaved rounds of {r['steps_per_round']} steps)")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    if len(args) > 2:
        torch.set_num_threads(args[2])
    print(describe(compare_blocks(*args[:2])))
