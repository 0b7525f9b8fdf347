"""GPU check step 2: train/memory.py's predicted peak against the measured one, per config.

On CUDA the measure is torch.cuda.max_memory_allocated over two training steps after a first
(compiling) one, so the optimizer state exists, as in the prediction; under --dry-run the same
configs shrunk run on CPU, measured by train/memory_measure.py (every live tensor storage), eager
(inductor on CPU would take most of the dry run's minute). Each config's error is
(predicted - measured) / measured; the target is within 10%.

    python scripts/gpu_check_memory.py RESULTS.json [--dry-run]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from scripts.gpu_check_common import MOE, Results, build, config_for, pick_device, shapes, training_step  # noqa: E402
from train.memory import predict_memory  # noqa: E402
from train.memory_measure import measure_peak_memory  # noqa: E402

TARGET = 0.10  # |predicted - measured| / measured


def configs(dry_run: bool) -> dict[str, tuple[str, int]]:
    """name -> (SET text, vocabulary): GPT-2 124M and the LLaMA-style model, bf16 eager and compiled,
    with MoE, with activation checkpointing."""
    base = shapes(dry_run)
    gpt2, gpt2_vocab = base["gpt2"]
    llama, llama_vocab = base["llama"]
    return {  # the compiled ones last: a step stopped at its budget keeps the quick eager ones
        "gpt2-bf16-eager": (gpt2, gpt2_vocab),
        "llama-bf16-eager": (llama, llama_vocab),
        "gpt2-moe-bf16-eager": (f"{gpt2} {MOE}", gpt2_vocab),
        "gpt2-act-ckpt-bf16-eager": (f"{gpt2} ACT_CKPT=y", gpt2_vocab),
        "llama-act-ckpt-bf16-eager": (f"{llama} ACT_CKPT=y", llama_vocab),
        "gpt2-bf16-compiled": (f"{gpt2} COMPILE=y", gpt2_vocab),
        "llama-bf16-compiled": (f"{llama} COMPILE=y", llama_vocab),
    }


def measure(sets: str, vocab: int, device: torch.device, dtype: str, dry_run: bool) -> dict:
    cfg = config_for(sets)
    built = build(cfg, vocab, device)
    config = built.model.config
    predicted = predict_memory(config, cfg.MICRO_BATCH, cfg.BLOCK_SIZE, dtype, cfg.OPTIMIZER,
                               checkpoint_every=config.checkpoint_every)
    compiled = cfg.COMPILE and device.type == "cuda"
    if device.type == "cuda":
        step = training_step(cfg, built, vocab, device, dtype, compiled)
        step()  # compiles; creates the optimizer state
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        measured, kind = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        generator = torch.Generator().manual_seed(cfg.SEED)

        def batch():
            return tuple(torch.randint(vocab, (cfg.MICRO_BATCH, cfg.BLOCK_SIZE), generator=generator)
                         for _ in range(2))

        measured = measure_peak_memory(built.model, built.optimizer, batch, dtype, steps=2)
        kind = "train/memory_measure.py live tensor storage (CPU)"
    error = (predicted.total - measured) / measured
    return {"set": sets, "vocab": vocab, "params": sum(p.numel() for p in built.model.parameters()),
            "micro_batch": cfg.MICRO_BATCH, "seq_len": cfg.BLOCK_SIZE, "dtype": dtype, "optimizer": cfg.OPTIMIZER,
            "compiled": compiled, "compile_requested": cfg.COMPILE, "checkpoint_every": config.checkpoint_every,
            "predicted_bytes": predicted.total, "predicted_terms": dataclasses.asdict(predicted),
            "measured_bytes": measured, "measure": kind, "error_pct": round(100 * error, 3),
            "within_target": abs(error) <= TARGET, "target_pct": 100 * TARGET}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated config names (default: all)")
    args = parser.parse_args(argv)
    results = Results(args.results, "memory", args.dry_run)
    device, dtype = pick_device(args.dry_run)
    if device.type == "cpu":
        torch.set_num_threads(1)  # byte counts do not depend on threads
    wanted = set(filter(None, args.only.split(",")))
    for name, (sets, vocab) in configs(args.dry_run).items():
        if not wanted or name in wanted:
            results.run(name, measure, sets, vocab, device, dtype, args.dry_run)
    errors = [i["error_pct"] for i in results.data["items"].values() if i["status"] == "done"]
    results.data["max_abs_error_pct"] = max(map(abs, errors)) if errors else None
    results.data["all_within_target"] = bool(errors) and all(abs(e) <= 100 * TARGET for e in errors)
    results.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
