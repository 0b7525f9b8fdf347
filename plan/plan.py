"""Plans: runs/<plan>/plan.json, the one record of what a plan holds and how far it got.

Single training is a plan of one run; ablations and matrices add runs. Every
update rewrites plan.json atomically, so a crash never leaves it half-written, and
under an exclusive lock on it that re-reads the runs first, so processes updating
different runs at once (Slurm array tasks) never lose each other's changes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import time
from pathlib import Path

from kconfig.atomic import write_text_if_changed

# Why a run stopped: done; time_limit (CONFIG_MAX_TIME); interrupted (SIGTERM/SIGINT, checkpointed);
# killed (SIGKILL or another fatal signal: the out-of-memory killer, a lost node); failed (an error);
# blocked (a chain run not started because its parent stage did not finish).
STATUSES = ("pending", "running", "done", "failed", "rejected", "interrupted", "killed", "time_limit", "blocked")
PLAN_FILE = "plan.json"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run_name(parts: list[tuple[str, object]]) -> str:
    """The one function that names runs: readable, filesystem-safe, stable for the same parts.

    ``parts`` are (key, value) pairs saying what sets a run apart from the base, in a fixed order:
    [] -> "base"; [("", "adamw"), ("lr", 3e-4), ("seed", 1)] -> "adamw-lr3e-4-seed1";
    [("", "rope+rmsnorm")] -> "rope+rmsnorm".
    """
    if not parts:
        return "base"
    words = [f"{key}{_short(value)}" for key, value in parts]
    name = re.sub(r"[^A-Za-z0-9.+_-]+", "_", "-".join(words)).strip("._-")
    return name[:120] or "run"


def _short(value: object) -> str:
    """3e-4 -> '3e-4', 0.5 -> '0.5', 2e-05 -> '2e-5'; other values as str()."""
    if not isinstance(value, float):
        return str(value)
    if value and (abs(value) < 1e-2 or abs(value) >= 1e4):
        mantissa, exponent = f"{value:.6e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}"


class Plan:
    def __init__(self, path: Path, record: dict):
        self.path = Path(path)
        self.record = record

    @classmethod
    def create(cls, runs_dir: Path, plan_name: str, mode: str, runs: list[dict]) -> Plan:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", plan_name):
            raise ValueError(f"CONFIG_PLAN_NAME={plan_name!r}: use letters, digits, '.', '_' and '-' only")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(runs_dir) / f"{plan_name}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = Path(runs_dir) / f"{plan_name}-{stamp}-{n}"
        path.mkdir(parents=True)
        names = [r["name"] for r in runs]
        if len(set(names)) != len(names):
            raise ValueError(f"run names in plan {plan_name} are not unique: {names}")
        record = {"name": path.name, "mode": mode, "created": now(),
                  "runs": [{"status": "pending", "error": None, "start": None, "end": None, **r} for r in runs]}
        plan = cls(path, record)
        plan.save()
        return plan

    @classmethod
    def load(cls, path: Path) -> Plan:
        path = Path(path)
        return cls(path, json.loads((path / PLAN_FILE).read_text()))

    def save(self) -> None:
        with self.locked():
            self._write()

    def _write(self) -> None:
        write_text_if_changed(self.path / PLAN_FILE, json.dumps(self.record, indent=2) + "\n")

    @contextlib.contextmanager
    def locked(self):
        """Hold an exclusive flock on plan.json. Every write replaces the file, so a lock taken on a
        file that has since been replaced is retried on the current one."""
        path = self.path / PLAN_FILE
        while path.exists():  # before it exists the plan is being created: nobody else knows it
            with open(path, "a") as f:  # 'a': writable (NFS locks need it), content untouched
                try:
                    fcntl.flock(f, fcntl.LOCK_EX)
                except OSError as e:  # no flock (Lustre without -o flock): safe for one process only
                    if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                        raise
                mine, now_there = os.fstat(f.fileno()), os.stat(path)
                if (mine.st_dev, mine.st_ino) == (now_there.st_dev, now_there.st_ino):
                    yield  # closing the file releases the lock
                    return
        yield

    @property
    def runs(self) -> list[dict]:
        return self.record["runs"]

    def run_dir(self, name: str) -> Path:
        return self.path / name

    def run_by_name(self, name: str) -> dict:
        for run in self.runs:
            if run["name"] == name:
                return run
        raise KeyError(f"no run {name!r} in plan {self.path}")

    def update(self, name: str, **fields) -> None:
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"unknown run status {fields['status']!r}")
        self._edit(name, lambda run: run.update(fields))

    def add_attempt(self, name: str, **fields) -> None:
        """Start a new entry in the run's ``attempts`` history (each start of its training)."""
        self._edit(name, lambda run: run.setdefault("attempts", []).append(fields))

    def end_attempt(self, name: str, **fields) -> None:
        """Record how the run's latest attempt ended."""
        self._edit(name, lambda run: run["attempts"][-1].update(fields) if run.get("attempts") else None)

    def _edit(self, name: str, edit) -> None:
        with self.locked():  # runs as on disk now: another process may have updated one of them
            if (self.path / PLAN_FILE).exists():
                self.record["runs"] = json.loads((self.path / PLAN_FILE).read_text())["runs"]
            edit(self.run_by_name(name))
            self._write()


def newest_run_dir(runs_dir: Path) -> Path | None:
    """The most recently finished run with a checkpoint, across all plans."""
    candidates = [p.parent.parent for p in Path(runs_dir).glob("*/*/checkpoints/step-*.pt")]
    return max(candidates, key=lambda p: (p / "checkpoints").stat().st_mtime, default=None)
