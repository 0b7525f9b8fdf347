"""Golden loss curves: a short deterministic training per planned run, its losses held to a file in golden/.

'make check' trains each run of a shipped preset for GOLDEN_STEPS optimizer steps on the CPU, on a
frozen 32 KB slice of the embedded corpus (golden/corpus.txt, read as UTF-8 bytes: the live
embedded corpus is this Python's standard library and differs between Python versions), with the
run's seed, one thread, and the run's own model, optimizer, schedule, dtype, FP8 (emulated),
MoE, MTP, curriculum and post-training objective. What a CPU cannot do in a second or two is
shrunk, and the shrink is recorded in the file: batch, sequence length and micro-batches capped
(GOLDEN_BATCH, GOLDEN_SEQ, GOLDEN_ACCUM), a model above GOLDEN_PARAM_BUDGET replaced by the same
reduced twin the two-step check uses, MUON_CPU_BF16 off (it depends on AMX), a data-parallel
engine replaced by one process (its averaged gradient is the single-process one).

Each step's loss is compared with golden/<PLAN_NAME>.json; the first step off by more than the
run's tolerance fails the check, naming the run, the step and the difference. A run whose resolved
configuration differs from the one its file was made from (a user's plan that kept a preset's
name, a changed default) is skipped with the reason; UPDATE_GOLDEN=1 rewrites the file.

Tolerances, relative per step (measured in docs/plans.md): FP32_RTOL for fp32 runs, whose losses
moved by at most 1.7e-5 between AMX and AVX2 kernels or 1 and 2 threads; LOW_PRECISION_RTOL for
runs that round to bf16 (DTYPE bf16/fp16, which CPUs run as bf16) or FP8, which moved by up to
4.3e-4 (a rounding that flips early grows over the steps). A numeric change to the model moves
the losses by 1e-3 to 1e-1 within a few steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path

import torch

from kconfig.atomic import write_text_if_changed
from kconfig.tree import ROOT, resolve
from kconfig.values import Config, values
from data.tokenizer import Tokenizer
from model.gpt import GPT, ModelConfig
from optim.optimizers import OptimizerConfig, build_optimizer, set_lr
from optim.schedule import lr_at
from plan.expand import RunSpec
from plan.preflight import check_vocab
from train.build import build_model_and_optimizer
from train.curriculum import Curriculum
from train.device import DeviceConfig, target_dtype
from train.moe_stats import MoEStats
from train.post_training import PostTraining
from train.precision import Fp8Config

GOLDEN_DIR = ROOT / "golden"
CORPUS = GOLDEN_DIR / "corpus.txt"
GOLDEN_STEPS = 16
GOLDEN_BATCH, GOLDEN_SEQ, GOLDEN_ACCUM = 4, 64, 2
GOLDEN_PARAM_BUDGET = 2_000_000  # larger models train as the reduced twin (a second or two per run)
CPU_PARAM_BUDGET = 30_000_000  # the two-step check's budget for the same twin (plan/check.py)
FP32_RTOL = 1e-4
LOW_PRECISION_RTOL = 5e-3
# Symbols that name where things go or how they are shown, not what a run computes: a user may change
# them and keep the golden comparison.
NOT_NUMERIC = ("CHECK_GOLDEN", "RUNS_DIR", "PLAN_NAME", "TARGET_DEVICE_MEMORY_GIB", "DRY_RUN")


def cpu_twin(config: ModelConfig) -> ModelConfig:
    """The model with every option kept and fewer layers, narrower heads, shorter sequences, narrower experts."""
    moe = config.moe and dataclasses.replace(config.moe, expert_hidden=32)
    return dataclasses.replace(config, n_layer=max(min(config.n_layer, 2), config.moe_first_dense + 1),
                               n_embd=16 * config.n_head, block_size=min(config.block_size, 64), moe=moe)


def post_training_batch(post, cfg: Config, x: torch.Tensor) -> tuple:
    """Rows ``x`` shaped as the objective's batch: SFT (x, y, doc) with each row two examples whose prompts
    are masked (doc ids when packing); DPO (x, y) of chosen and rejected rows (``x`` has both)."""
    rows, seq = x.shape
    y = torch.roll(x, -1, dims=1)
    y[:, : seq // 4] = -100  # a prompt
    if post.kind == "dpo":
        return x, y
    doc = (torch.arange(seq) >= seq // 2).long().expand(rows, seq).contiguous() if cfg.SFT_PACKING else None
    return x, y, doc


@functools.lru_cache(maxsize=1)
def _defaults() -> Config:
    return values(resolve()[0])


def config_digest(cfg: Config) -> str:
    """SHA-256 of the resolved values that differ from Kconfig's defaults, less NOT_NUMERIC: a new symbol
    or a changed default leaves it alone (the losses then say whether anything changed), a user's SET
    changes it."""
    defaults = _defaults()
    values_ = {k: v for k, v in sorted(cfg.items()) if k not in NOT_NUMERIC and (k not in defaults or defaults[k] != v)}
    return hashlib.sha256(json.dumps(values_, sort_keys=True, default=str).encode()).hexdigest()


def tolerance(cfg: Config) -> float:
    device_config = DeviceConfig.from_config(cfg)
    exact = target_dtype(device_config) == "fp32" and device_config.fp8.backend == "none"
    return FP32_RTOL if exact else LOW_PRECISION_RTOL


def skip_reason(cfg: Config) -> str | None:
    """Why this run has no golden curve on a CPU, or None."""
    if cfg.FP8 == "te":
        return "TransformerEngine FP8 runs on a GPU only (CONFIG_FP8_TE)"
    return None


def corpus_ids() -> torch.Tensor:
    return torch.tensor(list(CORPUS.read_bytes()), dtype=torch.long)


def golden_run(cfg: Config, steps: int = GOLDEN_STEPS) -> tuple[dict, list[float]]:
    """Train ``cfg``'s run (shrunk as the module says) for ``steps`` steps on one thread: (overrides, losses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(cfg, steps)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: Config, steps: int) -> tuple[dict, list[float]]:
    curriculum = Curriculum.from_config(cfg)
    device_config = DeviceConfig.from_config(cfg)
    optimizer_config = dataclasses.replace(OptimizerConfig.from_config(cfg), muon_cpu_bf16=False)
    model_config = ModelConfig.from_config(cfg, check_vocab(cfg))
    with torch.device("meta"):
        params = GPT(model_config).num_params(non_embedding=False)
    overrides: dict = {"steps": steps, "threads": 1, "data": "golden/corpus.txt bytes", "muon_cpu_bf16": False}
    if params > GOLDEN_PARAM_BUDGET:
        twin = cpu_twin(model_config)
        overrides["twin"] = {f: getattr(twin, f) for f in ("n_layer", "n_embd", "block_size")}
        model_config = twin
    if cfg.PARALLEL != "none":  # one process stands in for the engine
        overrides["engine"] = f"one process, not {cfg.PARALLEL}"
    fp8 = device_config.fp8
    cpu_fp8 = dataclasses.replace(fp8, emulate=True) if fp8.backend == "torchao" else Fp8Config()
    built = build_model_and_optimizer(model_config, optimizer_config, cpu_fp8, cfg.SEED, torch.device("cpu"))
    model, optimizer = built.model, built.optimizer
    post = None
    if cfg.OBJECTIVE != "pretrain":  # the stage's own loss and LoRA, from its random initialisation
        post = PostTraining(cfg, Tokenizer({"kind": "byte"}), log=lambda message: None)
        post.prepare(model, None)
        optimizer = build_optimizer(model, optimizer_config, torch.device("cpu"))
    moe_stats = MoEStats(model.moe_layers, torch.device("cpu"))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if target_dtype(device_config) != "fp32"
                else contextlib.nullcontext())
    ids, data = corpus_ids(), torch.Generator().manual_seed(cfg.SEED)
    shapes = []
    losses = []
    for step in range(steps):
        stage = curriculum.stages[0] if step < steps // 2 else curriculum.stages[-1]  # shortest, then longest
        batch = min(stage.micro_batch, GOLDEN_BATCH)
        seq = min(stage.seq_len, model_config.block_size, GOLDEN_SEQ)
        accum = min(curriculum.grad_accum_at(step), GOLDEN_ACCUM)
        shapes.append([batch, seq, accum])
        set_lr(optimizer, lr_at(step, optimizer_config.schedule) * curriculum.lr_scale_at(step))
        total = 0.0
        for _ in range(accum):
            rows = 2 * batch if post is not None and post.kind == "dpo" else batch
            starts = torch.randint(0, len(ids) - seq - 1, (rows,), generator=data)
            window = ids[starts[:, None] + torch.arange(seq + 1)]
            x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
            with autocast:
                if post is None:
                    _, loss = model(x, y)
                else:
                    loss, _ = post.loss(model, model, post_training_batch(post, cfg, x))
            if moe_stats:
                moe_stats.collect()
            (loss / accum).backward()
            total += loss.item() / accum
        max_norm = optimizer_config.grad_clip if optimizer_config.grad_clip > 0 else float("inf")
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if moe_stats:
            moe_stats.end_step()
        losses.append(total)
    overrides["shapes"] = _runs_of(shapes)
    return overrides, losses


def _runs_of(shapes: list[list[int]]) -> list[list[int]]:
    """[batch, seq, accum] per step as [steps, batch, seq, accum] runs of equal shapes."""
    out: list[list[int]] = []
    for shape in shapes:
        if out and out[-1][1:] == shape:
            out[-1][0] += 1
        else:
            out.append([1, *shape])
    return out


def first_drift(want: list[float], got: list[float], rtol: float) -> str | None:
    """The first step whose loss differs from the golden one by more than ``rtol`` relative, described; or None."""
    if len(want) != len(got):
        return f"{len(got)} steps, the golden file has {len(want)}"
    for step, (w, g) in enumerate(zip(want, got), 1):
        off = abs(g - w) / max(abs(w), 1e-12)
        if not off <= rtol:  # NaN drifts too
            return f"step {step}: loss {g:.6f} vs golden {w:.6f} (relative {off:.1e} > {rtol:.0e})"
    return None


def golden_path(plan: str, folder: Path | None = None) -> Path:
    return (folder or GOLDEN_DIR) / f"{plan}.json"


def check_golden(specs: list[RunSpec], cfg: Config, update: bool, folder: Path | None = None) -> tuple[int, list[str]]:
    """Compare (or with ``update`` rewrite) the plan's golden curves: (failures, lines to print)."""
    if not cfg.CHECK_GOLDEN:
        return 0, ["golden: off (CONFIG_CHECK_GOLDEN=n)"]
    path = golden_path(cfg.PLAN_NAME, folder)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    stored = json.loads(path.read_text()) if path.exists() else None
    if stored is None and not update:
        return 0, [f"golden: no {shown} for plan {cfg.PLAN_NAME!r} (a plan of your own): 'make check "
                   f"UPDATE_GOLDEN=1' writes one from this code; CONFIG_CHECK_GOLDEN=n skips this"]
    runs = (stored or {}).get("runs", {})
    lines, failures, written = [], 0, {}
    for spec in specs:
        if spec.rejected:
            continue
        if reason := skip_reason(spec.cfg):
            lines.append(f"golden {spec.name}: skipped: {reason}")
            continue
        digest, rtol = config_digest(spec.cfg), tolerance(spec.cfg)
        old = runs.get(spec.name)
        if not update and (old is None or old["config_sha256"] != digest):
            why = "no curve for this run" if old is None else "its configuration differs from the file's"
            lines.append(f"golden {spec.name}: skipped: {why} (a changed preset: 'make check UPDATE_GOLDEN=1')")
            continue
        t0 = time.perf_counter()
        try:
            overrides, losses = golden_run(spec.cfg)
        except Exception as e:  # the two-step check above reports build failures in full
            failures += 1
            lines.append(f"golden {spec.name}: FAILED: {type(e).__name__}: {e}")
            continue
        if update:
            written[spec.name] = {"config_sha256": digest, "tolerance": rtol, "overrides": overrides, "losses": losses}
            lines.append(f"golden {spec.name}: written, loss {losses[0]:.4f}->{losses[-1]:.4f}")
            continue
        drift = first_drift(old["losses"], losses, rtol)
        if drift is None and old["overrides"] != overrides:
            drift = f"shrunk differently: {overrides} vs the file's {old['overrides']}"
        if drift:
            failures += 1
            if stored["torch"] != torch.__version__:  # kernels change between releases: say so
                drift += f" (the file was written with torch {stored['torch']}, this is {torch.__version__})"
            lines.append(f"golden {spec.name}: FAILED: {drift}; if the change is intended: make check UPDATE_GOLDEN=1")
        else:
            lines.append(f"golden {spec.name}: ok, {len(losses)} steps within {rtol:.0e} of {shown} "
                         f"({time.perf_counter() - t0:.1f}s)")
    if update:
        document = {"plan": cfg.PLAN_NAME, "torch": torch.__version__, "note": "make check UPDATE_GOLDEN=1 "
                    "writes this file (plan/golden.py); each run's losses per step", "runs": written}
        write_text_if_changed(path, json.dumps(document, indent=1) + "\n")
        lines.append(f"golden: wrote {shown} ({len(written)} run(s))")
    return failures, lines
