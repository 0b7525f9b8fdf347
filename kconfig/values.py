"""Typed values of a resolved Kconfig tree: what every consumer reads.

A symbol is a bool, int, float (a string symbol whose prompt ends in "(float LO..HI)"), a
tuple of floats ("(float list ...)"), a str, or None while its dependencies are unmet.
A named choice (``choice MLP``) is one more value: its selected option's name without the
prefix its options share, lower case (MLP_SWIGLU -> ``cfg.MLP == "swiglu"``), or None while
the choice does not apply. Consumers compare that string; the option symbols stay the
defconfig contract.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import kconfiglib

from kconfig.errors import ConfigError

_FLOAT_PROMPT_RE = re.compile(r"\(float( list)?(?: ([-+0-9.eE]+)\.\.([-+0-9.eE]+))?\)\s*$")


class Config(dict):
    """Resolved, typed symbol values (no CONFIG_ prefix), readable as attributes."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no Kconfig symbol {name} (is it defined in a Kconfig file?)") from None


@dataclass(frozen=True)
class FloatSpec:
    """A string symbol holding a float, or a comma-separated list of floats, within [lo, hi]."""

    is_list: bool
    lo: float
    hi: float

    def parse(self, text: str):
        """The typed value: a float, or a tuple of floats ('' is the empty list). Raises ValueError."""
        if not self.is_list:
            return float(text)
        return tuple(float(item) for item in text.split(",")) if text.strip() else ()


def float_spec(sym: kconfiglib.Symbol) -> FloatSpec | None:
    """How to read a float symbol (prompt ends in '(float)', '(float LO..HI)' or '(float list ...)'), else None."""
    for node in sym.nodes:
        if node.prompt and (m := _FLOAT_PROMPT_RE.search(node.prompt[0])):
            return FloatSpec(bool(m[1]), float(m[2]) if m[2] else float("-inf"), float(m[3]) if m[3] else float("inf"))
    return None


def values(kconf: kconfiglib.Kconfig) -> Config:
    """Every defined symbol, typed, and every named choice's selected value."""
    out = Config()
    for sym in kconf.unique_defined_syms:
        out[sym.name] = _typed(sym)
    for choice in kconf.unique_choices:
        if not choice.name or choice.name in out:
            node = choice.nodes[0]
            raise ConfigError([f"{node.filename}:{node.linenr}: a choice needs a name of its own (choice NAME, "
                               f"not {choice.name or 'unnamed'}): consumers read its selection as cfg.NAME"])
        out[choice.name] = choice_value(choice)
    return out


def _typed(sym: kconfiglib.Symbol):
    s = sym.str_value
    if sym.orig_type == kconfiglib.BOOL:
        return sym.tri_value == 2
    if not kconfiglib.expr_value(sym.direct_dep):
        return None  # dependencies unmet: the option does not apply
    if sym.orig_type == kconfiglib.INT:
        return int(s) if s else None
    if sym.orig_type == kconfiglib.HEX:
        return int(s, 16) if s else None
    if (spec := float_spec(sym)) is not None:
        return spec.parse(s) if s or spec.is_list else None
    if sym.orig_type == kconfiglib.STRING:
        return s
    raise ConfigError([f"CONFIG_{sym.name}: unsupported Kconfig type {kconfiglib.TYPE_TO_STR[sym.orig_type]}"])


def config_py_text(kconf: kconfiglib.Kconfig) -> str:
    lines = [
        '"""Generated from .config by kconfig/tree.py. Do not edit: change .config with',
        "'make menuconfig' or a defconfig and this file is rewritten.\"\"\"",
        "",
        "from typing import Literal",
        "",
    ]
    for sym in kconf.unique_defined_syms:
        v = _typed(sym)
        kind = {bool: "bool", int: "int", float: "float", str: "str", tuple: "tuple[float, ...]"}.get(type(v))
        if v is None:
            kind = {kconfiglib.INT: "int", kconfiglib.HEX: "int", kconfiglib.STRING: "str"}[sym.orig_type]
            if float_spec(sym) is not None:
                kind = "float"
            kind += " | None"
        lines.append(f"{sym.name}: {kind} = {v!r}")
    for choice in kconf.unique_choices:
        kind = f"Literal[{', '.join(map(repr, option_values(choice)))}]"
        optional = " | None" if choice.direct_dep is not kconf.y else ""  # a choice that depends on others
        lines.append(f"{choice.name}: {kind}{optional} = {choice_value(choice)!r}")
    return "\n".join(lines) + "\n"


def choice_prefix(choice: kconfiglib.Choice) -> str:
    """The whole words its options share: MLP_GELU, MLP_SWIGLU -> "MLP_"; OPT_ADAMW, OPT_LION -> "OPT_"."""
    prefix = os.path.commonprefix([s.name for s in choice.syms])
    return prefix[:prefix.rfind("_") + 1]


def option_value(choice: kconfiglib.Choice, option: str) -> str:
    """The value a choice has when ``option`` (a symbol name) is selected: MLP_SWIGLU -> "swiglu"."""
    return option[len(choice_prefix(choice)):].lower()


def option_values(choice: kconfiglib.Choice) -> tuple[str, ...]:
    """Every value the choice can have, in menu order."""
    return tuple(option_value(choice, s.name) for s in choice.syms)


def choice_value(choice: kconfiglib.Choice) -> str | None:
    """The selected option's value, or None while the choice's dependencies are unmet."""
    selected = choice.selection if kconfiglib.expr_value(choice.direct_dep) else None
    return None if selected is None else option_value(choice, selected.name)
