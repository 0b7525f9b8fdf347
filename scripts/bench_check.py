"""How long 'make check' takes per run: python scripts/bench_check.py

Checks the shipped ablation and matrix presets, and a 20-run matrix built from
the matrix preset (AdamW only x 2 learning rates x 5 seeds x 2 position
encodings), in this process, and prints wall time in total and per run. Target: a 20-run plan in
20 s or less on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kconfig.tree import parse_file, parse_overrides, resolve  # noqa: E402
from kconfig.values import values  # noqa: E402
from plan.check import check_plan  # noqa: E402
from plan.expand import expand  # noqa: E402

CASES = [
    ("ablation-modern-gpt", ""),
    ("matrix-optimizers", ""),
    ("matrix-optimizers", "MATRIX_OPT_LION=n MATRIX_OPT_MUON=n MATRIX_SEEDS=5 MATRIX_POS_LEARNED=y MATRIX_POS_ROPE=y"),
]


def main() -> int:
    failed = 0
    for preset, overrides in CASES:
        layers = [parse_file(ROOT / "defconfigs" / preset), parse_overrides(overrides)]
        kconf, _ = resolve(*layers)
        cfg = values(kconf)
        n = len(expand(layers, cfg))
        out = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out):
            failures = check_plan(layers, cfg)
        seconds = time.perf_counter() - t0
        failed += failures
        label = preset + (f" + {overrides}" if overrides else "")
        print(f"{label}: {n} runs checked in {seconds:.1f}s ({seconds / n:.2f}s per run), "
              f"{'passed' if not failures else f'{failures} failure(s)'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
