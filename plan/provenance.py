"""What a run ran on: runs/<plan>/<run>/provenance.json, one record per attempt.

A comparison between runs is only as good as the sameness of everything but the option under
test. Each time the runner starts (or resumes) a run it appends an *attempt*: the git commit of
the tree and whether it was dirty, the Python, torch, CUDA, cuDNN, NCCL and key package versions,
the GPUs (or the CPU) and the host, the exact command and the SET overrides, with a timestamp.
``plan/report.py`` compares the latest attempts of a plan's runs (``comparable``) and flags what
differs, and flags a run whose own attempts differ (resumed on another commit or machine).

Collecting is cheap: git runs with a timeout, package versions come from installed metadata,
CUDA is only asked for device names when ``torch.cuda.is_available()`` (reading device
properties, no allocation). Nothing here raises for a missing git, repository or package: the
field is null and, for git, ``reason`` says why.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

from kconfig.atomic import write_text_if_changed
from kconfig.tree import ROOT
from plan.plan import now

PROVENANCE_FILE = "provenance.json"
GIT_TIMEOUT_S = 5.0
# Distributions whose version changes results or speed; one absent from the environment is left out.
PACKAGES = ("kconfiglib", "numpy", "sentencepiece", "torchao", "deepspeed", "transformers", "datasets",
            "tokenizers", "huggingface-hub", "flash-attn", "transformer-engine", "triton", "pyarrow")
# Paths of the tree that change while it trains: never make the tree dirty.
IGNORED = ("runs", ".cache")


def _git(root: Path, *args: str) -> tuple[str | None, str]:
    """stdout of ``git -C root ARGS``, or (None, why not)."""
    try:
        p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                           timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return None, "git is not installed"
    except subprocess.TimeoutExpired:
        return None, f"git {args[0]} took more than {GIT_TIMEOUT_S:g}s"
    except OSError as e:
        return None, f"git could not run: {e}"
    if p.returncode != 0:
        first = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[0]
        return None, f"git {args[0]}: {first}"
    return p.stdout, ""


def git_state(root: Path = ROOT) -> dict:
    """{"commit", "dirty", "changes"}: HEAD, uncommitted changes outside runs/ and .cache/, and a short
    hash of those changes (two dirty trees with different edits differ in it); "reason" when a
    value is null."""
    root = Path(root)
    state: dict = {"commit": None, "dirty": None, "changes": None}
    reasons = []
    head, why = _git(root, "rev-parse", "--verify", "HEAD")
    if head is None:
        reasons.append(why)
    else:
        state["commit"] = head.strip()
    spec = ["--", ".", *(f":(exclude){p}" for p in IGNORED)]
    status, why = _git(root, "status", "--porcelain", "--untracked-files=normal", *spec)
    if status is None:
        reasons.append(why)
    else:
        state["dirty"] = bool(status.strip())
        if state["dirty"]:
            diff, why = _git(root, "diff", "HEAD", "--no-ext-diff", "--binary", *spec) if head else ("", "")
            if diff is None:
                reasons.append(why)
            else:
                state["changes"] = hashlib.sha256((status + diff).encode()).hexdigest()[:12]
    if reasons:
        state["reason"] = "; ".join(dict.fromkeys(reasons))
    return state


def versions() -> dict:
    """Python, torch and its CUDA/cuDNN/NCCL (null on a build without them), then PACKAGES present."""
    out: dict = {"python": platform.python_version(), "torch": None, "cuda": None, "cudnn": None, "nccl": None}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        out["torch"] = torch.__version__
        out["cuda"] = torch.version.cuda
        try:
            cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
            out["cudnn"] = None if cudnn is None else str(cudnn)
        except Exception:  # a broken cuDNN install: the version stays unknown
            pass
        try:
            if torch.cuda.is_available():
                nccl = torch.cuda.nccl.version()
                out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception:  # a build without NCCL
            pass
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform.processor(), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def devices(gpus: str | None = None) -> dict:
    """{"gpu", "gpu_count", "cpu", "cpu_count"}; ``gpus`` ("0" or "0,1", indices as this process
    sees them) narrows the GPUs to those the run is given (the runner pins a run to one)."""
    out: dict = {"gpu": None, "gpu_count": 0, "cpu": cpu_model(), "cpu_count": os.cpu_count()}
    try:
        import torch
    except ImportError:
        return out
    try:
        if not torch.cuda.is_available():
            return out
        indices = list(range(torch.cuda.device_count()))
        if gpus:
            wanted = [int(i) for i in gpus.split(",") if i.strip().isdigit()]
            indices = [i for i in wanted if i in indices] or indices
        names = [torch.cuda.get_device_name(i) for i in indices]
    except Exception:  # a driver problem: the run itself will report it
        return out
    out["gpu"] = ", ".join(dict.fromkeys(names)) or None
    out["gpu_count"] = len(names)
    return out


def collect(overrides: str, *, root: Path = ROOT, gpus: str | None = None) -> dict:
    """One attempt's record (without its timestamp): git, versions, devices, host, command, SET."""
    return {"git": git_state(root), "versions": versions(), "device": devices(gpus),
            "hostname": socket.gethostname(),
            "command": {"argv": list(sys.orig_argv), "SET": os.environ.get("SET")},  # with the interpreter and -m
            "set": overrides}


def load_attempts(run_dir: Path) -> list[dict] | None:
    """The attempts in ``run_dir``/provenance.json, oldest first; None when there is no readable file."""
    try:
        data = json.loads((Path(run_dir) / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    attempts = data.get("attempts") if isinstance(data, dict) else None
    if not isinstance(attempts, list):
        return None
    return [a for a in attempts if isinstance(a, dict)]


def record_attempt(run_dir: Path, overrides: str, *, root: Path = ROOT, gpus: str | None = None,
                   resumed: bool | None = None) -> dict:
    """Append this attempt (with a timestamp) to ``run_dir``/provenance.json, atomically; return it.
    Earlier attempts are kept, so a resumed run shows where each part of it ran. ``resumed``: whether
    this attempt continues the previous ones' checkpoint (False: it starts over; None: not known)."""
    run_dir = Path(run_dir)
    attempt = {"time": now(), "resumed": resumed, **collect(overrides, root=root, gpus=gpus)}
    path = run_dir / PROVENANCE_FILE
    previous = load_attempts(run_dir)
    if previous is None and path.exists():
        attempt["note"] = f"the earlier {PROVENANCE_FILE} was unreadable and has been replaced"
    record = {"attempts": [*(previous or []), attempt]}
    write_text_if_changed(path, json.dumps(record, indent=2) + "\n")
    return attempt


def contributing(attempts: list[dict]) -> list[dict]:
    """The attempts the run's current outputs come from: those since its last fresh start
    (``resumed`` false); all of them when that is not recorded."""
    starts = [i for i, a in enumerate(attempts) if a.get("resumed") is False]
    return attempts[starts[-1]:] if starts else list(attempts)


def comparable(attempt: dict) -> dict:
    """The fields that must match between runs that are compared, flat and in a fixed order; not the
    time, command or SET, which differ legitimately. A field the record lacks is None."""
    git = attempt.get("git") or {}
    device = attempt.get("device") or {}
    vers = dict(attempt.get("versions") or {})
    fields = {"commit": git.get("commit"), "dirty": git.get("dirty"), "changes": git.get("changes")}
    for name in ("python", "torch", "cuda", "cudnn", "nccl"):
        fields[name] = vers.pop(name, None)
    fields.update(sorted(vers.items()))
    for name in ("gpu", "gpu_count", "cpu", "cpu_count"):
        fields[name] = device.get(name)
    fields["hostname"] = attempt.get("hostname")
    return fields


def differing(records: dict[str, dict]) -> dict[str, dict[object, list[str]]]:
    """For records keyed by name (run or attempt): each comparable field that is not the same in all
    of them -> {value: [names having it]} in first-seen order."""
    flat = {name: comparable(r) for name, r in records.items()}
    keys = list(dict.fromkeys(k for f in flat.values() for k in f))
    out = {}
    for key in keys:
        by_value: dict = {}
        for name, f in flat.items():
            by_value.setdefault(_hashable(f.get(key)), []).append(name)
        if len(by_value) > 1:
            out[key] = by_value
    return out


def _hashable(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value
