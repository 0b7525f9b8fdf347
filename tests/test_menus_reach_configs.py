"""Every symbol of the Model, Optimizer, LR schedule, Training, Sampling and Evaluation menus reaches its
typed config (ModelConfig, OptimizerConfig, LoopConfig, DeviceConfig, EvalConfig, GenerationConfig) with
its value.

A from_config that reads the wrong name (``tie_embeddings=cfg.BIAS``) builds a model that trains
and only differs where the two symbols disagree. So each symbol has a row here: the config field it
sets (every one of them), an assignment that moves it off its default, and what the field must then
hold. Three checks:

- the tables name exactly the menus' symbols (a new option needs its row: enumerated from the tree);
- moving one symbol changes its own field, to its value, and no field a row does not list;
- at the defaults, under every fragment in defconfigs/fragments and every preset, each field equals
  the value its row computes from the resolved Config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Callable

import kconfiglib
import pytest

from conftest import ROOT, config_of
from evaluation.generation import GenerationConfig
from harness.evaluate import EvalConfig
from kconfig.tree import new_kconfig, parse_file, resolve
from kconfig.values import values
from model.gpt import ModelConfig
from model.mlp import hidden_width
from optim.optimizers import OptimizerConfig
from train.device import DeviceConfig
from train.loop_config import LoopConfig
from train.sample import parse_stop_strings

VOCAB = 64


@dataclass(frozen=True)
class Row:
    field: str | tuple[str, ...]  # the config attribute(s) it sets to its value, dotted ("moe.top_k")
    varied: str  # SET text that moves the symbol off its default
    base: str = ""  # what the symbol needs to apply, set on both sides
    value: Callable | None = None  # the field's value from a Config; default: the symbol's own value
    also: tuple[str, ...] = ()  # other fields the variation moves by design


def moe_only(read):
    return lambda c: read(c) if c.MOE else None


MODEL = {
    "MODEL_SIZE": Row("n_embd", "MODEL_SIZE_SMALL=y", value=lambda c: c.N_EMBD,
                      also=("n_layer", "n_head", "n_kv_head")),
    "N_LAYER": Row("n_layer", "MODEL_SIZE_CUSTOM=y N_LAYER=3"),
    "N_HEAD": Row("n_head", "MODEL_SIZE_CUSTOM=y N_HEAD=8", also=("n_kv_head",)),
    "N_EMBD": Row("n_embd", "MODEL_SIZE_CUSTOM=y N_EMBD=64"),
    "N_KV_HEAD": Row("n_kv_head", "N_KV_HEAD=2", value=lambda c: c.N_KV_HEAD or c.N_HEAD),
    "BLOCK_SIZE": Row("block_size", "BLOCK_SIZE=64"),
    "NORM": Row("norm", "NORM_RMSNORM=y"),
    "POS": Row("pos", "POS_ROPE=y"),
    "ROPE_THETA": Row("rope_theta", 'ROPE_THETA="500000"', base="POS_ROPE=y",
                      value=lambda c: c.ROPE_THETA or 10000.0),
    "MLP": Row("mlp", "MLP_SWIGLU=y"),
    "MLP_RATIO": Row("mlp_ratio", 'MLP_RATIO="2"'),
    "ATTN": Row("attn", "ATTN_REFERENCE=y"),
    "ATTN_WINDOW": Row("attn_window", "ATTN_WINDOW=8"),
    "ATTN_SOFTCAP": Row("attn_softcap", 'ATTN_SOFTCAP="30"', base="ATTN_REFERENCE=y",
                        value=lambda c: c.ATTN_SOFTCAP or 0.0),
    "FINAL_LOGIT_SOFTCAP": Row("final_logit_softcap", 'FINAL_LOGIT_SOFTCAP="30"'),
    "QK_NORM": Row("qk_norm", "QK_NORM=y"),
    "BIAS": Row("bias", "BIAS=n"),
    "DROPOUT": Row("dropout", 'DROPOUT="0.1"'),
    "TIE_EMBEDDINGS": Row("tie_embeddings", "TIE_EMBEDDINGS=n"),
    "INIT_STD": Row("init_std", 'INIT_STD="0.01"'),
    "MTP_HEADS": Row("mtp_heads", "MTP_HEADS=1", also=("mtp_weight",)),
    "MTP_WEIGHT": Row("mtp_weight", 'MTP_WEIGHT="0.5"', base="MTP_HEADS=1", value=lambda c: c.MTP_WEIGHT or 0.0),
    "MOE": Row("moe", "MOE=y", value=lambda c: c.MOE, also=("moe.*",)),
    "MOE_EXPERTS": Row("moe.n_experts", "MOE_EXPERTS=4", base="MOE=y", value=moe_only(lambda c: c.MOE_EXPERTS)),
    "MOE_TOP_K": Row("moe.top_k", "MOE_TOP_K=1", base="MOE=y", value=moe_only(lambda c: c.MOE_TOP_K)),
    "MOE_EVERY": Row("moe_every", "MOE_EVERY=2", base="MOE=y", value=lambda c: c.MOE_EVERY or 1),
    "MOE_FIRST_DENSE": Row("moe_first_dense", "MOE_FIRST_DENSE=1", base="MOE=y",
                           value=lambda c: c.MOE_FIRST_DENSE or 0),
    "MOE_SHARED_EXPERTS": Row("moe.n_shared", "MOE_SHARED_EXPERTS=1", base="MOE=y",
                              value=moe_only(lambda c: c.MOE_SHARED_EXPERTS)),
    "MOE_EXPERT_RATIO": Row("moe.expert_hidden", 'MOE_EXPERT_RATIO="1"', base="MOE=y",
                            value=moe_only(lambda c: hidden_width(c.N_EMBD, c.MOE_EXPERT_RATIO, c.MLP))),
    "MOE_SCORE": Row("moe.score", "MOE_SCORE_SIGMOID=y", base="MOE=y", value=moe_only(lambda c: c.MOE_SCORE)),
    "MOE_AUX_LOSS_COEF": Row("moe.aux_loss_coef", 'MOE_AUX_LOSS_COEF="0.02"', base="MOE=y",
                             value=moe_only(lambda c: c.MOE_AUX_LOSS_COEF)),
    "MOE_Z_LOSS_COEF": Row("moe.z_loss_coef", 'MOE_Z_LOSS_COEF="0.002"', base="MOE=y",
                           value=moe_only(lambda c: c.MOE_Z_LOSS_COEF)),
    "MOE_BIAS_RATE": Row("moe.bias_rate", 'MOE_BIAS_RATE="0.001"', base="MOE=y",
                         value=moe_only(lambda c: c.MOE_BIAS_RATE)),
    "MOE_CAPACITY_FACTOR": Row("moe.capacity_factor", 'MOE_CAPACITY_FACTOR="1.25"', base="MOE=y",
                               value=moe_only(lambda c: c.MOE_CAPACITY_FACTOR)),
    "MOE_JITTER": Row("moe.jitter", 'MOE_JITTER="0.01"', base="MOE=y", value=moe_only(lambda c: c.MOE_JITTER)),
}
# ModelConfig fields set from other menus (Training's activation checkpointing).
MODEL_ELSEWHERE = {
    "ACT_CKPT": Row("checkpoint_every", "ACT_CKPT=y", value=lambda c: c.ACT_CKPT_EVERY if c.ACT_CKPT else 0),
    "ACT_CKPT_EVERY": Row("checkpoint_every", "ACT_CKPT_EVERY=2", base="ACT_CKPT=y",
                          value=lambda c: c.ACT_CKPT_EVERY if c.ACT_CKPT else 0),
}

BETAS = lambda c: (c.BETA1, c.BETA2)  # noqa: E731
OPTIMIZER = {
    "OPTIMIZER": Row("name", "OPT_LION=y"),
    "LR": Row(("lr", "schedule.lr"), 'LR="1e-3"'),
    "WEIGHT_DECAY": Row("weight_decay", 'WEIGHT_DECAY="0.05"'),
    "BETA1": Row("betas", 'BETA1="0.8"', value=BETAS),
    "BETA2": Row("betas", 'BETA2="0.99"', value=BETAS),
    "ADAM_EPS": Row("adam_eps", 'ADAM_EPS="1e-6"'),
    "LION_LR_SCALE": Row("lion_lr_scale", 'LION_LR_SCALE="0.5"'),
    "SGD_LR_SCALE": Row("sgd_lr_scale", 'SGD_LR_SCALE="20"'),
    "MUON_LR_SCALE": Row("muon_lr_scale", 'MUON_LR_SCALE="2"'),
    "MUON_MOMENTUM": Row("muon_momentum", 'MUON_MOMENTUM="0.9"'),
    "MUON_IMPL": Row("muon_impl", "MUON_IMPL_TORCH=y", base="OPT_MUON=y DEVICE_CPU=y"),
    "MUON_CPU_BF16": Row("muon_cpu_bf16", "MUON_CPU_BF16=y", base="OPT_MUON=y"),
    "SGD_MOMENTUM": Row("sgd_momentum", 'SGD_MOMENTUM="0.5"'),
    "EMBEDDING_LR_SCALE": Row("embedding_lr_scale", 'EMBEDDING_LR_SCALE="2"'),
    "HEAD_LR_SCALE": Row("head_lr_scale", 'HEAD_LR_SCALE="2"'),
    "GRAD_CLIP": Row("grad_clip", 'GRAD_CLIP="0.5"'),
    # The "LR schedule" menu: ScheduleConfig inside OptimizerConfig.
    "WARMUP_ITERS": Row("schedule.warmup_iters", "WARMUP_ITERS=10"),
    "LR_SCHEDULE": Row("schedule.shape", "LR_WSD=y", also=("schedule.decay_iters", "schedule.wsd_decay_fraction")),
    "LR_DECAY_ITERS": Row("schedule.decay_iters", "LR_DECAY_ITERS=500"),
    "WSD_DECAY_FRACTION": Row("schedule.wsd_decay_fraction", 'WSD_DECAY_FRACTION="0.5"', base="LR_WSD=y"),
    "MIN_LR": Row("schedule.min_lr", 'MIN_LR="1e-5"'),
}
OPTIMIZER_ELSEWHERE = {"MAX_ITERS": Row("schedule.max_iters", "MAX_ITERS=500")}  # the Training menu's



@dataclass(frozen=True)
class Training:
    """What the Training and Sampling menus' own symbols set: the loop (with its sample), the device
    (with FP8), activation checkpointing in the model, and the schedule's length."""

    loop: LoopConfig
    device: DeviceConfig
    model: ModelConfig
    optimizer: OptimizerConfig

    @classmethod
    def from_config(cls, cfg) -> "Training":
        return cls(LoopConfig.from_config(cfg), DeviceConfig.from_config(cfg), ModelConfig.from_config(cfg, VOCAB),
                   OptimizerConfig.from_config(cfg))


COMPILED = lambda c: c.COMPILE_MODE.replace("_", "-") if c.COMPILE else None  # noqa: E731
CHECKPOINTED = lambda c: c.ACT_CKPT_EVERY if c.ACT_CKPT else 0  # noqa: E731
WARM = 'INIT_FROM="runs/plan/parent"'
TRAINING = {
    "MICRO_BATCH": Row("loop.micro_batch", "MICRO_BATCH=8"),
    "GRAD_ACCUM": Row("loop.grad_accum", "GRAD_ACCUM=2"),
    "MAX_ITERS": Row(("loop.max_iters", "optimizer.schedule.max_iters"), "MAX_ITERS=500"),
    "MAX_TIME": Row("loop.max_time", "MAX_TIME=60"),
    "EVAL_INTERVAL": Row("loop.eval_interval", "EVAL_INTERVAL=100"),
    "EVAL_BATCHES": Row("loop.eval_batches", "EVAL_BATCHES=5"),
    "LOG_INTERVAL": Row("loop.log_interval", "LOG_INTERVAL=5"),
    "CHECKPOINT_INTERVAL": Row("loop.checkpoint_interval", "CHECKPOINT_INTERVAL=100"),
    "CHECKPOINT_KEEP": Row("loop.checkpoint_keep", "CHECKPOINT_KEEP=3"),
    "CHECKPOINT_MINUTES": Row("loop.checkpoint_minutes", "CHECKPOINT_MINUTES=7"),
    "SKIP_NONFINITE": Row("loop.skip_nonfinite", "SKIP_NONFINITE=n", also=("loop.max_bad_steps",)),
    "MAX_BAD_STEPS": Row("loop.max_bad_steps", "MAX_BAD_STEPS=3"),
    "SEED": Row(("loop.seed", "loop.sample.seed"), "SEED=7"),
    "DEVICE": Row("device.device", "DEVICE_CUDA=y"),
    "DTYPE": Row("device.dtype", "DTYPE_FP32=y"),
    "COMPILE": Row("device.compile_mode", "COMPILE=y", value=COMPILED),
    "COMPILE_MODE": Row("device.compile_mode", "COMPILE_MODE_REDUCE_OVERHEAD=y", base="COMPILE=y", value=COMPILED),
    "ACT_CKPT": Row("model.checkpoint_every", "ACT_CKPT=y", value=CHECKPOINTED),
    "ACT_CKPT_EVERY": Row("model.checkpoint_every", "ACT_CKPT_EVERY=2", base="ACT_CKPT=y", value=CHECKPOINTED),
    "CPU_THREADS": Row("device.cpu_threads", "CPU_THREADS=2"),
    "INIT_FROM": Row("loop.init_from", WARM, also=("loop.init_from_checkpoint",)),
    "INIT_FROM_CHECKPOINT": Row("loop.init_from_checkpoint", "INIT_FROM_CHECKPOINT_LATEST=y", base=WARM),
    "INIT_FROM_OPTIMIZER": Row("loop.init_from_optimizer", "INIT_FROM_OPTIMIZER=y", base=WARM),
    "FP8": Row("device.fp8.backend", "FP8_TORCHAO=y", also=("device.fp8.recipe", "device.fp8.emulate")),
    "FP8_RECIPE": Row("device.fp8.recipe", "FP8_RECIPE_ROWWISE=y", base="FP8_TORCHAO=y"),
    "FP8_EMULATE": Row("device.fp8.emulate", "FP8_EMULATE=y", base="FP8_TORCHAO=y"),
    "TE_RECIPE": Row("device.fp8.te_recipe", "TE_RECIPE_CURRENT=y", base="DEVICE_CUDA=y FP8_TE=y"),
    "SAMPLE_PROMPT": Row("loop.sample.prompt", 'SAMPLE_PROMPT="def "'),
    "SAMPLE_TOKENS": Row("loop.sample.tokens", "SAMPLE_TOKENS=50"),
    "SAMPLE_TEMPERATURE": Row("loop.sample.temperature", 'SAMPLE_TEMPERATURE="0.5"'),
    "SAMPLE_TOP_K": Row("loop.sample.top_k", "SAMPLE_TOP_K=10"),
    "SAMPLE_TOP_P": Row("loop.sample.top_p", 'SAMPLE_TOP_P="0.9"'),
    "SAMPLE_STOP": Row("loop.sample.stop", r'SAMPLE_STOP="\\n\\n|class "',  # ("\n\n", "class ")
                       value=lambda c: parse_stop_strings(c.SAMPLE_STOP)),
}


@dataclass(frozen=True)
class Evaluation:
    """What the Evaluation menu sets: lm-eval's task settings and make eval's generation settings."""

    tasks: EvalConfig
    generation: GenerationConfig

    @classmethod
    def from_config(cls, cfg) -> "Evaluation":
        return cls(EvalConfig.from_config(cfg, ROOT), GenerationConfig.from_config(cfg))


def tasks_dir(c) -> Path:
    where = Path(c.EVAL_TASKS_DIR).expanduser()
    return where if where.is_absolute() else ROOT / where


EVALUATION = {
    "EVAL_TASKS": Row("tasks.tasks", 'EVAL_TASKS="arc_easy, hellaswag arc_easy"',
                      value=lambda c: tuple(dict.fromkeys(c.EVAL_TASKS.replace(",", " ").split()))),
    "EVAL_TASKS_DIR": Row("tasks.tasks_dir", 'EVAL_TASKS_DIR="/srv/tasks"', value=tasks_dir),
    "EVAL_FEWSHOT": Row("tasks.fewshot", "EVAL_FEWSHOT=3"),
    "EVAL_LIMIT": Row("tasks.limit", "EVAL_LIMIT=10"),
    "EVAL_BATCH_SIZE": Row("tasks.batch_size", "EVAL_BATCH_SIZE=4"),
    "EVAL_BPB_TOKENS": Row("tasks.bpb_tokens", "EVAL_BPB_TOKENS=1000"),
    "EVAL_EVERY": Row("tasks.every", "EVAL_EVERY=100"),
    "EVAL_GEN_SAMPLES": Row("generation.samples", "EVAL_GEN_SAMPLES=2"),
    "EVAL_GEN_TOKENS": Row("generation.tokens", "EVAL_GEN_TOKENS=20"),
    "EVAL_GEN_PROMPTS": Row("generation.prompts_file", 'EVAL_GEN_PROMPTS="prompts.txt"'),
}
# The Training menu's other files have consumers of their own (curriculum, trackers, objective/LoRA).
TRAINING_FILES = ("train/Kconfig", "train/Kconfig.init_from", "train/Kconfig.precision")

CONSUMERS = {  # config class, its tables, the menus they cover (and the files, where only some)
    "model": (lambda cfg: ModelConfig.from_config(cfg, VOCAB), MODEL, MODEL_ELSEWHERE, ("Model",), None),
    "optimizer": (OptimizerConfig.from_config, OPTIMIZER, OPTIMIZER_ELSEWHERE, ("Optimizer", "LR schedule"), None),
    "training": (Training.from_config, TRAINING, {}, ("Training", "Sampling"), TRAINING_FILES),
    "evaluation": (Evaluation.from_config, EVALUATION, {}, ("Evaluation",), None),
}


def menu_symbols(title: str, files: tuple[str, ...] | None = None) -> set[str]:
    """Names of the symbols and named choices under menu ``title`` (its submenus included), those
    defined in ``files`` where given; a choice's option symbols count as their choice."""
    kconf = new_kconfig()
    menu = next(node for node in kconf.node_iter() if node.item == kconfiglib.MENU and node.prompt[0] == title)
    names, stack = set(), [menu.list]
    while stack:
        node = stack.pop()
        while node is not None:
            if files is not None and node.filename not in files:
                pass
            elif isinstance(node.item, kconfiglib.Choice):
                names.add(node.item.name)
            elif isinstance(node.item, kconfiglib.Symbol) and node.item.choice is None:
                names.add(node.item.name)
            if node.list is not None and not isinstance(node.item, kconfiglib.Choice):
                stack.append(node.list)
            node = node.next
    return names


def field_value(config, path: str):
    """A dotted field of a config; None past a None (moe.* without MoE). ``moe`` alone reads as on/off."""
    if path == "moe":
        return config.moe is not None
    value = config
    for part in path.split("."):
        if value is None:
            return None
        value = getattr(value, part)
    return value


def flat_fields(config, prefix: str = "") -> dict:
    """Every leaf field of a (nested) frozen dataclass, by dotted name."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_fields(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def fields_of(row: Row) -> tuple[str, ...]:
    return (row.field,) if isinstance(row.field, str) else row.field


def expected(row: Row, symbol: str, cfg):
    return row.value(cfg) if row.value else attrgetter(symbol)(cfg)


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_the_tables_name_every_symbol_of_the_menus(consumer):
    _, rows, _, menus, files = CONSUMERS[consumer]
    in_tree = set().union(*(menu_symbols(title, files) for title in menus))
    assert set(rows) == in_tree, (f"missing rows: {sorted(in_tree - set(rows))}, "
                                  f"rows for no menu symbol: {sorted(set(rows) - in_tree)}")


ALL_ROWS = [(consumer, symbol) for consumer, (_, rows, elsewhere, *_) in sorted(CONSUMERS.items())
            for symbol in (*rows, *elsewhere)]


@pytest.mark.parametrize("consumer, symbol", ALL_ROWS)
def test_moving_one_symbol_moves_its_field_to_its_value_and_nothing_else(consumer, symbol):
    build, rows, elsewhere, *_ = CONSUMERS[consumer]
    row = {**rows, **elsewhere}[symbol]
    before_cfg, after_cfg = config_of(row.base), config_of(row.base, row.varied)
    before, after = build(before_cfg), build(after_cfg)
    for field in fields_of(row):
        assert field_value(after, field) != field_value(before, field), f"{row.varied} left {field} alone"
        assert field_value(after, field) == expected(row, symbol, after_cfg), field
    a, b = flat_fields(before), flat_fields(after)
    moved = {name for name in a.keys() | b.keys() if a.get(name, "absent") != b.get(name, "absent")}
    allowed = {*fields_of(row), *row.also}
    stray = {name for name in moved if name not in allowed and not any(
        name.startswith(pattern[:-1]) for pattern in allowed if pattern.endswith("*"))}
    assert not stray, f"{row.varied} also moved {sorted(stray)}"


FRAGMENTS = sorted((ROOT / "defconfigs" / "fragments").iterdir())
PRESETS = sorted(p for p in (ROOT / "defconfigs").iterdir() if p.is_file())


def resolved(path: Path | None):
    kconf, _ = resolve(parse_file(path)) if path else resolve()
    return values(kconf)


@pytest.mark.parametrize("path", [None, *FRAGMENTS, *PRESETS],
                         ids=lambda p: "defaults" if p is None else f"{p.parent.name}/{p.name}")
def test_every_field_carries_its_symbol_at_the_defaults_and_under_each_fragment_and_preset(path):
    cfg = resolved(path)
    for consumer, (build, rows, elsewhere, *_) in sorted(CONSUMERS.items()):
        config = build(cfg)
        for symbol, row in {**rows, **elsewhere}.items():
            for field in fields_of(row):
                assert field_value(config, field) == expected(row, symbol, cfg), (consumer, symbol, field)
