"""Optimizer construction: parameter groups by rule, then the optimizer the Optimizer menu picks.

LR is the AdamW-equivalent peak learning rate; optimizers with another natural
scale multiply it by their own factor (LION_LR_SCALE, SGD_LR_SCALE), so one LR
axis of a test matrix means the same thing for every optimizer. Each group
carries an ``lr_scale`` that set_lr applies on top of the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from optim.lion import Lion
from optim.muon import Muon
from optim.schedule import ScheduleConfig

MUON_IMPLS = ("torch", "compact")  # the values of CONFIG_MUON_IMPL


@dataclass(frozen=True)
class OptimizerConfig:
    """The Optimizer and LR schedule menus. The defaults are Kconfig's (tests/test_device.py holds
    them equal), for direct construction; a run builds it with from_config."""

    name: str = "adamw"  # adamw | lion | muon | sgd (CONFIG_OPTIMIZER)
    lr: float = 6e-4  # AdamW-equivalent peak; the schedule's peak too
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW and Lion
    adam_eps: float = 1e-8
    embedding_lr_scale: float = 1.0
    head_lr_scale: float = 1.0  # an untied output head
    lion_lr_scale: float = 0.3
    sgd_lr_scale: float = 50.0
    sgd_momentum: float = 0.9
    muon_lr_scale: float = 1.0
    muon_momentum: float = 0.95
    muon_impl: str | None = None  # muon: torch | compact (CONFIG_MUON_IMPL); None for the others
    muon_cpu_bf16: bool = False  # compact Muon: bf16 Newton-Schulz on CPUs with AMX bf16 (CONFIG_MUON_CPU_BF16)
    grad_clip: float = 1.0  # max gradient norm, 0 = off
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self):
        if self.name not in BUILDERS:
            raise ValueError(f"unknown optimizer {self.name!r}; expected one of {tuple(BUILDERS)} (CONFIG_OPTIMIZER)")
        if self.name == "muon" and self.muon_impl not in MUON_IMPLS:
            raise ValueError(f"Muon needs muon_impl, one of {MUON_IMPLS} (CONFIG_MUON_IMPL), not {self.muon_impl!r}")

    @classmethod
    def from_config(cls, cfg) -> OptimizerConfig:
        return cls(name=cfg.OPTIMIZER, lr=cfg.LR, weight_decay=cfg.WEIGHT_DECAY, betas=(cfg.BETA1, cfg.BETA2),
                   adam_eps=cfg.ADAM_EPS, embedding_lr_scale=cfg.EMBEDDING_LR_SCALE,
                   head_lr_scale=cfg.HEAD_LR_SCALE, lion_lr_scale=cfg.LION_LR_SCALE,
                   sgd_lr_scale=cfg.SGD_LR_SCALE, sgd_momentum=cfg.SGD_MOMENTUM, muon_lr_scale=cfg.MUON_LR_SCALE,
                   muon_momentum=cfg.MUON_MOMENTUM, muon_impl=cfg.MUON_IMPL,
                   muon_cpu_bf16=bool(cfg.MUON_CPU_BF16), grad_clip=cfg.GRAD_CLIP,
                   schedule=ScheduleConfig.from_config(cfg))


def param_groups(model: torch.nn.Module, config: OptimizerConfig) -> list[dict]:
    """Groups by rule: hidden matrices, embeddings, an untied output head (weight decay, LR multipliers);
    vectors (norm gains, biases: no weight decay)."""
    embeddings = {id(p) for name, p in model.named_parameters() if name.startswith(("wte.", "wpe."))}
    head = {id(p) for name, p in model.named_parameters() if name.startswith("lm_head.")} - embeddings
    rules = {
        "matrices": dict(weight_decay=config.weight_decay, lr_scale=1.0),
        "embeddings": dict(weight_decay=config.weight_decay, lr_scale=config.embedding_lr_scale),
        "head": dict(weight_decay=config.weight_decay, lr_scale=config.head_lr_scale),
        "vectors": dict(weight_decay=0.0, lr_scale=1.0),
    }
    members: dict[str, list] = {name: [] for name in rules}
    for p in model.parameters():  # shared (tied) tensors are yielded once
        if not p.requires_grad:
            continue
        group = ("embeddings" if id(p) in embeddings else "head" if id(p) in head
                 else "matrices" if p.dim() >= 2 else "vectors")
        members[group].append(p)
    return [{"name": name, "params": members[name], **rule} for name, rule in rules.items() if members[name]]


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``'s parameter groups."""
    return BUILDERS[config.name](param_groups(model, config), config, device)


def adamw(groups: list[dict], config: OptimizerConfig, device: torch.device) -> torch.optim.AdamW:
    # The fused kernel exists for CUDA and CPU in current torch.
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.adam_eps,
                             fused=device.type in ("cuda", "cpu"))


def lion(groups: list[dict], config: OptimizerConfig, device: torch.device) -> Lion:
    for g in groups:
        g["lr_scale"] *= config.lion_lr_scale
    return Lion(groups, lr=config.lr * config.lion_lr_scale, betas=config.betas)


def sgd(groups: list[dict], config: OptimizerConfig, device: torch.device) -> torch.optim.SGD:
    for g in groups:
        g["lr_scale"] *= config.sgd_lr_scale
    return torch.optim.SGD(groups, lr=config.lr * config.sgd_lr_scale, momentum=config.sgd_momentum,
                           nesterov=config.sgd_momentum > 0)


def muon_with_adamw(groups: list[dict], config: OptimizerConfig, device: torch.device) -> "Composite":
    """Muon on the hidden matrices; AdamW on embeddings, the head and vectors (as Muon's authors do).

    Both Muons scale each matrix's update to AdamW's RMS (adjust_lr_fn="match_rms_adamw"), so Muon
    runs at the same LR (times MUON_LR_SCALE) as the AdamW part. MUON_IMPL "torch" picks
    torch.optim.Muon for the 2-D matrices (the compact optim/muon.py Muon where this torch lacks it);
    stacks of matrices (dim > 2: MoE experts, group "experts") always go to the compact Muon, which
    orthogonalizes each matrix of the stack; torch's takes 2-D only.
    """
    matrices = [g for g in groups if g["name"] == "matrices"]
    rest = [g for g in groups if g["name"] != "matrices"]
    for g in matrices:
        g["lr_scale"] *= config.muon_lr_scale
    # MoE expert stacks (dim > 2) get their own group "experts": torch's Muon takes 2-D only.
    flat = [dict(g, params=[p for p in g["params"] if p.dim() == 2]) for g in matrices]
    stacks = [dict(g, name="experts", params=[p for p in g["params"] if p.dim() > 2]) for g in matrices]
    flat, stacks = [g for g in flat if g["params"]], [g for g in stacks if g["params"]]
    settings = dict(lr=config.lr * config.muon_lr_scale, weight_decay=config.weight_decay,
                    momentum=config.muon_momentum, nesterov=True, adjust_lr_fn="match_rms_adamw")
    notes = []
    compact = dict(settings, ns_dtype=newton_schulz_dtype(config, device, notes))
    torch_muon = config.muon_impl == "torch" and hasattr(torch.optim, "Muon")
    if config.muon_impl == "torch" and not torch_muon:
        notes.append(f"MUON_IMPL_TORCH: torch {torch.__version__} has no torch.optim.Muon (2.9 or newer); "
                     f"the compact Muon (optim/muon.py) runs instead")
    if torch_muon:
        muons = ([torch.optim.Muon(flat, **settings)] if flat else []) + ([Muon(stacks, **compact)] if stacks else [])
    else:
        muons = [Muon(flat + stacks, **compact)] if flat + stacks else []
    return Composite(*muons, adamw(rest, config, device), notes=notes)


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX tile units (bf16 matrix products in hardware), as torch's oneDNN sees it."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def newton_schulz_dtype(config: OptimizerConfig, device: torch.device, notes: list[str]) -> torch.dtype:
    """The compact Muon's Newton-Schulz dtype: bf16 on accelerators; on CPU fp32, or bf16 with MUON_CPU_BF16
    where AMX makes it faster (a note says when the CPU lacks it)."""
    if device.type != "cpu":
        return torch.bfloat16
    if not config.muon_cpu_bf16:
        return torch.float32
    if cpu_has_amx_bf16():
        return torch.bfloat16
    notes.append("MUON_CPU_BF16: this CPU has no AMX bf16 units, where bf16 matrix products are slower than fp32; "
                 "Newton-Schulz runs in fp32")
    return torch.float32


BUILDERS = {"adamw": adamw, "lion": lion, "muon": muon_with_adamw, "sgd": sgd}  # by CONFIG_OPTIMIZER


class Composite:
    """Several optimizers over disjoint parameter groups, stepped, saved and loaded as one."""

    def __init__(self, *optimizers: torch.optim.Optimizer, notes: tuple[str, ...] | list[str] = ()):
        self.optimizers = optimizers
        self.notes = list(notes)  # for the startup report, e.g. an implementation fallback

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def step(self, closure=None) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)

    def __repr__(self) -> str:
        return " + ".join(type(o).__name__ for o in self.optimizers)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's learning rate for this step, times each group's lr_scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def implementation(optimizer: torch.optim.Optimizer) -> str:
    """Which code runs an optimizer, as the startup report names it."""
    if isinstance(optimizer, Muon):
        dtypes = sorted({str(g["ns_dtype"] or "fp32-on-CPU-bf16-on-CUDA").removeprefix("torch.")
                         for g in optimizer.param_groups})
        return f"compact Muon (optim/muon.py), {'/'.join(dtypes)} Newton-Schulz"
    if isinstance(optimizer, getattr(torch.optim, "Muon", ())):
        return "torch.optim.Muon, bf16 Newton-Schulz"
    return type(optimizer).__name__


def describe(optimizer: torch.optim.Optimizer) -> str:
    """One line per parameter group: name, tensors, parameters, weight decay, LR multiplier; under a
    Composite also the implementation running the group, and any notes (fallbacks)."""
    parts = optimizer.optimizers if isinstance(optimizer, Composite) else (optimizer,)
    name = repr(optimizer) if isinstance(optimizer, Composite) else type(optimizer).__name__
    lines = [f"optimizer: {name}"] + [f"  note: {n}" for n in getattr(optimizer, "notes", [])]
    for o in parts:
        runs = f" [{implementation(o)}]" if isinstance(optimizer, Composite) else ""
        for g in o.param_groups:
            n = sum(p.numel() for p in g["params"])
            lines.append(f"  group {g.get('name', '?')}: {len(g['params'])} tensors, {n:,} params, "
                         f"weight_decay={g['weight_decay']}, lr x{g.get('lr_scale', 1.0):g}{runs}")
    return "\n".join(lines)
