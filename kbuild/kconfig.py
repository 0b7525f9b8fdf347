"""The one module that reads, resolves and writes configurations.

Everything goes through kconfiglib's API: assignments (from a defconfig, a
fragment, a .config or a command-line SET) are applied with
``Symbol.set_value`` and then checked against the value Kconfig actually
resolved. An assignment that does not take is an error naming the file, line,
symbol and reason -- never a silent fall back to a default.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

import kconfiglib

ROOT = Path(__file__).resolve().parent.parent
KCONFIG = ROOT / "Kconfig"
PREFIX = "CONFIG_"

_SET_RE = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")
_FLOAT_PROMPT_RE = re.compile(r"\(float( list)?(?: ([-+0-9.eE]+)\.\.([-+0-9.eE]+))?\)\s*$")


class ConfigError(Exception):
    """One or more assignments did not take. ``str()`` lists every problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Assignment:
    """``symbol = value`` as written at ``source:line`` (value in .config syntax, unquoted)."""

    symbol: str
    value: str
    source: str
    line: int
    snapshot: bool = False  # from a full .config: values of hidden symbols are records, not requests
    bare_strings: bool = False  # command-line overrides may leave string values unquoted

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source


class Config(dict):
    """Resolved, typed symbol values (no CONFIG_ prefix), readable as attributes."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no Kconfig symbol {name} (is it defined in a Kconfig file?)") from None


# --------------------------------------------------------------------------- parsing


def parse_file(path: str | os.PathLike, snapshot: bool = False) -> list[Assignment]:
    """Assignments of a defconfig, fragment or (with snapshot=True) full .config file, with line numbers."""
    path = _shown(Path(path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    out, problems = [], []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if m := _UNSET_RE.match(line):
            out.append(Assignment(m[1], "n", str(path), lineno, snapshot))
        elif line.startswith("#"):
            continue
        elif m := _SET_RE.match(line):
            out.append(Assignment(m[1], m[2], str(path), lineno, snapshot))
        else:
            problems.append(
                f"{path}:{lineno}: malformed line {raw!r}: expected CONFIG_NAME=value, "
                f"'# CONFIG_NAME is not set', a comment or a blank line"
            )
    if problems:
        raise ConfigError(problems)
    return out


def _shown(path: Path) -> Path:
    """Paths inside the tree are shown relative to its top (defconfigs/x:3), others as given."""
    try:
        return path.resolve().relative_to(Path.cwd()) if path.is_absolute() else path
    except ValueError:
        return path


def parse_overrides(text: str, source: str = "SET") -> list[Assignment]:
    """``NAME=value NAME2="a b"`` (CONFIG_ prefix optional, strings quoted or not)."""
    try:
        words = shlex.split(text or "")
    except ValueError as e:
        raise ConfigError([f"{source}: cannot split {text!r}: {e}"]) from None
    out = []
    for i, word in enumerate(words, 1):
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise ConfigError([f"{source} item {i}: {word!r} is not NAME=value"])
        name = name.removeprefix(PREFIX)
        out.append(Assignment(name, value, source, i, bare_strings=True))
    return out


def _unquote(value: str) -> str | None:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return kconfiglib.unescape(value[1:-1])
    return None


# --------------------------------------------------------------------------- resolving


def new_kconfig() -> kconfiglib.Kconfig:
    """The Kconfig tree of this repository, with every symbol at its default."""
    cwd = os.getcwd()
    os.chdir(ROOT)  # 'source' paths are relative to the top of the tree
    try:
        kconf = kconfiglib.Kconfig(str(KCONFIG), warn_to_stderr=False, suppress_traceback=False)
    finally:
        os.chdir(cwd)
    return kconf


def resolve(*layers: list[Assignment], lenient: bool = False) -> tuple[kconfiglib.Kconfig, list[str]]:
    """Apply assignment layers in order (later layers override earlier ones).

    Raises ConfigError listing every assignment that did not take, unless
    ``lenient`` (used by olddefconfig on an old .config): then the problems
    are returned as warnings and the resolved tree is kept.
    """
    kconf = new_kconfig()
    problems: list[str] = []
    final: dict[str, Assignment] = {}  # last assignment of each symbol wins
    for layer in layers:
        seen: dict[str, Assignment] = {}
        for a in layer:
            if a.symbol in seen:
                problems.append(
                    f"{a.where}: CONFIG_{a.symbol} is assigned twice in the same file "
                    f"(first at line {seen[a.symbol].line}); keep one"
                )
                continue
            seen[a.symbol] = a
            err = _apply(kconf, a)
            if err:
                problems.append(f"{a.where}: CONFIG_{a.symbol}: {err}")
                continue
            sym = kconf.syms[a.symbol]
            if sym.choice is not None and a.value == "y":
                # Selecting an option in a later layer replaces the earlier layers' pick.
                for other in sym.choice.syms:
                    earlier = final.get(other.name)
                    if other is not sym and earlier is not None and earlier.symbol not in seen:
                        del final[other.name]
            final[a.symbol] = a
    for a in final.values():
        err = _check_took(kconf, a)
        if err:
            problems.append(f"{a.where}: CONFIG_{a.symbol}={a.value}: {err}")
    problems += _check_floats(kconf, final)
    if problems and not lenient:
        raise ConfigError(problems)
    return kconf, problems


def _apply(kconf: kconfiglib.Kconfig, a: Assignment) -> str | None:
    sym = kconf.syms.get(a.symbol)
    if sym is None or not sym.nodes:
        close = _close_names(kconf, a.symbol)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return f"unknown symbol: no Kconfig file defines it{hint}"
    value = a.value
    if sym.orig_type == kconfiglib.STRING:
        unquoted = _unquote(value)
        if unquoted is None:
            if not a.bare_strings:
                return f'malformed string: write CONFIG_{a.symbol}="{value}" (with double quotes)'
            unquoted = value  # SET allows unquoted strings
        value = unquoted
    elif sym.orig_type == kconfiglib.BOOL:
        if value not in ("y", "n"):
            return f"malformed bool {value!r}: use y or n"
    elif sym.orig_type in (kconfiglib.INT, kconfiglib.HEX):
        base = 16 if sym.orig_type == kconfiglib.HEX else 10
        try:
            int(value, base)
        except ValueError:
            kind = "hex" if base == 16 else "integer"
            return f"malformed {kind} {value!r}"
    if not sym.set_value(value):
        return f"value {value!r} rejected by Kconfig (type {kconfiglib.TYPE_TO_STR[sym.orig_type]})"
    return None


def _expected_str(sym: kconfiglib.Symbol, a: Assignment) -> str:
    if sym.orig_type == kconfiglib.STRING:
        u = _unquote(a.value)
        return a.value if u is None else u
    return a.value


def _check_took(kconf: kconfiglib.Kconfig, a: Assignment) -> str | None:
    """Why the value Kconfig resolved differs from the one asked for, or None."""
    sym = kconf.syms[a.symbol]
    if a.snapshot and sym.visibility == 0:
        return None  # a .config records derived values too; they follow the options they derive from
    want = _expected_str(sym, a)
    got = sym.str_value
    if sym.orig_type in (kconfiglib.INT, kconfiglib.HEX) and got:
        base = 16 if sym.orig_type == kconfiglib.HEX else 10
        if int(got, base) == int(want, base):
            return None
    elif got == want:
        return None
    if not any(node.prompt for node in sym.nodes):
        return (f"did not take: the symbol has no prompt, its value ({got or 'unset'}) "
                f"is derived by Kconfig and cannot be assigned")
    if sym.visibility == 0:
        deps = _unmet_deps(sym)
        return (f"did not take: unmet dependency {deps} (resolved value: {got or 'unset'}); "
                f"change the options it depends on first")
    if sym.choice is not None and want == "y":
        other = sym.choice.selection
        return (f"did not take: choice conflict, {other.name if other else 'another option'} "
                f"is selected in the same choice; assign only one option of a choice")
    if sym.choice is not None and want == "n":
        return ("did not take: it is the selected option of its choice; select another "
                "option of the choice with =y instead")
    if sym.orig_type in (kconfiglib.INT, kconfiglib.HEX):
        lo, hi = _active_range(sym)
        if lo is not None:
            return f"out of range: must be within [{lo}, {hi}] (resolved value: {got})"
    if sym.orig_type == kconfiglib.BOOL and want == "y" and sym.visibility < 2:
        return f"did not take: dependencies allow at most {kconfiglib.TRI_TO_STR[sym.visibility]}"
    if sym.orig_type == kconfiglib.BOOL and want == "n" and sym.rev_dep is not kconf.n:
        return f"did not take: forced on by 'select' from {kconfiglib.expr_str(sym.rev_dep)}"
    return f"did not take (resolved value: {got!r})"


def _unmet_deps(sym: kconfiglib.Symbol) -> str:
    parts = []
    nodes = list(sym.nodes) + (list(sym.choice.nodes) if sym.choice is not None else [])
    for node in nodes:
        conds = [node.dep] + ([node.prompt[1]] if node.prompt else [])
        for cond in conds:
            text = re.sub(r"( && )?<choice>( && )?", "", kconfiglib.expr_str(cond))
            if text and text != "y" and text not in parts:
                parts.append(text)
    return " && ".join(parts) or "y"


def _active_range(sym: kconfiglib.Symbol) -> tuple[int | None, int | None]:
    for lo, hi, cond in sym.ranges:
        if kconfiglib.expr_value(cond):
            return int(lo.str_value, 0), int(hi.str_value, 0)
    return None, None


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


def _check_floats(kconf: kconfiglib.Kconfig, final: dict[str, Assignment]) -> list[str]:
    problems = []
    for sym in kconf.unique_defined_syms:
        spec = float_spec(sym)
        if spec is None or not kconfiglib.expr_value(sym.direct_dep):
            continue
        a = final.get(sym.name)
        where = a.where if a else f"{sym.nodes[0].filename}:{sym.nodes[0].linenr} (default)"
        shown = f'CONFIG_{sym.name}="{sym.str_value}"'
        try:
            value = spec.parse(sym.str_value)
        except ValueError:
            example = "comma-separated floats such as 1e-3,3e-3" if spec.is_list else "a float such as 3e-4"
            problems.append(f"{where}: {shown}: not a number; write {example}")
            continue
        if any(not spec.lo <= x <= spec.hi for x in (value if spec.is_list else (value,))):
            problems.append(f"{where}: {shown}: out of range: must be within [{spec.lo:g}, {spec.hi:g}]")
    return problems


def _close_names(kconf: kconfiglib.Kconfig, name: str) -> list[str]:
    import difflib

    names = [s.name for s in kconf.unique_defined_syms]
    return difflib.get_close_matches(name.upper(), names, n=3, cutoff=0.75)


# --------------------------------------------------------------------------- typed values


def values(kconf: kconfiglib.Kconfig) -> Config:
    """Every defined symbol, typed: bool, int, float (for float symbols), str, or None when inactive."""
    out = Config()
    for sym in kconf.unique_defined_syms:
        out[sym.name] = _typed(sym)
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
        '"""Generated from .config by kbuild/kconfig.py. Do not edit: change .config with',
        "'make menuconfig' or a defconfig and this file is rewritten.\"\"\"",
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
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- writing


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` then rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_if_changed(path: Path, text: str) -> bool:
    """Atomically write ``text`` unless the file already holds it. Returns True if written."""
    path = Path(path)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return True


def write_outputs(kconf: kconfiglib.Kconfig, dot_config: Path, config_py: Path) -> None:
    """Write the full .config and the typed config.py (each atomically, only when changed)."""
    header = "# Generated by kbuild (kconfiglib). Edit with 'make menuconfig'.\n"
    fd, tmp = tempfile.mkstemp(suffix=".config")
    os.close(fd)
    try:
        kconf.write_config(tmp, header=header, save_old=False)
        text = Path(tmp).read_text(encoding="utf-8")
    finally:
        os.unlink(tmp)
    write_text_if_changed(Path(dot_config), text)
    write_text_if_changed(Path(config_py), config_py_text(kconf))


def write_min_config(kconf: kconfiglib.Kconfig, path: Path) -> None:
    """The minimal defconfig: only assignments that differ from Kconfig defaults."""
    path = Path(path)
    _atomic_write(path, lambda tmp: kconf.write_min_config(tmp, header=""))


# --------------------------------------------------------------------------- entry points


def load(dot_config: str | os.PathLike, overrides: str = "") -> tuple[kconfiglib.Kconfig, Config]:
    """Resolve a .config (strictly) plus SET overrides; return the tree and typed values."""
    _, kconf, cfg = load_layers(dot_config, overrides)
    return kconf, cfg


def load_layers(dot_config: str | os.PathLike, overrides: str = ""):
    """As load(), also returning the assignment layers (for plans that add layers on top)."""
    path = Path(dot_config)
    if not path.exists():
        raise ConfigError([f"{path}: no configuration yet: run 'make defconfig-<name>' "
                           f"(see 'make list-defconfigs') or 'make menuconfig' first"])
    layers = [parse_file(path, snapshot=True), parse_overrides(overrides)]
    try:
        kconf, _ = resolve(*layers)
    except ConfigError as e:
        hint = (f"(if {path} was written by an older version of the Kconfig tree, "
                f"'make olddefconfig' updates it)")
        raise ConfigError(e.problems + [hint]) from None
    return layers, kconf, values(kconf)


def drift(path: str | os.PathLike) -> list[str]:
    """Problems with a defconfig or fragment: invalid, or not equal to its own savedefconfig output.

    Catches a Kconfig change (a new default, a renamed option) that would silently change a preset.
    """
    try:
        mine = parse_file(path)
        kconf, _ = resolve(mine)
    except ConfigError as e:
        return e.problems
    fd, tmp = tempfile.mkstemp(suffix=".defconfig")
    os.close(fd)
    try:
        kconf.write_min_config(tmp, header="")
        minimal = {a.symbol: a.value for a in parse_file(tmp)}
    finally:
        os.unlink(tmp)
    written = {a.symbol: a.value for a in mine}
    problems = []
    for sym in sorted(set(written) | set(minimal)):
        if written.get(sym) == minimal.get(sym):
            continue
        if sym not in minimal:
            problems.append(f"{path}: CONFIG_{sym}={written[sym]} equals the Kconfig default, so savedefconfig omits it; remove the line")
        elif sym not in written:
            problems.append(f"{path}: savedefconfig adds CONFIG_{sym}={minimal[sym]}: the preset's "
                            f"meaning changed; add the line or fix the Kconfig change that caused it")
        else:
            problems.append(f"{path}: CONFIG_{sym}={written[sym]} resolves as {minimal[sym]}")
    return problems
