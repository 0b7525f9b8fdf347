"""Every Kconfig symbol name the code reads exists in the Kconfig tree.

A renamed or misspelt symbol otherwise shows up late: as an AttributeError in the middle of a run,
or never (a message that names a symbol the user cannot find). These tests read every .py file
of the code packages with ``ast`` and collect the names the code uses as symbols:

- config reads: ``OBJ.NAME``, ``OBJ["NAME"]``, ``OBJ.get("NAME")``, ``getattr(OBJ, "NAME")`` and
  ``hasattr(OBJ, "NAME")``, where NAME is ALL_CAPS (``[A-Z][A-Z0-9_]+``) and OBJ is a
  configuration: a plain name or an attribute whose last identifier is ``cfg``, ``config``,
  ``configured`` or ends in ``_cfg``/``_config`` (``cfg``, ``base_cfg``, ``self.cfg``,
  ``spec.cfg``). That is how the code names its ``Config`` objects; torch, enum and module
  constants (``torch.float32``, ``signal.SIGTERM``, ``kconfiglib.BOOL``, ``recipe.Format.HYBRID``)
  sit on other names and are not collected, and a ``ModelConfig`` (``mcfg``) has lower-case fields;
- table lookups: ``kconf.syms["NAME"]``, ``kconf.named_choices["NAME"]`` (and their ``.get``);
- arguments: string constants passed where a function takes a symbol name (SYMBOL_ARGUMENTS:
  ``Assignment("NAME", ...)``, ``TrackerSpec("NAME", ...)``, ...);
- text: ``CONFIG_NAME`` written in any string (error messages): the user is told to set it.

Each must be a defined symbol or a named choice of ``kconfig.tree.new_kconfig()``. Two more rules
on the config reads: no silent fallbacks (``cfg.get(...)``, ``getattr(cfg, ...)``,
``"NAME" in cfg``: attribute access only), and no consumer reads a choice's option symbols (``cfg.MLP_SWIGLU``): it reads the
choice (``cfg.MLP == "swiglu"``); the option symbols are only the defconfig contract.
"""

from __future__ import annotations

import ast
import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from conftest import ROOT

CODE_DIRS = ("kconfig", "model", "optim", "data", "parallel", "train", "plan", "kbuild", "scripts")

SYMBOL_NAME = re.compile(r"[A-Z][A-Z0-9_]+")
CONFIG_OBJECT = re.compile(r"(?:\w+_)?(?:cfg|config)|configured")
SYMBOL_TABLES = ("syms", "named_choices")  # kconfiglib.Kconfig's dicts keyed by name
FALLBACK_CALLS = ("getattr", "hasattr")
CONFIG_IN_TEXT = re.compile(r"\bCONFIG_([A-Z0-9][A-Z0-9_]*[A-Z0-9])\b")
PLACEHOLDERS = {"NAME"}  # "expected CONFIG_NAME=value": stands for any symbol

# callee (its last identifier) -> (positions of symbol-name arguments, their keyword, variadic from)
SYMBOL_ARGUMENTS = {
    "Assignment": ((0,), "symbol", None),  # kconfig/tree.py
    "TrackerSpec": ((0,), "symbol", None),  # train/trackers.py
    "_entries": ((1,), "symbol", None),  # data/mix.py
    "say": ((0,), None, 2),  # kconfig/rules.py: say(first, text, *others)
}


@dataclass(frozen=True)
class Read:
    """Symbol ``name`` used at ``where`` (file:line) as ``how`` (the expression); ``kind`` as above."""

    where: str
    name: str
    how: str
    kind: str  # "config", "table", "argument" or "text"


def _last_identifier(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _is_config(node: ast.expr) -> bool:
    return bool(CONFIG_OBJECT.fullmatch(_last_identifier(node)))


def _name_constant(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and SYMBOL_NAME.fullmatch(node.value):
        return node.value
    return None


def _is_fallback(node: ast.AST) -> bool:
    """``cfg.get(...)``, ``getattr(cfg, ...)``, ``hasattr(cfg, ...)`` or ``... in cfg`` on a configuration."""
    if isinstance(node, ast.Compare):
        return any(isinstance(op, (ast.In, ast.NotIn)) and _is_config(right)
                   for op, right in zip(node.ops, node.comparators))
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr == "get":
        return _is_config(func.value)
    return _last_identifier(func) in FALLBACK_CALLS and bool(node.args) and _is_config(node.args[0])


def _call_reads(node: ast.Call, where: str) -> list[Read]:
    reads = []
    callee = _last_identifier(node.func)
    if callee in SYMBOL_ARGUMENTS:
        positions, keyword, variadic = SYMBOL_ARGUMENTS[callee]
        args = [a for i, a in enumerate(node.args) if i in positions or (variadic is not None and i >= variadic)]
        args += [k.value for k in node.keywords if keyword and k.arg == keyword]
        reads += [Read(where, name, f"{callee}({name!r}, ...)", "argument") for a in args if (name := _name_constant(a))]
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr == "get" and node.args and (name := _name_constant(node.args[0])):
        if _is_config(func.value):
            reads.append(Read(where, name, ast.unparse(node), "config"))
        elif _last_identifier(func.value) in SYMBOL_TABLES:
            reads.append(Read(where, name, ast.unparse(node), "table"))
    if _is_fallback(node) and callee in FALLBACK_CALLS and len(node.args) >= 2:
        if name := _name_constant(node.args[1]):
            reads.append(Read(where, name, ast.unparse(node), "config"))
    return reads


def _text_reads(tree: ast.Module, where) -> list[Read]:
    """``CONFIG_NAME`` in string constants; in an f-string, not a prefix that a field continues."""
    reads = []
    continued = set()  # f-string pieces followed by a field: a name at their very end is unfinished
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            continued |= {id(a) for a, b in zip(node.values, node.values[1:]) if isinstance(b, ast.FormattedValue)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            for m in CONFIG_IN_TEXT.finditer(node.value):
                if not (id(node) in continued and m.end() == len(node.value)):
                    reads.append(Read(where(node), m[1], f"text {m[0]!r}", "text"))
    return reads


def symbol_reads(path: Path, shown: str) -> list[Read]:
    """Every symbol name the file at ``path`` uses, located as ``shown:line``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def where(node: ast.AST) -> str:
        return f"{shown}:{node.lineno}"

    reads = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and SYMBOL_NAME.fullmatch(node.attr) and _is_config(node.value):
            reads.append(Read(where(node), node.attr, ast.unparse(node), "config"))
        elif isinstance(node, ast.Subscript) and (name := _name_constant(node.slice)):
            if _is_config(node.value):
                reads.append(Read(where(node), name, ast.unparse(node), "config"))
            elif _last_identifier(node.value) in SYMBOL_TABLES:
                reads.append(Read(where(node), name, ast.unparse(node), "table"))
        elif isinstance(node, ast.Call):
            reads += _call_reads(node, where(node))
        elif _is_fallback(node) and (name := _name_constant(node.left)):  # "NAME" in cfg
            reads.append(Read(where(node), name, ast.unparse(node), "config"))
    return reads + _text_reads(tree, where)


def fallbacks(path: Path, shown: str) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [f"{shown}:{node.lineno}: {ast.unparse(node)}"
            for node in ast.walk(tree) if _is_fallback(node)]


@lru_cache(maxsize=None)
def code_reads() -> tuple[Read, ...]:
    files = sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    return tuple(r for p in files for r in symbol_reads(p, str(p.relative_to(ROOT))))


@lru_cache(maxsize=None)
def kconfig_names() -> tuple[frozenset[str], dict[str, str]]:
    """(every defined symbol and named choice, each choice option -> how to read it: 'MLP == "swiglu"')."""
    from kconfig.tree import new_kconfig
    from kconfig.values import option_value

    kconf = new_kconfig()
    names = {sym.name for sym in kconf.unique_defined_syms} | set(kconf.named_choices)
    options = {sym.name: f'{choice.name} == "{option_value(choice, sym.name)}"'
               for choice in kconf.unique_choices for sym in choice.syms}
    return frozenset(names), options


def unknown_names(reads, names) -> list[str]:
    """A line per read of a name that is not in ``names``: where, how, and the closest names."""
    out = []
    for r in reads:
        if r.name in names or r.name in PLACEHOLDERS:
            continue
        close = difflib.get_close_matches(r.name, names, n=3, cutoff=0.75)
        hint = f"did you mean {' or '.join(close)}?" if close else "define it in a Kconfig file or fix the name"
        out.append(f"{r.where}: {r.how}: {r.name} is neither a Kconfig symbol nor a named choice ({hint})")
    return out


def test_code_reads_only_defined_symbols():
    reads = code_reads()
    assert sum(r.kind == "config" for r in reads) > 200, "few config reads found: is CONFIG_OBJECT still right?"
    unknown = unknown_names(reads, kconfig_names()[0])
    assert not unknown, "\n".join(unknown)


def test_no_silent_fallbacks_for_symbols():
    files = sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    found = [f for p in files for f in fallbacks(p, str(p.relative_to(ROOT)))]
    assert not found, ("a default hides a renamed symbol and switches a feature off silently; read cfg.NAME "
                       "(None while its dependencies are unmet):\n" + "\n".join(found))


def test_consumers_read_choices_not_their_options():
    options = kconfig_names()[1]
    found = [f"{r.where}: {r.how} reads a choice's option: read the choice, cfg.{options[r.name]}"
             for r in code_reads() if r.kind == "config" and r.name in options]
    assert not found, "\n".join(found)


def test_each_kind_of_read_catches_a_misspelt_symbol(tmp_path):
    source = tmp_path / "consumer.py"
    source.write_text(
        "def f(cfg, spec, kconf):\n"
        "    a = cfg.N_LAYR\n"
        "    b = spec.cfg['BLOK_SIZE']\n"
        "    c = kconf.syms['N_HEDA']\n"
        "    d = Assignment('SEEED', '1', 'SET', 0) if 'DROPUT' in cfg else None\n"
        "    raise ValueError(f'set CONFIG_MAX_ITER={a} or CONFIG_MATRIX_{b}=y')\n"
        "    return torch.float32, signal.SIGTERM, self.cfg.N_LAYER, cfg.MLP, env['RANK']\n"
    )
    reads = symbol_reads(source, "consumer.py")
    names = kconfig_names()[0]
    assert sorted(r.name for r in reads) == [
        "BLOK_SIZE", "DROPUT", "MAX_ITER", "MLP", "N_HEDA", "N_LAYER", "N_LAYR", "SEEED"]
    unknown = unknown_names(reads, names)
    assert len(unknown) == 6
    assert "consumer.py:2: cfg.N_LAYR: N_LAYR is neither a Kconfig symbol nor a named choice (did you mean N_LAYER?)" \
        in unknown
