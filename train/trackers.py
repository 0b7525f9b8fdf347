"""Optional experiment trackers (Weights & Biases, trackio, TensorBoard) beside metrics.jsonl.

metrics.jsonl is always written by train/metrics.py; trackers are extra copies and never stop a
run: a selected tracker that is not installed or fails to start is reported (with the pip command)
and skipped; an exception while logging is reported, rate-limited, and after repeated failures
that tracker is switched off. Secrets (WANDB_API_KEY, HF_TOKEN, ...) stay in the environment, read
by the tracker libraries themselves; nothing here writes them, and messages are scrubbed of them.

What goes where:
- W&B: ``<run_dir>/wandb/`` (offline-run-*/run-*.wandb, for 'wandb sync'; online it also uploads).
- trackio: its local database (TRACKIO_DIR, default ~/.cache/huggingface/trackio) or a Space.
- TensorBoard: ``<run_dir>/tensorboard/`` event files.
- ``<run_dir>/trackers.json``: the W&B run id, so a resumed run continues the same tracker runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MAX_FAILURES = 10  # consecutive failed log calls before a tracker is switched off
REPORT_EVERY_S = 300.0  # at most one failure message per tracker in this many seconds
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


@dataclass(frozen=True)
class TrackerSpec:
    symbol: str  # the Kconfig bool that selects it
    name: str
    module: str  # what must be importable
    package: str  # what pip installs


SPECS = (
    TrackerSpec("TRACK_WANDB", "wandb", "wandb", "wandb"),
    TrackerSpec("TRACK_TRACKIO", "trackio", "trackio", "trackio"),
    TrackerSpec("TRACK_TENSORBOARD", "tensorboard", "tensorboard", "tensorboard"),
)


def pip_command(package: str) -> str:
    return f"{sys.executable} -m pip install {package}"


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None  # None: blocked (tests simulate a missing package so)
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _missing_message(spec: TrackerSpec) -> str:
    return (f"CONFIG_{spec.symbol}=y but the '{spec.package}' package is not installed; install it with: "
            f"{pip_command(spec.package)} (training runs without it until then)")


def selected(cfg) -> list[TrackerSpec]:
    return [spec for spec in SPECS if cfg[spec.symbol]]


def tracker_problems(cfg) -> list[str]:
    """For make check and startup: each selected tracker that cannot work, with what to do."""
    problems = [_missing_message(spec) for spec in selected(cfg) if not _installed(spec.module)]
    if cfg.TRACK_WANDB and cfg.WANDB_MODE == "online" and not _wandb_key_available():
        problems.append("CONFIG_WANDB_MODE_ONLINE=y but no W&B API key is available: export WANDB_API_KEY "
                        "in the environment (never in a defconfig) or run 'wandb login', or choose "
                        "CONFIG_WANDB_MODE_OFFLINE=y and upload later with 'wandb sync'")
    return problems


def _wandb_key_available() -> bool:
    """WANDB_API_KEY is set, or 'wandb login' stored one (~/.netrc). Only presence is checked."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _secrets() -> list[str]:
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8]


def scrub(text: str) -> str:
    """``text`` with the value of every secret-looking environment variable replaced."""
    for value in _secrets():
        text = text.replace(value, "***")
    return text


def _say(log, message: str) -> None:
    log(scrub(message))


def public_config(cfg) -> dict:
    """The resolved configuration as logged to trackers: secret-looking names dropped, tuples as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(cfg).items() if not _SECRET_NAME.search(k)}


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """Finite numeric scalars of a metrics record, nested dicts as ``parent/child`` (val_losses/<name>,
    data_share/<source>: trackers draw one chart section per prefix). Lists (moe_load), strings,
    None and NaN/Inf are left out, as is ``step`` (passed separately)."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, numbers.Real) and math.isfinite(value) and name != "step":
            out[name] = float(value)
    return out


# --------------------------------------------------------------------------- the trackers


class WandbTracker:
    name = "wandb"

    def __init__(self, cfg, run_dir: Path, plan_name: str, run_name: str, resume_id: str | None):
        import wandb

        self.run = wandb.init(
            project=cfg.WANDB_PROJECT or cfg.PLAN_NAME or plan_name,
            entity=cfg.WANDB_ENTITY or None, name=run_name, group=plan_name, config=public_config(cfg),
            dir=str(run_dir), mode=cfg.WANDB_MODE,  # online | offline
            id=resume_id, resume="allow" if resume_id else None,
            # stdout stays ours (train.log has it); no code upload
            settings=wandb.Settings(console="off", save_code=False))
        self.id = self.run.id

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict) -> None:
        self.run.summary.update(flatten(summary))
        failed = summary.get("status") not in (None, "done")
        self.run.finish(exit_code=1 if failed else 0)


class TrackioTracker:
    name = "trackio"

    def __init__(self, cfg, run_dir: Path, plan_name: str, run_name: str, resume: bool):
        import trackio

        wanted = dict(project=cfg.PLAN_NAME or plan_name, name=run_name, group=plan_name,
                      config=public_config(cfg),
                      resume="allow" if resume else "never", embed=False,
                      auto_log_gpu=False, auto_log_cpu=False)  # system metrics come with our records
        accepted = inspect.signature(trackio.init).parameters  # older releases lack some of these
        self.run = trackio.init(**{k: v for k, v in wanted.items() if k in accepted})

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict) -> None:
        self.run.finish()


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, cfg, run_dir: Path, plan_name: str, run_name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), flush_secs=30)
        lines = [f"    {k} = {v!r}" for k, v in public_config(cfg).items()]  # indented: markdown code block
        self.writer.add_text("config", "\n".join(lines), global_step=0)

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def finish(self, summary: dict) -> None:
        self.writer.add_text("summary", "    " + json.dumps(summary, default=str), global_step=summary.get("steps"))
        self.writer.close()


class Trackers:
    """The selected trackers of one run (construct on rank 0 only)."""

    def __init__(self, trackers: list, log=print):
        self.trackers, self.log_fn = trackers, log
        self.failures = {t.name: 0 for t in trackers}
        self.reported = {t.name: -math.inf for t in trackers}

    def _log(self, message: str) -> None:
        _say(self.log_fn, message)

    @classmethod
    def from_config(cls, cfg, run_dir: Path, plan_name: str, run_name: str, log=print) -> "Trackers":
        """Open every selected tracker. Missing packages and start failures are logged and skipped."""
        run_dir = Path(run_dir)
        state_path = run_dir / "trackers.json"
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            state = {}
        opened = []
        for spec in selected(cfg):
            if not _installed(spec.module):
                _say(log, f"tracker {spec.name}: {_missing_message(spec)}")
                continue
            try:
                if spec.name == "wandb":
                    tracker = WandbTracker(cfg, run_dir, plan_name, run_name, state.get("wandb_id"))
                    state["wandb_id"] = tracker.id
                elif spec.name == "trackio":
                    tracker = TrackioTracker(cfg, run_dir, plan_name, run_name, resume=bool(state.get("trackio")))
                    state["trackio"] = True
                else:
                    tracker = TensorBoardTracker(cfg, run_dir, plan_name, run_name)
            except Exception as e:  # no network, bad credentials, an incompatible release: run without it
                _say(log, f"tracker {spec.name}: could not start ({type(e).__name__}: {e}); "
                          f"training continues without it")
                continue
            opened.append(tracker)
        if opened:
            state_path.write_text(json.dumps(state) + "\n")  # run ids only: never a key
            _say(log, "trackers: " + ", ".join(t.name for t in opened))
        return cls(opened, log)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def log(self, record: dict, step: int) -> None:
        """Send a metrics record's scalars to every tracker; a failure never reaches the caller."""
        if not self.trackers:
            return
        metrics = flatten(record)
        if metrics:
            for tracker in list(self.trackers):
                self._call(tracker, "log", metrics, step)

    def finish(self, summary: dict | None = None) -> None:
        for tracker in list(self.trackers):
            self._call(tracker, "finish", summary or {})
        self.trackers = []

    def _call(self, tracker, method: str, *args) -> None:
        try:
            getattr(tracker, method)(*args)
        except Exception as e:
            self.failures[tracker.name] += 1
            count = self.failures[tracker.name]
            if count >= MAX_FAILURES:
                self.trackers.remove(tracker)
                self._log(f"tracker {tracker.name}: {count} failures in a row, last {type(e).__name__}: {e}; "
                          f"switched off for the rest of the run (metrics.jsonl has everything)")
            elif time.monotonic() - self.reported[tracker.name] >= REPORT_EVERY_S or method == "finish":
                self.reported[tracker.name] = time.monotonic()
                self._log(f"tracker {tracker.name}: {method} failed ({type(e).__name__}: {e}); training "
                          f"continues (further failures reported at most every {REPORT_EVERY_S:.0f}s)")
        else:
            self.failures[tracker.name] = 0
