"""Exit 0 when this interpreter already satisfies pyproject.toml's named extras and any extra requirements.

    python scripts/venv_complete.py core "torch==2.13.0"

scripts/setup.mk runs it with $(VENV)/bin/python before installing: a virtualenv made elsewhere that
already has everything (VENV=/path/to/env) is reused instead of reinstalled. The check is pip's own
resolver with --dry-run --no-index: it installs nothing, needs no network, and succeeds only when every
requirement and its dependencies are installed at versions the specifiers accept (torch==2.13.0 accepts
2.13.0+cpu) and pip would install nothing. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _toml(text: str) -> dict:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # Python 3.10: pip vendors tomli
        from pip._vendor import tomli as tomllib
    return tomllib.loads(text)


def requirements(extras: list[str], extra_requirements: list[str]) -> list[str]:
    """The named extras' requirements (in pyproject.toml's order), then the given ones."""
    table = _toml(PYPROJECT.read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    unknown = [e for e in extras if e not in table]
    if unknown:
        raise SystemExit(f"venv_complete.py: no extra {unknown[0]!r} in {PYPROJECT} (extras: {', '.join(table)})")
    return [r for e in extras for r in table[e]] + extra_requirements


def satisfied(reqs: list[str]) -> bool:
    """True when pip, offline and installing nothing, finds every requirement already met.

    --no-index keeps pip off the network; find-links folders from pip's configuration may still offer
    wheels, so "met" is pip's report listing nothing it would install, not only its exit status.
    """
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet", "--report", "-", *reqs]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return False
    try:
        return json.loads(p.stdout)["install"] == []
    except (ValueError, KeyError):
        return False


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit("usage: python scripts/venv_complete.py EXTRA[,EXTRA...] [REQUIREMENT ...]")
    extras = [e for e in argv[0].split(",") if e]
    return 0 if satisfied(requirements(extras, argv[1:])) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
