"""Differences between two configuration files, in the form of the kernel's scripts/diffconfig.

Each file is read as written (a full .config, a defconfig or a fragment), symbol by symbol:
``# CONFIG_X is not set`` is the value ``n`` and strings keep their quotes. The output lists
the symbols only the first file has (``-SYM old``), then those whose value changed
(`` SYM old -> new``, with the kernel's leading space), then those only the second file has
(``+SYM new``), each group sorted by symbol name and written without the ``CONFIG_`` prefix.
"""

from __future__ import annotations

import os

from kconfig.tree import parse_file


def config_values(path: str | os.PathLike) -> dict[str, str]:
    """Symbol (without CONFIG_) -> value as the file writes it; a malformed line is a ConfigError."""
    return {a.symbol: a.value for a in parse_file(path, snapshot=True)}


def diff_lines(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """scripts/diffconfig's lines from ``old`` to ``new``: removed, changed, then added symbols."""
    removed = [f"-{name} {old[name]}" for name in sorted(old.keys() - new.keys())]
    changed = [f" {name} {old[name]} -> {new[name]}" for name in sorted(old.keys() & new.keys())
               if old[name] != new[name]]
    added = [f"+{name} {new[name]}" for name in sorted(new.keys() - old.keys())]
    return removed + changed + added


def diff_files(old: str | os.PathLike, new: str | os.PathLike) -> list[str]:
    """diff_lines between two configuration files."""
    return diff_lines(config_values(old), config_values(new))
