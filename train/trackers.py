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

Every tracker gets the same names: TRACKER_KEYS maps metrics.jsonl's keys (which stay as they are:
the report reads them) to namespaced ones (``train/loss``, ``val/<set>/loss``, ``perf/tokens_per_s``,
``eval/<task>/<metric>``), and FINAL_KEYS maps summary.json's to ``final/...``. ``tokens`` is W&B's x
axis; the resolved configuration is the W&B run config and TensorBoard's hparams, so runs of an
ablation compare in W&B's runs table and TensorBoard's HPARAMS tab.
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


# --------------------------------------------------------------------------- tracker keys

# metrics.jsonl's keys, nested dicts flattened to parent/child (flatten), -> the key every tracker logs.
# A trailing '*' matches the rest of the key, which fills the template's '{}'; the first row that matches
# wins; a key no row matches is logged under its own name (nothing is dropped).
TRACKER_KEYS = (
    ("tokens", "tokens"),  # tokens trained on before the step, all ranks: W&B's x axis
    ("train_loss", "train/loss"),  # nats/token
    ("lr", "train/lr"),
    ("grad_norm", "train/grad_norm"),  # before clipping
    ("skipped_steps", "train/skipped_steps"),  # non-finite steps skipped so far
    ("train_eval_loss", "train/eval_loss"),  # the train split on EVAL_BATCHES batches, at each evaluation
    ("mtp_loss", "train/mtp_loss"),
    ("dpo_*", "train/dpo_{}"),  # DPO's loss terms, rewards, accuracy, KL on the training batches
    ("val_loss", "val/loss"),  # the aggregate over the validation sets (the one checkpoints/best.pt follows)
    ("val_bpb", "val/bpb"),  # bits per byte
    ("val_losses/*", "val/{}/loss"),  # one per validation set (VAL_SETS; 'val' alone by default)
    ("val_bpbs/*", "val/{}/bpb"),
    ("val_dpo_*", "val/dpo_{}"),  # DPO's terms on the validation pairs
    ("eval/*", "eval/{}"),  # EVAL_TASKS during training: eval/<task>/<metric>
    ("tokens_per_s", "perf/tokens_per_s"),
    ("flops_per_s", "perf/flops_per_s"),
    ("mfu", "perf/mfu"),  # model FLOPs utilization, 0..1 (GPUs with a known peak only)
    ("elapsed_s", "perf/elapsed_s"),
    ("moe_aux_loss", "moe/aux_loss"),
    ("moe_z_loss", "moe/z_loss"),
    ("moe_load_max", "moe/load_max"),
    ("moe_dropped_frac", "moe/dropped_frac"),
    ("curriculum_stage", "curriculum/stage"),
    ("seq_len", "curriculum/seq_len"),
    ("tokens_per_step", "curriculum/tokens_per_step"),
    ("data_share/*", "data/share/{}"),  # each source's share of the tokens so far
    ("cpu_rss_gib", "system/cpu_rss_gib"),
    ("gpu_*", "system/gpu_{}"),
)

# summary.json's keys -> the final metrics (W&B's run summary; TensorBoard's HPARAMS columns). Unmatched
# keys are left out: summary.json has them all.
FINAL_KEYS = (
    ("final_train_loss", "final/train/loss"),
    ("final_val_loss", "final/val/loss"),
    ("best_val_loss", "final/val/best_loss"),
    ("best_val_step", "final/val/best_step"),
    ("final_val_bpb", "final/val/bpb"),
    ("best_val_bpb", "final/val/best_bpb"),
    ("final_val_losses/*", "final/val/{}/loss"),
    ("final_val_bpbs/*", "final/val/{}/bpb"),
    ("steps", "final/steps"),
    ("tokens", "final/tokens"),
    ("skipped_steps", "final/train/skipped_steps"),
    ("tokens_per_s", "final/perf/tokens_per_s"),
    ("mfu", "final/perf/mfu"),
    ("wall_time_s", "final/perf/wall_time_s"),
    ("params", "final/params"),
    ("params_non_embedding", "final/params_non_embedding"),
    ("params_active", "final/params_active"),
)


def tracker_key(key: str, table=TRACKER_KEYS) -> str | None:
    """``key``'s name in ``table`` (None where no row matches)."""
    for pattern, template in table:
        if pattern.endswith("*"):
            if key.startswith(pattern[:-1]) and len(key) > len(pattern) - 1:
                return template.format(key[len(pattern) - 1:])
        elif key == pattern:
            return template
    return None


def tracker_metrics(record: dict) -> dict[str, float]:
    """A metrics.jsonl record's finite scalars under the trackers' names."""
    return {tracker_key(key) or key: value for key, value in flatten(record).items()}


def final_metrics(summary: dict) -> dict[str, float]:
    """The run summary's comparable numbers under their ``final/...`` names."""
    return {name: value for key, value in flatten(summary).items() if (name := tracker_key(key, FINAL_KEYS))}


def namespaces() -> list[str]:
    """The first path segments of the tracker keys (W&B plots each against tokens)."""
    return sorted({template.split("/")[0] for _, template in TRACKER_KEYS if "/" in template})


def hparams(cfg) -> dict[str, bool | int | float | str]:
    """The resolved configuration as TensorBoard hyperparameters: unset symbols (None) left out, lists as
    their text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in public_config(cfg).items() if v is not None}


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
        # Charts against tokens trained on (steps mislead under curriculum and batch warmup); _step stays
        # the optimizer step, selectable as the x axis in the UI.
        self.run.define_metric("tokens")
        for namespace in namespaces():
            self.run.define_metric(f"{namespace}/*", step_metric="tokens")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict) -> None:
        self.run.summary.update(final_metrics(summary))
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
    """Scalars under the tracker keys, and the hparams plugin's session records in the run's own folder
    (SummaryWriter.add_hparams would open a second run beside it). The plugin's experiment record is
    left out on purpose: TensorBoard takes the first run's as every run's, so a symbol set in one run
    only would get no column; without it the HPARAMS tab's columns are the union of the runs'
    configurations and its metrics every scalar tag (the last value of each)."""

    name = "tensorboard"

    def __init__(self, cfg, run_dir: Path, plan_name: str, run_name: str):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), flush_secs=30)
        # At the start, so a run in progress is in the HPARAMS tab (status unknown until it is done);
        # TensorBoard keeps the first of a tag's records, so a resumed run shows its first attempt's.
        _, session_start, self.session_end = hparams_summaries(hparams(cfg), {})
        self.writer.file_writer.add_summary(session_start)
        lines = [f"    {k} = {v!r}" for k, v in public_config(cfg).items()]  # indented: markdown code block
        self.writer.add_text("config", "\n".join(lines), global_step=0)

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def finish(self, summary: dict) -> None:
        step = summary.get("steps")
        for key, value in final_metrics(summary).items():
            self.writer.add_scalar(key, value, global_step=step)
        if summary.get("status") == "done":  # "success"; a stopped run stays "unknown" until it completes
            self.writer.file_writer.add_summary(self.session_end)
        self.writer.add_text("summary", "    " + json.dumps(summary, default=str), global_step=step)
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
        metrics = tracker_metrics(record)
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
