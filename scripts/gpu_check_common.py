"""What the GPU check's steps share: the model shapes, building a run's model and optimizer from
Kconfig symbols through train/build.py, one training step as the trainer runs it, and a results
file written atomically after every item, so a step stopped at its time budget keeps the items it
finished (scripts/gpu_check.py reads it back).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kconfig.atomic import atomic_write  # noqa: E402
from kconfig.tree import parse_overrides, resolve  # noqa: E402
from kconfig.values import values  # noqa: E402
from model.gpt import ModelConfig  # noqa: E402
from optim.optimizers import OptimizerConfig  # noqa: E402
from train.build import Built, build_model_and_optimizer  # noqa: E402
from train.device import autocast, compile_model  # noqa: E402
from train.precision import Fp8Config, fp8_autocast  # noqa: E402

# The full shapes (GPU) and their dry-run stand-ins (CPU, tiny widths): SET text, vocabulary size.
GPT2 = "MODEL_SIZE_GPT2=y BLOCK_SIZE=1024 MICRO_BATCH=16 DROPOUT=0"  # GPT-2 124M, nanoGPT's shape
LLAMA = ("MODEL_SIZE_CUSTOM=y N_LAYER=24 N_EMBD=2048 N_HEAD=16 N_KV_HEAD=16 BLOCK_SIZE=2048 MICRO_BATCH=8 "
         "NORM_RMSNORM=y POS_ROPE=y MLP_SWIGLU=y BIAS=n TIE_EMBEDDINGS=n DROPOUT=0")  # LLaMA-style, ~1.35B
GPT2_VOCAB, LLAMA_VOCAB = 50304, 32000
DRY_GPT2 = "MODEL_SIZE_CUSTOM=y N_LAYER=2 N_EMBD=64 N_HEAD=2 N_KV_HEAD=2 BLOCK_SIZE=64 MICRO_BATCH=2 DROPOUT=0"
DRY_LLAMA = ("MODEL_SIZE_CUSTOM=y N_LAYER=2 N_EMBD=64 N_HEAD=4 N_KV_HEAD=4 BLOCK_SIZE=64 MICRO_BATCH=2 "
             "NORM_RMSNORM=y POS_ROPE=y MLP_SWIGLU=y BIAS=n TIE_EMBEDDINGS=n DROPOUT=0")
DRY_VOCAB = 256
MOE = "MOE=y MOE_EXPERTS=8 MOE_TOP_K=2"  # experts 2 x N_EMBD wide (MOE_EXPERT_RATIO): top-2 = a 4x dense MLP

FAIL_ENV = "GPU_CHECK_FAIL"  # comma-separated step names that raise at their start (the tests' failure injection)


def shapes(dry_run: bool) -> dict[str, tuple[str, int]]:
    """The two base models, full or shrunk: name -> (SET text, vocabulary size)."""
    if dry_run:
        return {"gpt2": (DRY_GPT2, DRY_VOCAB), "llama": (DRY_LLAMA, DRY_VOCAB)}
    return {"gpt2": (GPT2, GPT2_VOCAB), "llama": (LLAMA, LLAMA_VOCAB)}


def config_for(sets: str):
    """A resolved, typed Config: Kconfig defaults then ``sets``, strictly (as `make` resolves SET)."""
    kconf, _ = resolve(parse_overrides(sets, "gpu-check"))
    return values(kconf)


def build(cfg, vocab: int, device: torch.device) -> Built:
    """The run's GPT (FP8 applied) and optimizer, through train/build.py as the trainer builds them."""
    return build_model_and_optimizer(ModelConfig.from_config(cfg, vocab), OptimizerConfig.from_config(cfg),
                                     Fp8Config.from_config(cfg), cfg.SEED, device)


def training_step(cfg, built: Built, vocab: int, device: torch.device, dtype: str, compiled: bool):
    """One step of ``built`` as train/trainer.py runs it (``make_step``), compiled through
    train/device.py's compile_model with CONFIG_COMPILE_MODE when ``compiled``."""
    module = compile_model(built.module, cfg.COMPILE_MODE.replace("_", "-"), shapes=1) if compiled else built.module
    return make_step(module, built.optimizer, (cfg.MICRO_BATCH, cfg.BLOCK_SIZE), vocab, cfg.SEED, device, dtype,
                     Fp8Config.from_config(cfg))


def make_step(module, optimizer, shape: tuple[int, int], vocab: int, seed: int, device: torch.device, dtype: str,
              fp8: Fp8Config = Fp8Config()):
    """One training step on a fixed random batch, as the trainer runs it: forward under autocast (and
    FP8's context) returning (logits, loss), backward, optimizer step, zero_grad(set_to_none=True);
    no host sync inside. nanoGPT's GPT has the same forward(idx, targets) contract."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(vocab, shape, generator=generator).to(device)
    y = torch.randint(vocab, shape, generator=generator).to(device)

    def step() -> None:
        with autocast(device, dtype), fp8_autocast(fp8):
            logits, loss = module(x, y)  # noqa: F841 (held through the step, as the trainer's ``_``)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_tokens_per_s(step, tokens_per_step: int, device: torch.device, warmup: int, steps: int) -> dict:
    """Tokens/s over ``steps`` timed steps after ``warmup`` (the first holds compilation), and the
    first step's seconds."""
    t0 = time.perf_counter()
    step()
    synchronize(device)
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": tokens_per_step * steps / elapsed, "first_step_s": first_s, "timed_steps": steps,
            "step_s": elapsed / steps}


def pick_device(dry_run: bool) -> tuple[torch.device, str]:
    """CPU under the dry run; otherwise CUDA, which the full check needs."""
    if dry_run:
        return torch.device("cpu"), "bf16"
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: the full GPU check needs one (use --dry-run on a CPU machine)")
    return torch.device("cuda"), "bf16"


def release() -> None:
    """Free one item's models before the next: compiled graphs hold their modules (two 1.35B models
    with their AdamW state would not fit together), then the allocator's cache."""
    gc.collect()
    torch._dynamo.reset()  # the in-memory compile caches; inductor's on-disk cache stays for the next item
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Results:
    """One step's items, written to ``path`` atomically after each (the orchestrator reads the file
    whether the step ends, fails or is stopped at its budget)."""

    def __init__(self, path: Path, step: str, dry_run: bool):
        self.path, self.data = Path(path), {"step": step, "dry_run": dry_run, "items": {}}
        self.write()
        if step in os.environ.get(FAIL_ENV, "").split(","):
            raise RuntimeError(f"{FAIL_ENV} names step {step!r}: failing it on purpose")

    def write(self) -> None:
        text = json.dumps(self.data, indent=2, default=str) + "\n"
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    def run(self, name: str, measure, *args) -> None:
        """``measure(*args) -> dict`` recorded under ``name`` with its status and seconds; an exception
        is recorded as failed (last traceback lines) and the next item still runs."""
        print(f"[{self.data['step']}] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            item = {"status": "done", **measure(*args)}
        except Exception as e:  # noqa: BLE001 (one item's failure must not lose the others)
            item = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc().splitlines()[-6:]}
        finally:
            release()
        item["seconds"] = round(time.perf_counter() - t0, 3)
        print(f"[{self.data['step']}] {name}: {item['status']} in {item['seconds']:.1f} s"
              + (f" ({item['error']})" if item["status"] == "failed" else ""), flush=True)
        self.data["items"][name] = item
        self.write()

    def skip(self, name: str, reason: str) -> None:
        print(f"[{self.data['step']}] {name}: skipped: {reason}", flush=True)
        self.data["items"][name] = {"status": "skipped", "reason": reason}
        self.write()
