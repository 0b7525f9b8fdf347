"""The CPU dry run: every planned run builds, takes two optimizer steps, gets gradients and fits.

No dataset, network or GPU is needed: tokens are random and the vocabulary is
the tokenizer's upper bound. Models too large for a CPU budget are checked as a
reduced-depth/width twin that keeps every option of the config. Peak training
memory per device is predicted for the full model and compared with
TARGET_DEVICE_MEMORY_GIB. Presets and fragments are checked for drift.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from pathlib import Path

import torch

from kbuild.kconfig import ROOT, Assignment, Config, drift
from model.gpt import GPT, ModelConfig
from optim.optimizers import build_optimizer, optimizer_name, set_lr
from optim.schedule import lr_at
from plan.expand import FRAGMENTS, RunSpec, expand
from plan.memory import predict_memory

CPU_PARAM_BUDGET = 30_000_000  # larger models are checked as a reduced twin
CHAR_BYTE_VOCAB = 256  # byte vocabulary; char vocabularies of the shipped corpora pad to at most this


def check_vocab(cfg: Config) -> int:
    """The vocabulary the run's model will have, known without data (SentencePiece: its configured size)."""
    from train.trainer import padded_vocab

    return padded_vocab(cfg.SENTENCEPIECE_VOCAB_SIZE) if cfg.TOKENIZER_SENTENCEPIECE else CHAR_BYTE_VOCAB
GIB = 1024 ** 3


def target_dtype(cfg: Config) -> str:
    """The dtype the run will use on its target device (a GPU unless DEVICE_CPU)."""
    if cfg.DTYPE_FP32 or (cfg.DEVICE_CPU and cfg.DTYPE_AUTO):
        return "fp32"
    return "fp16" if cfg.DTYPE_FP16 else "bf16"


def step_twice(cfg: Config) -> dict:
    """Build the run's model (or its twin), take two steps; raise with a reason if anything is off."""
    mcfg = ModelConfig.from_config(cfg, check_vocab(cfg))
    with torch.device("meta"):
        full = GPT(mcfg)
    params, flops = full.num_params(non_embedding=False), full.flops_per_token()
    twin = params > CPU_PARAM_BUDGET
    if twin:  # same options, fewer layers, narrower heads, shorter sequences
        mcfg = dataclasses.replace(mcfg, n_layer=min(mcfg.n_layer, 2), n_embd=16 * mcfg.n_head,
                                   block_size=min(mcfg.block_size, 64))
    torch.manual_seed(cfg.SEED)
    model = GPT(mcfg)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    batch, seq = min(cfg.MICRO_BATCH, 4), min(mcfg.block_size, 64)
    losses = []
    for step in range(2):  # the second step runs on optimizer state made by the first
        set_lr(optimizer, lr_at(step, cfg))
        x = torch.randint(0, mcfg.vocab_size, (batch, seq))
        _, loss = model(x, torch.roll(x, -1, dims=1))
        if not torch.isfinite(loss):
            raise RuntimeError(f"step {step + 1}: loss is {loss.item()}")
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            raise RuntimeError(f"step {step + 1}: no gradient reached {', '.join(missing[:5])}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    memory = predict_memory(ModelConfig.from_config(cfg, check_vocab(cfg)), cfg.MICRO_BATCH, cfg.BLOCK_SIZE,
                            target_dtype(cfg), optimizer_name(cfg))
    return {"params": params, "flops_per_token": flops, "twin": twin, "losses": losses, "memory": memory}


@dataclasses.dataclass
class Row:
    name: str
    status: str  # ok, FAILED, rejected
    detail: str
    seconds: float = 0.0


def check_run(spec: RunSpec) -> Row:
    if spec.rejected:
        return Row(spec.name, "rejected", spec.error)
    t0 = time.perf_counter()
    cfg = spec.cfg
    try:
        r = step_twice(cfg)
    except Exception:
        print(f"check {spec.name}: FAILED\n{traceback.format_exc()}", flush=True)
        return Row(spec.name, "FAILED", traceback.format_exc().strip().splitlines()[-1], time.perf_counter() - t0)
    mem, target = r["memory"], cfg.TARGET_DEVICE_MEMORY_GIB
    built = "reduced twin" if r["twin"] else "full size"
    detail = (f"{r['params'] / 1e6:.2f}M params, {r['flops_per_token'] / 1e6:.1f} MFLOP/token, {built}, "
              f"loss {r['losses'][0]:.2f}->{r['losses'][1]:.2f}, {mem.describe()}")
    status = "ok"
    if mem.total > target * GIB:
        status = "FAILED"
        detail += (f"; predicted peak {mem.total / GIB:.1f} GiB exceeds TARGET_DEVICE_MEMORY_GIB={target} "
                   f"(lower MICRO_BATCH and raise GRAD_ACCUM, or shorten BLOCK_SIZE)")
    return Row(spec.name, status, detail, time.perf_counter() - t0)


def presets() -> list[Path]:
    folders = [ROOT / "defconfigs", FRAGMENTS]
    return sorted(p for folder in folders if folder.is_dir() for p in folder.iterdir() if p.is_file())


def check_plan(base_layers: list[list[Assignment]], cfg: Config) -> int:
    """Run the whole check, print a table, return the number of failures."""
    t0 = time.perf_counter()
    rows = [check_run(spec) for spec in expand(base_layers, cfg)]
    drifted = [problem for path in presets() for problem in drift(path)]
    width = max(len(r.name) for r in rows)
    print(f"\n=== check: {len(rows)} run(s), {time.perf_counter() - t0:.1f}s ===")
    for r in rows:
        print(f"{r.name:<{width}}  {r.status:<8} {r.seconds:5.2f}s  {r.detail}")
    print(f"presets: {len(presets())} defconfigs and fragments, "
          + ("all equal to their savedefconfig output" if not drifted else f"{len(drifted)} problem(s):"))
    for problem in drifted:
        print(f"  {problem}")
    failures = sum(r.status == "FAILED" for r in rows) + len(drifted)
    if cfg.RUN_ABLATION:  # a matrix may rule out cells; an ablation step that cannot apply is a mistake
        failures += sum(r.status == "rejected" for r in rows)
    print("check passed" if not failures else f"check FAILED: {failures} problem(s)")
    return failures
