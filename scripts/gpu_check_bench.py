"""GPU check step 3: training tokens/s and MFU of the issue's figures, each item timed alone.

GPT-2 124M (block 1024, bf16) eager and compiled, with nanoGPT's model.py at the same shape and
batch beside it when --nanogpt PATH names a checkout (never downloaded); the MoE model (8 experts,
top-2) against the dense GPT-2 of equal active parameters, and the MoE layer against a dense MLP
(scripts/bench_moe.py's moe_vs_dense); the ~1.35B LLaMA-style model compiled in bf16 and with
torchao float8, tensorwise and rowwise. Every model is built through train/build.py and stepped
as the trainer steps (scripts/gpu_check_common.py). Under --dry-run the same items run at tiny
shapes on CPU, eager; float8 is skipped there (real float8 needs CUDA and torchao).

    python scripts/gpu_check_bench.py RESULTS.json [--dry-run] [--nanogpt PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from scripts.bench_moe import moe_vs_dense  # noqa: E402
from scripts.gpu_check_common import (MOE, Results, build, config_for, make_step, pick_device, shapes,  # noqa: E402
                                      timed_tokens_per_s, training_step)
from model.gpt import ModelConfig  # noqa: E402
from train.device import DTYPES, device_name  # noqa: E402
from train.metrics import mfu  # noqa: E402

FP8 = {"tensorwise": "FP8_TORCHAO=y FP8_RECIPE_TENSORWISE=y", "rowwise": "FP8_TORCHAO=y FP8_RECIPE_ROWWISE=y"}


def step_counts(dry_run: bool) -> tuple[int, int]:
    """(warmup steps including the compiling first one, timed steps)."""
    return (1, 2) if dry_run else (3, 10)


def train_speed(sets: str, vocab: int, device: torch.device, dtype: str, dry_run: bool) -> dict:
    """Tokens/s and MFU of the config ``sets`` (compiled when it sets COMPILE=y and runs on CUDA)."""
    cfg = config_for(sets)
    built = build(cfg, vocab, device)
    compiled = cfg.COMPILE and device.type == "cuda"
    warmup, steps = step_counts(dry_run)
    tokens = cfg.MICRO_BATCH * cfg.BLOCK_SIZE
    speed = timed_tokens_per_s(training_step(cfg, built, vocab, device, dtype, compiled), tokens, device,
                               warmup, steps)
    flops = built.model.flops_per_token()
    return {"set": sets, "params": sum(p.numel() for p in built.model.parameters()), "tokens_per_step": tokens,
            "compiled": compiled, "compile_requested": cfg.COMPILE, "dtype": dtype, "fp8": built.fp8,
            "flops_per_token": flops, **speed, "mfu": mfu(flops, speed["tokens_per_s"], device_name(device))}


def nanogpt_speed(checkout: Path, sets: str, vocab: int, device: torch.device, dtype: str, dry_run: bool,
                  compiled: bool) -> dict:
    """nanoGPT's GPT (its model.py from ``checkout``) at our GPT-2 shape and batch, its own fused
    AdamW (configure_optimizers), stepped exactly as ours."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", checkout / "model.py")
    nanogpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt)
    cfg = config_for(sets)
    torch.manual_seed(cfg.SEED)
    model = nanogpt.GPT(nanogpt.GPTConfig(block_size=cfg.BLOCK_SIZE, vocab_size=vocab, n_layer=cfg.N_LAYER,
                                          n_head=cfg.N_HEAD, n_embd=cfg.N_EMBD, dropout=cfg.DROPOUT,
                                          bias=cfg.BIAS)).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)
    compiled = compiled and device.type == "cuda"
    module = torch.compile(model) if compiled else model  # nanoGPT's train.py: torch.compile(model)
    warmup, steps = step_counts(dry_run)
    tokens = cfg.MICRO_BATCH * cfg.BLOCK_SIZE
    speed = timed_tokens_per_s(make_step(module, optimizer, (cfg.MICRO_BATCH, cfg.BLOCK_SIZE), vocab, cfg.SEED,
                                         device, dtype), tokens, device, warmup, steps)
    return {"checkout": str(checkout), "params": sum(p.numel() for p in model.parameters()),
            "tokens_per_step": tokens, "compiled": compiled, "dtype": dtype, **speed}


def moe_layer(sets: str, device: torch.device, dtype: str) -> dict:
    """scripts/bench_moe.py's MoE layer vs dense MLP of equal active parameters at the model's shape."""
    cfg = config_for(f"{sets} {MOE}")
    return moe_vs_dense(ModelConfig.from_config(cfg, 256).moe, cfg.N_EMBD, cfg.MLP, cfg.MICRO_BATCH, cfg.BLOCK_SIZE, device,
                        DTYPES[dtype] if device.type == "cuda" else None)


def fp8_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "dry run on CPU: real float8 needs CUDA (capability 8.9+) and torchao"
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (carry its wheel: scripts/gpu_wheels.py)"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return f"capability {torch.cuda.get_device_capability(device)} has no float8 tensor cores (needs 8.9+)"
    return None


def figures(items: dict) -> dict:
    """The issue's ratios from whichever items finished: compiled vs nanoGPT, float8 vs bf16, MoE vs dense."""
    def tps(name):
        item = items.get(name, {})
        return item.get("tokens_per_s") if item.get("status") == "done" else None

    def ratio(a, b):
        return None if tps(a) is None or tps(b) is None else tps(a) / tps(b)

    compiled = items.get("gpt2-bf16-compiled", {})
    return {"gpt2_compiled_vs_eager": ratio("gpt2-bf16-compiled", "gpt2-bf16-eager"),
            "gpt2_compiled_vs_nanogpt_compiled": ratio("gpt2-bf16-compiled", "nanogpt-bf16-compiled"),
            "gpt2_eager_vs_nanogpt_eager": ratio("gpt2-bf16-eager", "nanogpt-bf16-eager"),
            "gpt2_compiled_mfu": compiled.get("mfu") if compiled.get("status") == "done" else None,
            "fp8_tensorwise_vs_bf16": ratio("llama-fp8-tensorwise-compiled", "llama-bf16-compiled"),
            "fp8_rowwise_vs_bf16": ratio("llama-fp8-rowwise-compiled", "llama-bf16-compiled"),
            "moe_vs_dense_model": ratio("gpt2-moe-bf16-eager", "gpt2-bf16-eager"),
            "targets": {"gpt2_compiled_vs_nanogpt_compiled": 1.3, "gpt2_compiled_mfu": 0.45,
                        "fp8_tensorwise_vs_bf16": 1.25, "fp8_rowwise_vs_bf16": 1.25, "moe_vs_dense_model": 0.6}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (its model.py); never downloaded")
    args = parser.parse_args(argv)
    results = Results(args.results, "bench", args.dry_run)
    device, dtype = pick_device(args.dry_run)
    base = shapes(args.dry_run)
    gpt2, gpt2_vocab = base["gpt2"]
    llama, llama_vocab = base["llama"]

    def record(name, measure, *a):
        results.run(name, measure, *a)
        results.data["figures"] = figures(results.data["items"])
        results.write()

    # Priority order: a step stopped at its budget keeps the items before the cut.
    record("gpt2-bf16-eager", train_speed, gpt2, gpt2_vocab, device, dtype, args.dry_run)
    record("gpt2-bf16-compiled", train_speed, f"{gpt2} COMPILE=y", gpt2_vocab, device, dtype, args.dry_run)
    for mode in ("eager", "compiled"):
        name = f"nanogpt-bf16-{mode}"
        if args.nanogpt is None:
            results.skip(name, "no --nanogpt")
        elif not (args.nanogpt / "model.py").is_file():
            results.skip(name, f"{args.nanogpt}/model.py does not exist (a nanoGPT checkout?)")
        else:
            record(name, nanogpt_speed, args.nanogpt, gpt2, gpt2_vocab, device, dtype, args.dry_run,
                   mode == "compiled")
    record("gpt2-moe-bf16-eager", train_speed, f"{gpt2} {MOE}", gpt2_vocab, device, dtype, args.dry_run)
    record("moe-layer-vs-dense-mlp", moe_layer, gpt2, device, dtype)
    record("llama-bf16-compiled", train_speed, f"{llama} COMPILE=y", llama_vocab, device, dtype, args.dry_run)
    for recipe, sets in FP8.items():
        name = f"llama-fp8-{recipe}-compiled"
        if reason := fp8_unavailable(device):
            results.skip(name, reason)
        else:
            record(name, train_speed, f"{llama} COMPILE=y {sets}", llama_vocab, device, dtype, args.dry_run)
    results.data["figures"] = figures(results.data["items"])
    results.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
