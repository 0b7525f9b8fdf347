"""The CPU speedrun against nanoGPT's CPU recipe: python scripts/bench_speedrun.py [--data-path PATH] [--json FILE]

Trains two presets one after the other in this invocation, on the same data (the embedded corpus, 4 MB, unless
--data-path names another file or folder), with the same tokenizer (char) and held-out split:
  - nanogpt-shakespeare-char-cpu, moved onto that data (its own dataset is Shakespeare);
  - speedrun-cpu, the fastest configuration this project expresses to the same validation loss.
Each run goes through the real runner (`python -m kbuild run` on its own KCONFIG_CONFIG, outputs in a
temporary RUNS_DIR). Afterwards both final checkpoints are scored by the same evaluation: one pass over the
whole validation split in 64-token windows (evaluation/bits_per_byte.py), so neither run's EVAL_BATCHES or
micro-batch choice moves the comparison. Printed: each run's wall time (the trainer's, from its first step;
and the whole command's, data and model build included), tokens, the shared evaluation's loss and bits per
byte, and the ratios. --repeat N trains each preset N times, alternating (baseline, speedrun, speedrun,
baseline, ...), and compares the median wall times: the machine's noise then hits both alike. --threads sets
CPU_THREADS for both (0: every core). Exit status 1 when a run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASELINE, SPEEDRUN = "nanogpt-shakespeare-char-cpu", "speedrun-cpu"
EVAL_WINDOW = 64  # both presets' BLOCK_SIZE: the shared evaluation scores every token from the same context


def data_overrides(data_path: str | None) -> str:
    """The same data for both presets: the embedded corpus (4 MB), or DATA_PATH."""
    if data_path:
        return f'DATA_PATH="{Path(data_path).resolve()}"'
    return "DATASET_EMBEDDED=y EMBEDDED_CORPUS_MB=4"


def train(preset: str, workdir: Path, overrides: str, log) -> dict:
    """Configure ``preset`` in its own configuration file, run it, and return what it left."""
    env = {**os.environ, "KCONFIG_CONFIG": str(workdir / f"{preset}.config"), "PYTHONUNBUFFERED": "1"}
    env.pop("SET", None)
    python = sys.executable
    subprocess.run([python, "-m", "kbuild", "defconfig", preset], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    sets = f'{overrides} RUNS_DIR="{workdir / "runs"}" PLAN_NAME={preset} SAMPLE_TOKENS=1 PROGRESS_BAR=n'
    t0 = time.perf_counter()
    done = subprocess.run([python, "-m", "kbuild", "run", "--set", sets], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    command_s = time.perf_counter() - t0
    (workdir / f"{preset}.log").write_text(done.stdout)
    runs = sorted((workdir / "runs").glob(f"{preset}-*/base/summary.json"))
    if done.returncode or not runs:
        log(done.stdout[-3000:])
        raise SystemExit(f"{preset}: the run failed (exit status {done.returncode}); log: {workdir / preset}.log")
    summary = json.loads(runs[-1].read_text())
    return {"preset": preset, "run_dir": str(runs[-1].parent), "command_s": command_s, **summary}


def shared_evaluation(run_dir: str) -> dict:
    """The whole validation split, scored by the final checkpoint in EVAL_WINDOW-token windows."""
    from data.cache import token_byte_lengths
    from data.prepare import prepare
    from evaluation.bits_per_byte import bits_per_byte
    from evaluation.load import load_checkpoint

    model, _, info = load_checkpoint(Path(run_dir), "latest")
    if model.config.block_size != EVAL_WINDOW:
        raise SystemExit(f"{run_dir}: BLOCK_SIZE={model.config.block_size}; the shared evaluation needs "
                         f"{EVAL_WINDOW} for both presets (same windows, same context)")
    data = prepare(info["config"], ROOT, log=lambda message: None)
    return bits_per_byte(model, data.tokens("val"), token_byte_lengths(data.tokenizer), batch_size=64)


def order(repeat: int) -> list[str]:
    """Baseline and speedrun alternating in ABBA order, ``repeat`` runs of each."""
    pairs = [(BASELINE, SPEEDRUN) if i % 2 == 0 else (SPEEDRUN, BASELINE) for i in range(repeat)]
    return [preset for pair in pairs for preset in pair]


def merge(runs: list[dict]) -> dict:
    """One preset's repeated runs: the first run's figures (the training is deterministic), its median walls."""
    return {**runs[0], "wall_time_s": statistics.median(r["wall_time_s"] for r in runs),
            "command_s": statistics.median(r["command_s"] for r in runs),
            "wall_times_s": [r["wall_time_s"] for r in runs]}


def report(runs: list[dict]) -> dict:
    base, fast = runs
    return {
        "baseline": base["preset"], "speedrun": fast["preset"], "repeat": len(base["wall_times_s"]),
        "train_wall_ratio": fast["wall_time_s"] / base["wall_time_s"],
        "command_wall_ratio": fast["command_s"] / base["command_s"],
        "val_loss_difference": fast["eval"]["nats_per_token"] - base["eval"]["nats_per_token"],
        "reached": fast["eval"]["nats_per_token"] <= base["eval"]["nats_per_token"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", help="a text file or folder for both presets (default: the embedded corpus)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--threads", type=int, default=0, help="CPU_THREADS for both runs (0: every core)")
    parser.add_argument("--keep", type=Path, help="keep the runs in this folder (default: a temporary one)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each preset, alternating (median walls)")
    args = parser.parse_args(argv)
    overrides = f"{data_overrides(args.data_path)} CPU_THREADS={args.threads}"
    with tempfile.TemporaryDirectory(prefix="speedrun-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        done: dict[str, list[dict]] = {BASELINE: [], SPEEDRUN: []}
        for preset in order(args.repeat):
            print(f"training {preset} ...", flush=True)
            run = train(preset, workdir, overrides, print)
            if not done[preset]:  # the training is deterministic: one evaluation per preset
                run["eval"] = shared_evaluation(run["run_dir"])
            done[preset].append(run)
        runs = [merge(done[BASELINE]), merge(done[SPEEDRUN])]
        result = report(runs)
    print(f"\ndata: {args.data_path or 'embedded corpus (4 MB)'}, char tokenizer, whole val split in "
          f"{EVAL_WINDOW}-token windows" + (f"; median wall of {args.repeat} runs each" if args.repeat > 1 else ""))
    print(f"{'preset':<30} {'steps':>6} {'tokens':>10} {'train s':>8} {'command s':>10} {'val loss':>9} {'val bpb':>8}")
    for run in runs:
        e = run["eval"]
        print(f"{run['preset']:<30} {run['steps']:>6} {run['tokens']:>10,} {run['wall_time_s']:>8.1f} "
              f"{run['command_s']:>10.1f} {e['nats_per_token']:>9.4f} {e['bpb']:>8.4f}")
    verdict = "reaches" if result["reached"] else "does NOT reach"
    print(f"speedrun / baseline wall time: {result['train_wall_ratio']:.3f} (training), "
          f"{result['command_wall_ratio']:.3f} (whole command); the speedrun {verdict} the baseline's val loss "
          f"({result['val_loss_difference']:+.4f} nats/token)")
    if args.json:
        keep = ("preset", "steps", "tokens", "wall_time_s", "wall_times_s", "command_s", "tokens_per_s", "time_split",
                "eval")
        args.json.write_text(json.dumps({**result, "runs": [{k: r.get(k) for k in keep} for r in runs]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
