"""Optimizer step time on the quickstart model: AdamW, Muon, and Muon's matrix-by-matrix step before batching.

    python scripts/bench_optim.py [defconfig]     (default defconfigs/quickstart; SET="..." overrides it)

Builds the preset's model three times through the trainer's builders (train/build.py, the same seed and
weights): with AdamW, with Muon + AdamW (OPT_MUON=y, the compact Muon on CPU), and with the same Muon
groups stepped by LoopMuon below, the step as it was before batching. Each gets the gradients of one
forward and backward on the same random batch of the configured shape (MICRO_BATCH x BLOCK_SIZE), kept
for every step. Then, interleaved round by round (AdamW, Muon, loop, AdamW, ...) so load on the machine
hits all alike, the median of BENCH_OPTIM_REPEATS (default 30) timed calls of optimizer.step(), and of
a whole training step (forward, backward, step) for AdamW and Muon. Prints the medians, the ratios to
AdamW and Newton-Schulz's FLOPs per step; BENCH_OPTIM_THREADS sets torch's threads, BENCH_JSON=path also
writes the figures as JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.prepare import prepare  # noqa: E402
from kconfig.tree import parse_file, parse_overrides, resolve  # noqa: E402
from kconfig.values import values  # noqa: E402
from model.gpt import ModelConfig  # noqa: E402
from optim.muon import Muon, lr_ratio  # noqa: E402
from optim.optimizers import Composite, OptimizerConfig, cpu_has_amx_bf16, set_lr  # noqa: E402
from train.build import build_model_and_optimizer, padded_vocab  # noqa: E402
from train.device import DeviceConfig, resolve_device  # noqa: E402


def loop_orthogonalize(m: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float,
                       dtype: torch.dtype) -> torch.Tensor:
    """optim/muon.py's Newton-Schulz before batching: one matrix (or one parameter's stack) at a time."""
    a, b, c = coefficients
    rows, cols = m.shape[-2:]
    x = m.reshape(-1, rows, cols).to(dtype)
    if rows > cols:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if rows > cols:
        x = x.mT
    return x.reshape(m.shape)


class LoopMuon(Muon):
    """optim/muon.py's step before batching: momentum, Nesterov, orthogonalization, decay and update one
    parameter at a time. The reference the batched step is timed against here and tested against in
    tests/test_muon.py."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            momentum, lr = group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                dtype = group["ns_dtype"] or (torch.float32 if p.device.type == "cpu" else torch.bfloat16)
                update = loop_orthogonalize(update, group["ns_steps"], group["ns_coefficients"], group["eps"], dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * lr_ratio(group["adjust_lr_fn"], p.shape))


def newton_schulz_flops(muon: Muon) -> int:
    """Multiply-adds x 2 of one step's Newton-Schulz: per matrix (s x l, s <= l) and iteration, X X^T
    (2 s^2 l), the Gram matrix squared (2 s^3) and the product with X (2 s^2 l)."""
    total = 0
    for group in muon.param_groups:
        for p in group["params"]:
            s, l = sorted(p.shape[-2:])
            total += group["ns_steps"] * (p.numel() // (s * l)) * (4 * s * s * l + 2 * s ** 3)
    return total


def built_for(defconfig: Path, optimizer_sets: str):
    """The preset's config with ``optimizer_sets`` (then SET) on top, and its model and optimizer."""
    kconf, _ = resolve(parse_file(defconfig), parse_overrides(optimizer_sets, "bench_optim"),
                       parse_overrides(os.environ.get("SET", ""), "SET"))
    cfg = values(kconf)
    vocab = padded_vocab(prepare(cfg, ROOT).tokenizer.vocab_size)
    device = resolve_device(DeviceConfig.from_config(cfg))
    built = build_model_and_optimizer(ModelConfig.from_config(cfg, vocab), OptimizerConfig.from_config(cfg),
                                      DeviceConfig.from_config(cfg).fp8, 0, device)
    set_lr(built.optimizer, cfg.LR)
    return cfg, built, device


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int, device: torch.device, warmup: int = 3) -> dict[str, float]:
    """Median seconds of each function, called round by round in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def measure(defconfig: Path, repeats: int) -> dict | None:
    """optimizer.step() of AdamW, Muon and the matrix-by-matrix Muon, and the training step of AdamW and Muon,
    on ``defconfig``'s model (SET on top), interleaved; None when Muon there is not the compact one."""
    cfg, adamw, device = built_for(defconfig, "OPT_ADAMW=y")
    _, muon, _ = built_for(defconfig, "OPT_MUON=y")
    _, loop, _ = built_for(defconfig, "OPT_MUON=y")
    # MUON_CPU_BF16 where it applies (a CPU with AMX bf16 units): Newton-Schulz in bf16
    bf16 = built_for(defconfig, "OPT_MUON=y MUON_CPU_BF16=y")[1] if device.type == "cpu" and cpu_has_amx_bf16() \
        else None
    compact, rest = loop.optimizer.optimizers
    if not isinstance(compact, Muon):
        print(f"bench_optim: {defconfig.name} with OPT_MUON=y runs {type(compact).__name__} for the matrices, "
              "not the compact Muon (MUON_IMPL=torch off CPU); set SET=MUON_IMPL_COMPACT=y to time it")
        return None
    loop.optimizer = Composite(LoopMuon(compact.param_groups), rest)
    torch.manual_seed(0)
    x = torch.randint(0, adamw.model.config.vocab_size, (cfg.MICRO_BATCH, cfg.BLOCK_SIZE + 1), device=device)
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def backward(built):
        built.optimizer.zero_grad()
        built.model(inputs, targets)[1].backward()

    def train_step(built):
        backward(built)
        built.optimizer.step()

    builds = {"adamw": adamw, "muon": muon, "loop": loop, **({"muon_bf16": bf16} if bf16 else {})}
    for built in builds.values():
        backward(built)  # the gradients every optimizer.step() below reuses
    step = interleaved({name: built.optimizer.step for name, built in builds.items()}, repeats, device)
    train = interleaved({name: (lambda b=built: train_step(b)) for name, built in builds.items() if name != "loop"},
                        repeats, device)
    flops = newton_schulz_flops(muon.optimizer.optimizers[0])
    return {"defconfig": defconfig.name, "device": str(device), "threads": torch.get_num_threads(),
            "repeats": repeats, "params": sum(p.numel() for p in adamw.model.parameters()),
            "micro_batch": cfg.MICRO_BATCH, "block_size": cfg.BLOCK_SIZE,
            "ns_dtype": str(muon.optimizer.optimizers[0].defaults["ns_dtype"]).removeprefix("torch."),
            "step_s": step, "train_step_s": train, "newton_schulz_flops": flops,
            "muon_over_adamw": step["muon"] / step["adamw"], "loop_over_muon": step["loop"] / step["muon"],
            "train_muon_over_adamw": train["muon"] / train["adamw"],
            **({"muon_bf16_over_adamw": step["muon_bf16"] / step["adamw"],
                "train_muon_bf16_over_adamw": train["muon_bf16"] / train["adamw"]} if bf16 else {})}


def describe(result: dict) -> str:
    step, train, flops = result["step_s"], result["train_step_s"], result["newton_schulz_flops"]
    return "\n".join([
        f"bench_optim {result['defconfig']}: {result['params']:,} params, {result['device']}, "
        f"{result['threads']} threads, Newton-Schulz in {result['ns_dtype']}, median of {result['repeats']} "
        f"interleaved calls",
        f"  optimizer.step(): AdamW {1e3 * step['adamw']:.2f} ms, Muon {1e3 * step['muon']:.2f} ms "
        f"(ratio Muon/AdamW {result['muon_over_adamw']:.2f}), Muon matrix by matrix {1e3 * step['loop']:.2f} ms "
        f"(batched is {result['loop_over_muon']:.2f}x faster)",
        f"  Newton-Schulz: {flops / 1e9:.2f} GFLOP a step, {flops / step['muon'] / 1e9:.0f} GFLOP/s in the Muon step",
        f"  training step (forward, backward, step; {result['micro_batch']} x {result['block_size']} tokens): AdamW "
        f"{1e3 * train['adamw']:.1f} ms, Muon {1e3 * train['muon']:.1f} ms "
        f"(ratio Muon/AdamW {result['train_muon_over_adamw']:.2f})"]
        + ([f"  with MUON_CPU_BF16=y (Newton-Schulz in bf16 on this AMX CPU): optimizer.step() "
            f"{1e3 * step['muon_bf16']:.2f} ms (ratio {result['muon_bf16_over_adamw']:.2f}), training step "
            f"{1e3 * train['muon_bf16']:.1f} ms (ratio Muon/AdamW {result['train_muon_bf16_over_adamw']:.2f})"]
           if "muon_bf16" in step else []))


def main() -> int:
    defconfig = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "defconfigs" / "quickstart"
    repeats = int(os.environ.get("BENCH_OPTIM_REPEATS", "30"))
    if threads := os.environ.get("BENCH_OPTIM_THREADS"):
        torch.set_num_threads(int(threads))
    result = measure(defconfig, repeats)
    if result is None:
        return 1
    print(describe(result))
    if out := os.environ.get("BENCH_JSON"):
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
