"""Slurm: a plan as an sbatch array job (one task per run), and run-one, what each task runs.

'make slurm' creates the plan exactly as 'make' does, prepares its data on the
submitting machine, and writes runs/<plan>/slurm.sbatch instead of training.
Each array task runs 'python -m kbuild run-one PLAN_DIR RUN', which trains that
one run and records it in plan.json through the runner's own start_run/finish_run, so
'make continue' and 'make report' work on the results as on a local plan.

A run on NNODES > 1 nodes: the task's batch script (on the first node) starts
run-one on every node with srun, each with NODE_RANK=$SLURM_NODEID and the first
node as MASTER_ADDR/RDZV_ENDPOINT. Node 0 keeps plan.json; the other nodes wait
until node 0 has started the run (tagged with $SLURM_JOB_ID), then run the same
training command, resuming exactly when node 0 does.

A chain (RUN_MODE chain) is submitted by runs/<plan>/submit.sh instead: one
sbatch of the same script per run (--array=<its index>), each run after its
parent stage's task (--dependency=afterok:<parent's job>), so a branch whose
parent fails is cancelled (--kill-on-invalid-dep=yes) and the others go on.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from data.prepare import prepare
from kconfig.atomic import write_text_if_changed
from kconfig.errors import ConfigError, NamedError
from kconfig.tree import ROOT, control_char, load
from kconfig.values import Config
from parallel.launch import launch_env, train_command
from plan.expand import expand
from plan.plan import Plan
from plan.preflight import config_problems, data_problems
from plan.runner import create_plan, finish_run, runs_dir, start_run
from train.checkpoint import has_checkpoint

SCRIPT = "slurm.sbatch"
SUBMIT = "submit.sh"  # a chain's: one sbatch per run, each after its parent's task
_TIME_RE = re.compile(r"(?:(\d+)-)?(\d{1,2}):([0-5]\d):([0-5]\d)")
# What an '#SBATCH' line can carry without quoting: sbatch, not the shell, reads those lines and
# splits them at white space, so values are validated to need no quotes instead of being quoted.
_DIRECTIVE_VALUE_RE = re.compile(r"[A-Za-z0-9_.,:;@%+=/\[\]*|&!^~()-]*")
_NAME_RE = re.compile(r"[A-Za-z0-9_.,+-]+")
FOLLOWER_WAIT_S = 600  # how long nodes 1.. wait for node 0 to start the run


class RunRefused(ValueError):
    """run-one was asked for a run that has nothing left to train."""


@dataclass(frozen=True)
class SlurmSettings:
    partition: str
    account: str
    gpus_per_task: int
    cpus_per_task: int
    mem_gb: int
    time: str
    max_parallel: int
    extra: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg: Config) -> SlurmSettings:
        """The Slurm menu's values, validated; every problem names its symbol."""
        problems = []
        m = _TIME_RE.fullmatch(cfg.SLURM_TIME.strip())
        if not m or (m[1] is not None and int(m[2]) > 23):
            problems.append(f'CONFIG_SLURM_TIME="{cfg.SLURM_TIME}": not a time limit; write HH:MM:SS or '
                            f'D-HH:MM:SS, e.g. "04:00:00" or "1-12:00:00"')
        for sym in ("SLURM_PARTITION", "SLURM_ACCOUNT"):
            if re.search(r"\s", cfg[sym]):
                problems.append(f'CONFIG_{sym}="{cfg[sym]}": contains white space; give one name '
                                f'(several partitions are separated by commas)')
            elif cfg[sym] and not _NAME_RE.fullmatch(cfg[sym]):
                problems.append(f"CONFIG_{sym}={cfg[sym]!r}: not a Slurm name; use letters, digits, '_', '.', "
                                f"'-' and '+' (several separated by commas)")
        extra = tuple(item.strip() for item in cfg.SLURM_EXTRA.split(";") if item.strip())
        for item in extra:
            if not re.fullmatch(r"--?[A-Za-z][A-Za-z0-9-]*", item.partition("=")[0]):
                problems.append(f'CONFIG_SLURM_EXTRA="{cfg.SLURM_EXTRA}": {item!r} is not an sbatch option; '
                                f'write options like "--qos=high;--constraint=h100"')
            elif not _DIRECTIVE_VALUE_RE.fullmatch(item.partition("=")[2]):
                bad = next(c for c in item.partition("=")[2] if not _DIRECTIVE_VALUE_RE.fullmatch(c))
                problems.append(f"CONFIG_SLURM_EXTRA={cfg.SLURM_EXTRA!r}: {item!r} contains {bad!r}, which an "
                                f"'#SBATCH' line cannot carry (no white space, quotes, '#', '$' or backslashes); "
                                f"write --option=value with a plain value")
        if problems:
            raise ConfigError(problems)
        return cls(cfg.SLURM_PARTITION, cfg.SLURM_ACCOUNT, cfg.SLURM_GPUS_PER_TASK, cfg.SLURM_CPUS_PER_TASK,
                   cfg.SLURM_MEM_GB, cfg.SLURM_TIME.strip(), cfg.SLURM_MAX_PARALLEL, extra)


def output_path_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be the '#SBATCH --output=' directory, or None."""
    if _DIRECTIVE_VALUE_RE.fullmatch(str(folder)) and "%" not in str(folder):
        return None
    return (f"CONFIG_RUNS_DIR: the path {str(folder)!r} contains characters an '#SBATCH --output=' line cannot "
            f"carry (white space, quotes, '#', '%', '$', ...); for 'make slurm' choose a RUNS_DIR whose absolute "
            f"path has only letters, digits, '/', '.', '_' and '-'")


def slurm_plan(layers: list, cfg: Config, overrides: str = "") -> tuple[Plan, Path]:
    """Create the plan as 'make' does, prepare its data, and write its sbatch script; nothing trains."""
    if cfg.DRY_RUN:
        raise ConfigError(["CONFIG_DRY_RUN=y: 'make slurm' submits training; use 'make check' for the dry run "
                           "or set DRY_RUN=n"])
    settings = SlurmSettings.from_config(cfg)  # before the plan exists: a bad value leaves nothing behind
    if problem := output_path_problem(runs_dir(cfg)):
        raise ConfigError([problem])
    specs = expand(layers, cfg)
    nodes = {s.cfg.NNODES or 1 for s in specs if not s.rejected}  # None: a single process, one node
    if len(nodes) > 1:
        raise ConfigError([f"CONFIG_NNODES differs between the runs of this plan ({sorted(nodes)}); one sbatch "
                           f"array asks for one node count: make a plan per node count"])
    # the nodes train, not this machine: the model's rules now, the device's at each task's start
    found = [f"run {s.name}: {p}" for s in specs if not s.rejected for p in config_problems(s.cfg)]
    if found:
        raise ConfigError(found + ["nothing was created; fix the configuration (make menuconfig, or SET=...)"])
    plan = create_plan(cfg, specs, overrides)
    plan.record["runner_pid"] = None  # no process runs this plan; its array tasks never claim it
    plan.save()
    for run in plan.runs:  # data errors show now, not in every array task; tasks never prepare at once
        if run["status"] == "pending":
            run_cfg = next(s.cfg for s in specs if s.name == run["name"])
            try:
                found = data_problems(run_cfg, prepare(run_cfg, ROOT))
            except Exception as e:
                found = [f"data: {e}" if isinstance(e, NamedError) else f"data: {type(e).__name__}: {e}"]
            if found:
                plan.update(run["name"], status="failed", error="; ".join(found))
                print(f"run {run['name']}: " + "; ".join(found), file=sys.stderr)
    block_orphans(plan)
    script = write_script(plan, settings, nodes.pop() if nodes else 1)
    return plan, (write_submit(plan, script) if plan.record["mode"] == "chain" else script)


def block_orphans(plan: Plan) -> None:
    """A chain run whose parent will not train in the array (failed data, rejected, blocked) is blocked."""
    for run in plan.runs:  # parents come before their children
        parent = run.get("parent")
        if run["status"] == "pending" and parent and plan.run_by_name(parent)["status"] != "pending":
            state = plan.run_by_name(parent)
            plan.update(run["name"], status="blocked", error=f"not submitted: its parent stage's run {parent} is "
                                                             f"{state['status']}: {state.get('error')}")


def write_submit(plan: Plan, script: Path) -> Path:
    """runs/<plan>/submit.sh: sbatch for each pending run of a chain, one task each, after its parent's task."""
    q = shlex.quote
    names = [r["name"] for r in plan.runs if r["status"] == "pending"]
    index = {name: i for i, name in enumerate(names)}  # the run's place in the script's RUNS array
    lines = ["#!/bin/bash",
             f"# Generated by 'make slurm' for chain plan {q(plan.path.name)}: one array task per run, each",
             "# submitted with --dependency=afterok on its parent stage's task. Run it: bash submit.sh",
             "set -euo pipefail",
             f"SCRIPT={q(str(script))}",
             'submit() { local id; id=$(sbatch --parsable "$@" "$SCRIPT"); echo "${id%%;*}"; }  # "id;cluster"']
    for name in names:
        parent = plan.run_by_name(name).get("parent")
        after = (f" --dependency=afterok:$JOB_{index[parent]} --kill-on-invalid-dep=yes" if parent else "")
        lines.append(f"JOB_{index[name]}=$(submit --array={index[name]}{after})  # {q(name)}"
                     + (f" after {q(parent)}" if parent else ""))
    lines.append('echo "submitted ' + str(len(names)) + ' task(s): ' + " ".join(f"$JOB_{i}" for i in index.values())
                 + '"')
    path = plan.path / SUBMIT
    write_text_if_changed(path, "\n".join(lines) + "\n")
    return path


def write_script(plan: Plan, settings: SlurmSettings, nnodes: int = 1, python: str = sys.executable) -> Path:
    """runs/<plan>/slurm.sbatch over the plan's pending runs (written atomically)."""
    names = [r["name"] for r in plan.runs if r["status"] == "pending"]
    if not names:
        raise ValueError(f"plan {plan.path.name} has no run to train (see {plan.path / 'plan.json'}); "
                         f"nothing to submit")
    path = plan.path / SCRIPT
    write_text_if_changed(path, script_text(plan, names, settings, nnodes, python))
    return path


def script_text(plan: Plan, names: list[str], s: SlurmSettings, nnodes: int, python: str) -> str:
    """The sbatch script: every value in a shell line is quoted; values in '#SBATCH' lines are validated."""
    q = shlex.quote
    for what, value in (("the plan directory", str(plan.path)), ("the source tree", str(ROOT)),
                        ("the Python interpreter", python), *(("a run name", n) for n in names)):
        if control_char(value):  # a newline in a comment or an assignment would start a new command
            raise ConfigError([f"{what} {value!r} contains {control_char(value)}; the sbatch script cannot "
                               f"carry it: choose CONFIG_RUNS_DIR (or the checkout's path) without it"])
    if problem := output_path_problem(plan.path):
        raise ConfigError([problem])
    array = f"0-{len(names) - 1}" + (f"%{s.max_parallel}" if s.max_parallel else "")
    directives = [f"--job-name={plan.path.name}", f"--array={array}",
                  f"--output={plan.path / 'slurm-%A_%a.out'}",
                  f"--nodes={nnodes}", "--ntasks-per-node=1"]
    directives += [f"--partition={s.partition}"] if s.partition else []
    directives += [f"--account={s.account}"] if s.account else []
    directives += [f"--gpus-per-task={s.gpus_per_task}"] if s.gpus_per_task else []
    directives += [f"--cpus-per-task={s.cpus_per_task}"]
    directives += [f"--mem={s.mem_gb}G"] if s.mem_gb else []
    directives += [f"--time={s.time}", *s.extra]
    lines = ["#!/bin/bash",
             f"# Generated by 'make slurm' for plan {q(plan.path.name)}: one array task per run.",
             (f"# Submit: bash {q(str(plan.path / SUBMIT))} (a chain: each task after its parent stage's)"
              if plan.record.get("mode") == "chain" else f"# Submit: sbatch {q(str(plan.path / SCRIPT))}"),
             "# Status: plan.json; afterwards 'make continue' trains what is left, 'make report' reports.",
             *(f"#SBATCH {d}" for d in directives),
             "set -euo pipefail",
             "",
             "RUNS=(",
             *(f"  {q(n)}" for n in names),
             ")",
             f"PLAN_DIR={q(str(plan.path))}",
             'RUN=${RUNS[${SLURM_ARRAY_TASK_ID:?submit this script with sbatch: it is an array job}]}',
             f"cd {q(str(ROOT))}"]
    if nnodes == 1:
        lines.append(f'exec {q(python)} -m kbuild run-one "$PLAN_DIR" "$RUN"')
    else:  # one run-one per node; node 0 (this one) keeps plan.json, the first node is the rendezvous
        lines += ['NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST")',
                  "export MASTER_ADDR=${NODES%%$'\\n'*}",
                  "export MASTER_PORT=$((29500 + SLURM_ARRAY_TASK_ID % 1000))  # tasks sharing a node differ",
                  "export RDZV_ENDPOINT=$MASTER_ADDR:$MASTER_PORT",
                  f"exec srun --nodes={nnodes} --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
                  "  bash -c 'NODE_RANK=$SLURM_NODEID exec \"$0\" -m kbuild run-one \"$1\" \"$2\"' \\",
                  f'  {q(python)} "$PLAN_DIR" "$RUN"']
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- one array task


def run_one(plan_dir: Path, name: str) -> int:
    """Train run ``name`` of the plan in ``plan_dir`` and record it in plan.json; the training exit code."""
    plan = Plan.load(plan_dir)
    try:
        status = plan.run_by_name(name)["status"]
    except KeyError:
        raise RunRefused(f"no run {name!r} in plan {plan.path} (runs: "
                         f"{', '.join(r['name'] for r in plan.runs)})") from None
    if status in ("done", "rejected"):
        raise RunRefused(f"run {name} of plan {plan.path.name} is {status}; nothing to train "
                         f"(a new 'make slurm' or 'make' trains it again in a new plan)")
    parent = plan.run_by_name(name).get("parent")
    if parent and (parent_status := plan.run_by_name(parent)["status"]) != "done":
        raise RunRefused(f"run {name} of plan {plan.path.name} starts from its parent stage's run {parent}, which "
                         f"is {parent_status}; submit a chain with {plan.path / SUBMIT} (each task after its "
                         f"parent's), not with sbatch alone")
    if int(os.environ.get("NODE_RANK") or 0) > 0:
        return _follow(plan, name)
    proc = start_run(plan, name, None)  # no GPU pinning: the task uses the GPUs Slurm gave it
    if os.environ.get("SLURM_JOB_ID"):
        plan.update(name, slurm_job=os.environ["SLURM_JOB_ID"])

    def forward(signum, frame):  # scancel or the time limit: let the run checkpoint, then record it
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    finish_run(plan, name, code)
    return code if code >= 0 else 128 - code


def _follow(plan: Plan, name: str) -> int:
    """Nodes 1..NNODES-1: once node 0 has started this task's run, train it alongside."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        raise RuntimeError(f"NODE_RANK={os.environ['NODE_RANK']} without SLURM_JOB_ID: nodes other than 0 "
                           f"only run inside the Slurm job that 'make slurm' wrote")
    deadline = time.monotonic() + FOLLOWER_WAIT_S
    while Plan.load(plan.path).run_by_name(name).get("slurm_job") != job:
        if time.monotonic() > deadline:
            raise RuntimeError(f"node {os.environ['NODE_RANK']}: node 0 did not start run {name} "
                               f"of job {job} within {FOLLOWER_WAIT_S}s")
        time.sleep(2)
    run_dir = plan.run_dir(name)  # node 0 has cleared a run that starts over: a checkpoint means resume
    cfg = load(run_dir / ".config")[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **launch_env(cfg))
    code = subprocess.call(train_command(cfg, run_dir, has_checkpoint(run_dir)), cwd=ROOT, env=env)
    return code if code >= 0 else 128 - code
