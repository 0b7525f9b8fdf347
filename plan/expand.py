"""Expand a configuration into the runs of its plan: single, ablation, matrix or chain.

Every run is the base layers (.config, SET) plus its own layers (fragments for
an ablation step or a chain stage, axis assignments for a matrix cell), resolved
through kconfiglib. A run whose assignments do not take is kept in the plan as
rejected, with Kconfig's reason; it never runs. A chain stage's run also gets
INIT_FROM (its parent stage's run directory) and INIT_FROM_CHECKPOINT, applied
before its fragments; until the plan's directory exists INIT_FROM holds a
placeholder that bind_parent replaces.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import kconfiglib

from kconfig.errors import ConfigError
from kconfig.tree import ROOT, Assignment, new_kconfig, parse_file, resolve
from kconfig.values import Config, option_value, values
from plan.plan import run_name

FRAGMENTS = ROOT / "defconfigs" / "fragments"
PLAN_KCONFIG = "plan/Kconfig"  # symbols that describe the plan itself, not a run
MATRIX_PREFIX = "MATRIX_"


@dataclass
class RunSpec:
    name: str
    layers: list[list[Assignment]] = field(default_factory=list)
    baseline: bool = False
    kconf: kconfiglib.Kconfig | None = None
    cfg: Config | None = None
    differences: dict = field(default_factory=dict)
    error: str | None = None  # set for a rejected run
    cell: tuple[int, ...] = ()  # a matrix run's value index on each axis
    stage: str | None = None  # a chain run's stage name
    parent: str | None = None  # a chain run's parent run (None: the first stage)
    inherit: list[Assignment] = field(default_factory=list)  # a chain run's INIT_FROM layer

    @property
    def rejected(self) -> bool:
        return self.error is not None


def expand(base_layers: list[list[Assignment]], base_cfg: Config) -> list[RunSpec]:
    """The plan's runs, each resolved (or rejected). Raises ConfigError for a broken plan definition."""
    mode = base_cfg.RUN_MODE
    if mode == "ablation":
        specs = ablation_runs(base_cfg)
    elif mode == "matrix":
        specs = matrix_runs(base_cfg)
    elif mode == "chain":
        specs = chain_runs(base_cfg)
    else:
        specs = [RunSpec("base", baseline=True)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError([f"the plan names two runs alike: {', '.join(dupes)}; give ablation steps (chain stages, "
                           f"sweep alternatives) distinct names"])
    # Each run's own config is a single run: the plan-describing assignments stay with the plan.
    single = [Assignment("RUN_SINGLE", "y", "plan", 0)]
    plan_syms = plan_symbols()
    run_base = [[a for a in layer if a.symbol not in plan_syms] for layer in base_layers]
    by_name = {s.name: s for s in specs}
    for spec in specs:
        if spec.parent is not None and by_name[spec.parent].rejected:  # parents come first
            spec.error = f"its parent stage's run {spec.parent} is rejected, so it cannot start from it"
            continue
        try:
            spec.kconf, _ = resolve(*run_base, spec.inherit, *spec.layers, single)
        except ConfigError as e:
            spec.error = "; ".join(e.problems)
            continue
        spec.cfg = values(spec.kconf)
        spec.differences = differences(base_cfg, spec.cfg, spec.kconf)
        own = {a.symbol for layer in spec.layers for a in layer}
        for a in spec.inherit:  # the chain's INIT_FROM layer: the parent column says where a stage starts from
            if a.symbol not in own:
                spec.differences.pop(a.symbol, None)
    if mode == "matrix" and base_cfg.MATRIX_PAIRWISE:
        specs = pairwise(specs)
    return specs


def plan_symbols() -> set[str]:
    """The run-mode options and everything that depends on the ablation or matrix mode."""
    kconf = new_kconfig()
    modes = set(kconf.named_choices["RUN_MODE"].syms)
    def deps(sym) -> set:
        items = set(kconfiglib.expr_items(sym.direct_dep))
        return items | (set(kconfiglib.expr_items(sym.choice.direct_dep)) if sym.choice else set())

    return {s.name for s in kconf.unique_defined_syms if s in modes or modes & deps(s)}


# --------------------------------------------------------------------------- ablation


def parse_steps(text: str, symbol: str = "CONFIG_ABLATION_STEPS") -> list[tuple[str, list[str]]]:
    """ "rope llama=rmsnorm+swiglu" -> [("rope", ["rope"]), ("llama", ["rmsnorm", "swiglu"])]"""
    steps = []
    for item in text.split():
        name, sep, frags = item.partition("=")
        fragments = (frags if sep else name).split("+")
        if not name or not all(fragments):
            raise ConfigError([f"{symbol}: malformed item {item!r}: write FRAGMENT or NAME=FRAG1+FRAG2"])
        steps.append((name, fragments))
    return steps


def fragment_path(name: str, symbol: str = "CONFIG_ABLATION_STEPS") -> Path:
    path = FRAGMENTS / name
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in FRAGMENTS.iterdir() if p.is_file())) if FRAGMENTS.is_dir() else ""
        raise ConfigError([f"{symbol}: no fragment {name!r} in {FRAGMENTS}/"
                           f" (have: {known or 'none'})"])
    return path


def ablation_runs(cfg: Config) -> list[RunSpec]:
    steps = parse_steps(cfg.ABLATION_STEPS or "")
    if not steps:
        raise ConfigError(["CONFIG_ABLATION_STEPS is empty: name at least one fragment, e.g. \"rope rmsnorm\""])
    specs = [RunSpec(run_name([]), baseline=True)] if cfg.ABLATION_BASELINE else []
    applied: list[list[Assignment]] = []
    for name, fragments in steps:
        layers = [parse_file(fragment_path(f)) for f in fragments]
        applied = applied + layers if cfg.ABLATION_ORDER == "cumulative" else layers
        specs.append(RunSpec(run_name([("", name)]), layers=list(applied)))
    return specs


# --------------------------------------------------------------------------- chain

CHAIN_SYMBOL = "CONFIG_CHAIN_STAGES"
PARENT_PLACEHOLDER = "<this plan>/"  # INIT_FROM of a stage until its plan directory exists
_STAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SWEEP_RE = re.compile(r"(?P<before>[^\[\]|]*)\[(?P<alternatives>[^\[\]]*)\](?P<after>[^\[\]|]*)")


@dataclass(frozen=True)
class Stage:
    name: str
    variants: tuple[tuple[str, tuple[str, ...]], ...]  # (sweep label, "" when not swept; its fragments)


def _fragment_list(text: str, item: str) -> list[str]:
    fragments = text.split("+") if text else []
    if not all(fragments):
        raise ConfigError([f"{CHAIN_SYMBOL}: malformed stage {item!r}: an empty fragment name between '+' signs"])
    return fragments


def parse_stages(text: str) -> list[Stage]:
    """ "pretrain= sft=sft-tiny+[lora8|]" -> [Stage("pretrain", (("", ()),)),
    Stage("sft", (("lora8", ("sft-tiny", "lora8")), ("", ("sft-tiny",))))]"""
    stages = []
    for item in text.split():
        name, sep, spec = item.partition("=")
        if not _STAGE_NAME_RE.fullmatch(name):
            raise ConfigError([f"{CHAIN_SYMBOL}: malformed stage {item!r}: write NAME=FRAG1+FRAG2, FRAGMENT, NAME= "
                               f"or NAME=FRAG+[ALT1|ALT2]; a name is letters, digits, '.', '_' and '-'"])
        spec = spec if sep else name
        sweep = _SWEEP_RE.fullmatch(spec)
        if sweep is None:
            if set(spec) & set("[]|"):
                raise ConfigError([f"{CHAIN_SYMBOL}: malformed sweep in stage {item!r}: write one group "
                                   f"[ALT1|ALT2|...] as one '+'-item, e.g. sft=sft-tiny+[lora-r8|lora-r64|]"])
            stages.append(Stage(name, (("", tuple(_fragment_list(spec, item))),)))
            continue
        before, after = sweep["before"], sweep["after"]
        if (before and not before.endswith("+")) or (after and not after.startswith("+")):
            raise ConfigError([f"{CHAIN_SYMBOL}: malformed sweep in stage {item!r}: the [ALT1|ALT2] group is a "
                               f"'+'-item of its own, e.g. sft=sft-tiny+[lora-r8|lora-r64]"])
        common_before, common_after = _fragment_list(before[:-1], item), _fragment_list(after[1:], item)
        labels = sweep["alternatives"].split("|")
        if len(set(labels)) != len(labels):
            raise ConfigError([f"{CHAIN_SYMBOL}: stage {item!r} lists an alternative twice"])
        stages.append(Stage(name, tuple((label, (*common_before, *_fragment_list(label, item), *common_after))
                                        for label in labels)))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError([f"{CHAIN_SYMBOL}: two stages are named {sorted(n for n in names if names.count(n) > 1)[0]!r}; "
                           f"name each stage once"])
    return stages


def stage_layers(stage: Stage, fragments: tuple[str, ...]) -> list[list[Assignment]]:
    """The stage's fragments, parsed; a fragment setting INIT_FROM is refused (the chain sets it)."""
    layers = [parse_file(fragment_path(f, CHAIN_SYMBOL)) for f in fragments]
    for layer in layers:
        for a in layer:
            if a.symbol == "INIT_FROM":
                raise ConfigError([f"{a.where}: CONFIG_INIT_FROM: fragment of chain stage {stage.name!r}: a chain "
                                   f"sets each stage's INIT_FROM to its parent stage's run; remove it from the "
                                   f"fragment (to start the first stage from a run, set INIT_FROM in the "
                                   f"configuration itself)"])
    return layers


def chain_runs(cfg: Config) -> list[RunSpec]:
    """One run per stage and sweep alternative; a stage after a swept stage follows every branch (a tree).
    Runs are listed stage by stage, so every parent comes before its children."""
    stages = parse_stages(cfg.CHAIN_STAGES or "")
    if not stages:
        raise ConfigError([f"{CHAIN_SYMBOL} is empty: name the stages in order, e.g. \"pretrain= sft=sft-tiny\""])
    checkpoint = f"INIT_FROM_CHECKPOINT_{cfg.CHAIN_PARENT_CHECKPOINT.upper()}"  # "best" -> ..._BEST
    specs: list[RunSpec] = []
    branches: list[tuple[str | None, list[str]]] = [(None, [])]  # (parent run, sweep labels on the way)
    for stage in stages:
        grown = []
        for parent, labels in branches:
            for label, fragments in stage.variants:
                path = labels + [label] if label else labels
                name = run_name([("", stage.name), *(("", part) for part in path)])
                inherit = [] if parent is None else [
                    Assignment("INIT_FROM", f'"{PARENT_PLACEHOLDER}{parent}"', f"chain stage {stage.name}", 0),
                    Assignment(checkpoint, "y", "CONFIG_CHAIN_PARENT_CHECKPOINT", 0)]
                specs.append(RunSpec(name, layers=stage_layers(stage, fragments), stage=stage.name, parent=parent,
                                     inherit=inherit))
                grown.append((name, path))
        branches = grown
    return specs


def bind_parent(spec: RunSpec, parent_dir: Path) -> None:
    """Point a resolved chain run's INIT_FROM at its parent's run directory, now that it exists."""
    sym = spec.kconf.syms["INIT_FROM"]
    sym.set_value(str(parent_dir))
    if sym.str_value != str(parent_dir):
        raise ConfigError([f"run {spec.name}: CONFIG_INIT_FROM did not take the parent's run directory "
                           f"{str(parent_dir)!r}; choose a RUNS_DIR whose path is one printable line"])
    spec.cfg = values(spec.kconf)


# --------------------------------------------------------------------------- matrix


def matrix_axes(cfg: Config, kconf_syms: dict) -> list[list[tuple[str, list[Assignment]]]]:
    """Axes as lists of (label, assignments). Choice axes come from ticked MATRIX_<OPTION> symbols
    (MATRIX_PAIRWISE, a bool too, says how to sample the axes and is not one)."""
    by_choice: dict[object, list[str]] = {}
    for name, ticked in cfg.items():
        if not (name.startswith(MATRIX_PREFIX) and ticked is True) or name == "MATRIX_PAIRWISE":
            continue
        option = kconf_syms.get(name[len(MATRIX_PREFIX):])
        if option is None or option.choice is None:
            raise ConfigError([f"CONFIG_{name}: {name[len(MATRIX_PREFIX):]} is not an option of a Kconfig choice"])
        by_choice.setdefault(option.choice, []).append(option.name)
    axes = []
    for choice, options in by_choice.items():  # OPT_ADAMW -> "adamw", as cfg.OPTIMIZER reads it
        axes.append([(option_value(choice, o), [Assignment(o, "y", f"matrix axis CONFIG_{MATRIX_PREFIX}{o}", 0)])
                     for o in options])
    for name, fragments in parse_steps(cfg.MATRIX_FRAGMENTS or "", "CONFIG_MATRIX_FRAGMENTS"):
        layer = [a for f in fragments for a in parse_file(fragment_path(f, "CONFIG_MATRIX_FRAGMENTS"))]
        axes.append([("", []), (f"+{name}", layer)])  # "+" marks a toggle; matrix_runs joins them
    if cfg.MATRIX_LRS:
        axes.append([(f"lr{_lr_text(lr)}", [Assignment("LR", f'"{lr!r}"', "matrix axis CONFIG_MATRIX_LRS", 0)])
                     for i, lr in enumerate(cfg.MATRIX_LRS)])
    if cfg.MATRIX_SEEDS > 1:
        axes.append([(f"seed{cfg.SEED + i}", [Assignment("SEED", str(cfg.SEED + i), "matrix axis CONFIG_MATRIX_SEEDS", 0)])
                     for i in range(cfg.MATRIX_SEEDS)])
    return axes


def _lr_text(lr: float) -> str:
    return run_name([("", lr)])


def matrix_runs(cfg: Config) -> list[RunSpec]:
    axes = matrix_axes(cfg, new_kconfig().syms)
    specs = []
    for index in itertools.product(*(range(len(axis)) for axis in axes)):
        cell = [axis[i] for axis, i in zip(axes, index)]
        # An axis with one value is still named: it is what differs from the base. Toggled
        # fragments that are on make one part, "moe+muon"; all off and nothing else is "base".
        toggled = "+".join(label[1:] for label, _ in cell if label.startswith("+"))
        parts = ([("", toggled)] if toggled else []) + [("", label) for label, _ in cell
                                                         if label and not label.startswith("+")]
        specs.append(RunSpec(run_name(parts), layers=[[a for _, assignments in cell for a in assignments]],
                             baseline=not parts, cell=index))
    return specs


def cell_pairs(spec: RunSpec) -> set[tuple[int, int, int, int]]:
    """The (axis a, value, axis b, value) pairs a matrix run holds."""
    c = spec.cell
    return {(a, c[a], b, c[b]) for a in range(len(c)) for b in range(a + 1, len(c))}


def pairwise(specs: list[RunSpec]) -> list[RunSpec]:
    """A subset of the full matrix in which every pair of axis values that some accepted run holds
    appears in a kept run (greedy covering: repeatedly keep the run covering most uncovered pairs).
    A pair only rejected runs hold is impossible; one rejected run per such pair is kept, so the
    plan (and 'make check') shows Kconfig's reason. With fewer than two axes every run is kept."""
    if not specs or len(specs[0].cell) < 2:
        return specs
    accepted = [s for s in specs if not s.rejected]
    uncovered = set().union(*(cell_pairs(s) for s in accepted)) if accepted else set()
    kept: list[RunSpec] = []
    while uncovered:
        best = max(accepted, key=lambda s: len(cell_pairs(s) & uncovered))  # first of equals: stable order
        kept.append(best)
        uncovered -= cell_pairs(best)
    possible = set().union(*(cell_pairs(s) for s in accepted)) if accepted else set()
    impossible = set()
    for spec in specs:
        new = cell_pairs(spec) - possible - impossible if spec.rejected else set()
        if new:
            kept.append(spec)
            impossible |= new
    order = {id(s): i for i, s in enumerate(specs)}
    return sorted(kept, key=lambda s: order[id(s)])


# --------------------------------------------------------------------------- differences


def differences(base: Config, run: Config, kconf: kconfiglib.Kconfig) -> dict:
    """User-facing symbols whose value differs from the base (choices: only the newly selected option)."""
    out = {}
    for sym in kconf.unique_defined_syms:
        name = sym.name
        if base[name] == run[name] or sym.nodes[0].filename == PLAN_KCONFIG:
            continue
        if sym.visibility == 0:
            continue  # derived (e.g. N_LAYER from a size preset); its cause is listed instead
        if sym.choice is not None and run[name] is not True:
            continue
        if base[name] is None and sym.user_value is None:
            continue  # newly applicable at its default (ROPE_THETA once RoPE is on): follows its cause
        out[name] = run[name]
    return out
