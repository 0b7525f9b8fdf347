"""The CPU dry run: every planned run builds, takes two optimizer steps, gets gradients and fits.

No dataset, network or GPU is needed: tokens are random and the vocabulary is
the tokenizer's upper bound. Models too large for a CPU budget are checked as a
reduced-depth/width twin that keeps every option of the config. The steps run
the run's own features: bf16 autocast (also standing in for fp16, which CPUs
lack), torchao FP8 through its emulation mode, TransformerEngine as a shape
check (it needs a GPU), activation checkpointing, MoE balancing, and the first
and last curriculum shapes. Data-parallel settings are validated (world size,
node rank, DeepSpeed installed, batch warmup); peak training memory per device
is predicted for the full model, per rank under ZeRO/FSDP sharding, and
compared with TARGET_DEVICE_MEMORY_GIB. Selected trackers that are not
installed are noted with their pip command. Presets and
fragments are checked for drift. A chain stage is built like any run, from a
random initialisation: its parent has not trained yet, so its INIT_FROM (a
placeholder until the plan exists) is never read; instead its model's tensor
shapes are compared with its parent stage's, which a warm start needs equal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import traceback
from pathlib import Path

import torch

from kconfig.tree import ROOT, Assignment, drift

from kconfig.values import Config
from data.tokenizer import Tokenizer
from model.gpt import GPT, ModelConfig
from optim.optimizers import OptimizerConfig, build_optimizer, set_lr
from optim.schedule import lr_at
from plan.expand import FRAGMENTS, RunSpec, cell_pairs, expand
from plan.golden import CPU_PARAM_BUDGET, check_golden, cpu_twin, post_training_batch as shaped_batch
from plan.preflight import check_vocab, config_problems, device_problems
from parallel.launch import check_layout
from train.build import build_model_and_optimizer
from train.curriculum import Curriculum
from train.device import DeviceConfig, target_dtype
from train.memory import predict_run_memory
from train.moe_stats import MoEStats
from train.post_training import PostTraining
from train.precision import Fp8Config, te_shape_problems, te_token_problem
from train.trackers import tracker_problems
from train.hf_parent import ARCHITECTURE_SYMBOLS

GIB = 1024 ** 3


def step_twice(cfg: Config) -> dict:
    """Build the run's model (or its twin), take two steps; raise with a reason if anything is off."""
    curriculum = Curriculum.from_config(cfg)  # CurriculumError names the symbols
    device_config, optimizer_config = DeviceConfig.from_config(cfg), OptimizerConfig.from_config(cfg)
    full_config = ModelConfig.from_config(cfg, check_vocab(cfg))
    with torch.device("meta"):
        full = GPT(full_config)
    params, active, flops = full.num_params(non_embedding=False), full.active_params(), full.flops_per_token()
    fp8, notes = device_config.fp8, []
    if fp8.backend == "te":  # TransformerEngine needs a GPU; its GEMM shape rules are checked on the full model
        tokens = [s.micro_batch * s.seq_len for s in curriculum.stages]
        problems = [p for p in map(te_token_problem, tokens) if p]
        if problems:
            raise RuntimeError("CONFIG_FP8_TE=y: " + problems[0])
        kept = te_shape_problems(full)  # layers that stay in higher precision: worth knowing, not fatal
        notes.append(f"TE: {len(kept)} linear layer(s) stay out of FP8 (dims not multiples of 16)" if kept
                     else "TE shapes ok (runs on GPU only)")
    model_config, twin = full_config, params > CPU_PARAM_BUDGET
    if twin:  # same options, fewer layers, narrower heads, shorter sequences, narrower experts
        model_config = cpu_twin(full_config)
    # torchao's FP8 runs emulated (the same Float8Linear layers and casts, on CPU); TE's not at all.
    cpu_fp8 = dataclasses.replace(fp8, emulate=True) if fp8.backend == "torchao" else Fp8Config()
    built = build_model_and_optimizer(model_config, optimizer_config, cpu_fp8, cfg.SEED, torch.device("cpu"))
    model, optimizer = built.model, built.optimizer
    post = None
    if cfg.OBJECTIVE != "pretrain":  # the stage's own loss and LoRA, on random ids (INIT_FROM is not read)
        post = PostTraining(cfg, Tokenizer({"kind": "byte"}), log=lambda message: None)  # the tokenizer only names
        post.prepare(model, None)  # the template's tokens; LoRA's targets are matched here (named errors)
        optimizer = build_optimizer(model, optimizer_config, torch.device("cpu"))  # over what trains
    moe_stats = MoEStats(model.moe_layers, torch.device("cpu"))
    dtype = target_dtype(device_config)  # bf16 stands in for fp16 on CPU
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype != "fp32" else contextlib.nullcontext()
    first, last = curriculum.stages[0], curriculum.stages[-1]  # the shortest and the longest sequences
    losses = []
    for step, stage in enumerate((first, last)):  # the second step runs on optimizer state made by the first
        set_lr(optimizer, lr_at(step, optimizer_config.schedule))
        batch, seq = min(stage.micro_batch, 4), min(stage.seq_len, model_config.block_size, 64)
        x = torch.randint(0, model_config.vocab_size, (batch, seq))
        with autocast:
            if post is None:
                _, loss = model(x, torch.roll(x, -1, dims=1))
            else:
                loss, _ = post.loss(model, model, post_training_batch(post, cfg, batch, seq, model_config.vocab_size))
        if not torch.isfinite(loss):
            raise RuntimeError(f"step {step + 1}: loss is {loss.item()}")
        if moe_stats:
            moe_stats.collect()
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            raise RuntimeError(f"step {step + 1}: no gradient reached {', '.join(missing[:5])}")
        optimizer.step()
        if moe_stats:
            moe_stats.end_step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    world, shard, layout = check_layout(cfg, curriculum.grad_accum_at(0) != cfg.GRAD_ACCUM)
    notes += layout + tracker_problems(cfg)
    memory = predict_run_memory(cfg, curriculum, full_config, dtype, world_size=world, shard=shard)
    return {"params": params, "active_params": active, "flops_per_token": flops, "twin": twin,
            "losses": losses, "memory": memory, "notes": notes}


def post_training_batch(post, cfg: Config, batch: int, seq: int, vocab: int) -> tuple:
    """A random batch shaped as the objective's (plan/golden.py's post_training_batch): SFT (x, y, doc),
    DPO (x, y) of chosen and rejected rows."""
    rows = 2 * batch if post.kind == "dpo" else batch
    return shaped_batch(post, cfg, torch.randint(0, vocab, (rows, seq)))


@dataclasses.dataclass
class Row:
    name: str
    status: str  # ok, FAILED, rejected
    detail: str
    seconds: float = 0.0


def parent_shape_problem(spec: RunSpec, parent: RunSpec) -> str | None:
    """Why a chain stage cannot start from its parent's weights: tensors whose shapes differ, or None. A tensor
    only one side has (an adapter a stage adds) is the warm start's to judge, not this check's, and so is a
    vocabulary the stage grows (special tokens added for a chat template)."""
    def model(cfg: Config):
        config = ModelConfig.from_config(cfg, check_vocab(cfg))
        with torch.device("meta"):
            return config, GPT(config).state_dict()

    (mine_config, mine), (their_config, theirs) = model(spec.cfg), model(parent.cfg)
    grown = (their_config.vocab_size, mine_config.vocab_size)

    def fits(before: tuple, after: tuple) -> bool:
        return len(before) == len(after) and all(a == b or (a, b) == grown and b > a for a, b in zip(before, after))

    differing = [f"{name} {tuple(theirs[name].shape)} -> {tuple(t.shape)}" for name, t in mine.items()
                 if name in theirs and not fits(tuple(theirs[name].shape), tuple(t.shape))]
    if not differing:
        return None
    old, new = dataclasses.asdict(their_config), dataclasses.asdict(mine_config)
    settings = [f"{field} {old[field]} -> {new[field]} (CONFIG_{symbol})"
                for field, symbol in ARCHITECTURE_SYMBOLS.items()
                if field in old and old[field] != new[field]]  # fields, not derived properties
    return (f"stage {spec.stage} cannot start from its parent {parent.name}: tensor shapes differ ("
            + ", ".join(differing[:3]) + (f" and {len(differing) - 3} more" if len(differing) > 3 else "")
            + "); settings that differ: " + ("; ".join(settings) or "none named")
            + "; a stage's fragments must keep its parent's model shape")


def check_run(spec: RunSpec, parent: RunSpec | None = None) -> Row:
    if spec.rejected:
        return Row(spec.name, "rejected", spec.error)
    if parent is not None:  # a chain stage: its parent is resolved too (a rejected parent rejects it)
        try:
            problem = parent_shape_problem(spec, parent)
        except ValueError as e:  # a model rule, named: reported by the run's own check below
            problem = None if "CONFIG_" in str(e) else f"{type(e).__name__}: {e}"
        if problem:
            return Row(spec.name, "FAILED", problem)
    t0 = time.perf_counter()
    cfg = spec.cfg
    if found := config_problems(cfg):  # named rules: no need to build anything, no traceback
        return Row(spec.name, "FAILED", "; ".join(found), time.perf_counter() - t0)
    try:
        r = step_twice(cfg)
    except Exception as e:
        if "CONFIG_" in str(e):  # raised on purpose, naming its symbol: the message is the whole story
            return Row(spec.name, "FAILED", f"{type(e).__name__}: {e}", time.perf_counter() - t0)
        print(f"check {spec.name}: FAILED\n{traceback.format_exc()}", flush=True)
        return Row(spec.name, "FAILED", traceback.format_exc().strip().splitlines()[-1], time.perf_counter() - t0)
    r["notes"] += [f"not on this machine: {p}" for p in device_problems(cfg)]
    mem, target = r["memory"], cfg.TARGET_DEVICE_MEMORY_GIB
    built = "reduced twin" if r["twin"] else "full size"
    active = f" ({r['active_params'] / 1e6:.2f}M active)" if r["active_params"] < r["params"] else ""
    detail = (f"{r['params'] / 1e6:.2f}M params{active}, {r['flops_per_token'] / 1e6:.1f} MFLOP/token, {built}, "
              f"loss {r['losses'][0]:.2f}->{r['losses'][1]:.2f}, {mem.describe()}" + "".join(f"; {n}" for n in r["notes"]))
    status = "ok"
    if mem.total > target * GIB:
        status = "FAILED"
        detail += (f"; predicted peak {mem.total / GIB:.1f} GiB exceeds TARGET_DEVICE_MEMORY_GIB={target} "
                   f"(lower MICRO_BATCH and raise GRAD_ACCUM, or shorten BLOCK_SIZE)")
    return Row(spec.name, status, detail, time.perf_counter() - t0)


def pair_coverage(specs: list[RunSpec]) -> str:
    """One line: how many value pairs the accepted runs cover, and the pairs Kconfig rules out."""
    covered = set().union(*(cell_pairs(s) for s in specs if not s.rejected))
    impossible = set().union(*(cell_pairs(s) for s in specs if s.rejected)) - covered
    axes = len(specs[0].cell) if specs else 0
    return (f"pairwise: {sum(not s.rejected for s in specs)} run(s) cover all {len(covered)} value pairs of "
            f"{axes} axes" + (f"; {len(impossible)} pair(s) impossible (see the rejected runs)" if impossible else ""))


def presets() -> list[Path]:
    folders = [ROOT / "defconfigs", FRAGMENTS]
    return sorted(p for folder in folders if folder.is_dir() for p in folder.iterdir() if p.is_file())


def check_plan(base_layers: list[list[Assignment]], cfg: Config, update_golden: bool | None = None) -> int:
    """Run the whole check, print a table, return the number of failures. ``update_golden`` (default:
    the environment's UPDATE_GOLDEN=1, which 'make check UPDATE_GOLDEN=1' sets) rewrites the golden curves."""
    if update_golden is None:
        update_golden = os.environ.get("UPDATE_GOLDEN", "") == "1"
    t0 = time.perf_counter()
    specs = expand(base_layers, cfg)
    by_name = {s.name: s for s in specs}
    rows = [check_run(spec, by_name[spec.parent] if spec.parent else None) for spec in specs]
    drifted = [problem for path in presets() for problem in drift(path)]
    width = max(len(r.name) for r in rows)
    print(f"\n=== check: {len(rows)} run(s), {time.perf_counter() - t0:.1f}s ===")
    for r in rows:
        print(f"{r.name:<{width}}  {r.status:<8} {r.seconds:5.2f}s  {r.detail}")
    if cfg.RUN_MODE == "matrix" and cfg.MATRIX_PAIRWISE:
        print(pair_coverage(specs))
    print(f"presets: {len(presets())} defconfigs and fragments, "
          + ("all equal to their savedefconfig output" if not drifted else f"{len(drifted)} problem(s):"))
    for problem in drifted:
        print(f"  {problem}")
    golden_failures, golden_lines = check_golden(specs, cfg, update_golden)
    for line in golden_lines:
        print(line)
    failures = sum(r.status == "FAILED" for r in rows) + len(drifted) + golden_failures
    if cfg.RUN_MODE in ("ablation", "chain"):  # a matrix may rule out cells; a step or stage that cannot apply is a mistake
        failures += sum(r.status == "rejected" for r in rows)
    print("check passed" if not failures else f"check FAILED: {failures} problem(s)")
    return failures
