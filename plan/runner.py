"""Execute a plan: resolve each run into its own directory, then train them one by one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kbuild.kconfig import ROOT, Config, write_outputs
from plan.plan import Plan, now, run_name


def plan_runs(cfg: Config, overrides: dict[str, object]) -> list[dict]:
    """The runs the configuration describes (single mode: one run)."""
    if cfg.RUN_ABLATION or cfg.RUN_MATRIX:
        mode = "RUN_ABLATION" if cfg.RUN_ABLATION else "RUN_MATRIX"
        raise NotImplementedError(f"CONFIG_{mode}=y: ablation and matrix plans are not available in this "
                                  f"version; select RUN_SINGLE (make menuconfig, Run mode)")
    return [{"name": run_name({}), "overrides": overrides}]


def runs_dir(cfg: Config) -> Path:
    p = Path(cfg.RUNS_DIR)
    return p if p.is_absolute() else ROOT / p


def execute(kconf, cfg: Config, overrides: dict[str, object]) -> Plan:
    """Create the plan, resolve every run into its directory, run them all; return the plan."""
    from data.prepare import prepare

    runs = plan_runs(cfg, overrides)
    data = prepare(cfg, ROOT)  # before any run starts: data errors stop the plan early
    plan = Plan.create(runs_dir(cfg), cfg.PLAN_NAME, "single", runs)
    print(f"plan: {plan.path} ({len(runs)} run{'s' if len(runs) != 1 else ''})", flush=True)
    for run in plan.runs:
        write_outputs(kconf, plan.run_dir(run["name"]) / ".config", plan.run_dir(run["name"]) / "config.py")
    for run in plan.runs:
        train_one(plan, run["name"])
    print_summary(plan, data.manifest)
    return plan


def train_one(plan: Plan, name: str) -> None:
    """Train one run in a child process; a failure is recorded, never raised."""
    run_dir = plan.run_dir(name)
    plan.update(name, status="running", start=now(), error=None)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        code = subprocess.call([sys.executable, "-m", "train", str(run_dir)], cwd=ROOT, env=env)
    except KeyboardInterrupt:
        plan.update(name, status="interrupted", end=now(), error="interrupted by the user")
        raise
    summary = read_summary(run_dir)
    if code == 0 and summary.get("status") == "done":
        plan.update(name, status="done", end=now())
    else:
        error = summary.get("error") or f"training exited with code {code}; see {run_dir / 'train.log'}"
        plan.update(name, status="interrupted" if code == 130 else "failed", end=now(), error=error)


def read_summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def print_summary(plan: Plan, manifest: dict) -> None:
    print(f"\n=== plan {plan.path.name} ===")
    for run in plan.runs:
        run_dir = plan.run_dir(run["name"])
        s = read_summary(run_dir)
        print(f"run directory:   {run_dir}")
        if run["status"] != "done":
            print(f"status:          {run['status']}: {run['error']}")
            continue
        print(f"final loss:      train {s['final_train_loss']:.4f} | val {s['final_val_loss']:.4f} "
              f"(best val {s['best_val_loss']:.4f} at step {s['best_val_step']})")
        print(f"unigram entropy: {s['unigram_entropy_nats']:.4f} nats/token (a model that ignores context)")
        speed = f"{s['tokens_per_s']:,.0f} tokens/s, {s['flops_per_s'] / 1e9:.1f} GFLOP/s"
        if s["mfu"] is not None:
            speed += f", MFU {100 * s['mfu']:.1f}%"
        print(f"throughput:      {speed} on {s['device']}")
        print(f"wall time:       {s['wall_time_s']:.1f}s for {s['steps']} steps, {s['params']:,} parameters")
        print(f"sample:\n{s['sample']}")
    failed = [r["name"] for r in plan.runs if r["status"] != "done"]
    if failed:
        print(f"\n{len(failed)} run(s) did not finish: {', '.join(failed)} (details in {plan.path / 'plan.json'})")
