"""Training throughput of the configured model on this machine: python scripts/bench.py

Runs the real trainer for BENCH_STEPS steps (default 60) with the current
configuration ($KCONFIG_CONFIG, else .config, plus SET overrides), on a 4 MB embedded corpus so no download is
needed: the data's content does not change the speed, and its char vocabulary
(97) pads to the same 128 ids as tiny Shakespeare's (65). Reports the median
tokens/s of the logging intervals after the first, which holds warmup and
torch.compile time, and the time to save (atomically, with fsync) and load a
checkpoint of the full training state. Peak memory: the CUDA allocator's peak on
a GPU, the process's peak resident set on CPU (which includes Python and torch
themselves), next to train/memory.py's prediction for the same step. With
CONFIG_MOE=y it also times an MoE layer against a dense MLP of equal active
parameters (scripts/bench_moe.py). Then, in the same process: the GPT-2 block against the
LLaMA-style block (RMSNorm, RoPE, SwiGLU, QK-norm) at nearly equal parameters, eager on CPU, and
their tokens/s ratio (scripts/bench_blocks.py); torch.compile against eager on the configured model,
tokens/s and the compile time apart (scripts/bench_compile.py; BENCH_COMPILE=n skips it). Both time
interleaved rounds and report medians, so other work on the machine slows both sides alike.
BENCH_JSON=path also writes the figures as JSON.
A measured run that does not finish (NaN/Inf stop, interrupt, time limit) is
reported with its status, reason and the step it reached, and the exit status
is 1; a time-limited run still prints the throughput of the steps it made.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.prepare import prepare  # noqa: E402
from kconfig.tree import load, parse_overrides, resolve, parse_file  # noqa: E402
from kconfig.values import values  # noqa: E402
from model.gpt import ModelConfig  # noqa: E402
import torch  # noqa: E402

from scripts.bench_blocks import compare_blocks, describe as describe_blocks  # noqa: E402
from scripts.bench_compile import compile_vs_eager, describe as describe_compile  # noqa: E402
from scripts.bench_moe import describe as describe_moe, moe_vs_dense  # noqa: E402
from scripts.bench_optim import describe as describe_optim, measure as measure_optim  # noqa: E402
from train import checkpoint  # noqa: E402
from train.device import DTYPES  # noqa: E402
from train.memory import predict_run_memory  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def checkpoint_times(trainer: Trainer, folder: Path) -> tuple[float, float, int]:
    """Median wall time of writing (atomically, with fsync) and loading the full training state."""
    saves, loads = [], []
    path = folder / "bench-ckpt.pt"
    for _ in range(5):
        t0 = time.perf_counter()
        checkpoint.save(path, trainer.state(trainer.start_step, None, 0.0))
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        checkpoint.load(path)
        loads.append(time.perf_counter() - t0)
    return statistics.median(saves), statistics.median(loads), path.stat().st_size


def config_path() -> Path:
    """The configuration make and kbuild read: $KCONFIG_CONFIG, else .config (kbuild/__main__.py); a
    relative path is taken from the repository root, where make runs."""
    return ROOT / (os.environ.get("KCONFIG_CONFIG") or ".config")


def main() -> int:
    steps = int(os.environ.get("BENCH_STEPS", "60"))
    interval = max(1, steps // 6)
    _, configured = load(config_path(), os.environ.get("SET", ""))  # validate first: named errors, as for make
    # One process: a data-parallel run's throughput is in its own summary (make, then the report).
    bench_sets = (f'DATA_PATH="" DATASET_EMBEDDED=y EMBEDDED_CORPUS_MB=4 MAX_ITERS={steps} MAX_TIME=0 '
                  f"LOG_INTERVAL={interval} EVAL_INTERVAL={steps} EVAL_BATCHES=1 CHECKPOINT_INTERVAL=0 "
                  "SAMPLE_TOKENS=1 PARALLEL_NONE=y TRACK_WANDB=n TRACK_TRACKIO=n TRACK_TENSORBOARD=n "
                  f"WARMUP_ITERS={min(configured.WARMUP_ITERS, steps - 1)}")  # the steps measured fit the schedule
    if configured.PARALLEL != "none":
        print("bench runs one process; for the data-parallel throughput run 'make' and read its summary")
    kconf, _ = resolve(parse_file(config_path(), snapshot=True), parse_overrides(os.environ.get("SET", "")),
                       parse_overrides(bench_sets, "bench"))
    cfg = values(kconf)
    result = bench(cfg, prepare(cfg, ROOT))
    if "tokens_per_s" in result:
        result.update(comparisons(cfg, result))
    if out := os.environ.get("BENCH_JSON"):
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["status"] == "done" else 1


def bench(cfg, data) -> dict:
    """Train ``cfg`` (MAX_ITERS steps) in a temporary folder, print the figures and return them.

    A run that ends early (status other than "done": NaN/Inf stop, interrupt, time limit) is
    reported as such; its throughput is printed only when the summary and at least two logging
    intervals hold it (a "time_limit" summary does), and the checkpoint timing is skipped.
    """
    steps = cfg.MAX_ITERS
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, data, Path(tmp), log=lambda m: None)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        summary = trainer.run()
        if trainer.device.type == "cuda":
            peak, peak_kind = torch.cuda.max_memory_allocated(), "CUDA allocator peak"
        else:
            peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
        metrics = Path(tmp) / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        done = summary["status"] == "done"
        if done:
            save_s, load_s, ckpt_bytes = checkpoint_times(trainer, Path(tmp))
    result = {"plan": cfg.PLAN_NAME, "status": summary["status"], "steps": summary["steps"],
              "planned_steps": summary.get("planned_steps", steps)}
    if not done:
        print(stop_message(cfg.PLAN_NAME, summary, steps))
        if "error" in summary:
            result["error"] = summary["error"]
    logged = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    speeds = logged[1:]  # the first interval holds warmup and compilation
    if not all(k in summary for k in ("device", "dtype", "params", "mfu")):
        print("  no throughput figures: the summary of a run stopped this way holds none")
        return result
    if not speeds:
        print(f"  no throughput figure: the run logged {len(logged)} interval(s) of {cfg.LOG_INTERVAL} steps and "
              "the first holds warmup; raise BENCH_STEPS")
        return result
    tps = statistics.median(speeds)
    flops = trainer.model.flops_per_token() * tps
    result.update({
        "device": summary["device"], "dtype": summary["dtype"], "compile": cfg.COMPILE,
        "params": summary["params"], "tokens_per_step": trainer.tokens_per_step,
        "tokens_per_s": tps, "tokens_per_s_intervals": speeds, "flops_per_s": flops, "mfu": summary["mfu"],
        "model": dataclasses.asdict(trainer.model.config), "device_type": trainer.device.type,
    })
    print(f"bench {cfg.PLAN_NAME}: {summary['params']:,} params, vocab {trainer.model.config.vocab_size}, "
          f"{trainer.tokens_per_step:,} tokens/step, "
          f"{summary['device']}, {summary['dtype']}, compile {'on' if cfg.COMPILE else 'off'}")
    print(f"  {tps:,.0f} tokens/s (median of {len(speeds)} intervals of {cfg.LOG_INTERVAL} steps), "
          f"{flops / 1e9:.1f} GFLOP/s" + (f", MFU {100 * summary['mfu']:.1f}%" if summary["mfu"] else ""))
    predicted = predict_run_memory(cfg, trainer.curriculum, trainer.model.config, summary["dtype"]).total
    print(f"  peak memory: {peak / 2**20:,.0f} MiB ({peak_kind}); predicted for the training step: "
          f"{predicted / 2**20:,.0f} MiB")
    result.update(peak_memory_bytes=peak, peak_memory_kind=peak_kind, predicted_memory_bytes=predicted)
    if cfg.MOE:
        model_config = trainer.model.config
        dtype = DTYPES[summary["dtype"]] if summary["dtype"] != "fp32" else None
        moe = moe_vs_dense(model_config.moe, model_config.n_embd, model_config.mlp, cfg.MICRO_BATCH, cfg.BLOCK_SIZE,
                           trainer.device, dtype)
        print(describe_moe(moe))
        result["moe_vs_dense"] = moe
    if done:
        print(f"  checkpoint: {ckpt_bytes / 2**20:.1f} MiB, save {1000 * save_s:.0f} ms, load {1000 * load_s:.0f} ms "
              f"(median of 5, including fsync)")
        result.update(checkpoint_bytes=ckpt_bytes, checkpoint_save_s=save_s, checkpoint_load_s=load_s)
    return result


def comparisons(cfg, result: dict) -> dict:
    """The side-by-side figures after the trainer's: the GPT-2 block against the LLaMA-style block
    (on CPU at nanoGPT's CPU recipe size, whatever the configured model), Muon's step against AdamW's on
    the quickstart model (scripts/bench_optim.py; SET applies there too) and, unless
    BENCH_COMPILE=n, torch.compile against eager on the configured model on its device."""
    blocks = compare_blocks()
    print(describe_blocks(blocks))
    out = {"blocks": blocks}
    optim = measure_optim(ROOT / "defconfigs" / "quickstart", int(os.environ.get("BENCH_OPTIM_REPEATS", "30")))
    if optim:  # Muon against AdamW on the quickstart model, whatever the configured optimizer
        print(describe_optim(optim))
        out["muon_vs_adamw"] = optim
    if os.environ.get("BENCH_COMPILE", "y") != "n":
        dtype = DTYPES[result["dtype"]] if result["dtype"] != "fp32" else None
        mode = cfg.COMPILE_MODE.replace("_", "-") if cfg.COMPILE else "default"
        compiled = compile_vs_eager(ModelConfig.from_dict(result["model"]), cfg.MICRO_BATCH, cfg.BLOCK_SIZE,
                                    torch.device(result["device_type"]), dtype, mode)
        print(describe_compile(compiled))
        out["compile_vs_eager"] = compiled
    return out


def stop_message(plan: str, summary: dict, planned: int) -> str:
    """What an early stop looks like in the bench output: status, steps reached and the reason."""
    status, reached, planned = summary["status"], summary["steps"], summary.get("planned_steps", planned)
    if status == "time_limit":
        return (f"bench {plan}: the measured run was cut short by its time limit at step {reached} of {planned}; "
                "any figures below cover only the steps it reached")
    return (f"bench {plan}: the measured run stopped early (status {status!r}) at step {reached} of {planned}: "
            f"{summary.get('error') or 'no reason given'}")


if __name__ == "__main__":
    sys.exit(main())
