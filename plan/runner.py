"""Execute a plan: resolve each run into its own directory, then train them.

Runs go one after another on a CPU machine; on a machine with N GPUs, N
single-process runs at once, one per GPU, while runs with data parallelism
(PARALLEL ddp, fsdp2 or deepspeed) go one after another, each across the GPUs
through torchrun (parallel/launch.py). A failed run is recorded in plan.json
and the plan goes on. In a chain a run starts only once its parent stage is
done; the descendants of a parent that did not finish are marked blocked, with
the reason, and 'make continue' takes them up with it. With CHAIN_EVAL each
stage is evaluated ('make eval') as it finishes; a failing evaluation is
recorded and the chain goes on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from data.prepare import prepare
from kconfig.errors import ConfigError, NamedError
from kconfig.tree import (ROOT, completeness_problem, load, parse_overrides, parse_snapshot, predates_marker, resolve,
                          unrecorded, write_outputs)
from kconfig.values import Config, values
from parallel.launch import launch_env, train_command
from plan.expand import RunSpec, bind_parent
from plan.plan import PLAN_FILE, Plan, now
from plan.preflight import data_problems, problems
from plan.provenance import record_attempt
from train.checkpoint import newest_intact_step

UNFINISHED = ("pending", "running", "failed", "interrupted", "killed", "time_limit", "blocked")
KEPT_ON_RESTART = (".config", "config.py", "provenance.json")  # what a run that starts over keeps in place
_ATTEMPT_RE = re.compile(r"^attempt-\d+$")


def runs_dir(cfg: Config) -> Path:
    p = Path(cfg.RUNS_DIR)
    return p if p.is_absolute() else ROOT / p


def create_plan(cfg: Config, specs: list[RunSpec], overrides: str = "") -> Plan:
    """Write runs/<plan>/plan.json and every run's resolved .config/config.py before anything runs."""
    chain = cfg.RUN_MODE == "chain"
    records = [{"name": s.name, "baseline": s.baseline, "differences": s.differences,
                **({"stage": s.stage, "parent": s.parent} if chain else {})} for s in specs]
    plan = Plan.create(runs_dir(cfg), cfg.PLAN_NAME, cfg.RUN_MODE, records)
    plan.record.update(set=overrides, runner_pid=os.getpid(), **({"chain_eval": cfg.CHAIN_EVAL} if chain else {}))
    plan.save()
    for spec in specs:
        if spec.rejected:
            plan.update(spec.name, status="rejected", error=spec.error)
        else:
            if spec.parent is not None:  # the parent's directory exists now: INIT_FROM names it
                bind_parent(spec, plan.run_dir(spec.parent))
            run_dir = plan.run_dir(spec.name)
            write_outputs(spec.kconf, run_dir / ".config", run_dir / "config.py")
    return plan


def prepare_to_continue(plan: Plan, names: list[str], overrides: str = "") -> None:
    """Before ``names`` are continued: apply SET-style overrides to their resolved configs (e.g. another
    world size, a smaller MICRO_BATCH) and check each result can train on this machine
    (plan/preflight.py). Every run is validated before any file is written, so a refusal changes nothing.
    A run configured by an older kbuild, before symbols the tree has now, gets their defaults, as
    'make olddefconfig' would give them, and says so."""
    resolved, found, rewrite = {}, [], set()
    for name in names:
        path = plan.run_dir(name) / ".config"
        try:
            mine = parse_snapshot(path)
        except ConfigError as e:
            found += [f"run {name}: {problem}" for problem in e.problems]
            continue
        resolved[name] = kconf = resolve(mine, parse_overrides(overrides))[0]
        if predates_marker(path) and (new := unrecorded(mine, kconf)):
            print(f"run {name}: its .config predates " + ", ".join(
                f"CONFIG_{n}={kconf.syms[n].str_value or 'unset'}" for n in new) + " (defaults, as olddefconfig gives)")
            rewrite.add(name)
        elif gap := completeness_problem(path, mine, kconf):
            found.append(f"run {name}: {gap}")
        found += [f"run {name}: {p}" for p in problems(values(kconf))]
    if found:
        raise ConfigError(found + ["nothing was continued: fix it with 'make continue SET=...' or continue on "
                                   "a machine that fits"])
    for name, kconf in resolved.items():
        if overrides or name in rewrite:
            write_outputs(kconf, plan.run_dir(name) / ".config", plan.run_dir(name) / "config.py")


def execute(plan: Plan) -> Plan:
    """Train every unfinished run of ``plan`` (interrupted ones resume from their checkpoint)."""
    todo, parallel = [], False
    for name in [r["name"] for r in plan.runs if r["status"] in UNFINISHED]:
        try:  # prepare data up front: data errors show before hours of training
            cfg = load(plan.run_dir(name) / ".config")[1]
            found = data_problems(cfg, prepare(cfg, ROOT))
        except Exception as e:
            found = [f"data: {e}" if isinstance(e, NamedError) else f"data: {type(e).__name__}: {e}"]
        if found:  # e.g. a corpus shorter than BLOCK_SIZE, a SAMPLE_PROMPT the tokenizer cannot encode
            plan.update(name, status="failed", error="; ".join(found), end=now())
            print(f"run {name}: " + "; ".join(found), file=sys.stderr, flush=True)
            continue
        todo.append(name)
        parallel |= cfg.PARALLEL != "none"
    print(f"plan: {plan.path} ({len(plan.runs)} run{'s' if len(plan.runs) != 1 else ''}, {len(todo)} to train)", flush=True)
    slots = [None] if parallel else _device_slots()  # a data-parallel run takes every GPU
    active: dict[str, tuple[subprocess.Popen, str | None]] = {}
    queue = list(todo)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        evaluate_unevaluated(plan)  # a chain stopped between a stage's training and its evaluation
        while queue or active:
            while len(active) < len(slots) and (name := next_ready(plan, queue, active)) is not None:
                free = [s for s in slots if s not in {slot for _, slot in active.values()}][0]
                active[name] = (start_run(plan, name, free), free)
            for name, (proc, _) in list(active.items()):
                if proc.poll() is not None:
                    finish_run(plan, name, proc.returncode, evaluate=False)
                    del active[name]  # before the evaluation: an interrupt during it must not finish it twice
                    evaluate_if_chain(plan, name)
            time.sleep(0.2)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: let every run checkpoint, record it, stop
        for sig in previous:  # a second signal (make forwards one too) must not cut this short
            signal.signal(sig, signal.SIG_IGN)
        print("\nstopping: each running run finishes its step and writes a checkpoint ...", flush=True)
        for name, (proc, _) in active.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, (proc, _) in active.items():
            finish_run(plan, name, proc.wait(), evaluate=False)  # 'make continue' evaluates it
        print(f"interrupted; 'make continue' resumes {plan.path.name}", flush=True)
        raise SystemExit(130) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return plan


def next_ready(plan: Plan, queue: list[str], active: dict) -> str | None:
    """Take from ``queue`` the first run whose parent (in a chain) is done; a run whose parent will not be
    (it stopped, failed or is blocked itself, and is neither queued nor training) is marked blocked."""
    for name in list(queue):
        parent = plan.run_by_name(name).get("parent")
        if parent is None or plan.run_by_name(parent)["status"] == "done":
            queue.remove(name)
            return name
        if parent in queue or parent in active:
            continue
        queue.remove(name)
        state = plan.run_by_name(parent)
        reason = f": {state['error']}" if state.get("error") else ""
        plan.update(name, status="blocked", end=now(),
                    error=f"not run: its parent stage's run {parent} is {state['status']}{reason}; "
                          f"'make continue' retries {parent}, then this run")
        print(f"run {name}: blocked: its parent {parent} is {state['status']}", file=sys.stderr, flush=True)
    return None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _device_slots() -> list[str | None]:
    """One slot per visible GPU (runs are pinned with CUDA_VISIBLE_DEVICES), else one CPU slot."""
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:
        n = 0
    # indices within the GPUs this process may use: CUDA_VISIBLE_DEVICES=2,3 means physical 2 and 3
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    ids = visible[:n] if len(visible) >= n else [str(i) for i in range(n)]
    return ids if n > 1 else [None]


def start_run(plan: Plan, name: str, gpu: str | None) -> subprocess.Popen:
    """Start (or resume) one run's training. A run whose directory holds an intact step checkpoint
    resumes from its newest one, whatever its status (failed, killed, interrupted, time limit); one
    without starts over, and the files of its previous attempt move to attempt-N/, never deleted."""
    run_dir = plan.run_dir(name)
    resumed_from = newest_intact_step(run_dir)
    resume = resumed_from is not None
    if not resume and (aside := set_aside(run_dir)) is not None:
        print(f"run {name}: no checkpoint to resume from; the previous attempt's files are in {aside}", flush=True)
    (run_dir / "summary.json").unlink(missing_ok=True)  # its status and error are in plan.json's attempts
    plan.update(name, status="running", start=now(), end=None, error=None)
    plan.add_attempt(name, start=now(), resumed_from=resumed_from)
    record_attempt(run_dir, plan.record.get("set") or "", gpus=gpu, resumed=resume)  # commit, versions, host
    cfg = load(run_dir / ".config")[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **launch_env(cfg))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    args = train_command(cfg, run_dir, resume)
    print(f"\n--- run {name}{' (resuming from its checkpoint)' if resume else ''} ---", flush=True)
    return subprocess.Popen(args, cwd=ROOT, env=env)


def set_aside(run_dir: Path) -> Path | None:
    """Move everything but the run's configuration into the next free attempt-N/; None if nothing to move."""
    items = [p for p in run_dir.iterdir() if p.name not in KEPT_ON_RESTART and not _ATTEMPT_RE.match(p.name)]
    if not items:
        return None
    n = 1
    while (run_dir / f"attempt-{n}").exists():
        n += 1
    aside = run_dir / f"attempt-{n}"
    aside.mkdir()
    for p in items:
        os.replace(p, aside / p.name)
    return aside


def finish_run(plan: Plan, name: str, code: int, evaluate: bool = True) -> None:
    """Record in plan.json how run ``name``'s training process ended (exit ``code``): status, error, attempt;
    then, in a chain with CHAIN_EVAL and unless ``evaluate`` is off, evaluate a done stage."""
    run_dir = plan.run_dir(name)
    status, error = outcome(code, read_summary(run_dir), run_dir)
    plan.update(name, status=status, end=now(), error=error)
    plan.end_attempt(name, end=now(), status=status, exit_code=code, error=error)
    if evaluate:
        evaluate_if_chain(plan, name)


def evaluate_if_chain(plan: Plan, name: str) -> None:
    """In a chain with CHAIN_EVAL, evaluate run ``name`` if its training is done."""
    if plan.record.get("chain_eval") and plan.run_by_name(name)["status"] == "done":
        evaluate_stage(plan, name)


def evaluate_stage(plan: Plan, name: str) -> None:
    """CHAIN_EVAL: 'make eval' on a finished stage's best checkpoint with the stage's own configuration. The
    outcome goes to plan.json (``eval``: done or failed, ``eval_error``); a failure does not stop the chain."""
    from evaluation.generation import GenerationConfig
    from evaluation.run import evaluate_run
    from harness.evaluate import EvalConfig

    run_dir = plan.run_dir(name)
    print(f"\n--- evaluating {name} ---", flush=True)
    try:
        cfg = load(run_dir / ".config")[1]
        evaluate_run(run_dir, EvalConfig.from_config(cfg, ROOT), GenerationConfig.from_config(cfg), ROOT, "best")
    except Exception as e:  # recorded, not fatal: the next stage needs the weights, not the scores
        error = str(e) if isinstance(e, NamedError) else f"{type(e).__name__}: {e}"
        print(f"run {name}: evaluation failed: {error}", file=sys.stderr, flush=True)
        plan.update(name, eval="failed", eval_error=error)
        return
    plan.update(name, eval="done", eval_error=None)


def evaluate_unevaluated(plan: Plan) -> None:
    """With CHAIN_EVAL, evaluate the done stages with no evaluation recorded yet (the plan was stopped while
    one was being evaluated); a failed evaluation is not retried."""
    if plan.record.get("chain_eval"):
        for run in plan.runs:
            if run["status"] == "done" and "eval" not in run:
                evaluate_stage(plan, run["name"])


def outcome(code: int, summary: dict, run_dir: Path) -> tuple[str, str | None]:
    """(plan.json status, error) of a training process that exited with ``code``."""
    last = newest_intact_step(run_dir)
    kept = (f"its newest checkpoint (step {last}) is kept and 'make continue' resumes from it" if last is not None
            else "it had no checkpoint yet, so 'make continue' starts it over")
    if code == 0 and summary.get("status") in ("done", "time_limit"):
        return summary["status"], summary.get("error")
    if code in (130, 143, -signal.SIGINT, -signal.SIGTERM):
        return "interrupted", summary.get("error") or "interrupted"
    if code in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return "killed", (f"killed by SIGKILL (exit {code}), most likely by the out-of-memory killer (see "
                          f"'dmesg' or the scheduler's log) or a lost node; {kept}. If it was memory, lower "
                          f"CONFIG_MICRO_BATCH (and raise CONFIG_GRAD_ACCUM to keep the batch) first")
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return "killed", f"killed by {name} (exit {code}); {kept}"
    error = summary.get("error") or f"training exited with code {code}; see {run_dir / 'train.log'}"
    return "failed", error


def read_summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def newest_unfinished_plan(root: Path) -> Plan | None:
    """The most recently created plan with a run still to do (by plan.json, never by logs)."""
    plans = []
    for f in Path(root).glob(f"*/{PLAN_FILE}"):
        plan = Plan.load(f.parent)
        if any(r["status"] in UNFINISHED for r in plan.runs):
            plans.append(plan)
    return max(plans, key=lambda p: p.record["created"], default=None)


def claim(plan: Plan) -> None:
    """Refuse to run a plan another live process is running; mark its stale 'running' runs interrupted."""
    pid = plan.record.get("runner_pid")
    if pid and pid != os.getpid() and _alive(pid):
        raise RuntimeError(f"plan {plan.path.name} is being run by process {pid}; wait for it or stop it first")
    plan.record["runner_pid"] = os.getpid()
    for run in plan.runs:
        if run["status"] == "running":
            run.update(status="killed", error="the process running the plan stopped while this run trained, "
                                              "without recording why (killed with its process group?)")
    plan.save()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process nobody has reaped yet (a zombie) is not running anything
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def print_summary(plan: Plan) -> None:
    print(f"\n=== plan {plan.path.name} ({plan.record['mode']}) ===")
    for run in plan.runs:
        run_dir = plan.run_dir(run["name"])
        s = read_summary(run_dir)
        if run["status"] not in ("done", "time_limit"):
            print(f"{run['name']}: {run['status']}: {run['error']}")
            continue
        if run["status"] == "time_limit":
            print(f"{run['name']}: time limit: {run['error']}")
        if len(plan.runs) > 1:
            print(f"{run['name']}: val {s['final_val_loss']:.4f} (best {s['best_val_loss']:.4f}), "
                  f"{s['tokens_per_s']:,.0f} tokens/s, {s['wall_time_s']:.0f}s")
            continue
        print(f"run directory:   {run_dir}")
        print(f"final loss:      train {s['final_train_loss']:.4f} | val {s['final_val_loss']:.4f} "
              f"(best val {s['best_val_loss']:.4f} at step {s['best_val_step']})")
        print(f"unigram entropy: {s['unigram_entropy_nats']:.4f} nats/token (a model that ignores context)")
        speed = f"{s['tokens_per_s']:,.0f} tokens/s, {s['flops_per_s'] / 1e9:.1f} GFLOP/s"
        if s["mfu"] is not None:
            speed += f", MFU {100 * s['mfu']:.1f}%"
        print(f"throughput:      {speed} on {s['device']}")
        print(f"wall time:       {s['wall_time_s']:.1f}s for {s['steps']} steps, {s['params']:,} parameters")
        print(f"sample:\n{s['sample']}")
    failed = [r["name"] for r in plan.runs if r["status"] not in ("done", "rejected")]
    if failed:
        print(f"\n{len(failed)} run(s) did not finish: {', '.join(failed)} (details in {plan.path / PLAN_FILE}; "
              f"'make continue' retries them)")
