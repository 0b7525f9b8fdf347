"""torch.compile vs eager on the configured model: steady-state training tokens/s and compile time.

Two copies of the same model (same weights) train on the same random batch, one eager and one
through train/device.py's compile_model (static shapes, CONFIG_COMPILE_MODE or "default"). The
compile time is the compiled copy's first step (tracing, inductor codegen and the C++ or Triton
build) less one steady-state step, reported apart from the tokens/s, which are the medians of
interleaved rounds (scripts/bench_blocks.py's interleaved) after that. Called by scripts/bench.py;
BENCH_COMPILE=n there skips it (compiling takes tens of seconds on CPU).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.gpt import GPT, ModelConfig  # noqa: E402
from scripts.bench_blocks import interleaved, training_step  # noqa: E402
from train.device import compile_model  # noqa: E402


def compile_vs_eager(config: ModelConfig, batch: int, block: int, device: torch.device, dtype: torch.dtype | None,
                     mode: str = "default", rounds: int = 6, per_round: int = 5) -> dict:
    """Eager and compiled tokens/s of ``config`` at ``batch`` x ``block`` tokens per step, their
    ratio and the compile time in seconds."""
    torch.manual_seed(0)
    eager = GPT(config).to(device)
    compiled_model = compile_model(copy.deepcopy(eager), mode, shapes=1)
    steps = {"eager": training_step(eager, batch, block, config.vocab_size, dtype),
             "compiled": training_step(compiled_model, batch, block, config.vocab_size, dtype)}
    t0 = time.perf_counter()
    steps["compiled"]()
    first = time.perf_counter() - t0
    speeds = interleaved(steps, batch * block, rounds, per_round)
    step_s = batch * block / speeds["compiled"]
    return {"eager_tokens_per_s": speeds["eager"], "compiled_tokens_per_s": speeds["compiled"],
            "ratio": speeds["compiled"] / speeds["eager"], "compile_s": max(0.0, first - step_s), "mode": mode,
            "rounds": rounds, "steps_per_round": per_round}


def describe(result: dict) -> str:
    r = result
    return (f"  compile ({r['mode']}) vs eager, configured model: compiled {r['compiled_tokens_per_s']:,.0f} tokens/s, "
            f"eager {r['eager_tokens_per_s']:,.0f} tokens/s: ratio {r['ratio']:.2f} after {r['compile_s']:.1f} s "
            f"of compiling (median of {r['rounds']} interleaved rounds of {r['steps_per_round']} steps)")
