"""The prepared GPU check (issue 16): one command, one JSON of results and a log in OUT_DIR.

    python scripts/gpu_check.py OUT_DIR [--dry-run] [--nanogpt PATH] [--only STEP,...] [--budget STEP=S,...]
    SKIP_SETUP=1 PYTHON=python3 make gpu-check OUT=OUT_DIR [GPU_CHECK_ARGS="--nanogpt PATH"]

Steps, in order, each in its own process with a time budget (a step over it is stopped and
recorded as "timeout"; the items it finished are kept), each failure recorded and the next step
run all the same; OUT_DIR/gpu_check.json is rewritten atomically after every step, so a check
killed at the machine's limit still leaves the steps done:

0. wheels: kconfiglib and torchao, when this interpreter lacks them, installed offline from the
   carried wheels/ folder (scripts/gpu_wheels.py downloads it on a machine with the registry);
1. tests: ``pytest -m gpu tests/gpu`` (the GPU tier; GPU_CHECK_DRY_RUN=1 under --dry-run), counts
   from its JUnit XML;
2. memory: train/memory.py's prediction vs the measured peak on seven configs
   (scripts/gpu_check_memory.py);
3. bench: tokens/s and MFU of GPT-2 124M eager and compiled (nanoGPT beside it with --nanogpt),
   MoE vs dense, the 1.35B LLaMA-style model bf16 vs float8 (scripts/gpu_check_bench.py).

--dry-run runs the same steps at tiny shapes on CPU (tests/test_gpu_check.py runs it). docs/gpu.md
describes the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kconfig.atomic import atomic_write  # noqa: E402 (kconfig/atomic.py needs no kconfiglib)

STEPS = ("wheels", "tests", "memory", "bench")
# Seconds per step on the GPU: under 8 minutes together, inside one 10-minute command.
BUDGETS = {"wheels": 60, "tests": 120, "memory": 150, "bench": 210}
DRY_BUDGETS = {"wheels": 60, "tests": 120, "memory": 60, "bench": 60}
WHEELS = ROOT / "wheels"
SITE = Path(tempfile.gettempdir()) / "gpu_check_site"  # outside OUT_DIR: it does not travel back
NEEDED = ("kconfiglib", "torchao")  # what the GPU machine's image lacks (KINDS.md)
TAIL = 40  # lines of a failed step's output kept in the JSON (the log has all of it)


def parse_budgets(text: str, budgets: dict[str, int]) -> dict[str, int]:
    out = dict(budgets)
    for part in filter(None, text.split(",")):
        name, _, seconds = part.partition("=")
        if name not in STEPS or not seconds.isdigit():
            raise SystemExit(f"--budget {part!r}: expected STEP=SECONDS with STEP one of {', '.join(STEPS)}")
        out[name] = int(seconds)
    return out


def environment() -> dict:
    """Device, versions, command line and git commit: what the figures were measured with."""
    import torch

    env = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "host": platform.node(),
           "command": [sys.executable, *sys.argv], "torchao": None, "kconfiglib": None}
    if torch.cuda.is_available():
        env.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   device_memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    else:
        env.update(device=f"cpu ({os.cpu_count()} cores)", capability=None)
    for name in ("torchao", "kconfiglib"):
        try:
            from importlib.metadata import version
            env[name] = version(name)
        except Exception:  # noqa: BLE001 (not installed)
            pass
    env["git"] = git_state()
    return env


def git_state() -> dict:
    def git(*args):
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


class Check:
    """The results file and the log, both under ``out``."""

    def __init__(self, out: Path, args):
        self.out, self.args = out, args
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out / "gpu_check.log"
        self.log_path.write_text("")
        self.data = {"dry_run": args.dry_run, "started": now(), "finished": None, "environment": None,
                     "budgets_s": args.budgets, "steps": {}}
        self.write()

    def log(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log_path, "a") as f:
            f.write(text.rstrip("\n") + "\n")

    def since(self, offset: int) -> str:
        """The log's text from byte ``offset`` on (a step's output)."""
        return self.log_path.read_bytes()[offset:].decode(errors="replace")

    def write(self) -> None:
        text = json.dumps(self.data, indent=2, default=str) + "\n"
        atomic_write(self.out / "gpu_check.json", lambda tmp: Path(tmp).write_text(text))

    def record(self, name: str, entry: dict) -> None:
        self.data["steps"][name] = entry
        self.write()
        self.log(f"== {name}: {entry['status']} in {entry['seconds']:.1f} s"
                 + (f": {entry['error']}" if entry.get("error") else ""))


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_process(check: Check, name: str, command: list[str], budget: int, env: dict | None = None) -> dict:
    """Run ``command`` in its own process group within ``budget`` seconds, its output into the log;
    over budget the whole group is killed. Returns status (ok, failed, timeout), exit code, tail."""
    check.log(f"== {name}: {' '.join(command)} (budget {budget} s)")
    with open(check.log_path, "a") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            code = process.wait(timeout=budget)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code, status = process.wait(), "timeout"
    return {"status": status, "exit_code": code, "command": command}


def output_tail(check: Check, since: int) -> list[str]:
    return check.since(since).splitlines()[-TAIL:]


def step_wheels(check: Check) -> dict:
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if not missing:
        return {"status": "skipped", "reason": f"{', '.join(NEEDED)} already importable; nothing installed"}
    if not WHEELS.is_dir():
        return {"status": "failed", "error": f"{', '.join(missing)} missing and no {WHEELS} folder: run "
                "scripts/gpu_wheels.py on a machine with the package registry and carry wheels/"}
    check.log(f"installing {', '.join(missing)} offline from {WHEELS} into {SITE} (pip --no-index --target), "
              "on every step's PYTHONPATH")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(SITE), "--find-links", str(WHEELS), *missing]
    done = run_process(check, "wheels", pip, check.args.budgets["wheels"])
    if done["status"] == "ok":
        sys.path.insert(0, str(SITE))
        importlib.invalidate_caches()
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")]))
        done["target"] = str(SITE)
    done["installed"] = missing
    return {**done, "status": "passed" if done["status"] == "ok" else done["status"]}


def junit_counts(path: Path) -> dict:
    """Test counts and the names of failed tests from pytest's --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


VERBOSE_LINE = re.compile(r"^(tests/gpu/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)


def verbose_counts(text: str) -> dict:
    """Counts from pytest -v's one line per test, for a tier stopped at its budget (no JUnit file yet)."""
    outcomes = dict(VERBOSE_LINE.findall(text))
    values = list(outcomes.values())
    return {"tests": len(values), "failures": values.count("FAILED"), "errors": values.count("ERROR"),
            "skipped": values.count("SKIPPED") + values.count("XFAIL"),
            "passed": values.count("PASSED") + values.count("XPASS"),
            "failed_tests": [t for t, o in outcomes.items() if o in ("FAILED", "ERROR")], "from": "log (cut short)"}


def step_tests(check: Check) -> dict:
    junit = check.out / "gpu_tests.xml"
    junit.unlink(missing_ok=True)
    since = check.log_path.stat().st_size
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-v", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
    done = run_process(check, "tests", command, check.args.budgets["tests"],
                       {"GPU_CHECK_DRY_RUN": "1"} if check.args.dry_run else None)
    if junit.exists():
        done["counts"] = junit_counts(junit)
    else:
        done["counts"] = verbose_counts(check.since(since))
    if done["status"] == "ok":
        done["status"] = "passed"
    elif done["exit_code"] == 5:
        done["error"] = "pytest collected no tests (exit 5): is tests/gpu there?"
    return done


def step_child(check: Check, name: str, script: str, extra: list[str]) -> dict:
    results = check.out / f"{name}.json"
    results.unlink(missing_ok=True)
    command = [sys.executable, f"scripts/{script}", str(results), *(["--dry-run"] if check.args.dry_run else []),
               *extra]
    done = run_process(check, name, command, check.args.budgets[name])
    if results.exists():
        done["result"] = json.loads(results.read_text())
    failed = [item for item, r in done.get("result", {}).get("items", {}).items() if r["status"] == "failed"]
    if done["status"] == "ok" and failed:
        done.update(status="failed", error=f"item(s) failed: {', '.join(failed)} (see result.items)")
    done["status"] = "passed" if done["status"] == "ok" else done["status"]
    return done


def run_step(check: Check, name: str) -> None:
    since = check.log_path.stat().st_size
    t0 = time.perf_counter()
    try:
        if name == "wheels":
            entry = step_wheels(check)
        elif name == "tests":
            entry = step_tests(check)
        elif name == "memory":
            entry = step_child(check, "memory", "gpu_check_memory.py", [])
        else:
            extra = ["--nanogpt", str(check.args.nanogpt)] if check.args.nanogpt else []
            entry = step_child(check, "bench", "gpu_check_bench.py", extra)
    except Exception as e:  # noqa: BLE001 (the next step runs all the same)
        entry = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    entry["budget_s"] = check.args.budgets[name]
    if entry["status"] == "timeout":
        entry["error"] = f"stopped at its budget of {entry['budget_s']} s; items finished before are kept"
    if entry["status"] in ("failed", "timeout"):
        entry["output_tail"] = output_tail(check, since)
        entry.setdefault("error", f"exit code {entry.get('exit_code')}; see output_tail and gpu_check.log")
    check.record(name, entry)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for gpu_check.json, gpu_check.log and each step's files")
    parser.add_argument("--dry-run", action="store_true", help="the same steps at tiny shapes on CPU")
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout: its model.py timed beside ours")
    parser.add_argument("--only", default="", help=f"comma-separated steps of {', '.join(STEPS)} (default: all)")
    parser.add_argument("--budget", default="", help="STEP=SECONDS,... overriding the per-step budgets")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    if unknown := [s for s in only if s not in STEPS]:
        parser.error(f"--only: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    if args.nanogpt is not None:
        args.nanogpt = args.nanogpt.resolve()  # the steps run from the repository root
    args.budgets = parse_budgets(args.budget, DRY_BUDGETS if args.dry_run else BUDGETS)
    check = Check(args.out.resolve(), args)
    check.log(f"gpu check {'(dry run, CPU) ' if args.dry_run else ''}into {check.out}: "
              f"steps {', '.join(only or STEPS)}")
    for name in STEPS:
        if only and name not in only and name != "wheels":  # a rerun on a fresh machine needs them too
            check.data["steps"][name] = {"status": "skipped", "reason": "not in --only", "seconds": 0.0}
            continue
        if name == "wheels" and args.dry_run:
            check.data["steps"][name] = {"status": "skipped", "reason": "dry run: the venv has them", "seconds": 0.0}
            continue
        if check.data["environment"] is None and name != "wheels":
            check.data["environment"] = environment()  # after the wheels: torchao's version is known
        run_step(check, name)
    if check.data["environment"] is None:
        check.data["environment"] = environment()
    check.data["finished"] = now()
    check.write()
    statuses = {name: step["status"] for name, step in check.data["steps"].items()}
    check.log("gpu check done: " + ", ".join(f"{n} {s}" for n, s in statuses.items()))
    return 0 if all(s in ("passed", "skipped") for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
