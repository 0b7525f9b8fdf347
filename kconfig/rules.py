"""Rules on resolved values that no Kconfig range or dependency can express.

Called once, from kconfig.tree.resolve, so a defconfig, .config, SET and every run of a
plan meet the same rules before any work is spent. Each problem names the symbols, their
values and where each value comes from (file:line, or the Kconfig default).
Rules that need the model's own arithmetic (head widths, MoE layout) live with the model
(model/gpt.py ModelConfig) and run up front in plan/preflight.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Mapping

PLAN_NAME_MAX = 200  # <PLAN_NAME>-YYYYmmdd-HHMMSS-NN must fit a 255-byte file name
_PLAN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def rule_problems(cfg: Mapping, where: Callable[[str], str], root: Path) -> list[str]:
    """Every broken rule of the resolved, typed values ``cfg``; ``where(NAME)`` locates a value."""
    problems = []

    def say(first: str, text: str, *others: str) -> None:
        located = "".join(f" (CONFIG_{o} from {where(o)})" for o in others)
        problems.append(f"{where(first)}: {text}{located}")

    problems_of_names(cfg, say, root)
    problems_of_schedule(cfg, say)
    return problems


def problems_of_names(cfg: Mapping, say, root: Path) -> None:
    name = cfg["PLAN_NAME"]
    if not _PLAN_NAME_RE.fullmatch(name) or len(name) > PLAN_NAME_MAX:
        say("PLAN_NAME", f"CONFIG_PLAN_NAME={name[:60]!r}{'...' if len(name) > 60 else ''} "
                         f"({len(name)} characters) is not a plan name: use 1 to {PLAN_NAME_MAX} letters, digits, "
                         f"'.', '_' and '-', starting with a letter or digit (it names runs/<PLAN_NAME>-<time>/)")
    for sym, what in (("RUNS_DIR", "plans and runs"), ("DATA_CACHE_DIR", "prepared token files")):
        value = cfg[sym]
        if value is None:
            continue
        target = Path(value) if os.path.isabs(value) else root / value
        if not value.strip() or os.path.normpath(target) == os.path.normpath(root):
            where_to = "empty, which means the top of the source tree" if not value.strip() else "the top of the source tree"
            say(sym, f'CONFIG_{sym}="{value}" is {where_to}: {what} would be written among '
                     f"the sources; give a directory of their own, e.g. the default "
                     f"\"{'runs' if sym == 'RUNS_DIR' else '.cache/data'}\"")


def problems_of_schedule(cfg: Mapping, say) -> None:
    """The LR schedule (optim/schedule.py lr_at) as configured has no jump and decays downwards."""
    lr, min_lr, warmup, max_iters = cfg["LR"], cfg["MIN_LR"], cfg["WARMUP_ITERS"], cfg["MAX_ITERS"]
    if min_lr is not None and min_lr > lr:  # MIN_LR applies to cosine and WSD, not to constant
        shape = "cosine" if cfg["LR_SCHEDULE"] == "cosine" else "WSD"
        say("MIN_LR", f"CONFIG_MIN_LR={min_lr:g} is above CONFIG_LR={lr:g}: the {shape} 'decay' would raise the "
                      f"rate; set MIN_LR at or below LR (typical: LR/10)", "LR")
    if warmup >= max_iters:
        say("WARMUP_ITERS", f"CONFIG_WARMUP_ITERS={warmup} is not below CONFIG_MAX_ITERS={max_iters}: the run "
                            f"would end still in warmup, never training at LR; lower WARMUP_ITERS (typical: "
                            f"1-5% of MAX_ITERS, e.g. {max(1, max_iters // 20)}) or raise MAX_ITERS", "MAX_ITERS")
    if cfg["LR_SCHEDULE"] == "cosine" and cfg["LR_DECAY_ITERS"] and warmup >= cfg["LR_DECAY_ITERS"]:
        say("LR_DECAY_ITERS", f"CONFIG_LR_DECAY_ITERS={cfg['LR_DECAY_ITERS']} is not after CONFIG_WARMUP_ITERS="
                              f"{warmup}: the cosine would be over before warmup ends and the rate would drop from "
                              f"LR to MIN_LR in one step; make LR_DECAY_ITERS larger than WARMUP_ITERS (0 means "
                              f"MAX_ITERS)", "WARMUP_ITERS")
    if cfg["LR_SCHEDULE"] == "wsd":
        decay_start = max_iters - int(cfg["WSD_DECAY_FRACTION"] * max_iters)
        if decay_start < warmup < max_iters:
            say("WARMUP_ITERS", f"CONFIG_WARMUP_ITERS={warmup} ends after the WSD decay starts at step "
                                f"{decay_start} (CONFIG_MAX_ITERS={max_iters} x (1 - CONFIG_WSD_DECAY_FRACTION="
                                f"{cfg['WSD_DECAY_FRACTION']:g})): the rate would jump down when warmup ends; "
                                f"lower WARMUP_ITERS to at most {decay_start} or WSD_DECAY_FRACTION",
                "MAX_ITERS", "WSD_DECAY_FRACTION")
