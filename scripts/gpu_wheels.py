"""The wheels the GPU machine lacks, downloaded here for its Python and torch into wheels/ (git-ignored).

    python scripts/gpu_wheels.py [--dest wheels] [--python 3.12] [--torch 2.11] [--print]

The GPU machine (KINDS.md: Python 3.12, torch 2.11+cu130, no package registry) has everything
scripts/gpu_check.py and tests/gpu import except kconfiglib and torchao; this fetches exactly those,
without dependencies (neither has a required one), as binary wheels for that interpreter and
platform, and prints each file's size and the total, which must stay under the 64 MiB a device
call carries. torchao: 0.18.0, the release whose own import check accepts torch >= 2.11 (its
__init__ loads its C++ extensions from torch 2.11.0 on) and the one pyproject.toml pins, so the
GPU run uses the torchao the CPU suite tests. On the GPU machine scripts/gpu_check.py installs
them with ``pip install --no-index --find-links wheels kconfiglib torchao``.
--print shows the pip commands without running them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 64 * 2**20  # what one device call carries in all
# torch minor version -> the torchao release built for it (torchao's __init__ minimum torch version)
TORCHAO_FOR_TORCH = {"2.11": "0.18.0", "2.13": "0.18.0"}  # 2.13: the CPU venv the suite runs
KCONFIGLIB = "14.1.0"
PLATFORM = "manylinux_2_28_x86_64"


class WheelError(Exception):
    pass


def requirements(torch_version: str) -> list[str]:
    minor = ".".join(torch_version.split(".")[:2])
    if minor not in TORCHAO_FOR_TORCH:
        raise WheelError(f"no torchao release recorded for torch {torch_version} (known: "
                         f"{', '.join(TORCHAO_FOR_TORCH)}); add it to TORCHAO_FOR_TORCH from torchao's README table")
    return [f"kconfiglib=={KCONFIGLIB}", f"torchao=={TORCHAO_FOR_TORCH[minor]}"]


def pip_commands(dest: Path, python: str, torch_version: str, pip: list[str] | None = None) -> list[list[str]]:
    """One ``pip download`` per requirement: binary only, no dependencies, for ``python`` on x86-64
    manylinux (a pure-Python wheel matches too)."""
    pip = pip or [sys.executable, "-m", "pip"]
    return [[*pip, "download", requirement, "--no-deps", "--only-binary=:all:", "--python-version", python,
             "--implementation", "cp", "--platform", PLATFORM, "--dest", str(dest)]
            for requirement in requirements(torch_version)]


def wheel_sizes(dest: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(dest.glob("*.whl"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / "wheels")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (major.minor)")
    parser.add_argument("--torch", default="2.11", help="the GPU machine's torch (major.minor)")
    parser.add_argument("--print", action="store_true", help="show the pip commands, download nothing")
    args = parser.parse_args(argv)
    try:
        commands = pip_commands(args.dest, args.python, args.torch)
    except WheelError as e:
        print(f"gpu_wheels: {e}", file=sys.stderr)
        return 2
    for command in commands:
        print(" ".join(command))
        if not args.print:
            args.dest.mkdir(parents=True, exist_ok=True)
            if subprocess.run(command).returncode != 0:
                print(f"gpu_wheels: {' '.join(command)} failed (is the package registry reachable?)", file=sys.stderr)
                return 1
    if args.print:
        return 0
    sizes = wheel_sizes(args.dest)
    for name, size in sizes.items():
        print(f"  {name}: {size / 2**20:.2f} MiB")
    total = sum(sizes.values())
    print(f"  total {total / 2**20:.2f} MiB in {args.dest} (limit {LIMIT // 2**20} MiB per device call)")
    if total >= LIMIT:
        print(f"gpu_wheels: {total / 2**20:.1f} MiB is over the {LIMIT // 2**20} MiB a device call carries; "
              f"remove the wheels in {args.dest} that the check does not need", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
