"""Checkpoints: atomic writes, rotation plus the best, loads that never execute pickled code.

Layout in a run directory: checkpoints/step-00000400.pt (the last CHECKPOINT_KEEP of them) and
checkpoints/best.pt (lowest val loss so far). Each file is written to a temporary name, fsynced
and renamed, so a crash or a full disk never leaves a file that looks complete; a file that does
not load (truncated, corrupt) is skipped with a warning and the previous one is used.

Sharded engines (FSDP2 through torch distributed checkpointing, DeepSpeed through its own API)
write a folder instead: checkpoints/step-00000400/ (and best/), filled under a temporary name by
every rank, completed by rank 0 with extra.pt (step, data position, RNG: everything but weights
and optimizer) and then renamed. A folder without extra.pt is incomplete and never used.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch

from parallel.errors import CheckpointError  # raised here and by parallel/ when it reads sharded folders
from parallel.untrusted import load_weights_only

FOLDER = "checkpoints"
BEST = "best.pt"
BEST_SHARDED = "best"
EXTRA = "extra.pt"  # a sharded checkpoint's non-tensor state; written last, it marks the folder complete
_STEP_RE = re.compile(r"^step-(\d+)(\.pt)?$")


def save(path: Path, state: dict) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    Any failure (a full disk shows up as OSError from our own writes, but as RuntimeError from torch's
    zip writer) removes the partial file, so the space it took is free again and the earlier
    checkpoints stay the newest complete ones, then ends in a CheckpointError naming the path and the
    free space."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # torch's zip writer words a full disk as e.g. "unexpected pos 704 vs 598": ask the disk
        free = _free_bytes(path.parent)
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or (free is not None and free < 16 * 2**20)
        tmp.unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)):
            raise  # KeyboardInterrupt and the like: cleaned up, not a write failure
        cause = f"{type(e).__name__}: {str(e).strip()}"
        cause = f"no space left on the device ({cause})" if full else cause
        shown = "unknown space" if free is None else f"{free / 2**20:,.0f} MiB"
        raise CheckpointError(f"cannot write the checkpoint {path}: {cause} ({shown} free there); the partial "
                              f"file was removed and earlier checkpoints are intact. Free space, then "
                              f"'make continue' resumes from the last one") from None


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def load(path: Path) -> dict:
    """Load onto the CPU with weights_only=True: tensors and plain containers only, no code. A file
    that pickles anything else is refused, naming what it pickles (UntrustedCheckpointError)."""

    return load_weights_only(path, path, mmap=False)


def step_paths(run_dir: Path) -> list[Path]:
    """Step checkpoints of a run (files, or complete sharded folders), oldest first."""
    folder = Path(run_dir) / FOLDER
    found = [(int(m[1]), p) for p in folder.glob("step-*") if (m := _STEP_RE.match(p.name))
             and (p.is_file() or (p / EXTRA).is_file())]
    return [p for _, p in sorted(found)]


def save_step(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write the checkpoint of ``step`` and delete all but the newest ``keep`` step checkpoints."""
    path = Path(run_dir) / FOLDER / f"step-{step:08d}.pt"
    save(path, state)
    prune(run_dir, keep)
    return path


def prune(run_dir: Path, keep: int) -> None:
    for old in step_paths(run_dir)[:-keep]:
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)


def sharded_paths(run_dir: Path, step: int | None) -> tuple[Path, Path]:
    """(temporary folder to fill, final folder) of a sharded checkpoint; step None is best/."""
    name = BEST_SHARDED if step is None else f"step-{step:08d}"
    folder = Path(run_dir) / FOLDER
    return folder / f".{name}.tmp", folder / name


def complete_sharded(tmp: Path, final: Path, extra: dict) -> None:
    """Rank 0, after every rank wrote its shards into ``tmp``: add extra.pt, then swap it in."""
    save(tmp / EXTRA, extra)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save_best(run_dir: Path, state: dict) -> Path:
    path = Path(run_dir) / FOLDER / BEST
    save(path, state)
    return path


def latest(run_dir: Path, warn=None, skipped: list[str] | None = None) -> tuple[Path, dict] | None:
    """The newest step checkpoint that loads; unreadable ones are skipped with a warning (through
    ``warn(message)`` when given, e.g. the run's log, else Python's warnings) and, with ``skipped``,
    listed there with their reasons."""
    for path in reversed(step_paths(run_dir)):
        try:
            if path.is_dir():  # sharded: the engine loads weights and optimizer from the folder itself
                return path, {**load(path / EXTRA), "sharded": str(path)}
            return path, load(path)
        except Exception as e:  # truncated zip, bad magic, refused pickle: all mean "not usable"
            reason = (str(e).removeprefix(f"{path / EXTRA if path.is_dir() else path}: ")
                      if isinstance(e, CheckpointError) else f"{type(e).__name__}: {str(e).split('. ')[0]}")  # torch's first sentence
            if skipped is not None:
                skipped.append(f"{path.name}: {reason}")
            message = f"skipping unreadable checkpoint {path} ({reason}); trying an earlier one"
            warnings.warn(message, stacklevel=2) if warn is None else warn(f"warning: {message}")
    return None


def newest(run_dir: Path, warn=None) -> tuple[Path, dict]:
    """``latest``, or a CheckpointError saying why no step checkpoint could be used."""
    skipped = []
    found = latest(run_dir, warn, skipped)
    if found is None:
        raise CheckpointError(f"{run_dir}: no readable checkpoint ({'; '.join(skipped)})" if skipped else
                              f"{run_dir}: no step checkpoint in {Path(run_dir) / FOLDER}")
    return found


def intact(path: Path) -> bool:
    """Cheap test that a step checkpoint is complete, without loading it: torch's zip container
    (of the file, or of a sharded folder's extra.pt) has its central directory, which a truncated
    write lacks. ``latest`` still loads it fully and falls back to an earlier one if that fails."""
    try:
        with zipfile.ZipFile(path / EXTRA if path.is_dir() else path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def newest_intact_step(run_dir: Path) -> int | None:
    """The step of the newest intact step checkpoint (what a resume starts from), or None."""
    return max((int(_STEP_RE.match(p.name)[1]) for p in step_paths(run_dir) if intact(p)), default=None)


def has_checkpoint(run_dir: Path) -> bool:
    """The run holds a step checkpoint it can resume from."""
    return newest_intact_step(run_dir) is not None


def init_source(where: Path, which: str) -> tuple[Path, dict]:
    """The checkpoint a warm start (CONFIG_INIT_FROM) reads and its loaded state: ``where`` is a run
    directory (its best checkpoint for ``which`` "best", its newest readable step checkpoint for
    "latest") or a checkpoint (a file, or a sharded FSDP2/DeepSpeed folder: its state says "sharded", and
    train/lora.py's checkpoint_weights gathers its weights)."""
    where = Path(where)
    if where.is_dir():
        if (where / EXTRA).is_file():  # a sharded checkpoint folder itself
            return where, {**load(where / EXTRA), "sharded": str(where)}
        if which == "best":
            sharded = where / FOLDER / BEST_SHARDED
            if (sharded / EXTRA).is_file():
                return sharded, {**load(sharded / EXTRA), "sharded": str(sharded)}
            path = where / FOLDER / BEST
            if not path.is_file():
                raise CheckpointError(f"CONFIG_INIT_FROM={str(where)!r}: no {FOLDER}/{BEST} there (the run never "
                                      "evaluated); set CONFIG_INIT_FROM_CHECKPOINT_LATEST=y or name a checkpoint file")
        else:
            found = latest(where)
            if found is None:
                raise CheckpointError(f"CONFIG_INIT_FROM={str(where)!r}: no readable step checkpoint in "
                                      f"{where / FOLDER}; name a run directory that has trained, or a checkpoint file")
            return found  # a sharded one's weights are read through train/lora.py's checkpoint_weights
    elif where.is_file():
        path = where
    else:
        raise CheckpointError(f"CONFIG_INIT_FROM={str(where)!r}: no such run directory or checkpoint file; "
                              "set it to a run directory (runs/<plan>/<run>) or a .pt checkpoint")
    state = load(path)
    if "model" not in state:
        raise CheckpointError(f"CONFIG_INIT_FROM: {path} holds no weights (a sharded checkpoint's extra.pt?); "
                              "name the sharded checkpoint's folder, or its run directory")
    return path, state
